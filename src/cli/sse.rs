//! A small Server-Sent Events reader over a streaming HTTP body: `event:` and
//! `data:` lines into frames, comments (keep-alives) skipped.

use std::pin::Pin;

use bytes::Bytes;
use futures::{Stream, StreamExt};

/// The largest frame kept; a longer one is an error, not an allocation.
const MAX_FRAME: usize = 4 * 1024 * 1024;

/// One frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub event: String,
    pub data: String,
}

pub struct Reader {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buffer: Vec<u8>,
}

impl Reader {
    pub fn new(response: reqwest::Response) -> Reader {
        Reader { body: Box::pin(response.bytes_stream()), buffer: Vec::new() }
    }

    /// The next frame; `None` when the stream ended.
    pub async fn next(&mut self) -> Result<Option<Frame>, String> {
        loop {
            if let Some(frame) = take_frame(&mut self.buffer) {
                match frame {
                    Some(frame) => return Ok(Some(frame)),
                    None => continue,
                }
            }
            if self.buffer.len() > MAX_FRAME {
                return Err(format!("an event larger than {MAX_FRAME} bytes"));
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buffer.extend(chunk.iter().copied().filter(|b| *b != b'\r')),
                Some(Err(e)) => return Err(format!("the event stream broke: {e}")),
                None => return Ok(None),
            }
        }
    }
}

/// Takes one block off the buffer: `Some(Some(frame))`, `Some(None)` for a
/// block of comments only, `None` when no whole block is buffered yet.
fn take_frame(buffer: &mut Vec<u8>) -> Option<Option<Frame>> {
    let end = buffer.windows(2).position(|w| w == b"\n\n")?;
    let block: Vec<u8> = buffer.drain(..end + 2).collect();
    let block = String::from_utf8_lossy(&block);
    let mut event = None;
    let mut data: Option<String> = None;
    for line in block.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event = Some(value.to_string()),
            "data" => match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_string()),
            },
            _ => {}
        }
    }
    if event.is_none() && data.is_none() {
        return Some(None);
    }
    Some(Some(Frame { event: event.unwrap_or_else(|| "message".into()), data: data.unwrap_or_default() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_comments() {
        let mut buffer = b": keepalive\n\ndata: {\"a\":1}\n\nevent: done\ndata: x\ndata: y\n\npartial".to_vec();
        assert_eq!(take_frame(&mut buffer), Some(None));
        assert_eq!(take_frame(&mut buffer), Some(Some(Frame { event: "message".into(), data: "{\"a\":1}".into() })));
        assert_eq!(take_frame(&mut buffer), Some(Some(Frame { event: "done".into(), data: "x\ny".into() })));
        assert_eq!(take_frame(&mut buffer), None);
        assert_eq!(buffer, b"partial");
    }
}

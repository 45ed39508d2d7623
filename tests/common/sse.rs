//! Reads a Server-Sent Events body frame by frame (id, event, data), skipping
//! comments (keep-alives), for tests of the streaming routes.

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde_json::Value;

/// One frame with an event or data.
#[derive(Debug, Clone)]
pub struct Frame {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

impl Frame {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("frame data is not JSON ({e}): {}", self.data))
    }
}

pub struct SseReader {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buffer: Vec<u8>,
}

impl SseReader {
    /// A reader over a 200 `text/event-stream` response.
    pub fn new(response: reqwest::Response) -> SseReader {
        let status = response.status();
        let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_string());
        assert_eq!(status, 200, "content-type {content_type:?}");
        assert!(content_type.as_deref().is_some_and(|c| c.starts_with("text/event-stream")), "{content_type:?}");
        SseReader { body: Box::pin(response.bytes_stream()), buffer: Vec::new() }
    }

    /// The next frame, waiting at most `limit`: `None` when the body ended or
    /// nothing came in time.
    pub async fn next_within(&mut self, limit: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let block = String::from_utf8(block).expect("UTF-8 frames");
                let mut frame = Frame { id: None, event: None, data: String::new() };
                let mut has_data = false;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        frame.id = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        frame.event = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        if has_data {
                            frame.data.push('\n');
                        }
                        frame.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                        has_data = true;
                    }
                }
                if frame.event.is_some() || has_data {
                    return Some(frame);
                }
                continue;
            }
            let chunk = tokio::time::timeout_at(deadline, self.body.next()).await.ok()??;
            self.buffer.extend(chunk.expect("SSE body").iter().copied().filter(|b| *b != b'\r'));
        }
    }

    /// Frames until `until` matches one (included); panics after `limit`.
    pub async fn until(&mut self, limit: Duration, until: impl Fn(&Frame) -> bool) -> Vec<Frame> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frame = self
                .next_within(left)
                .await
                .unwrap_or_else(|| panic!("stream ended or went quiet; frames so far: {frames:#?}"));
            let done = until(&frame);
            frames.push(frame);
            if done {
                return frames;
            }
        }
    }
}

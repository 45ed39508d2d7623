//! Body extractors whose every failure is an [`ApiError`] with a stable code:
//! malformed JSON, a wrong-typed field (named), a body over the limit, a body
//! not received within the read timeout (408 `body_read_timeout`).

use axum::body::{Body, BodyDataStream, Bytes, HttpBody};
use axum::extract::{FromRequest, Request};
use axum::http::HeaderMap;
use bytes::BytesMut;
use futures::StreamExt;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, Code};

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        read_json(req.into_body()).await.map(JsonBody)
    }
}

/// The request's headers and its JSON body. The headers are moved out of the
/// request, where axum's `HeaderMap` extractor copies them.
pub struct HeadersAndJson<T>(pub HeaderMap, pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for HeadersAndJson<T> {
    type Rejection = ApiError;

    async fn from_request(mut req: Request, state: &S) -> Result<Self, ApiError> {
        let headers = std::mem::take(req.headers_mut());
        let JsonBody(body) = JsonBody::from_request(req, state).await?;
        Ok(HeadersAndJson(headers, body))
    }
}

/// The request's headers, moved out of the request (for handlers with no body,
/// where axum's `HeaderMap` extractor would copy them).
pub struct Headers(pub HeaderMap);

impl<S: Send + Sync> FromRequest<S> for Headers {
    type Rejection = ApiError;

    async fn from_request(mut req: Request, _state: &S) -> Result<Self, ApiError> {
        Ok(Headers(std::mem::take(req.headers_mut())))
    }
}

/// The body's bytes, read in full within the read timeout.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        read(req.into_body()).await.map(RawBody)
    }
}

/// A body read whole, within the read timeout and [`MAX_BODY_BYTES`].
pub async fn read(body: Body) -> Result<Bytes, ApiError> {
    let timeout = crate::http_server::read_timeout();
    match tokio::time::timeout(timeout, read_whole(body)).await {
        Ok(read) => read,
        Err(_) => Err(ApiError::new(
            Code::BodyReadTimeout,
            format!("the request body was not received within {} s", timeout.as_secs()),
        )),
    }
}

/// A body read as [`read`] does and parsed as [`parse`] does.
pub async fn read_json<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    parse(&read(body).await?)
}

/// The refusal of a body past [`MAX_BODY_BYTES`] (413 `payload_too_large`).
pub fn too_large() -> ApiError {
    ApiError::new(Code::PayloadTooLarge, format!("the request body is larger than {MAX_BODY_BYTES} bytes"))
}

/// Whether `body` declares a length past [`MAX_BODY_BYTES`].
pub fn declared_too_large(body: &Body) -> bool {
    body.size_hint().lower() > MAX_BODY_BYTES as u64
}

/// How much of a body past [`MAX_BODY_BYTES`] is read and dropped before its
/// 413 goes out. A connection answered and closed while its body is still
/// arriving is reset by the kernel, and a client still sending then sees a
/// broken pipe instead of the answer.
const DRAIN_BYTES: usize = 4 * MAX_BODY_BYTES;

/// Reads `body` whole, refusing it past [`MAX_BODY_BYTES`] (by its declared
/// length before keeping any of it). A body that arrives in one piece, as a
/// small JSON body does, is that piece: not copied, not collected.
async fn read_whole(body: Body) -> Result<Bytes, ApiError> {
    let broken = |e: axum::Error| ApiError::new(Code::InvalidRequest, format!("cannot read the request body: {e}"));
    if declared_too_large(&body) {
        // Past the drain too: answered at once (the client may see a reset).
        if body.size_hint().lower() > DRAIN_BYTES as u64 {
            return Err(too_large());
        }
        return Err(refused(body.into_data_stream(), 0).await);
    }
    let mut pieces = body.into_data_stream();
    let Some(first) = pieces.next().await.transpose().map_err(broken)? else { return Ok(Bytes::new()) };
    if first.len() > MAX_BODY_BYTES {
        return Err(refused(pieces, first.len()).await);
    }
    let Some(second) = pieces.next().await.transpose().map_err(broken)? else { return Ok(first) };
    let mut whole = BytesMut::from(first);
    let mut next = Some(second);
    while let Some(piece) = next {
        if whole.len() + piece.len() > MAX_BODY_BYTES {
            return Err(refused(pieces, whole.len() + piece.len()).await);
        }
        whole.extend_from_slice(&piece);
        next = pieces.next().await.transpose().map_err(broken)?;
    }
    Ok(whole.freeze())
}

/// The 413 for a body past the limit, once the rest of it is read and
/// dropped (`read` bytes of it are already read), up to [`DRAIN_BYTES`].
async fn refused(mut pieces: BodyDataStream, mut read: usize) -> ApiError {
    while read <= DRAIN_BYTES {
        match pieces.next().await {
            Some(Ok(piece)) => read += piece.len(),
            _ => break,
        }
    }
    too_large()
}

/// Parses a JSON body into `T`, naming the field at fault.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(Code::InvalidJson, "the request body is empty; send a JSON object"));
    }
    // The path to a bad field is tracked only once the body is known to be bad.
    if let Ok(parsed) = serde_json::from_slice(bytes) {
        return Ok(parsed);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::new(Code::InvalidJson, format!("the request body is not valid JSON: {inner}"))
        } else if path == "." {
            ApiError::new(Code::InvalidRequest, format!("the request body must be a JSON object: {inner}"))
        } else {
            ApiError::new(Code::InvalidRequest, format!("field `{path}`: {inner}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Message {
        #[allow(dead_code)]
        message: String,
    }

    fn streamed(pieces: Vec<Result<&'static [u8], &'static str>>) -> Body {
        let pieces = pieces.into_iter().map(|piece| piece.map(Bytes::from_static).map_err(std::io::Error::other));
        Body::from_stream(futures::stream::iter(pieces))
    }

    #[tokio::test]
    async fn a_body_is_read_whole_in_one_piece_or_many() {
        assert_eq!(read_whole(Body::from("{\"a\": 1}")).await.unwrap(), "{\"a\": 1}");
        assert_eq!(read_whole(Body::empty()).await.unwrap(), "");
        let pieces = streamed(vec![Ok(b"{\"message\""), Ok(b""), Ok(b": \"hi\""), Ok(b"}")]);
        assert_eq!(read_whole(pieces).await.unwrap(), "{\"message\": \"hi\"}");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_or_broken_is_refused_with_its_code() {
        let declared = Body::from(vec![b' '; MAX_BODY_BYTES + 1]);
        assert_eq!(read_whole(declared).await.unwrap_err().code, Code::PayloadTooLarge);
        static HALF: [u8; MAX_BODY_BYTES / 2 + 1] = [b' '; MAX_BODY_BYTES / 2 + 1];
        let grown = streamed(vec![Ok(&HALF), Ok(&HALF)]);
        assert_eq!(read_whole(grown).await.unwrap_err().code, Code::PayloadTooLarge);
        let exactly = streamed(vec![Ok(&HALF), Ok(&HALF[2..])]);
        assert_eq!(read_whole(exactly).await.unwrap().len(), MAX_BODY_BYTES);
        let broken = read_whole(streamed(vec![Ok(b"{"), Err("connection reset")])).await.unwrap_err();
        assert_eq!(broken.code, Code::InvalidRequest);
        assert!(broken.message.contains("connection reset"), "{}", broken.message);
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(parse::<Message>(b"").unwrap_err().code, Code::InvalidJson);
        assert_eq!(parse::<Message>(b"{\"message\": ").unwrap_err().code, Code::InvalidJson);
        let wrong = parse::<Message>(b"{\"message\": 5}").unwrap_err();
        assert_eq!(wrong.code, Code::InvalidRequest);
        assert!(wrong.message.contains("`message`"), "{}", wrong.message);
        assert_eq!(parse::<Message>(b"[1]").unwrap_err().code, Code::InvalidRequest);
    }
}

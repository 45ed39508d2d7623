//! One delivery attempt: a signed POST of the exact body bytes, and what its
//! outcome means for retrying.

use std::error::Error as _;
use std::time::Duration;

use reqwest::header::{HeaderMap, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use reqwest::StatusCode;

use super::sign::signature_headers;
use super::target::{GuardedResolver, RefusedAddress};

/// `muxi-rt/<version>`.
pub const USER_AGENT: &str = concat!("muxi-rt/", env!("CARGO_PKG_VERSION"));

/// The longest `Retry-After` honoured: a receiver cannot park a delivery for days.
const MAX_RETRY_AFTER: Duration = crate::time::MAX_RETRY_AFTER;

/// The HTTP client for webhooks: never follows redirects, ignores proxy settings,
/// and resolves names through [`GuardedResolver`] (see [`super::target`] on DNS
/// rebinding). Hosts in `allow_hosts` may resolve to internal addresses.
pub fn webhook_client(allow_hosts: &[String]) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(std::sync::Arc::new(GuardedResolver::new(allow_hosts)))
        .connect_timeout(Duration::from_secs(10))
        .build()
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptResult {
    /// A 2xx answer.
    Delivered,
    /// Worth trying again, no sooner than `retry_after` when the receiver said so.
    Retry { error: String, retry_after: Option<Duration> },
    /// Never worth trying again (410 Gone, or the target resolves to a refused address).
    Gone { error: String },
}

/// POSTs `body` to `url` once, signed with `secret` (when any), bounded by `timeout`.
///
/// The client should come from [`webhook_client`]: it must not follow redirects,
/// since a 3xx is reported as a retryable error naming the `Location`.
pub async fn attempt(
    client: &reqwest::Client,
    url: &str,
    webhook_id: &str,
    body: &[u8],
    secret: Option<&str>,
    timeout: Duration,
) -> AttemptResult {
    let timestamp = crate::time::now_ms() / 1000;
    let mut request = client
        .post(url)
        .timeout(timeout)
        .header(CONTENT_TYPE, "application/json")
        .header(reqwest::header::USER_AGENT, USER_AGENT);
    for (name, value) in signature_headers(secret, webhook_id, timestamp, body) {
        request = request.header(name, value);
    }
    let response = match request.body(body.to_vec()).send().await {
        Ok(response) => response,
        Err(err) => return send_error(err, timeout),
    };
    let status = response.status();
    if status.is_success() {
        AttemptResult::Delivered
    } else if status == StatusCode::GONE {
        AttemptResult::Gone { error: "HTTP 410 Gone: the receiver asked to stop".into() }
    } else if status.is_redirection() {
        let location = header_str(response.headers(), LOCATION.as_str())
            .map(|l| truncate(l, 200))
            .unwrap_or_else(|| "nowhere (no Location header)".into());
        AttemptResult::Retry {
            error: format!("redirect not followed (status {} to {location})", status.as_u16()),
            retry_after: None,
        }
    } else {
        let retry_after = header_str(response.headers(), RETRY_AFTER.as_str())
            .and_then(|v| parse_retry_after(v, crate::time::now_ms()));
        AttemptResult::Retry { error: format!("HTTP {}", status.as_u16()), retry_after }
    }
}

/// A transport failure as an attempt result; never includes the URL (it may carry tokens).
fn send_error(err: reqwest::Error, timeout: Duration) -> AttemptResult {
    let err = err.without_url();
    let mut source = err.source();
    while let Some(cause) = source {
        if let Some(refused) = cause.downcast_ref::<RefusedAddress>() {
            return AttemptResult::Gone { error: format!("target refused: {refused}") };
        }
        source = cause.source();
    }
    let error = if err.is_timeout() {
        format!("timed out after {:.1} s", timeout.as_secs_f64())
    } else if err.is_connect() {
        format!("connection failed: {}", root_cause(&err))
    } else {
        format!("request failed: {}", root_cause(&err))
    };
    AttemptResult::Retry { error, retry_after: None }
}

/// The innermost message of an error chain ("Connection refused (os error 111)").
fn root_cause(err: &reqwest::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message = cause.to_string();
        source = cause.source();
    }
    message
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// `Retry-After` as delay-seconds or an HTTP date (relative to `now_ms`), capped at
/// one hour; a date in the past means no wait.
pub fn parse_retry_after(value: &str, now_ms: i64) -> Option<Duration> {
    crate::time::retry_after(value, now_ms).map(|delay| delay.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::VecDeque;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap as AxHeaders, StatusCode as AxStatus};
    use axum::response::{IntoResponse, Response};
    use base64::engine::general_purpose::STANDARD as BASE64;
    use base64::Engine as _;
    use hmac::{Hmac, Mac};
    use sha2::Sha256;

    /// How the test receiver answers one request.
    #[derive(Clone)]
    enum Answer {
        Status(u16),
        StatusWith(u16, &'static str, &'static str),
        Hang,
    }

    #[derive(Default)]
    struct Receiver {
        script: Mutex<VecDeque<Answer>>,
        seen: Mutex<Vec<(AxHeaders, Bytes)>>,
    }

    async fn receive(State(rx): State<Arc<Receiver>>, headers: AxHeaders, body: Bytes) -> Response {
        rx.seen.lock().expect("lock").push((headers, body));
        let answer = rx.script.lock().expect("lock").pop_front().unwrap_or(Answer::Status(200));
        match answer {
            Answer::Status(code) => AxStatus::from_u16(code).expect("status").into_response(),
            Answer::StatusWith(code, name, value) => {
                (AxStatus::from_u16(code).expect("status"), [(name, value)]).into_response()
            }
            Answer::Hang => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                AxStatus::OK.into_response()
            }
        }
    }

    /// A real HTTP receiver on 127.0.0.1:0 answering by `script`, then 200.
    async fn receiver(script: Vec<Answer>) -> (String, Arc<Receiver>) {
        let rx = Arc::new(Receiver { script: Mutex::new(script.into()), ..Default::default() });
        let app = axum::Router::new().route("/hook", axum::routing::post(receive)).with_state(rx.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (format!("http://{addr}/hook"), rx)
    }

    fn client() -> reqwest::Client {
        webhook_client(&["127.0.0.1".to_string()]).expect("client")
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    fn hmac(key: &[u8], message: &[u8]) -> Vec<u8> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
        mac.update(message);
        mac.finalize().into_bytes().to_vec()
    }

    fn header<'a>(headers: &'a AxHeaders, name: &str) -> &'a str {
        headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_else(|| panic!("missing {name}"))
    }

    #[tokio::test]
    async fn signatures_verify_over_the_raw_body() {
        let (url, rx) = receiver(vec![]).await;
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        // Deliberately not canonical JSON: the receiver must see these exact bytes.
        let body = br#"{"id":"req_1",  "text":"caf\u00e9"}"#;
        let result = attempt(&client(), &url, "wh_42", body, Some(secret), TIMEOUT).await;
        assert_eq!(result, AttemptResult::Delivered);

        let seen = rx.seen.lock().expect("lock");
        let (headers, raw) = &seen[0];
        assert_eq!(raw.as_ref(), body);
        assert_eq!(header(headers, "content-type"), "application/json");
        assert_eq!(header(headers, "user-agent"), USER_AGENT);
        assert_eq!(header(headers, "webhook-id"), "wh_42");

        // X-Muxi-Signature: t=<t>,v1=<hex HMAC(secret as written, "<t>." + body)>.
        let muxi = header(headers, "x-muxi-signature");
        let (t, v1) = muxi
            .strip_prefix("t=")
            .and_then(|rest| rest.split_once(",v1="))
            .unwrap_or_else(|| panic!("bad header {muxi}"));
        assert!((t.parse::<i64>().expect("t") - crate::time::now_ms() / 1000).abs() < 60);
        let signed = [format!("{t}.").as_bytes(), raw.as_ref()].concat();
        assert_eq!(v1, hex::encode(hmac(secret.as_bytes(), &signed)));

        // Standard Webhooks: v1,<base64 HMAC(decoded key, "<id>.<t>." + body)>.
        assert_eq!(header(headers, "webhook-timestamp"), t);
        let key = BASE64.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("key");
        let signed = [format!("wh_42.{t}.").as_bytes(), raw.as_ref()].concat();
        assert_eq!(header(headers, "webhook-signature"), format!("v1,{}", BASE64.encode(hmac(&key, &signed))));
    }

    #[tokio::test]
    async fn plain_secret_and_no_secret() {
        let (url, rx) = receiver(vec![]).await;
        attempt(&client(), &url, "wh_1", b"{}", Some("fma_admin"), TIMEOUT).await;
        attempt(&client(), &url, "wh_2", b"{}", None, TIMEOUT).await;
        let seen = rx.seen.lock().expect("lock");
        assert!(seen[0].0.get("x-muxi-signature").is_some());
        assert!(seen[0].0.get("webhook-signature").is_none());
        assert!(seen[1].0.get("x-muxi-signature").is_none());
        assert_eq!(header(&seen[1].0, "webhook-id"), "wh_2");
        assert!(seen[1].0.get("webhook-timestamp").is_some());
    }

    #[tokio::test]
    async fn server_error_then_success() {
        let (url, rx) = receiver(vec![Answer::StatusWith(503, "retry-after", "7"), Answer::Status(500)]).await;
        let c = client();
        assert_eq!(
            attempt(&c, &url, "wh", b"{}", None, TIMEOUT).await,
            AttemptResult::Retry { error: "HTTP 503".into(), retry_after: Some(Duration::from_secs(7)) }
        );
        assert_eq!(
            attempt(&c, &url, "wh", b"{}", None, TIMEOUT).await,
            AttemptResult::Retry { error: "HTTP 500".into(), retry_after: None }
        );
        assert_eq!(attempt(&c, &url, "wh", b"{}", None, TIMEOUT).await, AttemptResult::Delivered);
        let seen = rx.seen.lock().expect("lock");
        assert_eq!(seen.len(), 3);
        // The id is stable across retries.
        assert!(seen.iter().all(|(h, _)| header(h, "webhook-id") == "wh"));
    }

    #[tokio::test]
    async fn gone_stops() {
        let (url, _rx) = receiver(vec![Answer::Status(410)]).await;
        let result = attempt(&client(), &url, "wh", b"{}", None, TIMEOUT).await;
        assert!(matches!(result, AttemptResult::Gone { .. }), "{result:?}");
    }

    #[tokio::test]
    async fn redirects_are_not_followed() {
        let (url, rx) = receiver(vec![Answer::StatusWith(302, "location", "http://169.254.169.254/latest")]).await;
        let result = attempt(&client(), &url, "wh", b"{}", None, TIMEOUT).await;
        assert_eq!(
            result,
            AttemptResult::Retry {
                error: "redirect not followed (status 302 to http://169.254.169.254/latest)".into(),
                retry_after: None,
            }
        );
        assert_eq!(rx.seen.lock().expect("lock").len(), 1);
    }

    #[tokio::test]
    async fn a_hanging_receiver_times_out() {
        let (url, _rx) = receiver(vec![Answer::Hang]).await;
        let started = std::time::Instant::now();
        let result = attempt(&client(), &url, "wh", b"{}", None, Duration::from_millis(300)).await;
        assert_eq!(result, AttemptResult::Retry { error: "timed out after 0.3 s".into(), retry_after: None });
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn connection_refused_is_retried() {
        // Bind then drop a listener: nothing answers on that port.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let result = attempt(&client(), &format!("http://{addr}/hook"), "wh", b"{}", None, TIMEOUT).await;
        match result {
            AttemptResult::Retry { error, .. } => assert!(error.starts_with("connection failed"), "{error}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn refused_names_are_gone_at_connect_time() {
        // Not allow-listed: the guarded resolver refuses what `localhost` resolves to.
        let (url, rx) = receiver(vec![]).await;
        let url = url.replace("127.0.0.1", "localhost");
        let result = attempt(&webhook_client(&[]).expect("client"), &url, "wh", b"{}", None, TIMEOUT).await;
        match result {
            AttemptResult::Gone { error } => assert!(error.contains("loopback"), "{error}"),
            other => panic!("{other:?}"),
        }
        assert!(rx.seen.lock().expect("lock").is_empty());
    }

    #[test]
    fn retry_after_forms() {
        let now =
            chrono::DateTime::parse_from_rfc2822("Wed, 21 Oct 2015 07:28:00 GMT").expect("date").timestamp_millis();
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:29:30 GMT", now), Some(Duration::from_secs(90)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }
}

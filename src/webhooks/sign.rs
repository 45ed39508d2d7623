//! Signatures over the exact bytes of a webhook body.
//!
//! Two schemes are sent side by side:
//!
//! - **MUXI** (what the MUXI SDK's `muxi.webhook.verify_signature` checks):
//!   `X-Muxi-Signature: t=<unix secs>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`,
//!   the HMAC key being the secret string's bytes as written.
//! - **Standard Webhooks** (<https://www.standardwebhooks.com>), only when the secret
//!   has the form `whsec_<base64>`: `webhook-signature: v1,<base64 HMAC-SHA256(key,
//!   "<id>.<t>." + body)>` where `key` is the base64-decoded part of the secret.
//!
//! `webhook-id` (stable across retries, so receivers can de-duplicate) and
//! `webhook-timestamp` are sent in every case, signed or not.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Header carrying the MUXI signature.
pub const MUXI_SIGNATURE: &str = "x-muxi-signature";
/// Standard Webhooks: the message id (stable across retries).
pub const WEBHOOK_ID: &str = "webhook-id";
/// Standard Webhooks: the unix time (seconds) the attempt was signed.
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
/// Standard Webhooks: `v1,<base64 signature>`.
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";

/// The prefix of a Standard Webhooks secret.
const WHSEC_PREFIX: &str = "whsec_";

/// HMAC-SHA256 of the concatenation of `parts` under `key`.
fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length (long keys are hashed), so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// The `X-Muxi-Signature` value: `t=<t>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`.
pub fn muxi_signature(secret: &str, timestamp_secs: i64, body: &[u8]) -> String {
    let t = timestamp_secs.to_string();
    let mac = hmac_sha256(secret.as_bytes(), &[t.as_bytes(), b".", body]);
    format!("t={t},v1={}", hex::encode(mac))
}

/// The Standard Webhooks `webhook-signature` value (`v1,<base64>`), when `secret`
/// is a `whsec_<base64>` secret whose key decodes; `None` otherwise.
pub fn standard_signature(secret: &str, webhook_id: &str, timestamp_secs: i64, body: &[u8]) -> Option<String> {
    let key = BASE64.decode(secret.strip_prefix(WHSEC_PREFIX)?).ok()?;
    let t = timestamp_secs.to_string();
    let mac = hmac_sha256(&key, &[webhook_id.as_bytes(), b".", t.as_bytes(), b".", body]);
    Some(format!("v1,{}", BASE64.encode(mac)))
}

/// Every signing header for one attempt, as `(name, value)` pairs.
///
/// Without a secret only `webhook-id` and `webhook-timestamp` are produced.
pub fn signature_headers(
    secret: Option<&str>,
    webhook_id: &str,
    timestamp_secs: i64,
    body: &[u8],
) -> Vec<(&'static str, String)> {
    let mut headers = vec![(WEBHOOK_ID, webhook_id.to_string()), (WEBHOOK_TIMESTAMP, timestamp_secs.to_string())];
    if let Some(secret) = secret.filter(|s| !s.is_empty()) {
        headers.push((MUXI_SIGNATURE, muxi_signature(secret, timestamp_secs, body)));
        if let Some(signature) = standard_signature(secret, webhook_id, timestamp_secs, body) {
            headers.push((WEBHOOK_SIGNATURE, signature));
        } else if secret.starts_with(WHSEC_PREFIX) {
            // Say so without ever printing the secret itself.
            tracing::warn!("webhook secret starts with whsec_ but is not valid base64: sending only X-Muxi-Signature");
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification.
    #[test]
    fn standard_webhooks_spec_vector() {
        let signature = standard_signature(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature.as_deref(), Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="));
    }

    /// RFC 4231 test case 2: HMAC-SHA256("Jefe", "what do ya want for nothing?").
    #[test]
    fn hmac_primitive_matches_rfc4231() {
        let mac = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(hex::encode(mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn muxi_signature_signs_timestamp_dot_body() {
        let body = br#"{"id":"req_1","status":"completed"}"#;
        let header = muxi_signature("fma_secret", 1_700_000_000, body);
        // Independently: one HMAC over the whole signed string.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"fma_secret").expect("any key length");
        mac.update(br#"1700000000.{"id":"req_1","status":"completed"}"#);
        let expected = hex::encode(mac.finalize().into_bytes());
        assert_eq!(header, format!("t=1700000000,v1={expected}"));
    }

    #[test]
    fn plain_secret_gets_only_the_muxi_signature() {
        let headers = signature_headers(Some("plain"), "wh_1", 10, b"{}");
        let names: Vec<_> = headers.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, [WEBHOOK_ID, WEBHOOK_TIMESTAMP, MUXI_SIGNATURE]);
    }

    #[test]
    fn whsec_secret_gets_both_signatures() {
        let headers = signature_headers(Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), "wh_1", 10, b"{}");
        let names: Vec<_> = headers.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, [WEBHOOK_ID, WEBHOOK_TIMESTAMP, MUXI_SIGNATURE, WEBHOOK_SIGNATURE]);
    }

    #[test]
    fn no_secret_no_signature() {
        let headers = signature_headers(None, "wh_1", 10, b"{}");
        assert_eq!(headers, vec![(WEBHOOK_ID, "wh_1".to_string()), (WEBHOOK_TIMESTAMP, "10".to_string())]);
        assert_eq!(signature_headers(Some(""), "wh_1", 10, b"{}").len(), 2);
    }
}

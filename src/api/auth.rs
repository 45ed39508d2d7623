//! Who may call what: the formation's client key (or its admin key) for client
//! routes, the admin key for admin routes; and whose requests a caller sees.

use std::sync::Arc;

use axum::http::header::AsHeaderName;
use axum::http::{HeaderMap, HeaderName};

use crate::error::{ApiError, ApiResult, Code};
use crate::formation::Formation;
use crate::keys;

use super::AppState;

// Header names as `HeaderName`s: a lookup by `&str` parses the name every time.
pub const CLIENT_KEY: HeaderName = HeaderName::from_static("x-muxi-client-key");
pub const ADMIN_KEY: HeaderName = HeaderName::from_static("x-muxi-admin-key");
pub const USER_ID: HeaderName = HeaderName::from_static("x-muxi-user-id");
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("x-muxi-idempotency-key");

/// The user requests are scoped to when a caller names none.
pub const DEFAULT_USER: &str = "default";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Admin,
}

/// A header's value as text, if present and printable.
pub fn header(headers: &HeaderMap, name: impl AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty())
}

/// The formation, if it exists and the caller holds a key for `role`.
pub fn authorize(state: &AppState, formation_id: &str, headers: &HeaderMap, role: Role) -> ApiResult<Arc<Formation>> {
    let formation = formation(state, formation_id)?;
    let admin_ok = |k: &str| formation.keys.admin.as_deref().is_some_and(|want| keys::matches(want, k));
    let client_ok = |k: &str| formation.keys.client.as_deref().is_some_and(|want| keys::matches(want, k));
    let admin = header(headers, ADMIN_KEY);
    let client = header(headers, CLIENT_KEY);
    let allowed = match role {
        Role::Admin => match admin {
            None => {
                return Err(ApiError::new(
                    Code::MissingApiKey,
                    "this route needs the formation's admin key in the X-Muxi-Admin-Key header",
                ))
            }
            Some(key) => admin_ok(key),
        },
        Role::Client => match (client, admin) {
            (None, None) => {
                return Err(ApiError::new(
                    Code::MissingApiKey,
                    "this route needs the formation's client key in the X-Muxi-Client-Key header",
                ))
            }
            (client, admin) => client.is_some_and(client_ok) || admin.is_some_and(admin_ok),
        },
    };
    if allowed {
        state.rate_limits.check(&formation, headers)?;
        Ok(formation)
    } else {
        Err(ApiError::new(Code::InvalidApiKey, format!("the key given is not valid for formation `{formation_id}`")))
    }
}

/// The formation, with no key check (health).
pub fn formation(state: &AppState, formation_id: &str) -> ApiResult<Arc<Formation>> {
    state.registry.get(formation_id).ok_or_else(|| {
        ApiError::new(Code::FormationNotFound, format!("no formation `{formation_id}` is loaded on this server"))
    })
}

/// The longest user id, session id, agent id or idempotency key accepted.
pub const MAX_ID_LEN: usize = 256;
/// The longest webhook URL accepted.
pub const MAX_URL_LEN: usize = 2048;

/// Whether `value` is 1..=[`MAX_ID_LEN`] visible ASCII characters (0x21..=0x7E).
pub fn is_visible_id(value: &[u8]) -> bool {
    !value.is_empty() && value.len() <= MAX_ID_LEN && value.iter().all(|b| (0x21..=0x7E).contains(b))
}

/// The caller's user id: the body's `user_id`, else the `X-Muxi-User-ID` header,
/// else the default user. A user id given but not 1-256 visible ASCII characters
/// is refused (`invalid_user_id`), never read as another user.
pub fn user_id(headers: &HeaderMap, from_body: Option<&str>) -> ApiResult<String> {
    let invalid = |source: &str| {
        ApiError::new(
            Code::InvalidUserId,
            format!("the user id in {source} must be 1 to {MAX_ID_LEN} visible ASCII characters (no spaces)"),
        )
    };
    if let Some(user) = from_body.map(str::trim).filter(|u| !u.is_empty()) {
        return if is_visible_id(user.as_bytes()) { Ok(user.to_string()) } else { Err(invalid("`user_id`")) };
    }
    let Some(raw) = headers.get(USER_ID) else { return Ok(DEFAULT_USER.to_string()) };
    let raw = raw.as_bytes().trim_ascii();
    if raw.is_empty() {
        return Ok(DEFAULT_USER.to_string());
    }
    if !is_visible_id(raw) {
        return Err(invalid("X-Muxi-User-ID"));
    }
    // Visible ASCII is UTF-8.
    Ok(String::from_utf8_lossy(raw).into_owned())
}

/// Refuses an identifier field that is not 1-256 visible ASCII characters.
pub fn check_id(field: &str, value: &str) -> ApiResult<()> {
    if is_visible_id(value.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::new(
            Code::InvalidRequest,
            format!("{field} must be 1 to {MAX_ID_LEN} visible ASCII characters (no spaces)"),
        ))
    }
}

/// The `X-Muxi-Idempotency-Key` header, if given; refused when it is not 1-256
/// visible ASCII characters.
pub fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(raw) = headers.get(IDEMPOTENCY_KEY) else { return Ok(None) };
    let raw = raw.as_bytes().trim_ascii();
    if raw.is_empty() {
        return Ok(None);
    }
    if !is_visible_id(raw) {
        return Err(ApiError::new(
            Code::InvalidRequest,
            format!("X-Muxi-Idempotency-Key must be 1 to {MAX_ID_LEN} visible ASCII characters (no spaces)"),
        ));
    }
    Ok(Some(String::from_utf8_lossy(raw).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_user(value: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(USER_ID, HeaderValue::from_bytes(value).unwrap());
        headers
    }

    #[test]
    fn user_ids_are_visible_ascii_or_refused() {
        assert_eq!(user_id(&HeaderMap::new(), None).unwrap(), DEFAULT_USER);
        assert_eq!(user_id(&with_user(b" alice "), None).unwrap(), "alice");
        assert_eq!(user_id(&with_user(b"alice"), Some("bob")).unwrap(), "bob");
        assert_eq!(user_id(&with_user(b"   "), None).unwrap(), DEFAULT_USER);
        for bad in [&b"al ice"[..], "al\u{e9}ce".as_bytes(), &[b'a'; MAX_ID_LEN + 1][..], b"a\tb"] {
            let err = user_id(&with_user(bad), None).unwrap_err();
            assert_eq!(err.code, Code::InvalidUserId, "{bad:?}");
        }
        assert_eq!(user_id(&HeaderMap::new(), Some("ali ce")).unwrap_err().code, Code::InvalidUserId);
        assert_eq!(user_id(&HeaderMap::new(), Some("\u{e9}")).unwrap_err().code, Code::InvalidUserId);
        assert!(user_id(&with_user(&[b'a'; MAX_ID_LEN]), None).is_ok());
    }

    #[test]
    fn identifiers_are_bounded() {
        assert!(check_id("`session_id`", "sess_1").is_ok());
        assert_eq!(check_id("`session_id`", &"s".repeat(MAX_ID_LEN + 1)).unwrap_err().code, Code::InvalidRequest);
        let mut headers = HeaderMap::new();
        assert_eq!(idempotency_key(&headers).unwrap(), None);
        headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("k-1"));
        assert_eq!(idempotency_key(&headers).unwrap().as_deref(), Some("k-1"));
        headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_bytes("k\u{e9}".as_bytes()).unwrap());
        assert_eq!(idempotency_key(&headers).unwrap_err().code, Code::InvalidRequest);
    }
}

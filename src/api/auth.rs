//! Who may call what: the formation's client key (or its admin key) for client
//! routes, the admin key for admin routes; and whose requests a caller sees.

use std::sync::Arc;

use axum::http::HeaderMap;

use crate::error::{ApiError, ApiResult, Code};
use crate::formation::Formation;
use crate::keys;

use super::AppState;

pub const CLIENT_KEY: &str = "x-muxi-client-key";
pub const ADMIN_KEY: &str = "x-muxi-admin-key";
pub const USER_ID: &str = "x-muxi-user-id";
pub const IDEMPOTENCY_KEY: &str = "x-muxi-idempotency-key";

/// The user requests are scoped to when a caller names none.
pub const DEFAULT_USER: &str = "default";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Admin,
}

/// A header's value as text, if present and printable.
pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
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

/// The caller's user id: the body's `user_id`, else the `X-Muxi-User-ID` header,
/// else the default user.
pub fn user_id(headers: &HeaderMap, from_body: Option<&str>) -> String {
    from_body
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .or_else(|| header(headers, USER_ID))
        .unwrap_or(DEFAULT_USER)
        .to_string()
}

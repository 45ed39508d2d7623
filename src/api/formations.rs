//! Formation-level routes: health, status, async settings, description; and the
//! server-wide health that also reports files that failed to load.

use super::extract::Path;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{json, Value};

use super::auth::{self, Role};
use super::{envelope, AppState};
use crate::error::ApiResult;

/// `GET /health`: what is loaded, and what failed to load.
///
/// Anyone may ask; file paths and error texts (which name files) are shown only
/// to a caller presenting the admin key of a loaded formation.
pub async fn server_health(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let live = state.registry.snapshot();
    let admin = auth::header(&headers, auth::ADMIN_KEY).is_some_and(|presented| {
        live.formations
            .values()
            .any(|f| f.keys.admin.as_deref().is_some_and(|key| crate::keys::matches(key, presented)))
    });
    let formations: Vec<Value> = live
        .formations
        .values()
        .map(|f| {
            let mut entry = json!({ "id": f.id, "version": f.version, "revision": f.revision });
            if admin {
                entry["file"] = json!(f.source);
            }
            entry
        })
        .collect();
    let failures: Vec<Value> = live
        .failures
        .iter()
        .map(|failure| match admin {
            true => json!(failure),
            false => json!({ "still_serving": failure.still_serving, "errors": failure.errors.len() }),
        })
        .collect();
    let problems = if admin { json!(live.problems) } else { json!(live.problems.len()) };
    let store = state.engine.store().health();
    let store = json!({
        "writable": store.writable,
        "failing_since": store.failing_since.map(crate::time::rfc3339),
        "error": if admin { store.error } else { None },
    });
    let copies = differing_copies(&state, &live, admin).await;
    let healthy = live.failures.is_empty()
        && live.problems.is_empty()
        && store["writable"] == true
        && copies.as_ref().is_none_or(|c| c.is_empty());
    envelope::ok(
        "health",
        None,
        None,
        json!({
            "status": if healthy { "healthy" } else { "degraded" },
            "version": env!("CARGO_PKG_VERSION"),
            "formations": formations,
            "failures": failures,
            "problems": problems,
            "store": store,
            "copies": copies,
        }),
    )
}

/// The loaded formations whose copy here differs from another replica's
/// (as published in the last three lease periods): one entry per other copy.
/// Owner names (they hold host names) only for the admin key. `None` when the
/// store cannot say: `/health` answers anyway.
async fn differing_copies(state: &AppState, live: &crate::registry::Live, admin: bool) -> Option<Vec<Value>> {
    let since = crate::time::now_ms() - 3 * crate::engine::lease().as_millis() as i64;
    let copies = match state.engine.store().formation_copies(since).await {
        Ok(copies) => copies,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read other replicas' formation copies");
            return None;
        }
    };
    let mine = state.engine.owner();
    let differing = copies.into_iter().filter_map(|copy| {
        let here = live.formations.get(&copy.formation_id)?.version_label();
        if copy.owner == mine || copy.revision == here {
            return None;
        }
        let mut entry =
            json!({ "formation": copy.formation_id, "this_replica": here, "other_revision": copy.revision });
        if admin {
            entry["other_replica"] = json!(copy.owner);
        }
        Some(entry)
    });
    Some(differing.collect())
}

/// `GET /api/{id}/v1/health` (no key).
pub async fn health(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let formation = auth::formation(&state, &id)?;
    Ok(envelope::ok(
        "health",
        None,
        None,
        json!({ "status": "healthy", "formation_id": formation.id, "version": formation.version }),
    ))
}

/// `GET /api/{id}/v1/status` (admin key).
pub async fn status(State(state): State<AppState>, Path(id): Path<String>, headers: HeaderMap) -> ApiResult<Response> {
    let formation = auth::authorize(&state, &id, &headers, Role::Admin)?;
    Ok(envelope::ok(
        "status",
        None,
        None,
        json!({
            "status": "running",
            "formation_id": formation.id,
            "version": formation.version,
            "revision": formation.revision,
            "agents": formation.agents.len(),
            "uptime_seconds": state.started_at.elapsed().as_secs(),
            "runtime": { "name": "muxi-rt", "version": env!("CARGO_PKG_VERSION") },
        }),
    ))
}

/// `GET /api/{id}/v1/async` (admin key): the effective settings, defaults filled in.
pub async fn async_settings(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let formation = auth::authorize(&state, &id, &headers, Role::Admin)?;
    let overlord = &formation.overlord;
    let mut data = serde_json::to_value(&overlord.async_).unwrap_or_default();
    if let Value::Object(map) = &mut data {
        map.insert("webhook_secret_set".into(), json!(overlord.async_.webhook_secret.is_some()));
        map.insert("retry".into(), json!(overlord.retry));
        map.insert("timeouts".into(), json!(overlord.timeouts));
        map.insert("max_concurrent_requests".into(), json!(overlord.max_concurrent_requests));
        map.insert("formation_id".into(), json!(formation.id));
    }
    Ok(envelope::ok("async.config", None, None, data))
}

/// `GET /api/{id}/v1/formation` (admin key).
pub async fn describe(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let formation = auth::authorize(&state, &id, &headers, Role::Admin)?;
    let agents: Vec<Value> = formation
        .agents
        .iter()
        .map(|a| {
            let kind = serde_json::to_value(&a.kind).ok().and_then(|k| k.get("kind").cloned());
            json!({ "id": a.id, "name": a.name, "description": a.description, "default": a.default, "kind": kind })
        })
        .collect();
    Ok(envelope::ok(
        "formation",
        None,
        None,
        json!({
            "id": formation.id,
            "version": formation.version,
            "revision": formation.revision,
            "description": formation.description,
            "agents": agents,
        }),
    ))
}

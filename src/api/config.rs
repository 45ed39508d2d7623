//! `GET /agents`, `GET /agents/{id}` and `GET /config` (admin key): the
//! formation's agents and its effective settings, defaults filled in.
//!
//! Secrets never leave: as the MUXI runtime does, every value the formation's
//! files fill from `${{ secrets.NAME }}` is shown as that placeholder again,
//! wherever it appears (an URL, an argument, a header); keys not taken from
//! secrets are shown as `"***"`, as is any settings value whose name says key,
//! secret, token or password.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path as FsPath;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{json, Map, Value};

use super::auth::{self, Role};
use super::{envelope, AppState};
use crate::error::{ApiError, ApiResult, Code};
use crate::formation::{AgentSpec, Formation};

/// What a redacted value is shown as.
pub const REDACTED: &str = "***";
/// The largest formation file read to find the secrets it uses.
const MAX_SCAN_BYTES: u64 = 4 * 1024 * 1024;

/// `GET /agents`.
pub async fn agents(State(state): State<AppState>, Path(id): Path<String>, headers: HeaderMap) -> ApiResult<Response> {
    let formation = auth::authorize(&state, &id, &headers, Role::Admin)?;
    let secrets = secret_values(&formation);
    let agents: Vec<Value> = formation.agents.iter().map(|a| redact(agent_view(a), &secrets)).collect();
    Ok(envelope::ok("agent.list", None, None, json!({ "agents": agents, "count": agents.len() })))
}

/// `GET /agents/{agent_id}`.
pub async fn agent(
    State(state): State<AppState>,
    Path((id, agent_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let formation = auth::authorize(&state, &id, &headers, Role::Admin)?;
    let agent = formation.agents.iter().find(|a| a.id == agent_id).ok_or_else(|| {
        let known: Vec<&str> = formation.agents.iter().map(|a| a.id.as_str()).collect();
        ApiError::new(
            Code::AgentNotFound,
            format!("formation `{id}` has no agent `{agent_id}` (agents: {})", known.join(", ")),
        )
    })?;
    Ok(envelope::ok("agent", None, None, redact(agent_view(agent), &secret_values(&formation))))
}

/// `GET /config`: the effective formation.
pub async fn config(State(state): State<AppState>, Path(id): Path<String>, headers: HeaderMap) -> ApiResult<Response> {
    let formation = auth::authorize(&state, &id, &headers, Role::Admin)?;
    Ok(envelope::ok("formation.config", None, None, effective(&formation)))
}

/// The effective formation with every secret redacted.
pub fn effective(formation: &Formation) -> Value {
    let o = &formation.overlord;
    let mut async_ = serde_json::to_value(&o.async_).unwrap_or_default();
    if let Value::Object(map) = &mut async_ {
        map.insert("webhook_secret".into(), o.async_.webhook_secret.as_ref().map(|_| json!(REDACTED)).into());
    }
    let shown = |key: &Option<String>| key.as_ref().map(|_| REDACTED);
    let llm_keys: Map<String, Value> =
        formation.llm.api_keys.keys().map(|provider| (provider.clone(), json!(REDACTED))).collect();
    let config = json!({
        "schema": "1.0.0",
        "schema_version": "1.0.0",
        "id": formation.id,
        "formation_id": formation.id,
        "version": formation.version,
        "revision": formation.revision,
        "description": formation.description,
        "server": { "api_keys": { "admin_key": shown(&formation.keys.admin), "client_key": shown(&formation.keys.client) } },
        "async": async_,
        "overlord": {
            "max_concurrent_requests": o.max_concurrent_requests,
            "workflow": { "retry": o.retry, "timeouts": o.timeouts },
        },
        "llm": {
            "api_keys": llm_keys,
            "settings": formation.llm.settings,
            "models": formation.llm.models,
        },
        "agents": formation.agents.iter().map(agent_view).collect::<Vec<_>>(),
        "triggers": formation.triggers.keys().collect::<Vec<_>>(),
    });
    redact(config, &secret_values(formation))
}

fn agent_view(agent: &AgentSpec) -> Value {
    let mut view = serde_json::to_value(agent).unwrap_or_default();
    // `kind` is an object tagged by `kind`; show the tag beside the details.
    if let Value::Object(map) = &mut view {
        let kind = map.get("kind").and_then(|k| k.get("kind")).cloned().unwrap_or(Value::Null);
        let details = map.remove("kind").unwrap_or(Value::Null);
        map.insert("type".into(), kind);
        map.insert("settings".into(), details);
    }
    view
}

/// What must never be shown, and what is shown instead: each value this
/// formation took from a secret (as its placeholder), and its keys (`***`).
fn secret_values(formation: &Formation) -> Secrets {
    let mut names = BTreeSet::new();
    let mut files = vec![formation.source.clone()];
    if let Ok(entries) = std::fs::read_dir(formation.dir.join("agents")) {
        files.extend(entries.flatten().map(|e| e.path()).filter(|p| is_formation_file(p)));
    }
    for file in files {
        let small = std::fs::metadata(&file).is_ok_and(|m| m.len() <= MAX_SCAN_BYTES);
        if let Some(text) = small.then(|| std::fs::read_to_string(&file).ok()).flatten() {
            names.extend(secret_names(&text));
        }
    }
    let mut values = Secrets::new();
    let keys = [&formation.keys.admin, &formation.keys.client, &formation.overlord.async_.webhook_secret];
    for key in keys.into_iter().flatten().chain(formation.llm.api_keys.values()) {
        values.insert(key.clone(), REDACTED.to_string());
    }
    for name in names {
        if let Ok(value) = std::env::var(&name) {
            values.insert(value, format!("${{{{ secrets.{name} }}}}"));
        }
    }
    // Very short values would redact ordinary words.
    values.retain(|v, _| v.trim().len() >= 4);
    values
}

/// Secret value -> what is shown in its place.
type Secrets = BTreeMap<String, String>;

fn is_formation_file(path: &FsPath) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("afs" | "yaml" | "yml"))
}

/// The names in every `${{ secrets.NAME }}` of `text`.
fn secret_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${{") {
        let after = &rest[start + 3..];
        let Some(end) = after.find("}}") else { break };
        if let Some(name) = after[..end].trim().strip_prefix("secrets.") {
            let name = name.trim();
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                names.push(name.to_string());
            }
        }
        rest = &after[end + 2..];
    }
    names
}

/// Replaces every occurrence of a secret value in `value`'s strings, and the
/// value of every object key that names a credential.
fn redact(value: Value, secrets: &Secrets) -> Value {
    match value {
        Value::String(mut s) => {
            // Longest first, so a secret containing another is replaced whole.
            let mut ordered: Vec<(&String, &String)> = secrets.iter().collect();
            ordered.sort_by_key(|(secret, _)| std::cmp::Reverse(secret.len()));
            for (secret, shown) in ordered {
                if s.contains(secret.as_str()) {
                    s = s.replace(secret.as_str(), shown);
                }
            }
            Value::String(s)
        }
        Value::Array(items) => Value::Array(items.into_iter().map(|v| redact(v, secrets)).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let v = if credential_name(&k) && v.is_string() { json!(REDACTED) } else { redact(v, secrets) };
                    (k, v)
                })
                .collect(),
        ),
        other => other,
    }
}

fn credential_name(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["key", "secret", "token", "password", "authorization"].iter().any(|word| key.contains(word))
        && !key.ends_with("_set")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_secret_names() {
        let text = "a: ${{ secrets.ONE }}\nb: x-${{secrets.TWO}}-y\nc: ${{ data.x }}\nd: ${{ secrets. }}";
        assert_eq!(secret_names(text), ["ONE", "TWO"]);
    }

    #[test]
    fn redacts_values_anywhere_and_credential_fields() {
        let secrets: Secrets = [
            ("s3cr3t-value".to_string(), "${{ secrets.S }}".to_string()),
            ("s3cr3t-value-longer".to_string(), REDACTED.to_string()),
        ]
        .into();
        let doc = json!({
            "url": "https://h/x?key=s3cr3t-value&a=1",
            "other": "s3cr3t-value-longer",
            "argv": ["run", "--token=s3cr3t-value"],
            "settings": { "api_key": "plain", "api_base": "http://localhost", "max_tokens": 5 },
        });
        let out = redact(doc, &secrets);
        let text = out.to_string();
        assert!(!text.contains("s3cr3t-value"), "{text}");
        assert!(!text.contains("plain"), "{text}");
        assert_eq!(out["settings"]["api_base"], "http://localhost");
        assert_eq!(out["argv"][1], "--token=${{ secrets.S }}");
        assert_eq!(out["url"], "https://h/x?key=${{ secrets.S }}&a=1");
        assert_eq!(out["other"], "***");
        assert_eq!(out["settings"]["max_tokens"], 5);
    }
}

//! Triggers: `GET /triggers`, `GET /triggers/{name}`, `POST /triggers/{name}`.
//!
//! Firing a trigger renders its template with the posted data and runs the result
//! as a chat message, through the same path as `POST /chat` ([`chat::accept`],
//! [`chat::run_and_answer`]). Two body forms are accepted:
//!
//! - the MUXI docs' wrapper, `{"data": {...}, "use_async": false, "session_id": "...",
//!   "user_id": "...", "webhook_url": "..."}` (any JSON object with a `data` key);
//! - the SDK's `fire_trigger`, the data itself as the whole body (an empty body is
//!   `{}`), with `?async=true|false` in the query.
//!
//! Triggers answer 202 at once unless the trigger's front matter says `async: false`
//! or the call asks to wait (`use_async: false` in the body, or `?async=false` /
//! `?use_async=false`; the body wins over the query).

use super::extract::{Path, Query};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::{self, Role};
use super::chat::{self, ChatBody};
use super::{body, envelope, AppState};
use crate::error::{ApiError, ApiResult, Code};
use crate::formation::Formation;
use crate::triggers::{render, Trigger};

/// What a listing shows of a trigger (no template text).
fn summary(t: &Trigger) -> Value {
    json!({
        "name": t.name,
        "description": t.description,
        "agent_id": t.agent_id,
        "use_async": t.use_async,
        "fields": t.fields,
    })
}

/// The trigger named `name`, or 404 naming the ones there are.
fn find<'f>(formation: &'f Formation, name: &str) -> ApiResult<&'f Trigger> {
    formation.triggers.get(name).ok_or_else(|| {
        let known: Vec<&str> = formation.triggers.keys().map(String::as_str).collect();
        let known = if known.is_empty() { "none".to_string() } else { known.join(", ") };
        ApiError::new(
            Code::TriggerNotFound,
            format!("formation `{}` has no trigger `{name}` (triggers: {known})", formation.id),
        )
    })
}

/// `GET /triggers`.
pub async fn list(State(state): State<AppState>, Path(id): Path<String>, headers: HeaderMap) -> ApiResult<Response> {
    let formation = auth::authorize(&state, &id, &headers, Role::Client)?;
    let triggers: Vec<Value> = formation.triggers.values().map(summary).collect();
    Ok(envelope::ok("trigger.list", None, None, json!({ "triggers": triggers, "count": triggers.len() })))
}

/// `GET /triggers/{name}`: the template and the data fields it uses.
pub async fn show(
    State(state): State<AppState>,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let formation = auth::authorize(&state, &id, &headers, Role::Client)?;
    let trigger = find(&formation, &name)?;
    let mut data = summary(trigger);
    data["template"] = json!(trigger.template);
    // The URL itself may carry a token: say only whether there is one.
    data["has_webhook_url"] = json!(trigger.webhook_url.is_some());
    Ok(envelope::ok("trigger", None, None, data))
}

/// The query of `POST /triggers/{name}`.
#[derive(Debug, Default, Deserialize)]
pub struct FireParams {
    #[serde(rename = "async")]
    async_: Option<String>,
    use_async: Option<String>,
    session_id: Option<String>,
}

/// The MUXI docs' wrapper body. Unknown keys are ignored.
#[derive(Debug, Deserialize)]
struct Wrapper {
    data: Value,
    use_async: Option<bool>,
    #[serde(rename = "async")]
    async_: Option<bool>,
    session_id: Option<String>,
    user_id: Option<String>,
    webhook_url: Option<String>,
}

/// A fire call's body, in either form.
#[derive(Debug, PartialEq)]
struct Call {
    data: Value,
    use_async: Option<bool>,
    session_id: Option<String>,
    user_id: Option<String>,
    webhook_url: Option<String>,
}

impl Call {
    fn parse(bytes: &[u8]) -> ApiResult<Call> {
        let bare = |data| Call { data, use_async: None, session_id: None, user_id: None, webhook_url: None };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(bare(json!({})));
        }
        let value: Value = body::parse(bytes)?;
        if !value.as_object().is_some_and(|o| o.contains_key("data")) {
            return Ok(bare(value));
        }
        let w: Wrapper = body::parse(bytes)?;
        if let (Some(a), Some(b)) = (w.use_async, w.async_) {
            if a != b {
                return Err(ApiError::new(Code::InvalidRequest, "`use_async` and `async` disagree; give one"));
            }
        }
        Ok(Call {
            data: w.data,
            use_async: w.use_async.or(w.async_),
            session_id: w.session_id,
            user_id: w.user_id,
            webhook_url: w.webhook_url,
        })
    }
}

/// `true|false` (also `1|0`, `yes|no`, any case) from the query.
fn query_bool(name: &str, value: Option<&str>) -> ApiResult<Option<bool>> {
    let Some(text) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    match text.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(Some(true)),
        "false" | "0" | "no" => Ok(Some(false)),
        _ => Err(ApiError::new(Code::InvalidRequest, format!("query `{name}` must be true or false, got `{text}`"))),
    }
}

/// `POST /triggers/{name}`: render the template and run it as a chat request.
pub async fn fire(
    State(state): State<AppState>,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
    query: Result<Query<FireParams>, ApiError>,
    raw: Result<body::RawBody, ApiError>,
) -> ApiResult<Response> {
    let formation = auth::authorize(&state, &id, &headers, Role::Client)?;
    let trigger = find(&formation, &name)?.clone();
    let Query(params) = query?;
    let call = Call::parse(&raw?.0)?;

    let message = render(&trigger, &call.data).map_err(|missing| {
        ApiError::new(
            Code::MissingTriggerData,
            format!("trigger `{name}` needs data the payload lacks: {}", missing.join(", ")),
        )
        .with_details(json!({ "trigger": name, "missing": missing }))
    })?;
    if message.trim().is_empty() {
        return Err(ApiError::new(Code::InvalidRequest, format!("trigger `{name}` rendered an empty message")));
    }

    let from_query = match query_bool("use_async", params.use_async.as_deref())? {
        Some(v) => Some(v),
        None => query_bool("async", params.async_.as_deref())?,
    };
    let use_async = call.use_async.or(from_query).unwrap_or(trigger.use_async);
    let chat_body = ChatBody {
        message: Some(message),
        user_id: call.user_id,
        agent_id: trigger.agent_id,
        session_id: call.session_id.or(params.session_id),
        async_: Some(use_async),
        threshold_seconds: None,
        webhook_url: call.webhook_url.or(trigger.webhook_url),
        stream: false,
    };
    let accepted = chat::accept(&state, formation, &headers, chat_body).await?;
    chat::run_and_answer(&state, accepted).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_body_forms() {
        let c = Call::parse(br#"{"issue": {"title": "x"}}"#).expect("bare");
        assert_eq!(c.data, json!({"issue": {"title": "x"}}));
        assert_eq!(c.use_async, None);

        let c =
            Call::parse(br#"{"data": {"a": 1}, "use_async": false, "session_id": "s", "extra": 1}"#).expect("wrapper");
        assert_eq!(c.data, json!({"a": 1}));
        assert_eq!((c.use_async, c.session_id.as_deref()), (Some(false), Some("s")));
        assert_eq!(Call::parse(br#"{"data": 1, "async": true}"#).expect("async").use_async, Some(true));

        assert_eq!(Call::parse(b"  ").expect("empty").data, json!({}));
        assert_eq!(Call::parse(b"[1,2]").expect("array").data, json!([1, 2]));

        let err = Call::parse(br#"{"data": {}, "use_async": "no"}"#).unwrap_err();
        assert_eq!(err.code, Code::InvalidRequest);
        assert!(err.message.contains("use_async"), "{}", err.message);
        assert_eq!(Call::parse(b"{nope").unwrap_err().code, Code::InvalidJson);
        assert!(Call::parse(br#"{"data": {}, "use_async": true, "async": false}"#).is_err());
    }

    #[test]
    fn query_booleans() {
        assert_eq!(query_bool("async", Some("TRUE")).expect("ok"), Some(true));
        assert_eq!(query_bool("async", Some("0")).expect("ok"), Some(false));
        assert_eq!(query_bool("async", None).expect("ok"), None);
        assert_eq!(query_bool("async", Some("")).expect("ok"), None);
        assert_eq!(query_bool("async", Some("later")).unwrap_err().code, Code::InvalidRequest);
    }
}

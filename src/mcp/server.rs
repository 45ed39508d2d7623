//! The MCP server handler: tools/list, tools/call (agent tools and the
//! execution tools), and the Tasks extension (`tasks/get`, `tasks/cancel`).
//! Every call works on the formation and user the HTTP request was
//! authorized for ([`Caller`]), never on the MCP session.

use std::sync::Arc;
use std::time::Duration;

use axum::http::request::Parts;
use axum::http::HeaderMap;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, CancelTaskParams, CreateTaskResult, GetTaskParams,
    GetTaskResult, Implementation, JsonObject, ListToolsResult, PaginatedRequestParams, ProgressNotificationParam,
    ProgressToken, ServerCapabilities, ServerConfig,
};
use rmcp::service::{Peer, RequestContext, RoleServer};
use rmcp::{ErrorData as McpError, ServerHandler};
use serde_json::json;

use super::{tools, views, Caller};
use crate::api::auth;
use crate::api::chat::{accept, ChatBody};
use crate::api::AppState;
use crate::engine::{CancelError, LiveEvent, LiveRequest, Start, Submitted};
use crate::error::{ApiError, Code};
use crate::formation::Formation;
use crate::store::{ListQuery, RequestRecord};

/// One handler per MCP session (or per stateless request); all share the app state.
#[derive(Clone)]
pub struct FormationServer {
    pub state: AppState,
}

/// The formation and user of the HTTP request carrying an MCP message.
struct Call {
    formation: Arc<Formation>,
    user: String,
    headers: HeaderMap,
}

impl FormationServer {
    fn call(&self, context: &RequestContext<RoleServer>) -> Result<Call, McpError> {
        let parts = context.extensions.get::<Parts>();
        let caller = parts.and_then(|p| p.extensions.get::<Caller>()).ok_or_else(|| {
            McpError::internal_error("the MCP request reached the handler without an authorized caller", None)
        })?;
        let formation = auth::formation(&self.state, &caller.formation_id)
            .map_err(|e| McpError::invalid_request(e.message, Some(json!({ "code": e.code.as_str() }))))?;
        let mut headers = parts.map(|p| p.headers.clone()).unwrap_or_default();
        // A client's fixed headers would make every call the same request.
        headers.remove(auth::IDEMPOTENCY_KEY);
        Ok(Call { formation, user: caller.user.clone(), headers })
    }

    /// The caller's execution, or `None` when it does not exist or belongs to
    /// another formation or user.
    async fn find(&self, call: &Call, id: &str) -> Result<Option<RequestRecord>, McpError> {
        let record = match self.state.engine.live(id) {
            Some(live) => Some(live.snapshot()),
            None => self.state.engine.store().get(id).await.map_err(|e| internal(ApiError::from(e)))?,
        };
        Ok(record.filter(|r| r.formation_id == call.formation.id && r.user_id == call.user))
    }

    async fn run_agent(
        &self,
        call: Call,
        agent_id: &str,
        args: &JsonObject,
        context: &RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let threshold = call.formation.overlord.async_.threshold_seconds;
        let args = match tools::AgentArgs::parse(args, threshold) {
            Ok(args) => args,
            Err(bad) => return Ok(views::error(bad.code, &bad.message).into()),
        };
        let body = ChatBody {
            message: Some(args.message),
            user_id: Some(call.user.clone()),
            agent_id: Some(agent_id.to_string()),
            session_id: args.session_id,
            async_: Some(true),
            threshold_seconds: None,
            webhook_url: args.webhook_url,
            stream: false,
        };
        let accepted = match accept(&self.state, call.formation.clone(), &call.headers, body).await {
            Ok(accepted) => accepted,
            Err(e) => return Ok(views::error(e.code.as_str(), &e.message).into()),
        };
        let progress = context.meta.get_progress_token().filter(|_| !args.wait.is_zero());
        let start = match (args.wait.is_zero(), &progress) {
            (true, _) => Start::Queue,
            (false, None) => Start::Now,
            (false, Some(_)) => Start::Follow,
        };
        let Submitted { record, live, events } = self
            .state
            .engine
            .submit(accepted.formation, accepted.request, start)
            .await
            .map_err(|e| internal(ApiError::from(e)))?;
        let mut record = record;
        if let (false, Some(live)) = (args.wait.is_zero(), &live) {
            let progress = progress.map(|token| (token, context.peer.clone()));
            if let Some(finished) = self.wait(live, events, args.wait, progress, context).await {
                *record = finished;
            }
        }
        if record.status.is_final() {
            return Ok(views::status(&record).into());
        }
        if wants_task(context) {
            return Ok(CallToolResponse::Task(CreateTaskResult::new(views::task(&record, ttl_ms(&call.formation)))));
        }
        Ok(views::started(&record).into())
    }

    /// Waits up to `limit` for the execution to end, forwarding its progress as
    /// `notifications/progress` when the caller sent a progress token.
    async fn wait(
        &self,
        live: &LiveRequest,
        mut events: Option<tokio::sync::broadcast::Receiver<LiveEvent>>,
        limit: Duration,
        progress: Option<(ProgressToken, Peer<RoleServer>)>,
        context: &RequestContext<RoleServer>,
    ) -> Option<RequestRecord> {
        let finished = self.state.engine.wait(live, Some(limit));
        tokio::pin!(finished);
        let mut last = -1.0_f64;
        loop {
            let event = async {
                match events.as_mut() {
                    Some(events) => events.recv().await.ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                finished = &mut finished => return finished,
                _ = context.ct.cancelled() => return None,
                _ = self.state.shutdown.cancelled() => return None,
                event = event => match (event, &progress) {
                    (Some(LiveEvent::Progress(p)), Some((token, peer))) => {
                        let value = p.progress.unwrap_or(last.max(0.0));
                        if value <= last {
                            continue;
                        }
                        last = value;
                        let message = p.message.clone().or_else(|| p.current_step.clone());
                        let mut note = ProgressNotificationParam::new(token.clone(), value).with_total(100.0);
                        note.message = message;
                        let _ = peer.notify_progress(note).await;
                    }
                    (Some(_), _) => {}
                    // The channel lagged or closed: the end still comes through `finished`.
                    (None, _) => events = None,
                },
            }
        }
    }

    async fn check_status(&self, call: Call, args: &JsonObject) -> Result<CallToolResult, McpError> {
        let id = match tools::execution_id(args) {
            Ok(id) => id,
            Err(bad) => return Ok(views::error(bad.code, &bad.message)),
        };
        Ok(match self.find(&call, &id).await? {
            Some(record) => views::status(&record),
            None => not_found(&call, &id),
        })
    }

    async fn cancel(&self, call: Call, args: &JsonObject) -> Result<CallToolResult, McpError> {
        let id = match tools::execution_id(args) {
            Ok(id) => id,
            Err(bad) => return Ok(views::error(bad.code, &bad.message)),
        };
        let Some(record) = self.find(&call, &id).await? else { return Ok(not_found(&call, &id)) };
        match self.state.engine.cancel(&record).await {
            Ok(cancelled) => Ok(views::cancelled(&cancelled)),
            Err(CancelError::AlreadyFinished(status)) => Ok(views::error(
                "execution_already_finished",
                &format!(
                    "execution `{id}` has already ended ({}); only running executions can be cancelled",
                    status.as_str()
                ),
            )),
            Err(CancelError::Store(e)) => Err(internal(ApiError::from(e))),
        }
    }

    async fn list(&self, call: Call, args: &JsonObject) -> Result<CallToolResult, McpError> {
        let args = match tools::ListArgs::parse(args) {
            Ok(args) => args,
            Err(bad) => return Ok(views::error(bad.code, &bad.message)),
        };
        let statuses =
            if args.statuses.is_empty() { vec![None] } else { args.statuses.into_iter().map(Some).collect() };
        let mut records = Vec::new();
        for status in statuses {
            let query = ListQuery {
                formation_id: call.formation.id.clone(),
                user_id: call.user.clone(),
                status,
                limit: args.limit,
            };
            records.extend(self.state.engine.store().list(&query).await.map_err(|e| internal(ApiError::from(e)))?);
        }
        records.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| b.id.cmp(&a.id)));
        records.truncate(args.limit);
        Ok(views::list(&records))
    }

    async fn task(&self, context: &RequestContext<RoleServer>, id: &str) -> Result<(Call, RequestRecord), McpError> {
        let call = self.call(context)?;
        match self.find(&call, id).await? {
            Some(record) => Ok((call, record)),
            None => Err(McpError::invalid_params(
                format!("unknown task `{id}`: no execution with this id for this formation and user"),
                Some(json!({ "taskId": id, "code": "execution_not_found" })),
            )),
        }
    }
}

impl ServerHandler for FormationServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().enable_tasks().build())
            .with_server_info(Implementation::new("muxi-rt", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Each agent tool starts an execution and answers at once with an execution_id. \
                 Call check_execution_status with it until the status is completed, failed or cancelled.",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let call = self.call(&context)?;
        Ok(ListToolsResult::with_all_items(tools::list(&call.formation)))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let call = self.call(&context)?;
        let args = request.arguments.unwrap_or_default();
        match request.name.as_ref() {
            tools::CHECK_STATUS => self.check_status(call, &args).await.map(Into::into),
            tools::CANCEL => self.cancel(call, &args).await.map(Into::into),
            tools::LIST => self.list(call, &args).await.map(Into::into),
            name => {
                if !tools::exposed_agents(&call.formation).any(|a| a.id == name) {
                    let known: Vec<String> =
                        tools::list(&call.formation).into_iter().map(|t| t.name.into_owned()).collect();
                    return Err(McpError::invalid_params(
                        format!("unknown tool `{name}` (tools: {})", known.join(", ")),
                        Some(json!({ "code": "unknown_tool" })),
                    ));
                }
                let name = name.to_string();
                self.run_agent(call, &name, &args, &context).await
            }
        }
    }

    async fn get_task(
        &self,
        request: GetTaskParams,
        context: RequestContext<RoleServer>,
    ) -> Result<GetTaskResult, McpError> {
        let (call, record) = self.task(&context, &request.task_id).await?;
        Ok(GetTaskResult::new(views::detailed_task(&record, ttl_ms(&call.formation))))
    }

    async fn cancel_task(
        &self,
        request: CancelTaskParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        let (_, record) = self.task(&context, &request.task_id).await?;
        match self.state.engine.cancel(&record).await {
            Ok(_) => Ok(()),
            Err(CancelError::AlreadyFinished(status)) => Err(McpError::invalid_params(
                format!("task `{}` has already ended ({}); it cannot be cancelled", record.id, status.as_str()),
                Some(json!({ "taskId": record.id, "code": "execution_already_finished" })),
            )),
            Err(CancelError::Store(e)) => Err(internal(ApiError::from(e))),
        }
    }
}

/// Whether the caller declared the Tasks extension: its agent calls become tasks.
fn wants_task(context: &RequestContext<RoleServer>) -> bool {
    context.client_capabilities().is_some_and(|caps| caps.supports_tasks())
}

/// How long a finished execution is kept: the formation's retention.
fn ttl_ms(formation: &Formation) -> Option<u64> {
    let days = formation.overlord.async_.retention_days;
    (days.is_finite() && days > 0.0).then(|| (days * 86_400_000.0).min(u64::MAX as f64) as u64)
}

fn not_found(call: &Call, id: &str) -> CallToolResult {
    views::error(
        "execution_not_found",
        &format!("no execution `{id}` on formation `{}` for user `{}`", call.formation.id, call.user),
    )
}

fn internal(error: ApiError) -> McpError {
    let error = if error.code == Code::Internal { error } else { ApiError::internal(error) };
    McpError::internal_error(error.message, None)
}

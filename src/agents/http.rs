//! The `http` agent kind (stub: being written).

use super::{AgentContext, AgentFailure, AgentOutput, AgentRequest, Events};
use crate::formation::AgentSpec;

pub async fn run(
    _ctx: &AgentContext,
    _spec: &AgentSpec,
    _request: AgentRequest,
    _events: Events,
) -> Result<AgentOutput, AgentFailure> {
    Err(AgentFailure::new("agent_error", "http agents are not available yet", false))
}

//! The `llm` agent kind (stub: being written).

use super::{AgentContext, AgentFailure, AgentOutput, AgentRequest, Events};
use crate::formation::{AgentSpec, Formation};

pub async fn run(
    _ctx: &AgentContext,
    _formation: &Formation,
    _spec: &AgentSpec,
    _request: AgentRequest,
    _events: Events,
) -> Result<AgentOutput, AgentFailure> {
    Err(AgentFailure::new("agent_error", "llm agents are not available yet", false))
}

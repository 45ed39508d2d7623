//! The `command` agent kind (stub: being written).

use super::{AgentFailure, AgentOutput, AgentRequest, Events};
use crate::formation::{AgentSpec, Formation};

pub async fn run(
    _formation: &Formation,
    _spec: &AgentSpec,
    _request: AgentRequest,
    _events: Events,
) -> Result<AgentOutput, AgentFailure> {
    Err(AgentFailure::new("agent_error", "command agents are not available yet", false))
}

//! Helpers for tests, unit and integration alike: a fake OpenAI-compatible model
//! server ([`FakeLlm`]), builders of formations and agents with every other
//! setting at its default, and an address that refuses connections
//! ([`closed_port`]).

pub mod fake_llm;

pub use fake_llm::{FakeLlm, Reply, ScriptedToolCall};

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::formation::{AgentKind, AgentSpec, ApiKeys, Formation, LlmSettings, OverlordSettings, ToolSpec};

/// An engine `test` over `store`, with the formations of `dir/formations` (made
/// empty if missing) and a webhook dispatcher that is not started.
pub fn engine_over(
    store: std::sync::Arc<dyn crate::store::Store>,
    dir: &std::path::Path,
    shutdown: tokio_util::sync::CancellationToken,
) -> (std::sync::Arc<crate::registry::Registry>, std::sync::Arc<crate::engine::Engine>) {
    use std::sync::Arc;
    std::fs::create_dir_all(dir.join("formations")).expect("formations folder");
    let registry = Arc::new(crate::registry::Registry::load(&dir.join("formations"), &dir.join("data")));
    let lookup: crate::webhooks::FormationLookup = Arc::new(|_: &str| None);
    let dispatcher =
        Arc::new(crate::webhooks::Dispatcher::new(store.clone(), lookup, vec![], "test".into()).expect("dispatcher"));
    let engine = crate::engine::Engine::new(store, registry.clone(), dispatcher, "test".into(), shutdown);
    (registry, engine)
}

/// A new request `id` of user `u` to agent `a` of formation `f`, async, with
/// the message "hi" and nothing optional set.
pub fn new_request(id: &str) -> crate::store::NewRequest {
    crate::store::NewRequest {
        id: id.into(),
        formation_id: "f".into(),
        formation_version: "1+x".into(),
        user_id: "u".into(),
        session_id: None,
        agent_id: "a".into(),
        message: "hi".into(),
        mode: crate::store::Mode::Async,
        estimated_seconds: 1.0,
        idempotency_key: None,
        fingerprint: None,
        webhook_url: None,
        workflow_timeout_ms: 1_000,
        created_at: 1,
    }
}

/// A formation `test` holding `agents` (the first is the default unless one is
/// marked `default`), every other setting at its default.
pub fn formation_with_agents(agents: Vec<AgentSpec>) -> Formation {
    Formation {
        id: "test".to_string(),
        version: "0.0.0".to_string(),
        revision: "test".to_string(),
        description: "A formation built by a test".to_string(),
        source: PathBuf::from("formation.afs"),
        dir: PathBuf::from("."),
        keys: ApiKeys::default(),
        overlord: OverlordSettings::default(),
        llm: LlmSettings::default(),
        agents,
        mcp: Default::default(),
        observability: Default::default(),
        rate_limits: Default::default(),
        triggers: BTreeMap::new(),
        warnings: Vec::new(),
    }
}

/// An agent `id` of `kind`, with no system message.
pub fn agent(id: &str, kind: AgentKind) -> AgentSpec {
    AgentSpec {
        id: id.to_string(),
        name: id.to_string(),
        description: format!("Test agent {id}"),
        system_message: None,
        default: false,
        estimated_seconds: None,
        kind,
    }
}

/// An LLM agent on `api_base` (e.g. [`FakeLlm::base_url`]) with model
/// `openai/fake-model`, no key, no tools and at most 5 tool rounds.
pub fn llm_agent(id: &str, api_base: &str) -> AgentSpec {
    agent(
        id,
        AgentKind::Llm {
            model: "openai/fake-model".to_string(),
            api_base: api_base.to_string(),
            api_key: None,
            tools: Vec::<ToolSpec>::new(),
            max_tool_rounds: 5,
        },
    )
}

/// An HTTP agent posting to `url`.
pub fn http_agent(id: &str, url: &str) -> AgentSpec {
    agent(id, AgentKind::Http { url: url.to_string() })
}

/// An address nothing listens on, and nothing can while the socket is held:
/// it is bound but never listens, so a connection to it is refused. (A port
/// bound and freed again could be taken by another test's server meanwhile.)
pub fn closed_port() -> (tokio::net::TcpSocket, std::net::SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
    socket.bind(([127, 0, 0, 1], 0).into()).expect("bind 127.0.0.1:0");
    let addr = socket.local_addr().expect("its address");
    (socket, addr)
}

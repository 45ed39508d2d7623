//! Unit tests of the `llm` agent kind, against a fake OpenAI-compatible
//! provider and tool servers on 127.0.0.1.

use super::*;
use crate::agents::Turn;
use crate::formation::ToolSpec;
use crate::testing::{formation_with_agents, llm_agent, FakeLlm, Reply};
use axum::routing::post;
use axum::{Json, Router};

fn request(message: &str) -> AgentRequest {
    AgentRequest {
        request_id: "req_1".into(),
        formation_id: "test".into(),
        agent_id: "main".into(),
        user_id: "u".into(),
        session_id: Some("sess_1".into()),
        message: message.into(),
        attempt: 1,
        history: Vec::new(),
    }
}

fn with_tools(mut spec: AgentSpec, new_tools: Vec<ToolSpec>, rounds: u32) -> AgentSpec {
    if let AgentKind::Llm { tools, max_tool_rounds, .. } = &mut spec.kind {
        *tools = new_tools;
        *max_tool_rounds = rounds;
    }
    spec
}

fn with_key(mut spec: AgentSpec, key: &str) -> AgentSpec {
    if let AgentKind::Llm { api_key, .. } = &mut spec.kind {
        *api_key = Some(key.to_string());
    }
    spec
}

/// Runs the first agent of `formation` and collects its events.
async fn run_first(
    formation: &Formation,
    request: AgentRequest,
) -> (Result<AgentOutput, AgentFailure>, Vec<AgentEvent>) {
    let (tx, recorded) = Events::recorder();
    let out = crate::agents::run(&AgentContext::new(), formation, &formation.agents[0], request, tx).await;
    let events = recorded.lock().unwrap().clone();
    (out, events)
}

fn contents(events: &[AgentEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            AgentEvent::Content(c) => Some(c.clone()),
            _ => None,
        })
        .collect()
}

fn progress(events: &[AgentEvent]) -> Vec<ProgressUpdate> {
    events
        .iter()
        .filter_map(|e| match e {
            AgentEvent::Progress(p) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

/// A tool server answering `POST /search` with `result for <q>`.
async fn tool_server() -> String {
    let app = Router::new().route(
        "/search",
        post(|Json(args): Json<Value>| async move { format!("result for {}", args["q"].as_str().unwrap_or("?")) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/search")
}

/// A URL nothing answers at, and the socket that keeps it so.
fn closed_port_url() -> (tokio::net::TcpSocket, String) {
    let (held, addr) = crate::testing::closed_port();
    (held, format!("http://{addr}/v1"))
}

#[test]
fn agent_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let ctx = AgentContext::new();
    let formation = formation_with_agents(vec![llm_agent("main", "http://127.0.0.1:1/v1")]);
    let (tx, _) = Events::channel();
    let fut = crate::agents::run(&ctx, &formation, &formation.agents[0], request("x"), tx);
    assert_send(&fut);
}

#[tokio::test]
async fn plain_answer_streams_content_in_order() {
    let llm = FakeLlm::start().await;
    llm.push(Reply::text("Hello there, dear world"));
    let formation = formation_with_agents(vec![llm_agent("main", &llm.base_url())]);
    let (out, events) = run_first(&formation, request("hi")).await;
    let out = out.expect("answer");
    assert_eq!(out.text, "Hello there, dear world");
    assert!(out.artifacts.is_empty());
    let pieces = contents(&events);
    assert_eq!(pieces, vec!["Hello ", "there, ", "dear ", "world"]);
    let body = &llm.requests()[0];
    assert_eq!(body["model"], "fake-model");
    assert_eq!(body["stream"], true);
    assert!(body.get("tools").is_none());
    assert_eq!(llm.authorizations(), vec![None]);
    let steps = progress(&events);
    assert_eq!(steps.first().and_then(|p| p.step.clone()).as_deref(), Some("Calling model (round 1)"));
    assert_eq!(steps.last().and_then(|p| p.progress), Some(100.0));
}

#[tokio::test]
async fn prompt_has_system_message_history_and_message() {
    let llm = FakeLlm::start().await;
    let mut spec = with_key(llm_agent("main", &llm.base_url()), "sk-test-secret");
    spec.system_message = Some("You are terse.".into());
    let formation = formation_with_agents(vec![spec]);
    let mut req = request("and now?");
    req.history = vec![
        Turn { role: "user".into(), content: "first question".into() },
        Turn { role: "assistant".into(), content: "first answer".into() },
    ];
    let (out, _) = run_first(&formation, req).await;
    assert_eq!(out.expect("echo").text, "and now?");
    assert_eq!(
        llm.requests()[0]["messages"],
        json!([
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "and now?"},
        ])
    );
    assert_eq!(llm.authorizations(), vec![Some("Bearer sk-test-secret".to_string())]);
}

#[tokio::test]
async fn http_tool_loop() {
    let llm = FakeLlm::start().await;
    let tool_url = tool_server().await;
    llm.push(Reply::tool_call("search", json!({"q": "rust async"})));
    llm.push(Reply::text("Rust async is great."));
    let tool = ToolSpec::Http {
        name: "search".into(),
        description: "Search the web".into(),
        url: tool_url,
        parameters: json!({"type": "object", "properties": {"q": {"type": "string"}}}),
    };
    let formation = formation_with_agents(vec![with_tools(llm_agent("main", &llm.base_url()), vec![tool], 3)]);
    let (out, events) = run_first(&formation, request("tell me about rust async")).await;
    assert_eq!(out.expect("answer").text, "Rust async is great.");

    let requests = llm.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0]["tools"][0]["function"]["name"], "search");
    assert_eq!(requests[0]["tools"][0]["type"], "function");
    let messages = requests[1]["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 3);
    let call = &messages[1]["tool_calls"][0];
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(call["id"], "call_search");
    assert_eq!(call["function"]["name"], "search");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().expect("args")).expect("json");
    assert_eq!(args, json!({"q": "rust async"}));
    assert_eq!(messages[2], json!({"role": "tool", "tool_call_id": "call_search", "content": "result for rust async"}));

    let steps = progress(&events);
    let names: Vec<_> = steps.iter().filter_map(|p| p.step.clone()).collect();
    assert_eq!(names, vec!["Calling model (round 1)", "Running tool search", "Calling model (round 2)"]);
    let completed: Vec<_> = steps.iter().filter_map(|p| p.completed_steps).collect();
    assert_eq!(completed, vec![0, 1, 2, 3]);
    let pct: Vec<f64> = steps.iter().filter_map(|p| p.progress).collect();
    assert!(pct.windows(2).all(|w| w[0] < w[1]), "{pct:?}");
    assert!(pct[..pct.len() - 1].iter().all(|p| *p < 100.0));
    assert_eq!(steps[1].total_steps, Some(2));
}

#[tokio::test]
async fn agent_tool_calls_another_agent() {
    let llm = FakeLlm::start().await;
    let tool =
        ToolSpec::Agent { name: "ask_helper".into(), description: "Ask the helper".into(), agent_id: "helper".into() };
    let mut helper = llm_agent("helper", &llm.base_url());
    helper.system_message = Some("You help.".into());
    let formation = formation_with_agents(vec![with_tools(llm_agent("main", &llm.base_url()), vec![tool], 2), helper]);
    llm.push(Reply::tool_call("ask_helper", json!({"message": "what is 2+2?"})));
    llm.push(Reply::text("four"));
    llm.push(Reply::text("The helper says four."));
    let (out, events) = run_first(&formation, request("ask the helper")).await;
    assert_eq!(out.expect("answer").text, "The helper says four.");

    let requests = llm.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[0]["tools"][0]["function"]["parameters"]["required"], json!(["message"]));
    assert_eq!(
        requests[1]["messages"],
        json!([{"role": "system", "content": "You help."}, {"role": "user", "content": "what is 2+2?"}])
    );
    let last = requests[2]["messages"].as_array().and_then(|m| m.last().cloned()).expect("tool message");
    assert_eq!(last, json!({"role": "tool", "tool_call_id": "call_ask_helper", "content": "four"}));
    // The helper's own content is not forwarded to the outer stream.
    assert_eq!(contents(&events).concat(), "The helper says four.");
    let names: Vec<_> = progress(&events).iter().filter_map(|p| p.step.clone()).collect();
    assert_eq!(names, vec!["Calling model (round 1)", "Running tool ask_helper", "Calling model (round 2)"]);
}

#[tokio::test]
async fn agent_tools_stop_at_max_depth() {
    let llm = FakeLlm::start().await;
    let tool = ToolSpec::Agent { name: "me".into(), description: "Myself".into(), agent_id: "main".into() };
    let formation = formation_with_agents(vec![with_tools(llm_agent("main", &llm.base_url()), vec![tool], 1)]);
    for _ in 0..=MAX_AGENT_DEPTH {
        llm.push(Reply::tool_call("me", json!({"message": "deeper"})));
    }
    let (out, _) = run_first(&formation, request("recurse")).await;
    // The innermost call got an error result and answered with the default echo.
    assert!(out.is_ok(), "{out:?}");
    let requests = llm.requests();
    let innermost = &requests[MAX_AGENT_DEPTH as usize + 1]["messages"];
    let result = innermost.as_array().and_then(|m| m.last()).expect("tool message");
    assert!(result["content"].as_str().unwrap_or("").starts_with("error: agent calls nest"), "{result}");
}

#[tokio::test]
async fn too_many_tool_rounds_fails_and_tool_errors_go_to_the_model() {
    let llm = FakeLlm::start().await;
    let (_held, url) = closed_port_url();
    let tool = ToolSpec::Http { name: "search".into(), description: "Search".into(), url, parameters: Value::Null };
    let formation = formation_with_agents(vec![with_tools(llm_agent("main", &llm.base_url()), vec![tool], 1)]);
    llm.push(Reply::tool_call("search", json!({"q": "a"})));
    llm.push(Reply::tool_call("search", json!({"q": "b"})));
    let (out, _) = run_first(&formation, request("loop")).await;
    let err = out.expect_err("too many rounds");
    assert_eq!(err.kind, "tool_rounds_exceeded");
    assert!(!err.retryable);
    assert!(err.message.contains("max_tool_rounds"), "{}", err.message);

    let requests = llm.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0]["tools"][0]["function"]["parameters"], json!({"type": "object", "properties": {}}));
    let tool_result = &requests[1]["messages"][2]["content"];
    assert!(tool_result.as_str().unwrap_or("").starts_with("error: could not reach tool search"), "{tool_result}");
}

#[tokio::test]
async fn rate_limit_is_retryable_with_retry_after() {
    let llm = FakeLlm::start().await;
    llm.push(Reply::error_retry_after(429, "Slow down", "7"));
    let formation = formation_with_agents(vec![llm_agent("main", &llm.base_url())]);
    let err = run_first(&formation, request("x")).await.0.expect_err("429");
    assert_eq!(err.kind, "rate_limited");
    assert!(err.retryable);
    assert_eq!(err.retry_after, Some(Duration::from_secs(7)));
    assert!(err.message.contains("Slow down"), "{}", err.message);
}

#[tokio::test]
async fn server_error_is_retryable() {
    let llm = FakeLlm::start().await;
    llm.push(Reply::error(500, "internal oops"));
    let formation = formation_with_agents(vec![llm_agent("main", &llm.base_url())]);
    let err = run_first(&formation, request("x")).await.0.expect_err("500");
    assert_eq!(err.kind, "model_error");
    assert!(err.retryable);
    assert_eq!(err.retry_after, None);
    assert!(err.message.contains("500"), "{}", err.message);
}

#[tokio::test]
async fn client_error_is_final_with_provider_message_and_no_key() {
    let llm = FakeLlm::start().await;
    llm.push(Reply::error(400, "Invalid model 'fake-model' for key sk-test-secret"));
    let formation = formation_with_agents(vec![with_key(llm_agent("main", &llm.base_url()), "sk-test-secret")]);
    let err = run_first(&formation, request("x")).await.0.expect_err("400");
    assert_eq!(err.kind, "model_error");
    assert!(!err.retryable);
    assert!(err.message.contains("400"), "{}", err.message);
    assert!(err.message.contains("Invalid model 'fake-model'"), "{}", err.message);
    assert!(!err.message.contains("sk-test-secret"), "{}", err.message);
}

#[tokio::test]
async fn unreachable_api_is_retryable_and_names_the_host() {
    let (_held, base) = closed_port_url();
    let formation = formation_with_agents(vec![with_key(llm_agent("main", &base), "sk-test-secret")]);
    let err = run_first(&formation, request("x")).await.0.expect_err("refused");
    assert_eq!(err.kind, "unreachable");
    assert!(err.retryable);
    assert!(err.message.contains(&host_of(&base)), "{}", err.message);
    assert!(!err.message.contains("sk-test-secret"));
}

#[tokio::test]
async fn dropping_the_future_mid_stream_closes_the_call() {
    let llm = FakeLlm::start().await;
    llm.push(Reply::Hang { partial: "Thinking".into() });
    let formation = formation_with_agents(vec![llm_agent("main", &llm.base_url())]);
    let ctx = AgentContext::new();
    let (tx, mut rx) = Events::channel();
    {
        let work = crate::agents::run(&ctx, &formation, &formation.agents[0], request("x"), tx);
        tokio::pin!(work);
        // Run the work until the first content arrives, then drop it.
        let first = tokio::select! {
            _ = &mut work => panic!("a hanging stream cannot finish"),
            content = async {
                loop {
                    let pending = rx.recv().await;
                    if !pending.text.is_empty() {
                        return Some(pending.text.concat());
                    }
                }
            } => content,
        };
        assert_eq!(first.as_deref(), Some("Thinking"));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while llm.abandoned_streams() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the fake never saw the connection close");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn non_streamed_answer_is_understood() {
    // A provider that ignores `stream: true` and answers with one JSON object.
    let app = Router::new().route(
        "/v1/chat/completions",
        post(|| async {
            Json(json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": "whole"},
                                     "finish_reason": "stop"}]}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let formation = formation_with_agents(vec![llm_agent("main", &format!("http://{addr}/v1/"))]);
    let (out, events) = run_first(&formation, request("x")).await;
    assert_eq!(out.expect("answer").text, "whole");
    assert_eq!(contents(&events), vec!["whole"]);
}

#[test]
fn streamed_tool_call_deltas_are_assembled() {
    let ctx = AgentContext::new();
    let client = ModelClient::new(&ctx, "http://127.0.0.1:1/v1", "openai/x", None);
    let (tx, _) = Events::channel();
    let mut state = StreamState::default();
    let frames = [
        r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"a","function":{"name":"f","arguments":"{\"x\""}}]}}]}"#,
        r#"{"choices":[{"delta":{"tool_calls":[{"index":1,"id":"b","function":{"name":"g","arguments":""}}]}}]}"#,
        r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":":1}"}}]}}]}"#,
        r#"{"choices":[{"delta":{"tool_calls":[{"index":1,"function":{"arguments":"{}"}}]},"finish_reason":"tool_calls"}]}"#,
        "[DONE]",
    ];
    for frame in frames {
        client.on_data(&mut state, frame, &tx).expect("frame");
    }
    let answer = state.into_answer();
    let calls: Vec<_> =
        answer.tool_calls.iter().map(|c| (c.id.as_str(), c.name.as_str(), c.arguments.as_str())).collect();
    assert_eq!(calls, vec![("a", "f", r#"{"x":1}"#), ("b", "g", "{}")]);
}

#[test]
fn a_huge_tool_call_index_fails_without_allocating() {
    let ctx = AgentContext::new();
    let client = ModelClient::new(&ctx, "http://127.0.0.1:1/v1", "openai/x", None);
    let (tx, _) = Events::channel();
    let mut state = StreamState::default();
    for index in [MAX_TOOL_CALLS, 1_000_000_000_000] {
        let frame = format!(r#"{{"choices":[{{"delta":{{"tool_calls":[{{"index":{index},"id":"a"}}]}}}}]}}"#);
        let failure = client.on_data(&mut state, &frame, &tx).expect_err("refused");
        assert!(!failure.retryable);
        assert!(failure.message.contains("tool call index"), "{}", failure.message);
    }
    assert!(state.calls.is_empty());
    let last = MAX_TOOL_CALLS - 1;
    let frame = format!(r#"{{"choices":[{{"delta":{{"tool_calls":[{{"index":{last},"id":"a"}}]}}}}]}}"#);
    client.on_data(&mut state, &frame, &tx).expect("the last allowed index");
}

#[test]
fn streamed_text_is_bounded() {
    let ctx = AgentContext::new();
    let client = ModelClient::new(&ctx, "http://127.0.0.1:1/v1", "openai/x", None);
    let (tx, _rx) = Events::channel();
    let mut state = StreamState { size: MAX_ANSWER_TEXT_BYTES - 2, ..StreamState::default() };
    let args = r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"abc"}}]}}]}"#;
    assert!(!client.on_data(&mut state, args, &tx).expect_err("refused").retryable);
    let mut state = StreamState { size: MAX_ANSWER_TEXT_BYTES - 2, ..StreamState::default() };
    let text = r#"{"choices":[{"delta":{"content":"abc"}}]}"#;
    assert!(!client.on_data(&mut state, text, &tx).expect_err("refused").retryable);
}

#[tokio::test]
async fn an_endless_stream_line_is_refused() {
    let llm = FakeLlm::start().await;
    llm.push(Reply::RawSse(vec!["x".repeat(MAX_SSE_LINE_BYTES + 1)]));
    let formation = formation_with_agents(vec![llm_agent("main", &llm.base_url())]);
    let (out, _) = run_first(&formation, request("x")).await;
    let failure = out.expect_err("refused");
    assert!(!failure.retryable);
    assert!(
        failure.message.contains("a line of over") || failure.message.contains("an event of over"),
        "{}",
        failure.message
    );
}

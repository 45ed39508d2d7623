//! Issue 2: loading, validating, serving and hot-reloading formations.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test]
async fn serves_both_layouts_and_reports_unknown_formations() {
    let fx = Fixture::new();
    fx.write("alpha/formation.afs", &formation_yaml("alpha", ""));
    fx.write("beta.afs", &formation_yaml("beta", ""));
    fx.write("gamma/formation.yaml", &formation_yaml("gamma", ""));
    let server = fx.start();

    let (status, body) = json(server.get("/health").send().await.unwrap()).await;
    assert_eq!(status, 200);
    let ids: Vec<&str> =
        body["data"]["formations"].as_array().unwrap().iter().map(|f| f["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["alpha", "beta", "gamma"]);
    assert_eq!(body["data"]["status"], "healthy");

    for id in ["alpha", "beta", "gamma"] {
        let (status, body) = json(server.get(&format!("/api/{id}/v1/health")).send().await.unwrap()).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["data"]["formation_id"], id);
    }
    let (status, body) = json(server.get("/api/nope/v1/health").send().await.unwrap()).await;
    assert_eq!(status, 404);
    assert_eq!(body["code"], "formation_not_found");

    assert!(body["message"].as_str().unwrap().contains("nope"));
    let (status, body) = json(server.get("/api/alpha/v1/no-such-route").send().await.unwrap()).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    let (status, body) = json(server.delete("/api/alpha/v1/health").send().await.unwrap()).await;
    assert_eq!((status, body["code"].as_str()), (405, Some("method_not_allowed")), "{body}");
}

#[tokio::test]
async fn keys_are_required_checked_and_scoped_to_their_role() {
    let fx = Fixture::new();
    fx.write("alpha.afs", &formation_yaml("alpha", ""));
    let server = fx.start();

    let (status, body) = json(server.get("/api/alpha/v1/async").send().await.unwrap()).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("missing_api_key")));

    let (status, body) =
        json(server.get("/api/alpha/v1/async").header("X-Muxi-Admin-Key", "wrong").send().await.unwrap()).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("invalid_api_key")));

    // The client key does not open admin routes.
    let (name, key) = client_key("alpha");
    let (status, _) = json(server.get("/api/alpha/v1/async").header(name, &key).send().await.unwrap()).await;
    assert_eq!(status, 401);

    let (name, key) = admin_key("alpha");
    let (status, body) = json(server.get("/api/alpha/v1/async").header(name, &key).send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    let data = &body["data"];
    assert_eq!(data["mode"], "auto");
    assert_eq!(data["threshold_seconds"], 30.0);
    assert_eq!(data["enable_estimation"], true);
    assert_eq!(data["webhook_retries"], 3);
    assert_eq!(data["webhook_timeout"], 10.0);
    assert_eq!(data["retry"]["max_attempts"], 3);
    assert_eq!(data["retry"]["initial_delay"], 1.0);
    assert_eq!(data["retry"]["max_delay"], 60.0);
    assert_eq!(data["retry"]["backoff_factor"], 2.0);
    assert_eq!(data["timeouts"]["task_timeout"], 300.0);
    assert_eq!(data["timeouts"]["workflow_timeout"], 3600.0);
    assert_eq!(data["max_concurrent_requests"], 16);
    assert!(data.get("webhook_secret").is_none(), "secrets are never shown");

    let (status, body) = json(server.get("/api/alpha/v1/formation").header(name, &key).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(body["data"]["id"], "alpha");
    assert_eq!(body["data"]["version"], "1.0.0");
}

#[tokio::test]
async fn key_header_names_are_case_insensitive() {
    let fx = Fixture::new();
    fx.write("alpha.afs", &formation_yaml("alpha", ""));
    let server = fx.start();
    let addr = server.base.trim_start_matches("http://").to_string();
    let raw = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        write!(
            stream,
            "GET /api/alpha/v1/async HTTP/1.1\r\nHost: x\r\nX-MUXI-ADMIN-KEY: admin-alpha\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
}

#[tokio::test]
async fn a_formation_without_keys_gets_generated_keys_that_survive_restarts() {
    let fx = Fixture::new();
    fx.write("open.afs", "schema: \"1.0.0\"\nid: open\ndescription: no keys\n");
    let server = fx.start();
    let stored: Value = serde_json::from_slice(&std::fs::read(fx.data.join("keys/open.json")).unwrap()).unwrap();
    let admin = stored["admin_key"].as_str().unwrap().to_string();
    // Generated keys are printed once, at first load.
    eventually(WAIT, "keys printed", || async { server.stderr().contains(&admin).then_some(()) }).await;

    let (status, _) =
        json(server.get("/api/open/v1/async").header("X-Muxi-Admin-Key", &admin).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert!(server.terminate().is_some());

    let server = fx.start();
    let (status, _) =
        json(server.get("/api/open/v1/async").header("X-Muxi-Admin-Key", &admin).send().await.unwrap()).await;
    assert_eq!(status, 200, "the same key works after a restart");
    assert!(!server.stderr().contains(&admin), "keys are printed only when generated");
}

async fn threshold(server: &Server) -> Option<f64> {
    let (name, key) = admin_key("alpha");
    let response = server.get("/api/alpha/v1/async").header(name, key).send().await.ok()?;
    let (_, body) = json(response).await;
    body["data"]["threshold_seconds"].as_f64()
}

#[tokio::test]
async fn edits_reload_without_restart_and_invalid_edits_keep_the_old_version() {
    let fx = Fixture::new();
    fx.write("alpha.afs", &formation_yaml("alpha", "async:\n  threshold_seconds: 30\n"));
    let server = fx.start();
    assert_eq!(threshold(&server).await, Some(30.0));

    fx.write("alpha.afs", &formation_yaml("alpha", "async:\n  threshold_seconds: 45\n"));
    eventually(WAIT, "threshold 45", || async { (threshold(&server).await == Some(45.0)).then_some(()) }).await;

    // A typo: the file fails validation, the previous version keeps serving.
    fx.write("alpha.afs", &formation_yaml("alpha", "async:\n  threshhold_seconds: 60\n"));
    let failure = eventually(WAIT, "failure in /health", || async {
        let (name, key) = admin_key("alpha");
        let (_, body) = json(server.get("/health").header(name, key).send().await.unwrap()).await;
        let failures = body["data"]["failures"].as_array().cloned().unwrap_or_default();
        failures.into_iter().next()
    })
    .await;
    // Without the admin key: that a file failed, not where it is.
    let (_, anonymous) = json(server.get("/health").send().await.unwrap()).await;
    assert_eq!(anonymous["data"]["failures"][0], json!({"still_serving": "alpha", "errors": 1}));
    assert!(!anonymous.to_string().contains(".afs"), "no file paths without the key: {anonymous}");
    assert!(failure["file"].as_str().unwrap().ends_with("alpha.afs"));
    let errors = failure["errors"].to_string();
    assert!(errors.contains("threshhold_seconds"), "{errors}");
    assert!(errors.contains("alpha.afs:"), "errors name the file: {errors}");
    assert_eq!(failure["still_serving"], "alpha");
    assert_eq!(threshold(&server).await, Some(45.0));

    fx.write("alpha.afs", &formation_yaml("alpha", "async:\n  threshold_seconds: 50\n"));
    eventually(WAIT, "threshold 50", || async { (threshold(&server).await == Some(50.0)).then_some(()) }).await;
    let (_, body) = json(server.get("/health").send().await.unwrap()).await;
    assert_eq!(body["data"]["status"], "healthy");
}

#[tokio::test]
async fn added_files_start_serving_and_deleted_ones_stop() {
    let fx = Fixture::new();
    fx.write("alpha.afs", &formation_yaml("alpha", ""));
    let server = fx.start();
    let status_of = |id: &'static str| {
        let server = &server;
        async move { server.get(&format!("/api/{id}/v1/health")).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status_of("delta").await, 404);

    fx.write("delta/formation.afs", &formation_yaml("delta", ""));
    eventually(WAIT, "delta served", || async { (status_of("delta").await == 200).then_some(()) }).await;

    fx.remove("delta/formation.afs");
    eventually(WAIT, "delta gone", || async { (status_of("delta").await == 404).then_some(()) }).await;
    assert_eq!(status_of("alpha").await, 200, "other formations are untouched");
}

#[tokio::test]
async fn serve_keeps_valid_formations_when_others_are_broken() {
    let fx = Fixture::new();
    fx.write("good.afs", &formation_yaml("good", ""));
    fx.write("bad.afs", "schema: \"1.0.0\"\nid: bad\ndescription: [unclosed\n");
    let server = fx.start();
    assert_eq!(server.get("/api/good/v1/health").send().await.unwrap().status(), 200);
    assert_eq!(server.get("/api/bad/v1/health").send().await.unwrap().status(), 404);
    let (name, key) = admin_key("good");
    let (_, body) = json(server.get("/health").header(name, key).send().await.unwrap()).await;
    assert_eq!(body["data"]["status"], "degraded");
    let failure = &body["data"]["failures"][0];
    assert!(failure["file"].as_str().unwrap().ends_with("bad.afs"));
    assert!(failure["still_serving"].is_null());
}

#[tokio::test]
async fn sigterm_shuts_down_cleanly() {
    let fx = Fixture::new();
    fx.write("alpha.afs", &formation_yaml("alpha", ""));
    let server = fx.start();
    assert_eq!(server.terminate(), Some(0));
}

#[tokio::test]
async fn sigterm_closes_an_idle_keep_alive_connection_at_once() {
    let fx = Fixture::new();
    fx.write("alpha.afs", &formation_yaml("alpha", ""));
    let server = fx.start();
    // One request answered, then the connection stays open, idle.
    let mut idle = std::net::TcpStream::connect(server.addr()).unwrap();
    write!(idle, "GET /health HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut answer = [0u8; 4096];
    let read = idle.read(&mut answer).unwrap();
    assert!(String::from_utf8_lossy(&answer[..read]).starts_with("HTTP/1.1 200"));

    let exited = std::thread::spawn(move || server.terminate());
    // Well before the server's 10 s grace period, after which it would stop anyway.
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let closed = idle.read(&mut answer);
    assert!(matches!(closed, Ok(0)), "the idle connection was not closed: {closed:?}");
    assert_eq!(exited.join().unwrap(), Some(0));
}

/// Runs `validate` on one file and returns (exit code, output).
fn validate_one(fx: &Fixture, name: &str, content: &str) -> (i32, String) {
    let path = fx.write(name, content);
    let (code, out, _) = run_cli(&["validate", path.to_str().unwrap()], &fx.formations);
    (code, out)
}

#[test]
fn validate_reports_each_problem_with_file_line_and_column() {
    let fx = Fixture::new();

    let (code, out) = validate_one(&fx, "ok.afs", &formation_yaml("ok", "async:\n  mode: async\n"));
    assert_eq!(code, 0, "{out}");
    assert!(out.is_empty(), "{out}");

    // Unknown key in an acted-on section: located at the key (line 10, column 3).
    let (code, out) = validate_one(&fx, "typo.afs", &formation_yaml("typo", "async:\n  threshhold_seconds: 60\n"));
    assert_eq!(code, 1);
    assert!(out.contains("typo.afs:10:3: async.threshhold_seconds:"), "{out}");

    // Wrong type: located at the value's key.
    let (code, out) = validate_one(&fx, "type.afs", &formation_yaml("type", "async:\n  threshold_seconds: abc\n"));
    assert_eq!(code, 1);
    assert!(out.contains("type.afs:10:") && out.contains("async.threshold_seconds"), "{out}");

    // A number of seconds beyond the schema's maximum (no Duration holds 1e300).
    let (code, out) = validate_one(
        &fx,
        "huge.afs",
        &formation_yaml("huge", "overlord:\n  workflow:\n    timeouts:\n      task_timeout: 1e300\n"),
    );
    assert_eq!(code, 1);
    assert!(out.contains("huge.afs:12:7: overlord.workflow.timeouts.task_timeout: must be at most"), "{out}");

    let (code, out) = validate_one(
        &fx,
        "retry.afs",
        &formation_yaml("retry", "overlord:\n  workflow:\n    retry:\n      max_atempts: 2\n"),
    );
    assert_eq!(code, 1);
    assert!(out.contains("retry.afs:12:7: overlord.workflow.retry.max_atempts"), "{out}");

    // Malformed YAML.
    let (code, out) = validate_one(&fx, "broken.afs", "schema: \"1.0.0\"\nid: broken\ndescription: [oops\n");
    assert_eq!(code, 1);
    assert!(out.contains("broken.afs:"), "{out}");

    // A missing secret is named.
    let (code, out) = validate_one(
        &fx,
        "secret.afs",
        "schema: \"1.0.0\"\nid: secret\ndescription: d\nserver:\n  api_keys:\n    admin_key: \"${{ secrets.MUXI_TEST_NEVER_SET }}\"\n",
    );
    assert_eq!(code, 1);
    assert!(out.contains("secret.afs:6:") && out.contains("MUXI_TEST_NEVER_SET"), "{out}");
}

#[test]
fn validate_reports_duplicate_ids_naming_both_files() {
    let fx = Fixture::new();
    fx.write("one.afs", &formation_yaml("same", ""));
    fx.write("two/formation.afs", &formation_yaml("same", ""));
    let (code, out, _) = run_cli(&["validate", fx.formations.to_str().unwrap()], &fx.formations);
    assert_eq!(code, 1);
    assert!(out.contains("one.afs") && out.contains("two/formation.afs"), "{out}");
    assert!(out.contains("duplicate"), "{out}");
}

#[test]
fn validate_reports_an_empty_folder_and_an_unreadable_file() {
    let fx = Fixture::new();
    let (code, out, _) = run_cli(&["validate", fx.formations.to_str().unwrap()], &fx.formations);
    assert_eq!(code, 1);
    assert!(out.contains("no formation files"), "{out}");

    let missing = fx.formations.join("missing.afs");
    let (code, out, _) = run_cli(&["validate", missing.to_str().unwrap()], &fx.formations);
    assert_eq!(code, 1);
    assert!(out.contains("missing.afs"), "{out}");
}

#[test]
fn the_shipped_example_formation_validates() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let (code, out, err) = run_cli(&["validate", "formations"], root);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn schema_command_prints_the_embedded_schema() {
    let (code, out, _) = run_cli(&["schema"], std::path::Path::new("."));
    assert_eq!(code, 0);
    let schema: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(schema["$schema"], "https://json-schema.org/draft/2020-12/schema");
    let reference = schema["properties"]["async"]["$ref"].as_str().unwrap();
    let name = reference.strip_prefix("#/$defs/").unwrap();
    let threshold = &schema["$defs"][name]["properties"]["threshold_seconds"];
    assert_eq!(threshold["default"], 30);
    assert!(threshold["description"].is_string());
}

#[tokio::test]
async fn no_request_fails_while_the_formation_is_reloaded_again_and_again() {
    let fx = Fixture::new();
    fx.write("alpha.afs", &formation_yaml("alpha", "async:\n  threshold_seconds: 10\n"));
    let server = fx.start();
    let (name, key) = admin_key("alpha");
    let polling = async {
        let mut answered = 0;
        for _ in 0..400 {
            let response = server.get("/api/alpha/v1/async").header(name, &key).send().await.unwrap();
            assert_eq!(response.status(), 200, "a request failed during a reload");
            answered += 1;
        }
        answered
    };
    let editing = async {
        for i in 0..20 {
            fx.write("alpha.afs", &formation_yaml("alpha", &format!("async:\n  threshold_seconds: {}\n", 11 + i)));
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    };
    let (answered, ()) = tokio::join!(polling, editing);
    assert_eq!(answered, 400);
    eventually(WAIT, "the last edit served", || async { (threshold(&server).await == Some(30.0)).then_some(()) }).await;
}

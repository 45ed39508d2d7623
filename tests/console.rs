//! Issue 13: the admin routes the console uses, and the console's own pages,
//! through the real binary. (The headless browser drives the console in
//! `tests/console_browser.rs`.)

mod common;

use std::time::Duration;

use common::receiver::{Answer, Receiver};
use common::*;
use serde_json::{json, Value};

/// The console tests' command agent: the message says what to do.
pub const AGENT: &str = r#"#!/usr/bin/env python3
import json, os, sys, time
req = json.load(sys.stdin)
msg = req["message"]
cmd, _, arg = msg.partition(":")
def emit(**kw):
    print(json.dumps(kw), flush=True)
if cmd == "slow":
    steps = int(arg)
    for i in range(steps):
        emit(progress=i * 100 // steps, step=f"Step {i + 1} of {steps}", total_steps=steps,
             completed_steps=i, message=f"pid {os.getpid()}")
        time.sleep(0.5)
    emit(result="slow work done")
elif cmd == "failonce":
    if not os.path.exists(arg):
        open(arg, "w").close()
        sys.stderr.write("the first attempt fails\n")
        sys.exit(3)
    emit(result="worked the second time", artifacts=[{"name": "report.txt", "content": "ok"}])
elif cmd == "fail":
    sys.stderr.write("boom\n")
    sys.exit(3)
else:
    emit(result=f"echo: {msg}", artifacts=[{"name": "a.txt"}])
"#;

const ALLOW: &[&str] = &["--allow-webhook-host", "127.0.0.1"];

const AGENTS: &str = r#"agents:
  - id: worker
    default: true
    estimated_seconds: 0.5
    command: ["python3", "agent.py"]
  - id: slow
    estimated_seconds: 30
    command: ["python3", "agent.py"]
"#;

/// The formation document of `id`: always async, no webhook retries (a failed
/// attempt fails the delivery), two requests at once.
fn formation(id: &str) -> String {
    formation_yaml(
        id,
        &format!(
            "async:\n  mode: async\n  webhook_retries: 0\n  webhook_timeout: 3\noverlord:\n  max_concurrent_requests: 2\n{AGENTS}"
        ),
    )
}

/// Formations `f` and `g`, alike, with a trigger on `f`.
fn fixture() -> Fixture {
    let fx = Fixture::new();
    for id in ["f", "g"] {
        fx.script(&format!("{id}/agent.py"), AGENT);
        fx.write(&format!("{id}/formation.afs"), &formation(id));
    }
    fx.write("f/triggers/issue.md", "---\ndescription: A new issue\n---\nTriage ${{ data.title }}\n");
    fx
}

/// An async request of `user` to formation `f`; returns its id.
async fn submit(server: &Server, user: &str, body: Value) -> String {
    let (code, body, _) = server.caller("f", user).chat(body).await;
    assert_eq!(code, 202, "{body}");
    request_id(&body)
}

fn pid(data: &Value) -> Option<i32> {
    data["message"].as_str()?.strip_prefix("pid ")?.parse().ok()
}

#[tokio::test]
async fn admin_routes_take_only_the_formations_admin_key_and_see_only_that_formation() {
    let fx = fixture();
    let server = fx.start();
    let id = submit(&server, "u1", json!({"message": "hello"})).await;
    server.caller("f", "u1").finished(&id).await;

    let url = server.url(&format!("/api/f/v1/admin/requests/{id}"));
    let (name, client) = client_key("f");
    let (code, body) = json(server.http.get(&url).header(name, client).send().await.unwrap()).await;
    assert_eq!((code, body["code"].as_str()), (401, Some("missing_api_key")), "a client key is not an admin key");
    let (code, body) =
        json(server.http.get(&url).header("X-Muxi-Admin-Key", "admin-f-wrong").send().await.unwrap()).await;
    assert_eq!((code, body["code"].as_str()), (403, Some("invalid_api_key")));
    let (_, g_admin) = admin_key("g");
    let (code, body) = json(server.http.get(&url).header("X-Muxi-Admin-Key", g_admin).send().await.unwrap()).await;
    assert_eq!((code, body["code"].as_str()), (403, Some("invalid_api_key")), "g's admin key does not open f");

    // Through g's own routes, f's request does not exist.
    let g = server.admin("g");
    for (code, body) in [
        g.get(&format!("/requests/{id}")).await,
        g.post(&format!("/requests/{id}/rerun")).await,
        g.post(&format!("/deliveries/{id}/retry")).await,
        json(g.request(reqwest::Method::DELETE, &format!("/requests/{id}")).send().await.unwrap()).await,
    ] {
        assert_eq!((code, body["code"].as_str()), (404, Some("request_not_found")), "{body}");
    }
    assert!(g.list("").await.is_empty());
    assert_eq!(server.admin("f").list("").await, [id]);
    let (code, body) = server.admin("nope").get("/requests").await;
    assert_eq!((code, body["code"].as_str()), (404, Some("formation_not_found")));
}

#[tokio::test]
async fn admin_lists_every_users_requests_newest_first_with_filters() {
    let fx = fixture();
    let server = fx.start();
    let a = submit(&server, "alice", json!({"message": "one"})).await;
    let b = submit(&server, "bob", json!({"message": "fail"})).await;
    let c = submit(&server, "alice", json!({"message": "two"})).await;
    for id in [&a, &b, &c] {
        server.admin("f").until(id, "request ended", |d| d["completed_at"].is_string()).await;
    }
    let admin = server.admin("f");
    assert_eq!(admin.list("").await, [c.clone(), b.clone(), a.clone()]);
    assert_eq!(admin.list("?user=alice").await, [c.clone(), a.clone()]);
    assert_eq!(admin.list("?status=failed").await, vec![b.clone()]);
    assert_eq!(admin.list("?status=completed&user=alice&limit=1").await, vec![c.clone()]);
    assert_eq!(admin.list("?agent=worker").await.len(), 3);
    assert!(admin.list("?agent=slow").await.is_empty());
    // A time range: `since` inclusive, `until` exclusive, in RFC 3339 or ms.
    let created = |id: &String| {
        let admin = &admin;
        let id = id.clone();
        async move { admin.show(&id).await["created_at"].as_str().unwrap().to_string() }
    };
    let (b_at, c_at) = (created(&b).await, created(&c).await);
    let b_ms = chrono_ms(&b_at);
    assert_eq!(admin.list(&format!("?since={}&until={}", b_ms, chrono_ms(&c_at))).await, vec![b.clone()]);
    assert_eq!(admin.list(&format!("?since={}", b_at.replace('+', "%2B"))).await, [c.clone(), b.clone()]);

    // The client list of one user is unchanged: alice sees only hers.
    assert_eq!(server.caller("f", "alice").list("").await.len(), 2);

    for (query, word) in [
        ("?limit=0", "`limit`"),
        ("?limit=ten", "`limit`"),
        ("?status=done", "`status`"),
        ("?since=yesterday", "`since`"),
        ("?until=-5", "`until`"),
        ("?since=20&until=10", "before"),
    ] {
        let (code, body) = admin.get(&format!("/requests{query}")).await;
        assert_eq!((code, body["code"].as_str()), (400, Some("invalid_request")), "{query}: {body}");
        assert!(body["message"].as_str().unwrap().contains(word), "{query}: {body}");
    }
}

/// Milliseconds of an RFC 3339 time, read the simple way (the server writes UTC `Z`).
fn chrono_ms(text: &str) -> i64 {
    let (date, time) = text.trim_end_matches('Z').split_once('T').unwrap();
    let d: Vec<i64> = date.split('-').map(|p| p.parse().unwrap()).collect();
    let (hms, ms) = time.split_once('.').unwrap();
    let t: Vec<i64> = hms.split(':').map(|p| p.parse().unwrap()).collect();
    // Days from civil (Howard Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 { (d[0] - 1, d[1] + 9) } else { (d[0], d[1] - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    ((days * 24 + t[0]) * 60 + t[1]) * 60_000 + t[2] * 1000 + ms.parse::<i64>().unwrap()
}

#[tokio::test]
async fn formation_state_shows_backlog_settings_and_a_broken_edit_with_its_line() {
    let fx = fixture();
    let server = fx.start();
    let admin = server.admin("f");
    let (code, body) = admin.get("/formation").await;
    assert_eq!(code, 200, "{body}");
    let data = &body["data"];
    assert_eq!(data["state"], "serving");
    assert!(data["loaded_at"].is_string() && data["reloaded_at"].is_string(), "{data}");
    assert_eq!(data["async"]["mode"], "async");
    assert_eq!(data["async"]["max_concurrent_requests"], 2);
    assert_eq!(data["agents"].as_array().unwrap().len(), 2);
    assert_eq!(data["triggers"][0]["name"], "issue");
    assert_eq!(data["triggers"][0]["fields"], json!(["title"]));
    assert_eq!((data["queue_depth"].as_u64(), data["running"].as_u64()), (Some(0), Some(0)));
    assert!(data["errors"].as_array().unwrap().is_empty());
    let loaded_at = data["loaded_at"].clone();

    // Two run, the third waits; an admin cancels another user's running request.
    let mut ids = Vec::new();
    for user in ["u1", "u2", "u3"] {
        ids.push(submit(&server, user, json!({"message": "slow:200", "agent_id": "slow"})).await);
    }
    let data = eventually(Duration::from_secs(30), "two running, one queued", || async {
        let (_, body) = admin.get("/formation").await;
        let d = body["data"].clone();
        (d["running"] == 2 && d["queue_depth"] == 1).then_some(d)
    })
    .await;
    assert_eq!(data["state"], "serving");
    let running = admin.until(&ids[0], "agent pid", |d| pid(d).is_some()).await;
    let agent = pid(&running).unwrap();
    assert!(alive(agent));
    let (code, body) =
        json(admin.request(reqwest::Method::DELETE, &format!("/requests/{}", ids[0])).send().await.unwrap()).await;
    assert_eq!((code, body["data"]["status"].as_str()), (200, Some("cancelled")), "{body}");
    eventually(Duration::from_secs(10), "agent process gone", || async { (!alive(agent)).then_some(()) }).await;
    let (code, body) =
        json(admin.request(reqwest::Method::DELETE, &format!("/requests/{}", ids[0])).send().await.unwrap()).await;
    assert_eq!((code, body["code"].as_str()), (409, Some("request_already_finished")));
    for id in &ids[1..] {
        admin.request(reqwest::Method::DELETE, &format!("/requests/{id}")).send().await.unwrap();
    }

    // A broken edit: the previous version keeps serving and its errors name the line.
    let path = fx.write("f/formation.afs", &formation("f").replace("  webhook_retries: 0", "  webhook_retrys: 0"));
    let data = eventually(Duration::from_secs(20), "the broken edit noticed", || async {
        let (_, body) = admin.get("/formation").await;
        (body["data"]["state"] == "serving_previous").then(|| body["data"].clone())
    })
    .await;
    let errors = data["errors"].as_array().unwrap();
    let expected = format!("{}:11:", path.display());
    assert!(errors.iter().any(|e| e.as_str().unwrap().starts_with(&expected)), "{expected} in {errors:?}");
    assert!(errors.iter().any(|e| e.as_str().unwrap().contains("webhook_retrys")), "{errors:?}");
    assert_eq!(data["loaded_at"], loaded_at, "the version serving was loaded before the broken edit");
    assert_ne!(data["reloaded_at"], data["loaded_at"]);
}

#[tokio::test]
async fn a_failed_request_is_rerun_with_the_same_input_and_linked_both_ways() {
    let fx = fixture();
    let server = fx.start();
    let admin = server.admin("f");
    let marker = fx.data.join("failed-once");
    let message = format!("failonce:{}", marker.display());
    let (code, body, _) = server.caller("f", "bob").chat(json!({"message": message, "session_id": "s-1"})).await;
    assert_eq!(code, 202, "{body}");
    let original = request_id(&body);
    let failed = admin.until(&original, "the first run failed", |d| d["status"] == "failed").await;
    assert!(failed["error"]["message"].as_str().unwrap().contains("the first attempt fails"), "{failed}");

    let (code, body) = admin.post(&format!("/requests/{original}/rerun")).await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["data"]["rerun_of"], original.as_str());
    let rerun = body["data"]["request_id"].as_str().unwrap().to_string();
    assert_ne!(rerun, original);
    let done = admin.until(&rerun, "the re-run completed", |d| d["status"] == "completed").await;
    assert_eq!(done["result"]["text"], "worked the second time");
    assert_eq!(done["result"]["artifacts"][0]["name"], "report.txt");
    assert_eq!((done["input"].as_str(), done["user_id"].as_str()), (Some(message.as_str()), Some("bob")));
    assert_eq!((done["session_id"].as_str(), done["agent_id"].as_str()), (Some("s-1"), Some("worker")));
    assert_eq!(done["rerun_of"], original.as_str());
    assert_eq!(admin.show(&original).await["rerun_as"], json!([rerun]));
    // The user sees the re-run as theirs.
    assert_eq!(server.caller("f", "bob").data(&rerun).await["status"], "completed");

    // Only failed or cancelled requests are re-run.
    let (code, body) = admin.post(&format!("/requests/{rerun}/rerun")).await;
    assert_eq!((code, body["code"].as_str()), (409, Some("request_not_rerunnable")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("completed"), "{body}");
    let (code, body) = admin.post("/requests/req_nope/rerun").await;
    assert_eq!((code, body["code"].as_str()), (404, Some("request_not_found")));
}

#[tokio::test]
async fn a_failed_webhook_delivery_is_retried_on_demand() {
    let rx = Receiver::start().await;
    rx.script("/hook", vec![], Some(Answer::Status(503)));
    let fx = fixture();
    let server = Server::start(&fx, ALLOW, &[]);
    let admin = server.admin("f");
    let id = submit(&server, "u1", json!({"message": "hi", "webhook_url": rx.url("/hook")})).await;
    let failed = admin.until(&id, "the delivery failed", |d| d["delivery"]["status"] == "failed").await;
    let delivery = &failed["delivery"];
    assert_eq!(delivery["attempts"], 1);
    assert!(delivery["last_error"].as_str().unwrap().contains("503"), "{delivery}");
    assert!(delivery["next_attempt_at"].is_null());
    assert_eq!(delivery["url"], rx.url("/hook"));

    rx.script("/hook", vec![], Some(Answer::Status(200)));
    let (code, body) = admin.post(&format!("/deliveries/{id}/retry")).await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["data"]["delivery"]["status"], "pending");
    let delivered = admin.until(&id, "delivered on retry", |d| d["delivery"]["status"] == "delivered").await;
    assert_eq!(delivered["delivery"]["attempts"], 2);
    assert_eq!(rx.hits("/hook").len(), 2);
    assert_eq!(rx.hits("/hook")[1].json()["request_id"], id.as_str());

    let (code, body) = admin.post(&format!("/deliveries/{id}/retry")).await;
    assert_eq!((code, body["code"].as_str()), (409, Some("delivery_already_delivered")), "{body}");
    let plain = submit(&server, "u1", json!({"message": "no hook"})).await;
    server.caller("f", "u1").finished(&plain).await;
    let (code, body) = admin.post(&format!("/deliveries/{plain}/retry")).await;
    assert_eq!((code, body["code"].as_str()), (404, Some("delivery_not_found")), "{body}");
}

#[tokio::test]
async fn the_console_is_served_with_a_strict_policy_and_can_be_turned_off() {
    let fx = fixture();
    let server = fx.start();
    let mut weight = 0;
    for (path, kind) in
        [("/console", "text/html"), ("/console/app.js", "text/javascript"), ("/console/app.css", "text/css")]
    {
        let response = server.get(path).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_string());
        assert!(header("content-type").unwrap().starts_with(kind), "{path}");
        let csp = header("content-security-policy").unwrap();
        for directive in ["default-src 'none'", "script-src 'self'", "frame-ancestors 'none'", "connect-src 'self'"] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert_eq!(header("x-frame-options").as_deref(), Some("DENY"));
        assert_eq!(header("x-content-type-options").as_deref(), Some("nosniff"));
        assert!(header("set-cookie").is_none(), "no cookie, ever");
        let body = response.text().await.unwrap();
        weight += body.len();
        // Nothing is loaded from another host, and no inline script or style.
        assert!(!body.contains("http://") && !body.contains("https://") && !body.contains("//cdn"), "{path}");
        if path == "/console" {
            assert!(body.contains(r#"<script src="/console/app.js" defer></script>"#));
            assert_eq!(body.matches("<script").count(), 1, "the one script is the embedded file");
            assert!(!body.contains("<style") && !body.contains(" style="), "no inline style");
        }
    }
    eprintln!("console page weight: {weight} bytes (HTML + JS + CSS, uncompressed)");
    // The key only ever goes in a header: the script never builds a URL or cookie with it.
    let script = server.get("/console/app.js").send().await.unwrap().text().await.unwrap();
    assert!(!script.contains("document.cookie") && !script.contains("localStorage") && !script.contains("EventSource"));
    assert!(script.contains("sessionStorage") && script.contains(r#""X-Muxi-Admin-Key": key"#));
    drop(server);

    let server = Server::start(&fx, &["--no-console"], &[]);
    let (code, body) = json(server.get("/console").send().await.unwrap()).await;
    assert_eq!((code, body["code"].as_str()), (404, Some("not_found")));
    assert_eq!(server.get("/api/f/v1/health").send().await.unwrap().status(), 200, "the API still serves");
}

/// Where the browser test writes its screenshots (named in README.md).
fn screenshots() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("console-screenshots")
}

/// A real headless Chromium, used by keyboard only: sign in, filter the list,
/// re-run a failed request, follow a slow request live, cancel it, retry a
/// failed webhook delivery, see a broken edit's line; no sideways scrolling at
/// 390 and 320 px, dark mode, no error logged; screenshots at 1280 and 390 px.
#[tokio::test]
async fn a_browser_signs_in_follows_progress_live_cancels_and_retries_a_delivery() {
    let Some(browser) = common::browser::Browser::start().await else { return };
    let started = std::time::Instant::now();
    let rx = Receiver::start().await;
    rx.script("/hook", vec![], Some(Answer::Status(503)));
    let fx = fixture();
    let server = Server::start(&fx, ALLOW, &[]);
    let admin = server.admin("f");
    let slow = submit(&server, "alice", json!({"message": "slow:240", "agent_id": "slow"})).await;
    let hooked = submit(&server, "bob", json!({"message": "hi", "webhook_url": rx.url("/hook")})).await;
    let failing = submit(&server, "carol", json!({"message": "fail"})).await;
    admin.until(&hooked, "the delivery failed", |d| d["delivery"]["status"] == "failed").await;
    admin.until(&failing, "the request failed", |d| d["status"] == "failed").await;
    let shots = screenshots();
    let console = server.url("/console");

    // Sign in with the keyboard only: type, then Enter submits.
    browser.goto(&console).await;
    browser.type_into("#signin-formation", "f").await;
    browser.type_into("#signin-key", "admin-f").await;
    browser.press_enter("#signin-key").await;
    browser.wait_for("#formation-f").await;
    let stored = browser.eval("return sessionStorage.getItem('muxi.console.keys')", json!([])).await;
    assert_eq!(stored, r#"{"f":"admin-f"}"#);
    assert_eq!(browser.eval("return document.cookie", json!([])).await, "", "no cookie");
    browser.text_until("#running-f", "one running", |t| t == "1").await;
    browser.screenshot(&shots, "formations-1280").await;

    // The requests list, newest first, then the slow request's page by keyboard.
    browser.goto(&format!("{console}#/requests")).await;
    browser.wait_for(&format!("tr[data-request-id='{slow}']")).await;
    let order = browser
        .eval("return [...document.querySelectorAll('tr[data-request-id]')].map(r => r.dataset.requestId)", json!([]))
        .await;
    assert_eq!(order, json!([failing, hooked, slow]));
    browser.screenshot(&shots, "requests-1280").await;

    // Filter by status with the keyboard: only the failed request is left.
    browser.type_into("#f-status", "failed").await;
    browser.press_enter("#f-apply").await;
    browser
        .until("only the failed request listed", || async {
            let rows = browser
                .eval(
                    "return [...document.querySelectorAll('tr[data-request-id]')].map(r => r.dataset.requestId)",
                    json!([]),
                )
                .await;
            (rows == json!([failing])).then_some(())
        })
        .await;
    assert!(browser.eval("return location.hash", json!([])).await.as_str().unwrap().contains("status=failed"));

    // Re-run it (confirmed): the page links the new request.
    browser.press_enter(&format!("#link-{failing}")).await;
    browser.text_until("#status", "failed", |t| t == "failed").await;
    assert!(browser.text("#error").await.contains("boom"));
    browser.press_enter("#rerun").await;
    browser.press_enter("#confirm-yes").await;
    let rerun = browser.text_until("#d-rerun-as", "the re-run linked", |t| t.starts_with("req_")).await;
    assert_eq!(admin.show(&rerun).await["rerun_of"], failing.as_str());
    assert!(browser.text("#request-notice").await.contains(&rerun));

    browser.goto(&format!("{console}#/requests")).await;
    browser.press_enter(&format!("#link-{slow}")).await;
    browser.wait_for("#progress").await;

    // The bar moves with no reload: a mark left on the page stays.
    browser.eval("window.__stayed = true", json!([])).await;
    let progress =
        || async { browser.eval("return document.getElementById('progress').value", json!([])).await.as_f64() };
    let first = browser.until("some progress", || async { progress().await.filter(|p| *p > 0.0) }).await;
    let later = browser.until("the bar to advance", || async { progress().await.filter(|p| *p > first) }).await;
    assert!(later > first);
    assert_eq!(browser.eval("return window.__stayed === true", json!([])).await, true, "the page was not reloaded");
    assert!(browser.text("#step").await.starts_with("Step "), "the current step is shown");
    browser.screenshot(&shots, "request-running-1280").await;

    // Cancel, confirmed in the dialog, all by keyboard; the agent process goes.
    let agent = pid(&admin.until(&slow, "agent pid", |d| pid(d).is_some()).await).unwrap();
    assert!(alive(agent));
    browser.press_enter("#cancel").await;
    assert_eq!(browser.eval("return document.getElementById('confirm').open", json!([])).await, true);
    browser.press_enter("#confirm-yes").await;
    browser.text_until("#status", "cancelled", |t| t == "cancelled").await;
    eventually(Duration::from_secs(10), "agent process gone", || async { (!alive(agent)).then_some(()) }).await;
    assert_eq!(admin.show(&slow).await["status"], "cancelled");

    // A failed webhook delivery, retried against a receiver that now answers 200.
    browser.goto(&format!("{console}#/request/f/{hooked}")).await;
    browser.text_until("#delivery-status", "delivery failed", |t| t == "failed").await;
    assert!(browser.text("#delivery-error").await.contains("503"));
    rx.script("/hook", vec![], Some(Answer::Status(200)));
    browser.press_enter("#retry-delivery").await;
    browser.press_enter("#confirm-yes").await;
    browser.text_until("#delivery-status", "delivered", |t| t == "delivered").await;
    assert_eq!(browser.text("#delivery-attempts").await, "2");
    assert_eq!(rx.hits("/hook").len(), 2);
    browser.screenshot(&shots, "request-delivery-1280").await;

    // A broken edit shows its errors with FILE:LINE on the formations page.
    let path = fx.write("f/formation.afs", &formation("f").replace("  webhook_retries: 0", "  webhook_retrys: 0"));
    browser.goto(&format!("{console}#/formations")).await;
    let expected = format!("{}:11:", path.display());
    browser.text_until("#errors-f", "the broken edit's line", |t| t.contains(&expected)).await;
    assert_eq!(browser.text("#state-f").await, "serving_previous");
    browser.screenshot(&shots, "formations-broken-edit-1280").await;

    // Narrow screens: no sideways scrolling; screenshots at 390 px.
    let fits = "return document.documentElement.scrollWidth <= window.innerWidth";
    for width in [390, 320] {
        browser.resize(width, 844).await;
        for (page, fragment, ready) in [
            ("formations", "#/formations".to_string(), "#formation-f"),
            ("requests", "#/requests".to_string(), "tr[data-request-id]"),
            ("request", format!("#/request/f/{hooked}"), "#delivery:not([hidden])"),
        ] {
            browser.goto(&format!("{console}{fragment}")).await;
            browser.wait_for(ready).await;
            if width == 390 {
                browser.screenshot(&shots, &format!("{page}-390")).await;
            }
            let inner = browser.eval("return window.innerWidth", json!([])).await;
            let wide = "return [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > \
                        window.innerWidth + 1).map(e => e.tagName + '#' + e.id + '.' + e.className).slice(0, 5)";
            if browser.eval(fits, json!([])).await != true {
                panic!("{page} scrolls sideways at {inner} px: {}", browser.eval(wide, json!([])).await);
            }
        }
    }
    // Dark mode follows the system.
    let background = "return getComputedStyle(document.body).backgroundColor";
    assert_eq!(browser.eval(background, json!([])).await, "rgb(255, 255, 255)");
    browser.color_scheme("dark").await;
    assert_eq!(browser.eval(background, json!([])).await, "rgb(13, 17, 23)");
    browser.screenshot(&shots, "request-dark-390").await;
    browser.resize(1280, 900).await;
    browser.goto(&format!("{console}#/formations")).await;
    browser.wait_for("#formation-f").await;
    browser.screenshot(&shots, "formations-dark-1280").await;

    // The policy held: nothing was blocked, and the page logged no error.
    let logs = browser.logs().await;
    let severe: Vec<&Value> = logs.iter().filter(|e| e["level"] == "SEVERE").collect();
    assert!(severe.is_empty(), "{severe:?}");
    browser.quit().await;
    eprintln!("browser test took {:.1} s; screenshots in {}", started.elapsed().as_secs_f64(), shots.display());
}

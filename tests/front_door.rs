//! The front door (`api::front`): the two routes clients call most, answered
//! in front of the router, through real HTTP against the real binary.

mod common;

use common::*;
use serde_json::{json, Value};

/// The front door (`api::front`) answers a chat and a poll past the router;
/// the router answers the same calls when their path is spelt so that it must
/// decode it (`%5F` for `_`), or under the default formation's `/v1`. Both
/// must give the same answers: successes, refusals and errors alike.
#[tokio::test]
async fn the_front_door_answers_as_the_router_does() {
    let fx = Fixture::new();
    let agents = "agents:\n  - id: sleeper\n    estimated_seconds: 1\n    command: [\"sleep\", \"30\"]\n";
    fx.write("f/formation.afs", &formation_yaml("f", &format!("async:\n  mode: async\n{agents}")));
    let server = fx.start();
    let http = reqwest::Client::new();
    let (name, key) = client_key("f");
    let call = |method: reqwest::Method, path: &str, key: &str| {
        http.request(method, server.url(path)).header(name, key.to_string()).header("X-Muxi-User-ID", "u1")
    };
    // Everything but the moment of the answer.
    let same = |a: &Value, b: &Value, what: &str| {
        let (mut a, mut b) = (a.clone(), b.clone());
        a["timestamp"] = Value::Null;
        b["timestamp"] = Value::Null;
        assert_eq!(a, b, "{what}");
    };

    // A chat by each way: the same 202, but for the new request's own id.
    let mut accepted = Vec::new();
    for path in ["/api/f/v1/chat", "/api/%66/v1/chat", "/v1/chat"] {
        let response = call(reqwest::Method::POST, path, &key).json(&json!({"message": "work"})).send().await;
        let location = response.as_ref().unwrap().headers()["location"].to_str().unwrap().to_string();
        let (code, body) = json(response.unwrap()).await;
        assert_eq!(code, 202, "{path}: {body}");
        let id = request_id(&body);
        assert_eq!(location, format!("/api/f/v1/requests/{id}"), "{path}");
        accepted.push((id, body));
    }
    let shape = |(id, body): &(String, Value)| {
        let text = body.to_string().replace(id.as_str(), "ID").replace(&id["req_".len()..], "N");
        serde_json::from_str::<Value>(&text).unwrap()
    };
    same(&shape(&accepted[0]), &shape(&accepted[1]), "chat, front door and router");
    same(&shape(&accepted[0]), &shape(&accepted[2]), "chat, front door and default formation");

    // A poll by each way: the same document.
    let id = &accepted[0].0;
    let mut answers = Vec::new();
    for path in [
        format!("/api/f/v1/requests/{id}"),
        format!("/api/f/v1/requests/{}", id.replace('_', "%5F")),
        format!("/v1/requests/{id}"),
    ] {
        let (code, body) = json(call(reqwest::Method::GET, &path, &key).send().await.unwrap()).await;
        assert_eq!(code, 200, "{path}: {body}");
        assert_eq!(body["data"]["request_id"], id.as_str(), "{path}");
        answers.push(body);
    }
    same(&answers[0], &answers[1], "poll, front door and router");
    same(&answers[0], &answers[2], "poll, front door and default formation");

    // Refusals and errors, each the same by both ways.
    let refusals = [
        (reqwest::Method::GET, "/api/f/v1/requests/req_nope", "/api/f/v1/requests/req%5Fnope", key.clone(), None),
        (
            reqwest::Method::GET,
            &*format!("/api/f/v1/requests/{id}"),
            &*format!("/api/%66/v1/requests/{id}"),
            "wrong".into(),
            None,
        ),
        (reqwest::Method::GET, "/api/nope/v1/requests/req_1", "/api/n%6Fpe/v1/requests/req_1", key.clone(), None),
        (reqwest::Method::POST, "/api/f/v1/chat", "/api/%66/v1/chat", key.clone(), Some("{\"message\": ")),
        (reqwest::Method::POST, "/api/f/v1/chat", "/api/%66/v1/chat", key.clone(), Some("{\"message\": 7}")),
        (reqwest::Method::POST, "/api/f/v1/chat", "/api/%66/v1/chat", key.clone(), Some("{\"message\": \" \"}")),
        (reqwest::Method::POST, "/api/f/v1/chat", "/api/%66/v1/chat", "wrong".into(), Some("{\"message\": \"hi\"}")),
    ];
    for (method, front, router, key, body) in refusals {
        let mut answers = Vec::new();
        for path in [front, router] {
            let request = call(method.clone(), path, &key).header("content-type", "application/json");
            let request = match body {
                Some(body) => request.body(body),
                None => request,
            };
            let (code, answer) = json(request.send().await.unwrap()).await;
            assert!(code >= 400, "{method} {path}: {answer}");
            answers.push((code, answer));
        }
        assert_eq!(answers[0].0, answers[1].0, "{method} {front} {body:?}");
        same(&answers[0].1, &answers[1].1, &format!("{method} {front} {body:?}"));
    }

    // Both ways are counted under the router's route templates, never a raw path.
    let metrics = http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let count = |route: &str, method: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("muxi_http_requests_total{"))
            .filter(|l| l.contains(&format!("route=\"{route}\"")) && l.contains(&format!("method=\"{method}\"")))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
            .sum()
    };
    // Three chats (the default formation's too, answered by the formation's
    // route), and four refusals by each way.
    assert_eq!(count("/api/{formation_id}/v1/chat", "POST"), 3.0 + 8.0, "{metrics}");
    // Three polls, and three refusals by each way.
    assert_eq!(count("/api/{formation_id}/v1/requests/{request_id}", "GET"), 3.0 + 6.0, "{metrics}");
    assert!(!metrics.contains("route=\"/api/f/"), "raw paths are never labels");
}

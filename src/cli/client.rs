//! The HTTP side of the client: one formation's API as the user, with the MUXI
//! envelope unwrapped and error answers turned into readable messages.

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use super::{CliError, CliResult, Connection};

/// A formation's API, called with its client key as one user.
pub struct Client {
    http: reqwest::Client,
    server: String,
    base: String,
    key: String,
    pub user: String,
    pub formation: String,
}

/// A successful answer: its status and `data`.
pub struct Answer {
    pub status: u16,
    pub data: Value,
}

impl Client {
    pub fn new(conn: &Connection, formation: &str) -> CliResult<Client> {
        if formation.is_empty() || !formation.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(CliError(format!("`{formation}` is not a formation id (letters, digits, - _ .)")));
        }
        let given = conn.server();
        let server = given.trim_end_matches('/').to_string();
        if reqwest::Url::parse(&server).map(|u| !matches!(u.scheme(), "http" | "https")).unwrap_or(true) {
            return Err(CliError(format!("--server must be an http(s) URL, got `{given}`")));
        }
        let key = conn.client_key(formation)?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| CliError(format!("cannot build the HTTP client: {e}")))?;
        Ok(Client {
            http,
            base: format!("{server}/api/{formation}/v1"),
            server,
            key,
            user: conn.user.clone(),
            formation: formation.to_string(),
        })
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .header("X-Muxi-Client-Key", &self.key)
            .header("X-Muxi-User-ID", &self.user)
    }

    /// Calls `path` and returns the answer's `data`; an error answer is an error.
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> CliResult<Answer> {
        let mut request = self.request(method, path).timeout(Duration::from_secs(600));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| self.unreachable(e))?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(|e| self.unreachable(e))?;
        let doc: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status >= 400 {
            return Err(error_answer(status, &doc));
        }
        let data = match doc {
            Value::Object(mut map) if map.contains_key("data") => map.remove("data").unwrap_or(Value::Null),
            other => other,
        };
        Ok(Answer { status, data })
    }

    pub async fn get(&self, path: &str) -> CliResult<Value> {
        Ok(self.call(Method::GET, path, None).await?.data)
    }

    /// Opens a Server-Sent Events stream at `path`.
    pub async fn stream(&self, path: &str) -> CliResult<reqwest::Response> {
        let response = self
            .request(Method::GET, path)
            .header("Accept", "text/event-stream")
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = response.status().as_u16();
        let is_sse = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if status >= 400 || !is_sse {
            let text = response.text().await.unwrap_or_default();
            // Errors on a stream come as one `event: error` frame.
            let data = text.lines().find_map(|l| l.strip_prefix("data:")).unwrap_or(&text);
            let doc: Value = serde_json::from_str(data.trim()).unwrap_or(Value::String(text.clone()));
            return Err(error_answer(status, &doc));
        }
        Ok(response)
    }

    fn unreachable(&self, e: reqwest::Error) -> CliError {
        CliError(format!("cannot reach muxi-rt at {}: {e}", self.server))
    }
}

/// `code: message` of an error answer.
fn error_answer(status: u16, doc: &Value) -> CliError {
    let code = doc["code"].as_str().or(doc["type"].as_str()).unwrap_or("error");
    let message = doc["message"].as_str().or(doc["error"].as_str()).map(str::to_string).unwrap_or_else(|| {
        let text = doc.as_str().map(str::to_string).unwrap_or_else(|| doc.to_string());
        text.chars().take(300).collect()
    });
    CliError { message: format!("{message} ({code}, HTTP {status})"), code: Some(code.to_string()) }
}

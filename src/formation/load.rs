//! The loading pipeline: read -> parse YAML -> resolve secrets -> validate against
//! the schema -> build the typed [`Formation`]; and loading a whole folder.
//!
//! Every problem becomes a [`Diagnostic`] naming the file and, where the YAML
//! source allows, the line and column of the offending key or item.

mod source;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};

use source::{read_document, Source};

use super::config::{
    default_max_concurrent, AgentKind, AgentSpec, ApiKeys, AsyncSettings, LlmSettings, McpSettings, OverlordSettings,
    RetryPolicy, Timeouts, ToolSpec,
};
use super::discover::discover;
use super::locate::{display_path, pointer_push, Positions};
use super::{schema, secrets as secret_refs, Diagnostic, Formation};

/// A source of secret values (`${{ secrets.NAME }}`); the server uses the environment.
pub type Secrets<'a> = &'a dyn Fn(&str) -> Option<String>;

/// What loading a folder found.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Valid formations, in path order.
    pub formations: Vec<Formation>,
    /// Files that failed, with their problems.
    pub failures: Vec<(PathBuf, Vec<Diagnostic>)>,
    /// Problems of the folder itself (unreadable, empty).
    pub problems: Vec<Diagnostic>,
}

/// Top-level sections muxi-rt reads.
const IMPLEMENTED: [&str; 11] =
    ["schema", "id", "description", "version", "server", "llm", "agents", "overlord", "async", "mcp", "observability"];
/// Descriptive metadata: nothing to implement, so no warning.
const METADATA: [&str; 4] = ["name", "author", "url", "license"];
/// AFS sections muxi-rt knows exist and does not implement.
const AFS_UNIMPLEMENTED: [&str; 11] = [
    "runtime",
    "init",
    "input_limits",
    "memory",
    "logging",
    "scheduler",
    "a2a",
    "mcp",
    "user_credentials",
    "skills",
    "executor",
];
/// Main file names of the folder layout.
const FOLDER_LAYOUT_NAMES: [&str; 3] = ["formation.afs", "formation.yaml", "formation.yml"];
const AGENT_FILE_EXTENSIONS: [&str; 3] = ["afs", "yaml", "yml"];

const OPENAI_API_BASE: &str = "https://api.openai.com/v1";
const OLLAMA_API_BASE: &str = "http://localhost:11434/v1";
const DEFAULT_MAX_TOOL_ROUNDS: u32 = 8;

/// Loads one formation file.
pub fn load_file(path: &Path, secrets: Secrets<'_>) -> Result<Formation, Vec<Diagnostic>> {
    let (src, mut doc) = read_document(path)?;
    let warnings = drop_ignored_sections(&src, &mut doc);
    let mut errors = resolve_secrets(&src, &mut doc, secrets);
    errors.extend(schema::validate(&doc).into_iter().map(|e| src.error(&e.pointer, e.message)));
    if !errors.is_empty() {
        return Err(errors);
    }
    Builder::new(&src, &doc, secrets).build(warnings)
}

/// Loads every formation of a folder (see [`super::discover`]); duplicate ids fail.
pub fn load_dir(dir: &Path, secrets: Secrets<'_>) -> LoadReport {
    let mut report = LoadReport::default();
    let found = match discover(dir) {
        Ok(found) => found,
        Err(problem) => {
            report.problems.push(problem);
            return report;
        }
    };
    let mut first_by_id: HashMap<String, PathBuf> = HashMap::new();
    for f in found {
        match load_file(&f.file, secrets) {
            Err(diagnostics) => report.failures.push((f.file, diagnostics)),
            Ok(formation) => match first_by_id.get(&formation.id) {
                Some(first) => {
                    let diagnostic = duplicate_id(&f.file, &formation.id, first);
                    report.failures.push((f.file, vec![diagnostic]));
                }
                None => {
                    first_by_id.insert(formation.id.clone(), f.file);
                    report.formations.push(formation);
                }
            },
        }
    }
    report
}

fn duplicate_id(file: &Path, id: &str, first: &Path) -> Diagnostic {
    let message = format!("duplicate formation id `{id}`: also defined in {}", first.display());
    let diagnostic = Diagnostic::error(file, "id", message);
    let position = fs::read_to_string(file).ok().and_then(|text| Positions::parse(&text).get("/id"));
    match position {
        Some((line, column)) => diagnostic.at(line, column),
        None => diagnostic,
    }
}

/// Warns about each top-level section muxi-rt does not read and removes it, so
/// that (for instance) its secrets need not be set.
fn drop_ignored_sections(src: &Source, doc: &mut Value) -> Vec<Diagnostic> {
    let Some(map) = doc.as_object_mut() else { return Vec::new() };
    let ignored: Vec<String> =
        map.keys().filter(|k| !IMPLEMENTED.contains(&k.as_str()) && !METADATA.contains(&k.as_str())).cloned().collect();
    let mut warnings = Vec::new();
    for key in ignored {
        map.remove(&key);
        let message = if AFS_UNIMPLEMENTED.contains(&key.as_str()) {
            format!("section `{key}` is not implemented by muxi-rt and is ignored")
        } else {
            format!("unknown section `{key}` is ignored (not a section of the Agent Formation Schema)")
        };
        warnings.push(src.warning(&pointer_push("", &key), message));
    }
    warnings.sort_by_key(|w| w.line);
    warnings
}

fn resolve_secrets(src: &Source, doc: &mut Value, secrets: Secrets<'_>) -> Vec<Diagnostic> {
    secret_refs::resolve(doc, secrets)
        .into_iter()
        .map(|m| {
            src.error(&m.pointer, format!("secret `{}` is not set (used as `${{{{ secrets.{} }}}}`)", m.name, m.name))
        })
        .collect()
}

/// Deserialises a validated section into its typed shape, with its defaults.
fn typed<T: DeserializeOwned + Default>(src: &Source, doc: &Value, pointer: &str, errors: &mut Vec<Diagnostic>) -> T {
    let Some(value) = doc.pointer(pointer) else { return T::default() };
    serde_json::from_value(value.clone()).unwrap_or_else(|e| {
        errors.push(src.error(pointer, e.to_string()));
        T::default()
    })
}

/// An agent mapping and where it was written.
struct AgentDoc {
    value: Value,
    /// The agent's own file, for agents given by id; `None`: inline in the formation.
    file: Option<Source>,
    /// Pointer of the agent mapping in its source.
    base: String,
}

/// Builds the typed formation from a validated document.
struct Builder<'a> {
    src: &'a Source,
    doc: &'a Value,
    dir: PathBuf,
    folder_layout: bool,
    secrets: Secrets<'a>,
    llm: LlmSettings,
    errors: Vec<Diagnostic>,
}

impl<'a> Builder<'a> {
    fn new(src: &'a Source, doc: &'a Value, secrets: Secrets<'a>) -> Builder<'a> {
        let parent = src.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let dir = std::path::absolute(parent).unwrap_or_else(|_| parent.to_path_buf());
        let folder_layout =
            src.path.file_name().and_then(|n| n.to_str()).is_some_and(|n| FOLDER_LAYOUT_NAMES.contains(&n));
        Builder { src, doc, dir, folder_layout, secrets, llm: LlmSettings::default(), errors: Vec::new() }
    }

    fn build(mut self, warnings: Vec<Diagnostic>) -> Result<Formation, Vec<Diagnostic>> {
        self.llm = typed(self.src, self.doc, "/llm", &mut self.errors);
        let overlord = self.overlord();
        let keys = self.keys();
        let agents = self.agents();
        let triggers = self.triggers();
        let mcp = self.mcp(&agents);
        let observability = typed(self.src, self.doc, "/observability", &mut self.errors);
        let rate_limits = typed(self.src, self.doc, "/server/rate_limits", &mut self.errors);
        if !self.errors.is_empty() {
            return Err(self.errors);
        }
        let text = |key: &str| self.doc.get(key).and_then(Value::as_str).map(str::to_string);
        Ok(Formation {
            id: text("id").unwrap_or_default(),
            version: text("version").unwrap_or_else(|| "0.0.0".to_string()),
            revision: revision(&self.src.bytes),
            description: text("description").unwrap_or_default(),
            source: self.src.path.clone(),
            dir: self.dir,
            keys,
            overlord,
            llm: self.llm,
            agents,
            mcp,
            observability,
            rate_limits,
            triggers,
            warnings,
        })
    }

    /// The `mcp` section; every agent it names must exist.
    fn mcp(&mut self, agents: &[AgentSpec]) -> McpSettings {
        let mcp: McpSettings = typed(self.src, self.doc, "/mcp", &mut self.errors);
        for (i, id) in mcp.agents.iter().flatten().enumerate() {
            if !agents.iter().any(|a| &a.id == id) {
                let known: Vec<&str> = agents.iter().map(|a| a.id.as_str()).collect();
                let message = format!("no agent `{id}` in this formation (agents: {})", known.join(", "));
                self.errors.push(self.src.error(&format!("/mcp/agents/{i}"), message));
            }
        }
        mcp
    }

    fn overlord(&mut self) -> OverlordSettings {
        let async_: AsyncSettings = typed(self.src, self.doc, "/async", &mut self.errors);
        let mut workflow = self.doc.pointer("/overlord/workflow").cloned().unwrap_or(Value::Null);
        // Accepted for AFS compatibility, not read (see the schema).
        strip(&mut workflow, "/retry", "retry_on_errors");
        strip(&mut workflow, "/timeouts", "enable_adaptive_timeout");
        let workflow_doc = serde_json::json!({ "overlord": { "workflow": workflow } });
        let retry: RetryPolicy = typed(self.src, &workflow_doc, "/overlord/workflow/retry", &mut self.errors);
        let timeouts: Timeouts = typed(self.src, &workflow_doc, "/overlord/workflow/timeouts", &mut self.errors);
        let max = self.doc.pointer("/overlord/max_concurrent_requests").and_then(Value::as_u64);
        let max_concurrent_requests = max.and_then(|n| usize::try_from(n).ok()).unwrap_or_else(default_max_concurrent);
        let max_pending_per_user = self
            .doc
            .pointer("/overlord/max_pending_per_user")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok());
        OverlordSettings { async_, retry, timeouts, max_concurrent_requests, max_pending_per_user }
    }

    fn keys(&self) -> ApiKeys {
        let key = |name: &str| {
            self.doc.pointer(&format!("/server/api_keys/{name}")).and_then(Value::as_str).map(str::to_string)
        };
        ApiKeys { admin: key("admin_key"), client: key("client_key") }
    }

    fn triggers(&mut self) -> BTreeMap<String, crate::triggers::Trigger> {
        if !self.folder_layout {
            return BTreeMap::new();
        }
        crate::triggers::load_templates(&self.dir).unwrap_or_else(|diagnostics| {
            self.errors.extend(diagnostics);
            BTreeMap::new()
        })
    }

    fn agents(&mut self) -> Vec<AgentSpec> {
        let entries = self.doc.get("agents").and_then(Value::as_array).cloned().unwrap_or_default();
        let docs: Vec<AgentDoc> =
            entries.into_iter().enumerate().filter_map(|(i, entry)| self.agent_doc(i, entry)).collect();
        let mut specs: Vec<AgentSpec> = docs.iter().filter_map(|agent| self.agent(agent)).collect();
        self.check_agents(&docs, &mut specs);
        specs
    }

    /// An inline agent as is; an agent id loaded from `agents/<id>.afs`.
    fn agent_doc(&mut self, index: usize, entry: Value) -> Option<AgentDoc> {
        let base = format!("/agents/{index}");
        match entry {
            Value::String(id) => match self.agent_file(&base, &id) {
                Ok(doc) => Some(doc),
                Err(diagnostics) => {
                    self.errors.extend(diagnostics);
                    None
                }
            },
            value => Some(AgentDoc { value, file: None, base }),
        }
    }

    fn agent_file(&self, base: &str, id: &str) -> Result<AgentDoc, Vec<Diagnostic>> {
        let folder = self.dir.join("agents");
        let Some(path) =
            AGENT_FILE_EXTENSIONS.iter().map(|ext| folder.join(format!("{id}.{ext}"))).find(|p| p.is_file())
        else {
            let message = format!("agent `{id}`: no file {}/{id}.afs (nor .yaml, .yml)", folder.display());
            return Err(vec![self.src.error(base, message)]);
        };
        let (src, mut value) = read_document(&path)?;
        let mut errors = resolve_secrets(&src, &mut value, self.secrets);
        if let Some(map) = value.as_object_mut() {
            let written = map.entry("id").or_insert_with(|| Value::String(id.to_string()));
            if written.as_str() != Some(id) {
                errors
                    .push(src.error("/id", format!("this file is referenced as agent `{id}` but its id is {written}")));
            }
        }
        errors.extend(schema::validate_agent(&value).into_iter().map(|e| src.error(&e.pointer, e.message)));
        if errors.is_empty() {
            Ok(AgentDoc { value, file: Some(src), base: String::new() })
        } else {
            Err(errors)
        }
    }

    /// Builds one agent; records its problems and returns `None` when it has any.
    fn agent(&mut self, agent: &AgentDoc) -> Option<AgentSpec> {
        let src = agent.file.as_ref().unwrap_or(self.src);
        let v = &agent.value;
        let text = |key: &str| v.get(key).and_then(Value::as_str).map(str::to_string);
        let id = text("id")?;
        let kind = match (v.get("command"), v.get("url")) {
            (Some(_), Some(_)) => {
                let message = format!("agent `{id}` has both `command` and `url`: give only one");
                self.errors.push(src.error(&pointer_push(&agent.base, "url"), message));
                return None;
            }
            (Some(command), None) => self.command_kind(command, v),
            (None, Some(url)) => AgentKind::Http { url: url.as_str().unwrap_or_default().to_string() },
            (None, None) => match self.llm_kind(&id, agent, src) {
                Ok(kind) => kind,
                Err(diagnostic) => {
                    self.errors.push(diagnostic);
                    return None;
                }
            },
        };
        Some(AgentSpec {
            name: text("name").unwrap_or_else(|| id.clone()),
            description: text("description").unwrap_or_default(),
            system_message: text("system_message"),
            default: v.get("default").and_then(Value::as_bool).unwrap_or(false),
            estimated_seconds: v.get("estimated_seconds").and_then(Value::as_f64),
            id,
            kind,
        })
    }

    fn command_kind(&self, command: &Value, agent: &Value) -> AgentKind {
        let mut argv: Vec<String> = strings(command);
        if let Some(program) = argv.first_mut() {
            *program = resolve_program(&self.dir, program);
        }
        let retryable_exit_codes = agent
            .get("retryable_exit_codes")
            .and_then(Value::as_array)
            .map(|codes| codes.iter().filter_map(Value::as_i64).filter_map(|c| i32::try_from(c).ok()).collect())
            .unwrap_or_default();
        let env = agent
            .get("env")
            .and_then(Value::as_object)
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
            .unwrap_or_default();
        AgentKind::Command { argv, retryable_exit_codes, env }
    }

    fn llm_kind(&self, id: &str, agent: &AgentDoc, src: &Source) -> Result<AgentKind, Diagnostic> {
        let choice = self.model_choice(id, agent, src)?;
        let at = |message: String| choice.src.error(&choice.pointer, message);
        let (provider, _) =
            choice.model.split_once('/').filter(|(p, n)| !p.is_empty() && !n.is_empty()).ok_or_else(|| {
                at(format!("model `{}` of agent `{id}` must be written `provider/name`", choice.model))
            })?;
        let api_base = match choice.api_base.clone().or_else(|| self.setting("api_base")) {
            Some(base) => base,
            None => default_api_base(provider)
                .ok_or_else(|| {
                    at(format!("unknown provider `{provider}` for agent `{id}`: set llm.settings.api_base"))
                })?
                .to_string(),
        };
        let api_key = choice.api_key.clone().or_else(|| self.llm.api_keys.get(provider).cloned());
        if api_key.is_none() && provider == "openai" && api_base == OPENAI_API_BASE {
            return Err(at(format!("agent `{id}` uses `{}` but llm.api_keys.openai is not set", choice.model)));
        }
        let tools = agent.value.get("tools").and_then(Value::as_array).map(|t| t.iter().map(tool).collect());
        let rounds = agent.value.get("max_tool_rounds").and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok());
        Ok(AgentKind::Llm {
            model: choice.model,
            api_base,
            api_key,
            tools: tools.unwrap_or_default(),
            max_tool_rounds: rounds.unwrap_or(DEFAULT_MAX_TOOL_ROUNDS),
        })
    }

    /// The agent's `model`, else its AFS `llm_models[0]`, else the formation's `llm.models[0]`.
    fn model_choice<'s>(&'s self, id: &str, agent: &AgentDoc, src: &'s Source) -> Result<ModelChoice<'s>, Diagnostic> {
        if let Some(model) = agent.value.get("model").and_then(Value::as_str) {
            let pointer = pointer_push(&agent.base, "model");
            return Ok(ModelChoice { model: model.to_string(), api_base: None, api_key: None, src, pointer });
        }
        let own = agent.value.pointer("/llm_models/0").map(|m| (m, src, format!("{}/llm_models/0", agent.base)));
        let shared = self.llm.models.first().map(|m| (m, self.src, "/llm/models/0".to_string()));
        let Some((entry, entry_src, pointer)) = own.or(shared) else {
            let message =
                format!("agent `{id}` has no `command`, `url` or `model`, and llm.models is empty: give it one");
            return Err(src.error(&agent.base, message));
        };
        model_entry(entry, entry_src, pointer, id)
    }

    fn setting(&self, key: &str) -> Option<String> {
        self.llm.settings.get(key).and_then(Value::as_str).map(str::to_string)
    }

    /// Duplicate ids, several defaults, agent tools naming no agent.
    fn check_agents(&mut self, docs: &[AgentDoc], specs: &mut [AgentSpec]) {
        let mut seen: HashMap<&str, String> = HashMap::new();
        let mut default: Option<&str> = None;
        for doc in docs {
            let src = doc.file.as_ref().unwrap_or(self.src);
            let Some(id) = doc.value.get("id").and_then(Value::as_str) else { continue };
            if let Some(first) = seen.get(id) {
                let message = format!("duplicate agent id `{id}` (first defined at {first})");
                self.errors.push(src.error(&pointer_push(&doc.base, "id"), message));
            } else {
                seen.insert(id, where_defined(doc));
            }
            if doc.value.get("default").and_then(Value::as_bool) == Some(true) {
                match default {
                    Some(first) => {
                        let message = format!("more than one agent has `default: true` (also `{first}`)");
                        self.errors.push(src.error(&pointer_push(&doc.base, "default"), message));
                    }
                    None => default = Some(id),
                }
            }
        }
        self.check_agent_tools(docs, specs);
    }

    /// Every agent tool must name an agent of the formation; its description
    /// defaults to that agent's.
    fn check_agent_tools(&mut self, docs: &[AgentDoc], specs: &mut [AgentSpec]) {
        let descriptions: HashMap<String, String> =
            specs.iter().map(|s| (s.id.clone(), s.description.clone())).collect();
        let known = |id: &str| docs.iter().any(|d| d.value.get("id").and_then(Value::as_str) == Some(id));
        for doc in docs {
            let src = doc.file.as_ref().unwrap_or(self.src);
            let Some(tools) = doc.value.get("tools").and_then(Value::as_array) else { continue };
            for (i, t) in tools.iter().enumerate() {
                let Some(target) = t.get("agent_id").and_then(Value::as_str) else { continue };
                if !known(target) {
                    let pointer = format!("{}/tools/{i}/agent_id", doc.base);
                    let message = format!("tool names agent `{target}`, which this formation does not have");
                    self.errors.push(src.error(&pointer, message));
                }
            }
        }
        for spec in specs.iter_mut() {
            if let AgentKind::Llm { tools, .. } = &mut spec.kind {
                for t in tools.iter_mut() {
                    if let ToolSpec::Agent { description, agent_id, .. } = t {
                        if description.is_empty() {
                            *description = descriptions.get(agent_id.as_str()).cloned().unwrap_or_default();
                        }
                    }
                }
            }
        }
    }
}

/// Where an agent was written, for messages: `agents[1]` or its own file.
fn where_defined(doc: &AgentDoc) -> String {
    match &doc.file {
        Some(src) => src.path.display().to_string(),
        None => display_path(&doc.base),
    }
}

/// The model an LLM agent uses and where that was written.
struct ModelChoice<'s> {
    model: String,
    api_base: Option<String>,
    api_key: Option<String>,
    src: &'s Source,
    pointer: String,
}

/// One `llm.models` entry: `provider/name`, or a mapping with `model` (or `id`,
/// `name`, or the AFS capability `text`) and optional `api_base`, `api_key`.
fn model_entry<'s>(
    entry: &Value,
    src: &'s Source,
    pointer: String,
    agent: &str,
) -> Result<ModelChoice<'s>, Diagnostic> {
    let field = |key: &str| entry.get(key).and_then(Value::as_str).map(str::to_string);
    let model = match entry {
        Value::String(s) => Some(s.clone()),
        _ => ["model", "id", "name", "text"].iter().find_map(|k| field(k)),
    };
    let Some(model) = model else {
        let message = format!("agent `{agent}` uses this model entry, which names no model (`model: provider/name`)");
        return Err(src.error(&pointer, message));
    };
    Ok(ModelChoice { model, api_base: field("api_base"), api_key: field("api_key"), src, pointer })
}

fn default_api_base(provider: &str) -> Option<&'static str> {
    match provider {
        "openai" => Some(OPENAI_API_BASE),
        "ollama" => Some(OLLAMA_API_BASE),
        _ => None,
    }
}

/// A validated tool mapping as a [`ToolSpec`].
fn tool(t: &Value) -> ToolSpec {
    let text = |key: &str| t.get(key).and_then(Value::as_str).map(str::to_string);
    match t.get("type").and_then(Value::as_str) {
        Some("agent") => {
            let agent_id = text("agent_id").unwrap_or_default();
            ToolSpec::Agent {
                name: text("name").unwrap_or_else(|| agent_id.clone()),
                description: text("description").unwrap_or_default(),
                agent_id,
            }
        }
        _ => ToolSpec::Http {
            name: text("name").unwrap_or_default(),
            description: text("description").unwrap_or_default(),
            url: text("url").unwrap_or_default(),
            parameters: t
                .get("parameters")
                .cloned()
                .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}})),
        },
    }
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| items.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default()
}

/// A relative program path containing `/` is resolved against the formation's
/// folder; a bare name (`python3`) is left to `PATH`.
fn resolve_program(dir: &Path, program: &str) -> String {
    let path = Path::new(program);
    if !program.contains('/') || path.is_absolute() {
        return program.to_string();
    }
    let relative = path.strip_prefix(".").unwrap_or(path);
    dir.join(relative).to_string_lossy().into_owned()
}

/// Removes `key` from the mapping at `pointer` inside `value`, if there is one.
fn strip(value: &mut Value, pointer: &str, key: &str) {
    if let Some(Value::Object(map)) = value.pointer_mut(pointer) {
        map.remove(key);
    }
}

/// The first 12 hex digits of the SHA-256 of the file's bytes.
fn revision(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    hex::encode(digest)[..12].to_string()
}

#[cfg(test)]
mod tests;

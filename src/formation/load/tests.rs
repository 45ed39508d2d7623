//! Unit tests of the loading pipeline: formation files and folders, their
//! secrets, agents, models, tools and diagnostics.

use super::*;
use crate::formation::AsyncMode;

const HEAD: &str = "schema: \"1.0.0\"\nid: demo\ndescription: A test formation\n";

fn no_secrets(_: &str) -> Option<String> {
    None
}

fn some_secrets(name: &str) -> Option<String> {
    (name == "OPENAI_KEY").then(|| "sk-test".to_string())
}

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

/// Writes `text` as `tmp/demo/formation.afs` and loads it.
fn load(text: &str) -> (tempfile::TempDir, Result<Formation, Vec<Diagnostic>>) {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("demo/formation.afs");
    write(&file, text);
    let result = load_file(&file, &some_secrets);
    (tmp, result)
}

fn errors(text: &str) -> Vec<Diagnostic> {
    match load(text).1 {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(errors) => errors,
    }
}

fn one_error(text: &str) -> Diagnostic {
    let errors = errors(text);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    errors.into_iter().next().unwrap()
}

#[test]
fn the_example_formation_loads_cleanly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("formations");
    let report = load_dir(&root, &no_secrets);
    assert!(report.problems.is_empty() && report.failures.is_empty(), "{report:#?}");
    let f = &report.formations[0];
    assert_eq!((f.id.as_str(), f.version.as_str()), ("assistant", "1.0.0"));
    assert!(f.warnings.is_empty(), "{:?}", f.warnings);
    assert_eq!(f.revision.len(), 12);
    assert!(f.dir.is_absolute() && f.dir.ends_with("formations/assistant"));
    assert_eq!(f.overlord.async_.threshold_seconds, 10.0);
    assert_eq!(f.overlord.async_.mode, AsyncMode::Auto);
    assert_eq!(f.agent(None).map(|a| a.id.as_str()), Some("quick"));
    let researcher = f.agent(Some("researcher")).unwrap();
    assert_eq!(
        researcher.kind,
        AgentKind::Command {
            argv: vec!["python3".into(), "agents/research.py".into()],
            retryable_exit_codes: vec![75],
            env: BTreeMap::new()
        }
    );
}

#[test]
fn defaults_and_typed_values() {
    let (tmp, result) = load(&format!(
        "{HEAD}server:\n  api_keys:\n    admin_key: adm\nagents:\n  - id: run\n    command: [./bin/run.sh, ./arg]\n    env: {{A: b}}\n"
    ));
    let f = result.unwrap();
    assert_eq!(f.version, "0.0.0");
    assert_eq!(f.overlord, OverlordSettings::default());
    assert_eq!(f.keys, ApiKeys { admin: Some("adm".into()), client: None });
    let agent = &f.agents[0];
    assert_eq!((agent.name.as_str(), agent.description.as_str()), ("run", ""));
    let dir = std::path::absolute(tmp.path().join("demo")).unwrap();
    let AgentKind::Command { argv, env, .. } = &agent.kind else { panic!("{:?}", agent.kind) };
    assert_eq!(argv, &vec![dir.join("bin/run.sh").to_string_lossy().into_owned(), "./arg".to_string()]);
    assert_eq!(env.get("A").map(String::as_str), Some("b"));
}

#[test]
fn afs_workflow_keys_we_ignore_are_accepted() {
    let (_tmp, result) = load(&format!(
        "{HEAD}overlord:\n  persona: kind\n  workflow:\n    retry: {{max_attempts: 5, retry_on_errors: [timeout]}}\n    timeouts: {{task_timeout: 9, enable_adaptive_timeout: true}}\n"
    ));
    let f = result.unwrap();
    assert_eq!(f.overlord.retry.max_attempts, 5);
    assert_eq!(f.overlord.timeouts.task_timeout, 9.0);
}

#[test]
fn malformed_yaml_is_located() {
    let e = one_error(&format!("{HEAD}async:\n  mode: [auto\n"));
    assert!(e.message.starts_with("malformed YAML"), "{e}");
    assert!(e.line.is_some() && e.column.is_some(), "{e:?}");
}

#[test]
fn a_document_that_is_not_a_mapping_fails() {
    let e = one_error("- a\n- b\n");
    assert!(e.message.contains("found a list"), "{e}");
}

#[test]
fn wrong_type_is_located_at_its_key() {
    let e = one_error(&format!("{HEAD}async:\n  mode: auto\n  threshold_seconds: \"abc\"\n"));
    assert_eq!((e.line, e.column), (Some(6), Some(3)));
    assert_eq!(e.path, "async.threshold_seconds");
    assert_eq!(e.message, "expected number, found string \"abc\"");
    assert!(
        e.to_string()
            .ends_with("demo/formation.afs:6:3: async.threshold_seconds: expected number, found string \"abc\""),
        "{e}"
    );
}

#[test]
fn unknown_key_is_located_at_the_key() {
    let e = one_error(&format!("{HEAD}async:\n    threshhold_seconds: 5\n"));
    assert_eq!((e.line, e.column), (Some(5), Some(5)));
    assert_eq!(e.path, "async.threshhold_seconds");
    assert!(e.message.starts_with("unknown key `threshhold_seconds` (expected one of:"), "{e}");
}

#[test]
fn a_missing_secret_is_named_and_located() {
    let e = one_error(&format!("{HEAD}server:\n  api_keys:\n    admin_key: ${{{{ secrets.ADMIN_KEY }}}}\n"));
    assert!(e.message.contains("`ADMIN_KEY`"), "{e}");
    assert_eq!((e.path.as_str(), e.line, e.column), ("server.api_keys.admin_key", Some(6), Some(5)));
}

#[test]
fn unknown_sections_warn_and_their_secrets_are_not_needed() {
    let (_tmp, result) = load(&format!("{HEAD}memory:\n  api_key: ${{{{ secrets.NOPE }}}}\nextras: 1\nauthor: me\n"));
    let f = result.unwrap();
    let messages: Vec<String> = f.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(f.warnings.len(), 2, "{messages:?}");
    assert!(
        messages[0].ends_with(":4:1: memory: warning: section `memory` is not implemented by muxi-rt and is ignored"),
        "{messages:?}"
    );
    assert!(messages[1].contains("unknown section `extras`"), "{messages:?}");
}

#[test]
fn an_unreadable_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("gone.afs");
    let errors = load_file(&missing, &no_secrets).unwrap_err();
    assert_eq!(errors[0].file, missing);
    assert!(errors[0].message.contains("cannot read") && errors[0].message.contains("gone.afs"), "{:?}", errors[0]);
}

#[test]
fn an_empty_folder_is_a_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let report = load_dir(tmp.path(), &no_secrets);
    assert!(report.formations.is_empty() && report.failures.is_empty());
    assert!(report.problems[0].message.starts_with("no formation files found in"), "{:?}", report.problems);
}

#[test]
fn both_layouts_load_and_duplicate_ids_name_both_files() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let doc = |id: &str| format!("schema: \"1.0.0\"\nid: {id}\ndescription: d\n");
    write(&root.join("alpha/formation.yaml"), &doc("alpha"));
    write(&root.join("beta.afs"), &doc("beta"));
    write(&root.join("copy.afs"), &format!("# same id\n{}", doc("alpha")));
    let report = load_dir(root, &no_secrets);
    let ids: Vec<&str> = report.formations.iter().map(|f| f.id.as_str()).collect();
    assert_eq!(ids, ["alpha", "beta"]);
    assert!(report.formations[0].dir.ends_with("alpha"));
    assert_eq!(report.formations[1].dir, std::path::absolute(root).unwrap());
    assert_eq!(report.failures.len(), 1);
    let (file, diagnostics) = &report.failures[0];
    assert_eq!(file, &root.join("copy.afs"));
    let d = &diagnostics[0];
    assert!(d.message.contains("duplicate formation id `alpha`"), "{d}");
    assert!(d.message.contains(&root.join("alpha/formation.yaml").display().to_string()), "{d}");
    assert_eq!((d.file.clone(), d.line), (root.join("copy.afs"), Some(3)));
}

#[test]
fn agents_from_files() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("demo/formation.afs");
    write(&file, &format!("{HEAD}agents:\n  - helper\n  - missing\n"));
    write(&tmp.path().join("demo/agents/helper.yaml"), "name: Helper\nurl: https://example.com/run\n");
    let errors = load_file(&file, &no_secrets).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].message.contains("agent `missing`: no file"), "{}", errors[0]);
    assert_eq!((errors[0].path.as_str(), errors[0].line), ("agents[1]", Some(6)));

    write(&file, &format!("{HEAD}agents:\n  - helper\n"));
    let f = load_file(&file, &no_secrets).unwrap();
    assert_eq!(f.agents[0].name, "Helper");
    assert_eq!(f.agents[0].kind, AgentKind::Http { url: "https://example.com/run".into() });

    write(&tmp.path().join("demo/agents/helper.yaml"), "name: Helper\ncommand: oops\n");
    let errors = load_file(&file, &no_secrets).unwrap_err();
    assert!(errors[0].file.ends_with("agents/helper.yaml") && errors[0].line == Some(2), "{errors:?}");
}

#[test]
fn llm_agents_resolve_model_base_and_key() {
    let (_tmp, result) = load(&format!(
        "{HEAD}llm:\n  api_keys: {{openai: \"${{{{ secrets.OPENAI_KEY }}}}\"}}\n  models:\n    - openai/gpt-4o-mini\nagents:\n  - id: a\n    tools:\n      - {{type: agent, agent_id: b}}\n  - id: b\n    description: Bee\n    model: ollama/llama3\n"
    ));
    let f = result.unwrap();
    let AgentKind::Llm { model, api_base, api_key, tools, max_tool_rounds } = &f.agents[0].kind else { panic!() };
    assert_eq!(
        (model.as_str(), api_base.as_str(), api_key.as_deref()),
        ("openai/gpt-4o-mini", OPENAI_API_BASE, Some("sk-test"))
    );
    assert_eq!(*max_tool_rounds, 8);
    assert_eq!(tools, &vec![ToolSpec::Agent { name: "b".into(), description: "Bee".into(), agent_id: "b".into() }]);
    let AgentKind::Llm { api_base, api_key, .. } = &f.agents[1].kind else { panic!() };
    assert_eq!((api_base.as_str(), api_key.as_deref()), (OLLAMA_API_BASE, None));
}

#[test]
fn llm_agent_problems() {
    let e = one_error(&format!("{HEAD}agents:\n  - id: a\n    model: openai/gpt-4o\n"));
    assert!(e.message.contains("agent `a`") && e.message.contains("llm.api_keys.openai"), "{e}");
    let e = one_error(&format!("{HEAD}agents:\n  - id: a\n    model: acme/m1\n"));
    assert_eq!(e.message, "unknown provider `acme` for agent `a`: set llm.settings.api_base");
    let e = one_error(&format!("{HEAD}agents:\n  - id: a\n"));
    assert!(e.message.contains("agent `a` has no `command`, `url` or `model`"), "{e}");
    let e = one_error(&format!(
        "{HEAD}agents:\n  - id: a\n    model: ollama/x\n    tools: [{{type: agent, agent_id: ghost}}]\n"
    ));
    assert!(e.message.contains("`ghost`") && e.path == "agents[0].tools[0].agent_id", "{e}");
    let (_tmp, ok) = load(&format!(
        "{HEAD}llm:\n  settings: {{api_base: \"http://h/v1\"}}\nagents:\n  - id: a\n    model: acme/m1\n"
    ));
    assert!(ok.is_ok(), "{ok:?}");
}

#[test]
fn agent_set_problems() {
    let e = one_error(&format!("{HEAD}agents:\n  - id: a\n    command: [x]\n    url: http://x\n"));
    assert!(e.message.contains("both `command` and `url`") && e.path == "agents[0].url", "{e}");
    let e = one_error(&format!("{HEAD}agents:\n  - {{id: a, command: [x]}}\n  - {{id: a, command: [y]}}\n"));
    assert!(e.message.contains("duplicate agent id `a` (first defined at agents[0])") && e.line == Some(6), "{e}");
    let e = one_error(&format!(
        "{HEAD}agents:\n  - {{id: a, command: [x], default: true}}\n  - {{id: b, command: [y], default: true}}\n"
    ));
    assert!(e.message.contains("more than one agent has `default: true` (also `a`)"), "{e}");
}

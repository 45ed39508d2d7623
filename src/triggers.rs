//! Trigger templates: `triggers/*.md` beside a formation file.
//!
//! A trigger turns an incoming event (a GitHub webhook, a form post, ...) into a
//! message for an agent. Its file name (without `.md`) is its name; the file is
//! optional YAML front matter between `---` lines, then the template:
//!
//! ```text
//! ---
//! agent: triage            # or agent_id; default: the formation's default agent
//! description: New GitHub issue
//! webhook_url: https://example.com/done
//! async: true              # default true
//! ---
//! Triage issue #${{ data.issue.number }}: ${{ data.issue.title }}
//! Labels: ${{ data.issue.labels }}
//! ```
//!
//! `${{ data.a.b }}` placeholders (spaces inside the braces optional) are filled from
//! the posted data: nested keys by dots, array elements by index (`data.items.0`).
//! Strings go in as they are, numbers, booleans and `null` as their JSON text,
//! objects and arrays as compact JSON. Field paths are reported without the `data.`
//! prefix (`issue.title`): that is where they sit in the posted body. Other
//! placeholders (`${{ secrets.X }}`, anything not `data.`) are left as written.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::formation::Diagnostic;

/// One trigger template.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Trigger {
    pub name: String,
    pub description: String,
    /// The agent to run; `None` for the formation's default agent.
    pub agent_id: Option<String>,
    /// Where to send the completion webhook, when the caller gives none.
    pub webhook_url: Option<String>,
    /// Whether firing answers at once (202) rather than waiting for the result.
    pub use_async: bool,
    /// The template text (the file after its front matter).
    pub template: String,
    /// The distinct data paths the template uses (`issue.title`), in order of first use.
    pub fields: Vec<String>,
}

/// The recognised front matter keys; others are ignored.
#[derive(Debug, Default, Deserialize)]
struct FrontMatter {
    agent: Option<String>,
    agent_id: Option<String>,
    webhook_url: Option<String>,
    description: Option<String>,
    #[serde(rename = "async")]
    use_async: Option<bool>,
}

/// Loads `dir/triggers/*.md`; a folder without `triggers/` has none. Every problem of
/// every file is reported, each with its file and (where known) line.
pub fn load_templates(dir: &Path) -> Result<BTreeMap<String, Trigger>, Vec<Diagnostic>> {
    let folder = dir.join("triggers");
    let entries = match std::fs::read_dir(&folder) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => {
            return Err(vec![Diagnostic::error(&folder, "(root)", format!("cannot read the triggers folder: {e}"))])
        }
    };
    let mut paths: Vec<_> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|ext| ext == "md"))
        .collect();
    paths.sort();

    let mut triggers = BTreeMap::new();
    let mut problems = Vec::new();
    for path in paths {
        let Some(name) = path.file_stem().and_then(|s| s.to_str()).map(str::to_string) else {
            problems.push(Diagnostic::error(&path, "(root)", "trigger file name is not valid UTF-8"));
            continue;
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) => {
                problems.push(Diagnostic::error(&path, "(root)", format!("cannot read trigger: {e}")));
                continue;
            }
        };
        match parse_template(&name, &text, &path) {
            Ok(trigger) => {
                triggers.insert(name, trigger);
            }
            Err(diagnostic) => problems.push(diagnostic),
        }
    }
    if problems.is_empty() {
        Ok(triggers)
    } else {
        Err(problems)
    }
}

/// Parses one trigger file's text; `file` is only used in diagnostics.
pub fn parse_template(name: &str, text: &str, file: &Path) -> Result<Trigger, Diagnostic> {
    const PATH: &str = "front matter";
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let (front, body) = split_front_matter(text)
        .map_err(|()| Diagnostic::error(file, PATH, "front matter opened with --- is never closed").at(1, 1))?;

    let front: FrontMatter = match front {
        Some(yaml) if !is_blank_yaml(yaml) => {
            serde_yaml::from_str(yaml).map_err(|e| yaml_diagnostic(file, PATH, &e))?
        }
        _ => FrontMatter::default(),
    };
    let key_line =
        |key: &str| text.lines().position(|l| l.trim_start().starts_with(&format!("{key}:"))).map_or(1, |i| i + 1);

    let agent_id = match (front.agent, front.agent_id) {
        (Some(a), Some(b)) if a != b => {
            return Err(
                Diagnostic::error(file, PATH, "give either agent or agent_id, not both").at(key_line("agent_id"), 1)
            )
        }
        (a, b) => a.or(b),
    };
    if let Some(url) = &front.webhook_url {
        let ok = reqwest::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
        if !ok {
            return Err(Diagnostic::error(
                file,
                format!("{PATH}.webhook_url"),
                "webhook_url must be an absolute http or https URL",
            )
            .at(key_line("webhook_url"), 1));
        }
    }

    let template = body.trim().to_string();
    Ok(Trigger {
        name: name.to_string(),
        description: front.description.unwrap_or_default(),
        agent_id,
        webhook_url: front.webhook_url,
        use_async: front.use_async.unwrap_or(true),
        fields: fields(&template),
        template,
    })
}

/// A YAML error as a diagnostic located in the file (the front matter starts on
/// line 2, after the opening `---`).
fn yaml_diagnostic(file: &Path, path: &str, err: &serde_yaml::Error) -> Diagnostic {
    let mut message = err.to_string();
    match err.location() {
        Some(at) => {
            // serde_yaml appends the position within the snippet: drop it, ours is the file's.
            let suffix = format!(" at line {} column {}", at.line(), at.column());
            if let Some(stripped) = message.strip_suffix(&suffix) {
                message = stripped.to_string();
            }
            Diagnostic::error(file, path, message).at(at.line() + 1, at.column())
        }
        None => Diagnostic::error(file, path, message).at(2, 1),
    }
}

/// Splits `---\n<yaml>\n---\n<body>`; text not starting with a `---` line has no
/// front matter. `Err` when the front matter is never closed (by `---` or `...`).
fn split_front_matter(text: &str) -> Result<(Option<&str>, &str), ()> {
    let Some(first_end) = text.find('\n') else {
        return Ok((None, text));
    };
    if text[..first_end].trim_end() != "---" {
        return Ok((None, text));
    }
    let yaml_start = first_end + 1;
    let mut offset = yaml_start;
    for line in text[yaml_start..].split_inclusive('\n') {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed == "..." {
            return Ok((Some(&text[yaml_start..offset]), &text[offset + line.len()..]));
        }
        offset += line.len();
    }
    Err(())
}

/// Front matter with nothing but blank lines and comments.
fn is_blank_yaml(yaml: &str) -> bool {
    yaml.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
}

/// A piece of a template: literal text, or a `${{ data.path }}` placeholder.
enum Piece<'t> {
    Text(&'t str),
    Field { path: &'t str },
}

/// Splits a template into text and data placeholders.
fn pieces(template: &str) -> Vec<Piece<'_>> {
    const OPEN: &str = "${{";
    const CLOSE: &str = "}}";
    let mut pieces = Vec::new();
    let mut text_start = 0;
    let mut search = 0;
    while let Some(found) = template[search..].find(OPEN) {
        let open = search + found;
        let inner_start = open + OPEN.len();
        let Some(close) = template[inner_start..].find(CLOSE).map(|i| inner_start + i) else {
            break;
        };
        let inner = template[inner_start..close].trim();
        match inner.strip_prefix("data.").filter(|path| is_path(path)) {
            Some(path) => {
                if text_start < open {
                    pieces.push(Piece::Text(&template[text_start..open]));
                }
                pieces.push(Piece::Field { path });
                text_start = close + CLOSE.len();
                search = text_start;
            }
            // Not ours: leave it, but look for placeholders inside it.
            None => search = inner_start,
        }
    }
    if text_start < template.len() {
        pieces.push(Piece::Text(&template[text_start..]));
    }
    pieces
}

/// `a.b.0.c`: dot-separated, non-empty segments of letters, digits, `_` and `-`.
fn is_path(path: &str) -> bool {
    path.split('.').all(|seg| !seg.is_empty() && seg.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '-'))
}

/// The distinct data paths `template` uses, in order of first use.
pub fn fields(template: &str) -> Vec<String> {
    let mut fields: Vec<String> = Vec::new();
    for piece in pieces(template) {
        if let Piece::Field { path } = piece {
            if !fields.iter().any(|f| f == path) {
                fields.push(path.to_string());
            }
        }
    }
    fields
}

/// The value at a dotted path: object keys by name, array elements by index.
fn lookup<'v>(data: &'v Value, path: &str) -> Option<&'v Value> {
    path.split('.').try_fold(data, |value, segment| match value {
        Value::Object(map) => map.get(segment),
        Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    })
}

/// Fills the template's `${{ data.path }}` placeholders from `data`. `Err` lists every
/// missing path (distinct, in order of first use).
pub fn render(trigger: &Trigger, data: &Value) -> Result<String, Vec<String>> {
    let mut out = String::with_capacity(trigger.template.len());
    let mut missing: Vec<String> = Vec::new();
    for piece in pieces(&trigger.template) {
        match piece {
            Piece::Text(text) => out.push_str(text),
            Piece::Field { path } => match lookup(data, path) {
                Some(Value::String(s)) => out.push_str(s),
                Some(value) => out.push_str(&value.to_string()),
                None => {
                    if !missing.iter().any(|m| m == path) {
                        missing.push(path.to_string());
                    }
                }
            },
        }
    }
    if missing.is_empty() {
        Ok(out)
    } else {
        Err(missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(text: &str) -> Result<Trigger, Diagnostic> {
        parse_template("t", text, Path::new("triggers/t.md"))
    }

    #[test]
    fn front_matter_is_read() {
        let t = parse(
            "---\nagent: triage\ndescription: New issue\nwebhook_url: https://example.com/done\nasync: false\nextra: ignored\n---\n\nIssue: ${{ data.issue.title }}\n",
        )
        .expect("valid");
        assert_eq!(t.name, "t");
        assert_eq!(t.agent_id.as_deref(), Some("triage"));
        assert_eq!(t.description, "New issue");
        assert_eq!(t.webhook_url.as_deref(), Some("https://example.com/done"));
        assert!(!t.use_async);
        assert_eq!(t.template, "Issue: ${{ data.issue.title }}");
    }

    #[test]
    fn defaults_without_front_matter() {
        let t = parse("Hello ${{data.name}}").expect("valid");
        assert_eq!(t.agent_id, None);
        assert_eq!(t.description, "");
        assert!(t.use_async);
        assert_eq!(t.template, "Hello ${{data.name}}");

        let t = parse("---\nagent_id: a\n---\nbody").expect("agent_id spelling");
        assert_eq!(t.agent_id.as_deref(), Some("a"));
        let t = parse("---\n# nothing yet\n---\nbody").expect("empty front matter");
        assert_eq!((t.template.as_str(), t.use_async), ("body", true));
    }

    #[test]
    fn fields_are_distinct_in_order_of_first_use() {
        let t = parse("${{ data.b }} ${{data.a.x}} ${{ data.b }} ${{ data.items.0 }} ${{ secrets.K }} ${{ data }}")
            .expect("valid");
        assert_eq!(t.fields, ["b", "a.x", "items.0"]);
    }

    #[test]
    fn renders_nested_values() {
        let t = parse(
            "#${{ data.issue.number }} ${{ data.issue.title }} by ${{data.issue.user.login}}\nopen=${{ data.open }} first=${{ data.labels.0 }} labels=${{ data.labels }} user=${{ data.issue.user }} none=${{ data.none }} ${{ secrets.TOKEN }} ${{ env.X }}",
        )
        .expect("valid");
        let data = json!({
            "issue": {"number": 42, "title": "Crash on start", "user": {"login": "ada"}},
            "open": true,
            "labels": ["bug", "p1"],
            "none": null,
        });
        assert_eq!(
            render(&t, &data).expect("renders"),
            "#42 Crash on start by ada\nopen=true first=bug labels=[\"bug\",\"p1\"] user={\"login\":\"ada\"} none=null ${{ secrets.TOKEN }} ${{ env.X }}"
        );
    }

    #[test]
    fn every_missing_field_is_listed() {
        let t = parse(
            "${{ data.a }} ${{ data.b.c }} ${{ data.items.5 }} ${{ data.a }} ${{ data.ok }} ${{ data.ok.deeper }}",
        )
        .expect("valid");
        let data = json!({"b": {}, "items": [1], "ok": "yes"});
        assert_eq!(render(&t, &data), Err(vec!["a".into(), "b.c".into(), "items.5".into(), "ok.deeper".into()]));
    }

    #[test]
    fn malformed_front_matter_is_located() {
        let d = parse("---\nagent: triage\ndescription: [unclosed\n---\nbody").unwrap_err();
        assert_eq!(d.file, Path::new("triggers/t.md"));
        assert_eq!((d.line, d.column), (Some(3), Some(14)), "{d}");
        assert_eq!(
            d.to_string(),
            "triggers/t.md:3:14: front matter: description: invalid type: sequence, expected a string"
        );

        let d = parse("---\nagent: triage\nasync: sometimes\n---\nbody").unwrap_err();
        assert_eq!(d.line, Some(3), "{d}");
        let d = parse("---\nagent: triage\n  bad: indent: here\n---\nbody").unwrap_err();
        assert_eq!(d.line, Some(3), "{d}");

        let d = parse("---\nagent: triage\nbody without a closing line").unwrap_err();
        assert_eq!(d.line, Some(1));
        assert!(d.message.contains("never closed"));

        let d = parse("---\nwebhook_url: ftp://x\n---\nbody").unwrap_err();
        assert_eq!((d.path.as_str(), d.line), ("front matter.webhook_url", Some(2)));

        let d = parse("---\nagent: a\nagent_id: b\n---\nbody").unwrap_err();
        assert_eq!(d.line, Some(3));
    }

    #[test]
    fn loads_a_folder() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(load_templates(dir.path()), Ok(BTreeMap::new()));

        let triggers = dir.path().join("triggers");
        std::fs::create_dir(&triggers).expect("mkdir");
        std::fs::write(triggers.join("github-issue.md"), "---\nagent: triage\n---\nIssue ${{ data.issue.title }}")
            .expect("write");
        std::fs::write(triggers.join("ping.md"), "ping ${{ data.who }}").expect("write");
        std::fs::write(triggers.join("notes.txt"), "not a trigger").expect("write");
        let loaded = load_templates(dir.path()).expect("loads");
        assert_eq!(loaded.keys().collect::<Vec<_>>(), ["github-issue", "ping"]);
        assert_eq!(loaded["github-issue"].fields, ["issue.title"]);

        std::fs::write(triggers.join("bad.md"), "---\nasync: [\n---\nx").expect("write");
        std::fs::write(triggers.join("worse.md"), "---\nnever closed").expect("write");
        let problems = load_templates(dir.path()).unwrap_err();
        assert_eq!(problems.len(), 2);
        assert!(problems[0].file.ends_with("bad.md") && problems[0].line.is_some());
        assert!(problems[1].file.ends_with("worse.md"));
    }
}

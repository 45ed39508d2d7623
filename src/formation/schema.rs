//! The embedded JSON Schema of formation files, compiled once, and validation
//! errors turned into readable messages at JSON pointers.

use std::sync::OnceLock;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::{ValidationError, Validator};
use serde_json::Value;

use super::locate::{pointer_push, pointer_segments};

/// The schema, as shipped in `schema/formation.schema.json`.
pub const SCHEMA_JSON: &str = include_str!("../../schema/formation.schema.json");

/// One schema violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError {
    /// JSON pointer of the offending value (of the key itself, for unknown keys).
    pub pointer: String,
    pub message: String,
}

/// A compiled schema and the document it came from (to list expected keys).
struct Compiled {
    doc: Value,
    validator: Validator,
}

/// The schema document itself.
pub fn schema() -> &'static Value {
    &formation().doc
}

/// Validates a whole formation document.
pub fn validate(instance: &Value) -> Vec<SchemaError> {
    formation().check(instance)
}

/// Validates one agent mapping (as loaded from `agents/<id>.afs`).
pub fn validate_agent(instance: &Value) -> Vec<SchemaError> {
    agent().check(instance)
}

fn formation() -> &'static Compiled {
    static CELL: OnceLock<Compiled> = OnceLock::new();
    CELL.get_or_init(|| Compiled::new(serde_json::from_str(SCHEMA_JSON).expect("the embedded schema is valid JSON")))
}

fn agent() -> &'static Compiled {
    static CELL: OnceLock<Compiled> = OnceLock::new();
    CELL.get_or_init(|| {
        let root = &formation().doc;
        Compiled::new(serde_json::json!({
            "$schema": root["$schema"],
            "$defs": root["$defs"],
            "$ref": "#/$defs/agent",
        }))
    })
}

impl Compiled {
    fn new(doc: Value) -> Compiled {
        let validator = jsonschema::draft202012::new(&doc).expect("the embedded schema compiles");
        Compiled { doc, validator }
    }

    fn check(&self, instance: &Value) -> Vec<SchemaError> {
        let mut out = Vec::new();
        for error in self.validator.iter_errors(instance) {
            self.describe(&error, &mut out);
        }
        out.sort_by(|a, b| a.pointer.cmp(&b.pointer));
        out.dedup();
        out
    }

    fn describe(&self, error: &ValidationError<'_>, out: &mut Vec<SchemaError>) {
        let pointer = error.instance_path().as_str().to_string();
        if let ValidationErrorKind::AdditionalProperties { unexpected } = &error.kind() {
            let expected = self.expected_keys(error.schema_path().as_str());
            for key in unexpected {
                out.push(SchemaError {
                    pointer: pointer_push(&pointer, key.as_str()),
                    message: unknown_key(key.as_str(), &expected),
                });
            }
            return;
        }
        out.push(SchemaError { pointer, message: message(error) });
    }

    /// The `properties` of the schema whose `additionalProperties` failed.
    fn expected_keys(&self, schema_path: &str) -> Vec<String> {
        let parent = schema_path.strip_suffix("/additionalProperties").unwrap_or(schema_path);
        let mut node = &self.doc;
        for segment in pointer_segments(parent) {
            let next = if segment == "$ref" { self.resolve_ref(node) } else { child(node, &segment) };
            match next {
                Some(n) => node = n,
                None => return Vec::new(),
            }
        }
        let node = self.resolve_ref(node).filter(|_| node.get("properties").is_none()).unwrap_or(node);
        node.get("properties").and_then(Value::as_object).map(|m| m.keys().cloned().collect()).unwrap_or_default()
    }

    /// The target of a node's local `$ref` (`#/$defs/x`).
    fn resolve_ref(&self, node: &Value) -> Option<&Value> {
        let reference = node.get("$ref")?.as_str()?.strip_prefix('#')?;
        self.doc.pointer(reference)
    }
}

fn child<'v>(node: &'v Value, segment: &str) -> Option<&'v Value> {
    match node {
        Value::Object(map) => map.get(segment),
        Value::Array(items) => items.get(segment.parse::<usize>().ok()?),
        _ => None,
    }
}

fn unknown_key(key: &str, expected: &[String]) -> String {
    if expected.is_empty() {
        format!("unknown key `{key}`")
    } else {
        format!("unknown key `{key}` (expected one of: {})", expected.join(", "))
    }
}

/// A readable message for every error but unknown keys.
fn message(error: &ValidationError<'_>) -> String {
    let found = found(error.instance());
    match &error.kind() {
        ValidationErrorKind::Type { kind } => format!("expected {}, found {found}", type_names(kind)),
        ValidationErrorKind::Required { property } => {
            format!("missing required key `{}`", property.as_str().unwrap_or_default())
        }
        ValidationErrorKind::Enum { options } => format!("expected one of {}, found {found}", list(options)),
        ValidationErrorKind::Constant { expected_value } => format!("expected {expected_value}, found {found}"),
        ValidationErrorKind::Minimum { limit } => format!("must be at least {limit}, found {found}"),
        ValidationErrorKind::ExclusiveMinimum { limit } => format!("must be greater than {limit}, found {found}"),
        ValidationErrorKind::Maximum { limit } => format!("must be at most {limit}, found {found}"),
        ValidationErrorKind::ExclusiveMaximum { limit } => format!("must be less than {limit}, found {found}"),
        ValidationErrorKind::MinLength { limit: 1 } => "must not be empty".to_string(),
        ValidationErrorKind::MinLength { limit } => format!("must be at least {limit} characters long"),
        ValidationErrorKind::MinItems { limit } => format!("must have at least {limit} item(s)"),
        ValidationErrorKind::Pattern { pattern } => format!("{found} does not match the pattern `{pattern}`"),
        _ => error.to_string(),
    }
}

fn type_names(kind: &TypeKind) -> String {
    match kind {
        TypeKind::Single(t) => article(&t.to_string()),
        TypeKind::Multiple(set) => {
            let names: Vec<String> = set.iter().map(|t| article(&t.to_string())).collect();
            names.join(" or ")
        }
    }
}

/// `object` -> `a mapping`, `array` -> `a list`: the words of YAML authors.
fn article(json_type: &str) -> String {
    match json_type {
        "object" => "a mapping".to_string(),
        "array" => "a list".to_string(),
        "integer" => "an integer".to_string(),
        "null" => "null".to_string(),
        other => other.to_string(),
    }
}

fn list(options: &Value) -> String {
    match options {
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    }
}

/// What was found: `string "abc"`, `a mapping`, `number 0`; long values shortened.
fn found(value: &Value) -> String {
    match value {
        Value::Object(_) => "a mapping".to_string(),
        Value::Array(_) => "a list".to_string(),
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => {
            let mut shown: String = s.chars().take(60).collect();
            if shown.len() < s.len() {
                shown.push_str("...");
            }
            format!("string {}", Value::String(shown))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formation::config::{default_max_concurrent, AsyncSettings, RetryPolicy, Timeouts};
    use serde_json::json;

    fn minimal() -> Value {
        json!({"schema": "1.0.0", "id": "demo", "description": "d"})
    }

    #[test]
    fn a_minimal_formation_is_valid() {
        assert_eq!(validate(&minimal()), vec![]);
    }

    #[test]
    fn unknown_keys_point_at_the_key_and_list_the_expected_ones() {
        let mut doc = minimal();
        doc["async"] = json!({"threshhold_seconds": 5});
        doc["overlord"] = json!({"workflow": {"retry": {"max_attempt": 2}}});
        let errors = validate(&doc);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[0].pointer, "/async/threshhold_seconds");
        assert!(
            errors[0]
                .message
                .starts_with("unknown key `threshhold_seconds` (expected one of: enable_estimation, mode,"),
            "{}",
            errors[0].message
        );
        assert_eq!(errors[1].pointer, "/overlord/workflow/retry/max_attempt");
        assert!(errors[1].message.contains("max_attempts"), "{}", errors[1].message);
    }

    #[test]
    fn type_and_range_errors_are_readable() {
        let mut doc = minimal();
        doc["async"] = json!({"threshold_seconds": "abc", "webhook_retries": -1, "mode": "later"});
        let errors = validate(&doc);
        let by = |p: &str| errors.iter().find(|e| e.pointer == p).map(|e| e.message.clone()).unwrap_or_default();
        assert_eq!(by("/async/threshold_seconds"), "expected number, found string \"abc\"");
        assert_eq!(by("/async/webhook_retries"), "must be at least 0, found number -1");
        assert_eq!(by("/async/mode"), "expected one of auto, sync, async, found string \"later\"");
    }

    #[test]
    fn required_keys_and_agents() {
        let doc = json!({
            "schema": "1.0.0", "description": "d",
            "agents": ["ok-id", {"name": "no id"}, {"id": "t", "tools": [{"type": "agent"}]}, 5]
        });
        let errors = validate(&doc);
        let pointers: Vec<&str> = errors.iter().map(|e| e.pointer.as_str()).collect();
        assert!(pointers.contains(&""), "{errors:?}");
        assert!(pointers.contains(&"/agents/1"), "{errors:?}");
        assert!(pointers.contains(&"/agents/2/tools/0"), "{errors:?}");
        assert!(pointers.contains(&"/agents/3"), "{errors:?}");
        assert!(errors.iter().any(|e| e.message == "missing required key `id`"), "{errors:?}");
        assert!(errors.iter().any(|e| e.message == "missing required key `agent_id`"), "{errors:?}");
    }

    #[test]
    fn agent_files_are_validated_alone() {
        assert_eq!(validate_agent(&json!({"id": "a", "command": ["x"]})), vec![]);
        let errors = validate_agent(&json!({"id": "a", "command": [], "max_tool_rounds": 0}));
        assert_eq!(errors.len(), 2, "{errors:?}");
    }

    /// Every property in the schema explains itself (yaml-language-server shows it).
    #[test]
    fn every_property_has_a_description() {
        fn walk(node: &Value, path: &str, missing: &mut Vec<String>) {
            match node {
                Value::Object(map) => {
                    if let Some(Value::Object(props)) = map.get("properties") {
                        for (k, v) in props {
                            if v.get("description").is_none() {
                                missing.push(format!("{path}/properties/{k}"));
                            }
                        }
                    }
                    for (k, v) in map {
                        walk(v, &format!("{path}/{k}"), missing);
                    }
                }
                Value::Array(items) => items.iter().for_each(|v| walk(v, path, missing)),
                _ => {}
            }
        }
        let mut missing = Vec::new();
        walk(schema(), "", &mut missing);
        // `if` conditions only test values; they are not properties anyone writes.
        missing.retain(|p| !p.contains("/if/"));
        assert!(missing.is_empty(), "properties without a description: {missing:?}");
        assert!(schema().get("$id").is_some() && schema().get("title").is_some());
    }

    /// The serde defaults of config.rs equal the defaults the schema documents.
    #[test]
    fn schema_defaults_match_config_defaults() {
        let defs = &schema()["$defs"];
        compare_defaults(&defs["async"], serde_json::to_value(AsyncSettings::default()).unwrap(), "async");
        compare_defaults(&defs["retry"], serde_json::to_value(RetryPolicy::default()).unwrap(), "retry");
        compare_defaults(&defs["timeouts"], serde_json::to_value(Timeouts::default()).unwrap(), "timeouts");
        compare_defaults(
            &defs["observability"],
            serde_json::to_value(crate::formation::config::ObservabilitySettings::default()).unwrap(),
            "observability",
        );
        compare_defaults(
            &defs["rateLimits"],
            serde_json::to_value(crate::formation::config::RateLimits::default()).unwrap(),
            "rateLimits",
        );
        let max = &schema()["properties"]["overlord"]["properties"]["max_concurrent_requests"]["default"];
        assert_eq!(max.as_u64(), Some(default_max_concurrent() as u64));
    }

    /// `observability`, `server.rate_limits` and `max_pending_per_user` are
    /// strict and bounded like the other sections.
    #[test]
    fn observability_and_rate_limits_are_strict() {
        let mut doc = minimal();
        doc["observability"] = json!({"track_async_tasks": false});
        doc["server"] = json!({"rate_limits": {"per_key": {"requests_per_second": 0.5, "burst": 2}}});
        doc["overlord"] = json!({"max_pending_per_user": 3});
        assert!(validate(&doc).is_empty(), "{:?}", validate(&doc));
        for (pointer, bad) in [
            ("/observability", json!({"track_async_task": false})),
            ("/server/rate_limits", json!({"per_key": {"requests_per_second": 0}})),
            ("/server/rate_limits", json!({"per_key": {"burst": 2}})),
            ("/server/rate_limits", json!({"per_users": {"requests_per_second": 1}})),
            ("/overlord/max_pending_per_user", json!(0)),
        ] {
            let mut doc = minimal();
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            if parent.is_empty() {
                doc[key] = bad;
            } else {
                doc[&parent[1..]] = json!({ key: bad });
            }
            assert!(!validate(&doc).is_empty(), "{pointer}: {doc} should be refused");
        }
    }

    /// Every seconds or days setting has the maximum `crate::time` enforces.
    #[test]
    fn schema_maxima_match_the_runtime_bounds() {
        let defs = &schema()["$defs"];
        let seconds = [
            ("async", "threshold_seconds"),
            ("async", "webhook_timeout"),
            ("retry", "initial_delay"),
            ("retry", "max_delay"),
            ("timeouts", "task_timeout"),
            ("timeouts", "workflow_timeout"),
            ("agent", "estimated_seconds"),
        ];
        for (section, key) in seconds {
            let max = defs[section]["properties"][key]["maximum"].as_f64();
            assert_eq!(max, Some(crate::time::MAX_SECONDS), "{section}.{key}");
        }
        let days = defs["async"]["properties"]["retention_days"]["maximum"].as_f64();
        assert_eq!(days, Some(crate::time::MAX_RETENTION_DAYS));
        let mut doc = minimal();
        doc["overlord"] = json!({"workflow": {"timeouts": {"task_timeout": 1e300}}});
        let errors = validate(&doc);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].pointer, "/overlord/workflow/timeouts/task_timeout");
        assert!(errors[0].message.starts_with("must be at most 31536000"), "{}", errors[0].message);
    }

    fn compare_defaults(section: &Value, typed: Value, name: &str) {
        let props = section["properties"].as_object().expect("properties");
        let typed = typed.as_object().expect("a struct serialises to a mapping");
        for (key, prop) in props {
            let ours = typed.get(key).filter(|v| !v.is_null());
            match (prop.get("default"), ours) {
                (Some(d), Some(v)) => assert!(same(d, v), "{name}.{key}: schema default {d}, config default {v}"),
                (Some(d), None) => panic!("{name}.{key}: schema default {d}, config has none"),
                (None, Some(v)) => panic!("{name}.{key}: config default {v}, schema documents none"),
                (None, None) => {}
            }
        }
        for key in typed.keys() {
            assert!(props.contains_key(key), "{name}.{key} is in config.rs but not in the schema");
        }
    }

    fn same(a: &Value, b: &Value) -> bool {
        match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => x == y,
            _ => a == b,
        }
    }
}

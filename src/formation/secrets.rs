//! Resolves `${{ secrets.NAME }}` placeholders in every string of a document.
//!
//! Other `${{ ... }}` expressions (trigger templates' `${{ data.x }}`) are left
//! as written. A secret the source does not know is an error naming it, with the
//! JSON pointer of the string that holds it.

use serde_json::Value;

use super::load::Secrets;
use super::locate::pointer_push;

/// A placeholder naming a secret that the source does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingSecret {
    pub name: String,
    /// JSON pointer of the string holding the placeholder.
    pub pointer: String,
}

/// Replaces every secret placeholder in `value`'s strings; returns the missing ones.
pub fn resolve(value: &mut Value, secrets: Secrets<'_>) -> Vec<MissingSecret> {
    let mut missing = Vec::new();
    walk(value, String::new(), secrets, &mut missing);
    missing
}

fn walk(value: &mut Value, pointer: String, secrets: Secrets<'_>, missing: &mut Vec<MissingSecret>) {
    match value {
        Value::String(s) => match resolve_str(s, secrets) {
            Ok(resolved) => *s = resolved,
            Err(names) => {
                missing.extend(names.into_iter().map(|name| MissingSecret { name, pointer: pointer.clone() }))
            }
        },
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                walk(item, pointer_push(&pointer, &i.to_string()), secrets, missing);
            }
        }
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                walk(item, pointer_push(&pointer, key), secrets, missing);
            }
        }
        _ => {}
    }
}

/// Resolves the placeholders of one string, or names every secret it lacks.
pub fn resolve_str(s: &str, secrets: Secrets<'_>) -> Result<String, Vec<String>> {
    let mut out = String::with_capacity(s.len());
    let mut missing = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("${{") {
        let after = &rest[start + 3..];
        let Some(end) = after.find("}}") else { break };
        out.push_str(&rest[..start]);
        let whole = &rest[start..start + 3 + end + 2];
        match secret_name(&after[..end]) {
            Some(name) => match secrets(name) {
                Some(v) => out.push_str(&v),
                None => missing.push(name.to_string()),
            },
            None => out.push_str(whole),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    if missing.is_empty() {
        Ok(out)
    } else {
        Err(missing)
    }
}

/// `" secrets.NAME "` -> `NAME`; anything else (`data.x`) -> `None`.
fn secret_name(expr: &str) -> Option<&str> {
    let name = expr.trim().strip_prefix("secrets.")?;
    let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    valid.then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn source(name: &str) -> Option<String> {
        match name {
            "KEY" => Some("sk-123".into()),
            "HASH" => Some("abc".into()),
            _ => None,
        }
    }

    #[test]
    fn whole_string_and_embedded_placeholders() {
        assert_eq!(resolve_str("${{ secrets.KEY }}", &source), Ok("sk-123".into()));
        assert_eq!(resolve_str("${{secrets.KEY}}", &source), Ok("sk-123".into()));
        assert_eq!(
            resolve_str("https://x/h?hash=${{ secrets.HASH }}&k=${{secrets.KEY }}", &source),
            Ok("https://x/h?hash=abc&k=sk-123".into())
        );
    }

    #[test]
    fn other_expressions_are_left_alone() {
        assert_eq!(resolve_str("hi ${{ data.name }}", &source), Ok("hi ${{ data.name }}".into()));
        assert_eq!(
            resolve_str("${{ secrets. }} and ${{ unclosed", &source),
            Ok("${{ secrets. }} and ${{ unclosed".into())
        );
    }

    #[test]
    fn missing_secrets_are_named_with_their_pointer() {
        let mut doc = json!({
            "server": {"api_keys": {"admin_key": "${{ secrets.ADMIN }}", "client_key": "${{ secrets.KEY }}"}},
            "agents": [{"env": {"T": "x-${{ secrets.TOKEN }}"}}],
            "n": 3
        });
        let mut missing = resolve(&mut doc, &source);
        missing.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(
            missing,
            vec![
                MissingSecret { name: "ADMIN".into(), pointer: "/server/api_keys/admin_key".into() },
                MissingSecret { name: "TOKEN".into(), pointer: "/agents/0/env/T".into() },
            ]
        );
        assert_eq!(doc["server"]["api_keys"]["client_key"], "sk-123");
    }
}

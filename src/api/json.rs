//! JSON objects written field by field, for the answers sent most often (the
//! envelope, a 202, a status document).
//!
//! serde_json checks every byte of every key and string for characters to
//! escape, one byte at a time: for a status document that is most of the
//! cost of writing it. Here keys are static and written as they are, and a
//! string is handed to serde_json's escaping only when it holds a byte that
//! needs it. Anything else (numbers, nested values) is written by serde_json,
//! so the output is byte for byte what serialising the same fields would give.

use serde::Serialize;

/// A JSON object being written into a buffer; [`Object::end`] closes it.
pub struct Object<'b> {
    buf: &'b mut Vec<u8>,
    empty: bool,
}

impl<'b> Object<'b> {
    pub fn new(buf: &'b mut Vec<u8>) -> Object<'b> {
        buf.push(b'{');
        Object { buf, empty: true }
    }

    fn key(&mut self, key: &'static str) -> &mut Vec<u8> {
        debug_assert!(is_plain(key.as_bytes()), "key {key:?} needs escaping");
        if !self.empty {
            self.buf.push(b',');
        }
        self.empty = false;
        self.buf.push(b'"');
        self.buf.extend_from_slice(key.as_bytes());
        self.buf.extend_from_slice(b"\":");
        self.buf
    }

    pub fn str(&mut self, key: &'static str, value: &str) -> &mut Self {
        string(self.key(key), value);
        self
    }

    /// One JSON string made of `parts`, with no joined copy of them.
    pub fn str_joined<const N: usize>(&mut self, key: &'static str, parts: [&str; N]) -> &mut Self {
        let buf = self.key(key);
        if parts.iter().all(|part| is_plain(part.as_bytes())) {
            buf.push(b'"');
            parts.iter().for_each(|part| buf.extend_from_slice(part.as_bytes()));
            buf.push(b'"');
        } else {
            string(buf, &parts.concat());
        }
        self
    }

    pub fn opt_str(&mut self, key: &'static str, value: Option<&str>) -> &mut Self {
        match value {
            Some(value) => self.str(key, value),
            None => self.raw(key, "null"),
        }
    }

    /// `value` as JSON text that is already valid (`true`, `null`, a number).
    pub fn raw(&mut self, key: &'static str, json: &str) -> &mut Self {
        self.key(key).extend_from_slice(json.as_bytes());
        self
    }

    /// Any other value (a number, an option, a nested object), as serde_json writes it.
    pub fn value(&mut self, key: &'static str, value: &impl Serialize) -> &mut Self {
        let buf = self.key(key);
        let start = buf.len();
        if serde_json::to_writer(&mut *buf, value).is_err() {
            // Only a map with non-string keys or a failing `Serialize` gets here.
            buf.truncate(start);
            buf.extend_from_slice(b"null");
        }
        self
    }

    /// A value's `Display` text as a JSON string, formatted straight into the
    /// buffer (and escaped only if it turns out to need it).
    pub fn display(&mut self, key: &'static str, value: &impl std::fmt::Display) -> &mut Self {
        use std::io::Write;
        let buf = self.key(key);
        let start = buf.len();
        buf.push(b'"');
        // Writing into a Vec fails only if `value`'s `Display` does.
        let _ = write!(buf, "{value}");
        if is_plain(&buf[start + 1..]) {
            buf.push(b'"');
        } else {
            // `Display` writes UTF-8: the lossy conversion changes nothing.
            let text = String::from_utf8_lossy(&buf[start + 1..]).into_owned();
            buf.truncate(start);
            string(buf, &text);
        }
        self
    }

    /// A value that `write` writes as JSON text.
    pub fn written(&mut self, key: &'static str, write: impl FnOnce(&mut Vec<u8>)) -> &mut Self {
        write(self.key(key));
        self
    }

    /// A nested object, written by `write`.
    pub fn object(&mut self, key: &'static str, write: impl FnOnce(&mut Object)) -> &mut Self {
        let mut nested = Object::new(self.key(key));
        write(&mut nested);
        nested.end();
        self
    }

    pub fn end(self) {
        self.buf.push(b'}');
    }
}

/// `value` as a JSON string.
fn string(buf: &mut Vec<u8>, value: &str) {
    if is_plain(value.as_bytes()) {
        buf.reserve(value.len() + 2);
        buf.push(b'"');
        buf.extend_from_slice(value.as_bytes());
        buf.push(b'"');
    } else {
        // Writing a `str` into a Vec cannot fail.
        let _ = serde_json::to_writer(buf, value);
    }
}

/// Whether `value` has no byte JSON escapes (a control character, `"`, `\`).
/// No early exit: the loop is vectorised, and most strings are plain.
fn is_plain(value: &[u8]) -> bool {
    value.iter().fold(true, |plain, &b| plain & (b >= 0x20) & (b != b'"') & (b != b'\\'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        for value in ["", "plain req_01ab", "quote \" and \\ back", "tab\tnew\nline\u{1}", "é ✓ 🙂", "\u{7f}"] {
            let mut buf = Vec::new();
            string(&mut buf, value);
            assert_eq!(String::from_utf8(buf).unwrap(), serde_json::to_string(value).unwrap(), "{value:?}");
        }
    }

    #[test]
    fn an_object_is_valid_json_with_its_fields_in_order() {
        let mut buf = Vec::new();
        let mut object = Object::new(&mut buf);
        object
            .str("id", "req_\"1\"")
            .opt_str("none", None)
            .value("n", &1.5f64)
            .value("nan", &f64::NAN)
            .raw("ok", "true")
            .display("shown", &format_args!("{}-{} s", 7, 10))
            .display("escaped", &"a \"b\"\n")
            .str_joined("joined", ["/a/", "b", "/c"])
            .str_joined("joined_escaped", ["/a/", "\"b\"", "/c"])
            .object("inner", |inner| {
                inner.opt_str("s", Some("x"));
            })
            .object("empty", |_| {});
        object.end();
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            r#"{"id":"req_\"1\"","none":null,"n":1.5,"nan":null,"ok":true,"shown":"7-10 s","escaped":"a \"b\"\n","joined":"/a/b/c","joined_escaped":"/a/\"b\"/c","inner":{"s":"x"},"empty":{}}"#
        );
    }
}

//! Maps JSON pointers (`/agents/1/command`) back to places in the YAML source, and
//! to the dotted paths diagnostics display (`agents[1].command`).
//!
//! One pass over the YAML events (yaml-rust2 keeps positions, serde_yaml does not)
//! records where each mapping key and each sequence item starts.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Where each node of a YAML document starts, by JSON pointer.
#[derive(Debug, Default, Clone)]
pub struct Positions {
    marks: HashMap<String, Marker>,
}

impl Positions {
    /// Reads the first document of `source`. A document yaml-rust2 cannot parse
    /// keeps the positions found before the error.
    pub fn parse(source: &str) -> Positions {
        let mut recorder = Recorder::default();
        let _ = Parser::new_from_str(source).load(&mut recorder, false);
        Positions { marks: recorder.marks }
    }

    /// The 1-based (line, column) of the node at `pointer`: the key of a mapping
    /// member, the start of a sequence item.
    pub fn get(&self, pointer: &str) -> Option<(usize, usize)> {
        self.marks.get(pointer).map(|m| (m.line(), m.col() + 1))
    }

    /// Like [`Positions::get`], falling back to the nearest ancestor that exists
    /// (a missing required key is reported at its parent).
    pub fn find(&self, pointer: &str) -> Option<(usize, usize)> {
        let mut p = pointer;
        loop {
            if let Some(pos) = self.get(p) {
                return Some(pos);
            }
            match p.rfind('/') {
                Some(i) => p = &p[..i],
                None => return None,
            }
        }
    }
}

/// Appends one segment to a JSON pointer, escaping `~` and `/`.
pub fn pointer_push(pointer: &str, segment: &str) -> String {
    format!("{pointer}/{}", segment.replace('~', "~0").replace('/', "~1"))
}

/// The segments of a JSON pointer, unescaped.
pub fn pointer_segments(pointer: &str) -> impl Iterator<Item = String> + '_ {
    pointer.split('/').skip(1).map(|s| s.replace("~1", "/").replace("~0", "~"))
}

/// The dotted display path of a pointer: `/agents/1/command` -> `agents[1].command`,
/// `` -> `(root)`.
pub fn display_path(pointer: &str) -> String {
    let mut out = String::new();
    for segment in pointer_segments(pointer) {
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            out.push('[');
            out.push_str(&segment);
            out.push(']');
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&segment);
        }
    }
    if out.is_empty() {
        "(root)".to_string()
    } else {
        out
    }
}

/// What the parser is inside of.
enum Frame {
    /// A mapping at `ptr` (`None`: inside a complex key, positions not recorded).
    Map {
        ptr: Option<String>,
        state: MapState,
    },
    Seq {
        ptr: Option<String>,
        next: usize,
    },
}

enum MapState {
    /// Expecting a key. `fix` names the mapping itself when its recorded start
    /// should move to its first key (block mappings report their start late).
    Key { fix: Option<String> },
    /// Expecting the value of the key at this pointer.
    Value(Option<String>),
}

#[derive(Default)]
struct Recorder {
    stack: Vec<Frame>,
    marks: HashMap<String, Marker>,
    done: bool,
}

impl Recorder {
    fn record(&mut self, ptr: &str, mark: Marker) {
        self.marks.entry(ptr.to_string()).or_insert(mark);
    }

    /// Moves a container's recorded start earlier when its first child begins before it.
    fn fix_start(&mut self, ptr: &str, mark: Marker) {
        if let Some(m) = self.marks.get_mut(ptr) {
            if mark.index() < m.index() {
                *m = mark;
            }
        }
    }

    /// Handles a node (scalar, alias or container start) and returns its pointer,
    /// and whether its start mark may be moved to its first child.
    fn node(&mut self, ev: &Event, mark: Marker) -> (Option<String>, bool) {
        match self.stack.last_mut() {
            None => {
                self.record("", mark);
                (Some(String::new()), true)
            }
            Some(Frame::Seq { ptr, next }) => {
                let child = ptr.as_deref().map(|p| pointer_push(p, &next.to_string()));
                *next += 1;
                if let Some(c) = &child {
                    self.record(c, mark);
                }
                (child, true)
            }
            Some(Frame::Map { ptr, state }) => match std::mem::replace(state, MapState::Value(None)) {
                MapState::Value(child) => {
                    *state = MapState::Key { fix: None };
                    (child, false)
                }
                MapState::Key { fix } => {
                    let key = match ev {
                        Event::Scalar(k, ..) => ptr.as_deref().map(|p| pointer_push(p, k)),
                        _ => None,
                    };
                    *state = MapState::Value(key.clone());
                    if let Some(f) = fix {
                        self.fix_start(&f, mark);
                    }
                    if let Some(k) = &key {
                        self.record(k, mark);
                    }
                    // A complex key's own contents are not addressable.
                    (None, false)
                }
            },
        }
    }
}

impl MarkedEventReceiver for Recorder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.done {
            return;
        }
        match ev {
            Event::Scalar(..) | Event::Alias(_) => {
                self.node(&ev, mark);
            }
            Event::MappingStart(..) => {
                let (ptr, fixable) = self.node(&ev, mark);
                let fix = if fixable { ptr.clone() } else { None };
                self.stack.push(Frame::Map { ptr, state: MapState::Key { fix } });
            }
            Event::SequenceStart(..) => {
                let (ptr, _) = self.node(&ev, mark);
                self.stack.push(Frame::Seq { ptr, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::DocumentEnd => self.done = true,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
# a comment
id: demo
async:
  mode: auto
  threshold_seconds: 30
agents:
  - id: quick
    command: [\"python3\", \"a.py\"]
  - name: second
    command:
      - ./run.sh
      - --fast
  - plain
\"a/b\": {x: 1}
";

    #[test]
    fn finds_keys_and_items() {
        let p = Positions::parse(DOC);
        assert_eq!(p.get("/id"), Some((2, 1)));
        assert_eq!(p.get("/async"), Some((3, 1)));
        assert_eq!(p.get("/async/threshold_seconds"), Some((5, 3)));
        assert_eq!(p.get("/agents/0"), Some((7, 5)));
        assert_eq!(p.get("/agents/0/command"), Some((8, 5)));
        assert_eq!(p.get("/agents/0/command/1"), Some((8, 26)));
        assert_eq!(p.get("/agents/1/command"), Some((10, 5)));
        assert_eq!(p.get("/agents/1/command/1"), Some((12, 9)));
        assert_eq!(p.get("/agents/2"), Some((13, 5)));
        assert_eq!(p.get("/a~1b/x"), Some((14, 9)));
        assert_eq!(p.get("/nope"), None);
    }

    #[test]
    fn root_is_first_key_and_find_falls_back_to_ancestors() {
        let p = Positions::parse(DOC);
        assert_eq!(p.get(""), Some((2, 1)));
        assert_eq!(p.find("/async/missing"), Some((3, 1)));
        assert_eq!(p.find("/missing/deeper"), Some((2, 1)));
    }

    #[test]
    fn broken_yaml_keeps_what_came_before() {
        let p = Positions::parse("a: 1\nb: [\n");
        assert_eq!(p.get("/a"), Some((1, 1)));
    }

    #[test]
    fn display_paths() {
        assert_eq!(display_path(""), "(root)");
        assert_eq!(display_path("/async/threshold_seconds"), "async.threshold_seconds");
        assert_eq!(display_path("/agents/1/command"), "agents[1].command");
        assert_eq!(display_path("/agents/1/command/0"), "agents[1].command[0]");
        assert_eq!(display_path("/a~1b/c~0d"), "a/b.c~d");
        assert_eq!(pointer_push("/x", "a/b~"), "/x/a~1b~0");
    }
}

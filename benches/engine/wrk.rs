//! The issue's own measure beside the bench's: `wrk -t1 -c64` (issue 14 states
//! its figures so) against two servers, in rotating rounds, when wrk is
//! installed: accept against the floor, polls against bare GET. Its rounds
//! are longer than `load.rs`'s and its cost per request differs, so its
//! ratios differ from the bench's own; they are printed beside the bench's
//! figures, never instead of them.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

/// Requests per second of each round, per side.
pub struct Rounds {
    pub base: Vec<f64>,
    pub muxi: Vec<f64>,
    /// Answers that were not 2xx or 3xx, over all rounds (must be 0).
    pub errors: u64,
}

impl Rounds {
    /// Total muxi-rt throughput over the baseline's (rounds are equally long).
    pub fn ratio(&self) -> f64 {
        self.muxi.iter().sum::<f64>() / self.base.iter().sum::<f64>()
    }
}

/// A wrk script: every request has `headers`; a POST of `body` to `path`, or
/// GETs of `path` followed by each of `ids` in turn.
pub struct Script<'a> {
    pub headers: &'a [(&'a str, &'a str)],
    pub post: Option<&'a str>,
    pub path: &'a str,
    pub ids: &'a [String],
}

impl Script<'_> {
    fn write(&self, file: &Path) {
        let mut lua = String::new();
        for (name, value) in self.headers {
            lua.push_str(&format!("wrk.headers[{}] = {}\n", lua_string(name), lua_string(value)));
        }
        match self.post {
            Some(body) => lua.push_str(&format!("wrk.method = \"POST\"\nwrk.body = {}\n", lua_string(body))),
            None => {
                let ids: Vec<String> = self.ids.iter().map(|id| lua_string(id)).collect();
                lua.push_str(&format!(
                    "local ids = {{{}}}\nlocal i = 0\nrequest = function()\n  i = i + 1\n  \
                     return wrk.format(\"GET\", {} .. ids[(i % #ids) + 1])\nend\n",
                    ids.join(", "),
                    lua_string(self.path)
                ));
            }
        }
        std::fs::write(file, lua).expect("write the wrk script");
    }
}

/// `rounds` rounds of `seconds` each of `script` from `wrk -t1 -c<connections>`
/// against `base` and `muxi`, alternating which goes first. `None` when wrk
/// cannot be run.
pub fn compare(
    base: SocketAddr,
    muxi: SocketAddr,
    script: &Script,
    file: &Path,
    (rounds, seconds, connections): (usize, u32, usize),
) -> Option<Rounds> {
    script.write(file);
    // A POST goes to its path; GETs build theirs in the script.
    let url = |addr: SocketAddr| format!("http://{addr}{}", if script.post.is_some() { script.path } else { "/" });
    let run = |addr: SocketAddr| -> Option<(f64, u64)> {
        let out = Command::new("wrk")
            .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s"), "-s"])
            .arg(file)
            .arg(url(addr))
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |label: &str| {
            text.lines().find_map(|line| line.trim().strip_prefix(label).map(|rest| rest.trim().to_owned()))
        };
        let rate = field("Requests/sec:")?.parse().ok()?;
        let errors = field("Non-2xx or 3xx responses:").and_then(|n| n.parse().ok()).unwrap_or(0);
        Some((rate, errors))
    };
    // A first run each, not counted: wrk is there, and both servers are warm.
    run(base)?;
    run(muxi)?;
    let mut out = Rounds { base: Vec::new(), muxi: Vec::new(), errors: 0 };
    for round in 0..rounds {
        let order = if round % 2 == 0 { [base, muxi] } else { [muxi, base] };
        for addr in order {
            let (rate, errors) = run(addr)?;
            out.errors += errors;
            if addr == base { &mut out.base } else { &mut out.muxi }.push(rate);
        }
    }
    Some(out)
}

/// `text` as a Lua string literal.
fn lua_string(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

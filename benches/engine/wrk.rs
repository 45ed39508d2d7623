//! The issue's own measure beside the bench's: `wrk -t1 -c64` (issue 14 states
//! its figures so) against the floor and muxi-rt, in rotating rounds, when wrk
//! is installed. wrk spends more CPU per request than `load.rs`'s generator,
//! which leaves the servers less of the two CPUs: the same servers measure
//! closer to each other under wrk. Printed beside the bench's figures, never
//! instead of them.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

/// Requests per second of each round, per side.
pub struct Rounds {
    pub floor: Vec<f64>,
    pub muxi: Vec<f64>,
    /// Answers that were not 2xx, over all rounds (must be 0).
    pub errors: u64,
}

impl Rounds {
    /// Total muxi-rt throughput over total floor throughput (rounds are equally long).
    pub fn ratio(&self) -> f64 {
        self.muxi.iter().sum::<f64>() / self.floor.iter().sum::<f64>()
    }
}

/// `rounds` rounds of `seconds` each of chat POSTs from `wrk -t1 -c<connections>`,
/// alternating which side goes first. `None` when wrk cannot be run.
pub fn accept(
    floor: SocketAddr,
    muxi: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    dir: &Path,
    (rounds, seconds, connections): (usize, u32, usize),
) -> Option<Rounds> {
    let script = dir.join("post.lua");
    let mut lua = format!("wrk.method = \"POST\"\nwrk.body = {}\n", lua_string(body));
    for (name, value) in headers {
        lua.push_str(&format!("wrk.headers[{}] = {}\n", lua_string(name), lua_string(value)));
    }
    std::fs::write(&script, lua).expect("write the wrk script");
    let run = |addr: SocketAddr| -> Option<(f64, u64)> {
        let out = Command::new("wrk")
            .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s"), "-s"])
            .arg(&script)
            .arg(format!("http://{addr}{path}"))
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
    // A short run first: wrk is there, and both servers answer.
    run(floor)?;
    run(muxi)?;
    let mut out = Rounds { floor: Vec::new(), muxi: Vec::new(), errors: 0 };
    for round in 0..rounds {
        let order = if round % 2 == 0 { [floor, muxi] } else { [muxi, floor] };
        for addr in order {
            let (rate, errors) = run(addr)?;
            out.errors += errors;
            if addr == floor { &mut out.floor } else { &mut out.muxi }.push(rate);
        }
    }
    Some(out)
}

/// `text` as a Lua string literal.
fn lua_string(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

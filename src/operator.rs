//! Operator tools: `graph`, `inspect` and `tap`.

use anyhow::{Context as _, Result};
use millrace_config::{KeyExtractor, Role, Topology};
use millrace_engine::{inspect, state_of, Plan, Registry};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

/// The topology as Graphviz DOT.
pub fn graph(file: &Path, registry: &Registry) -> Result<String> {
    let topology = Topology::load(file)?;
    Plan::build(topology.clone(), registry).context("checking component options")?;
    let mut dot =
        String::from("digraph millrace {\n  rankdir=LR;\n  node [fontname=\"Helvetica\"];\n");
    for c in topology.components() {
        let shape = match c.role {
            Role::Source => "invhouse",
            Role::Computation => "box",
            Role::Sink => "house",
        };
        dot.push_str(&format!(
            "  \"{}\" [shape={shape}, label=\"{}\\n{}\"];\n",
            c.name, c.name, c.kind
        ));
    }
    for c in topology.components() {
        for input in &c.inputs {
            let mut labels = Vec::new();
            if let Some(o) = &input.stream.output {
                labels.push(o.clone());
            }
            match &input.key {
                KeyExtractor::Key => {}
                KeyExtractor::Value => labels.push("key=value".into()),
                KeyExtractor::Json(p) => labels.push(format!("key=json:{p}")),
                KeyExtractor::Field { index, .. } => labels.push(format!("key=field:{index}")),
            }
            let attrs = if labels.is_empty() {
                String::new()
            } else {
                format!(" [label=\"{}\"]", labels.join(", ").replace('"', "\\\""))
            };
            dot.push_str(&format!(
                "  \"{}\" -> \"{}\"{attrs};\n",
                input.stream.component, c.name
            ));
        }
    }
    dot.push_str("}\n");
    Ok(dot)
}

fn time(micros: i64) -> String {
    match micros {
        i64::MAX => "end of input".to_owned(),
        m => format!("{m}us ({:.3}s since the epoch)", m as f64 / 1e6),
    }
}

/// A summary of a data directory, or one key's state.
pub fn inspect_dir(
    dir: &Path,
    component: Option<&str>,
    key: Option<&str>,
    json: bool,
) -> Result<String> {
    let (store, data) =
        inspect(dir).with_context(|| format!("opening {} read-only", dir.display()))?;
    if let Some(key) = key {
        let component = component.context("--key needs --component NAME")?;
        let value = state_of(&store, &data, component, key.as_bytes())?;
        return Ok(match value {
            Some(v) => format!("{}\n", String::from_utf8_lossy(&v)),
            None => format!("no state for key {key:?} in {component}\n"),
        });
    }
    if json {
        return Ok(serde_json::to_string_pretty(&data)? + "\n");
    }
    let mut out = format!(
        "{}: shards per computation: {}\n{:<20} {:>6} {:>10} {:>8} {:>8}  {}\n",
        dir.display(),
        data.shards.map_or("unknown".into(), |s| s.to_string()),
        "component",
        "shards",
        "state",
        "outbox",
        "timers",
        "low watermark / position"
    );
    for (name, c) in &data.components {
        if component.is_some_and(|want| want != name) {
            continue;
        }
        let mut tail = c.low_watermark.map_or("-".to_owned(), time);
        if !c.positions.is_empty() {
            let p: Vec<String> = c.positions.values().cloned().collect();
            tail = format!("{tail}; position {}", p.join(", "));
        }
        out.push_str(&format!(
            "{:<20} {:>6} {:>10} {:>8} {:>8}  {}\n",
            name,
            c.shards.len(),
            c.state_keys,
            c.outbox,
            c.timers,
            tail
        ));
    }
    Ok(out)
}

/// Prints the records leaving `component` of the worker at `addr`, live.
pub fn tap(addr: &str, component: &str, limit: Option<u64>) -> Result<()> {
    let mut stream =
        std::net::TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    // The token, when the worker wants one, as `millrace stop` sends it; the
    // component's name encoded so that it cannot add to the request.
    let auth = crate::savepoints::bearer_header();
    let component =
        percent_encoding::utf8_percent_encode(component, percent_encoding::NON_ALPHANUMERIC);
    write!(
        stream,
        "GET /tap?component={component} HTTP/1.1\r\nHost: {addr}\r\n{auth}\r\n"
    )?;
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status)?;
    let ok = status.split_whitespace().nth(1) == Some("200");
    let mut line = String::new();
    // Skip the headers.
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
    }
    if !ok {
        let mut body = String::new();
        let _ = std::io::Read::read_to_string(&mut reader, &mut body);
        anyhow::bail!("{addr} refused the tap: {} {}", status.trim(), body.trim());
    }
    let stdout = std::io::stdout();
    let mut seen = 0;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut out = stdout.lock();
        out.write_all(line.as_bytes())?;
        out.flush()?;
        seen += 1;
        if limit.is_some_and(|l| seen >= l) {
            return Ok(());
        }
    }
}

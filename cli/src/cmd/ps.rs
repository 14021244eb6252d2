//! `strata ps`: the models the daemon has loaded (`GET /api/ps`).

use std::path::PathBuf;

use serde_json::Value;

use crate::client::Client;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The daemon's socket (default: where stratad puts it).
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    let ps = Client::new(args.socket).json("GET", "/api/ps", None)?;
    print!("{}", render(&ps)?);
    Ok(())
}

/// The `/api/ps` answer as a table, one model a line.
fn render(ps: &Value) -> anyhow::Result<String> {
    let models = ps["models"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("the daemon's /api/ps answer has no models list"))?;
    let mut rows = vec![
        [
            "NAME",
            "ARCH",
            "SIZE",
            "KV",
            "CONTEXT",
            "ACTIVE",
            "QUEUED",
            "IDLE",
            "KEEP ALIVE",
        ]
        .map(String::from),
    ];
    for m in models {
        let int = |k: &str| m[k].as_u64().map_or("-".into(), |n| n.to_string());
        let bytes = |k: &str| m[k].as_u64().map_or("-".into(), human_bytes);
        let secs = |k: &str| m[k].as_f64().map_or("-".into(), human_secs);
        rows.push([
            m["name"].as_str().unwrap_or("?").to_owned(),
            m["arch"].as_str().unwrap_or("-").to_owned(),
            bytes("size_bytes"),
            bytes("kv_bytes"),
            int("n_ctx"),
            int("active_sequences"),
            int("queued"),
            secs("idle_s"),
            match (m["keep_loaded"].as_bool(), m["keep_alive_s"].as_f64()) {
                // Named at start: the keep-alive does not apply.
                (Some(true), _) | (_, Some(0.0)) => "forever".into(),
                _ => secs("keep_alive_s"),
            },
        ]);
    }
    let mut widths = [0usize; 9];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let cells: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    let loading: Vec<&str> = ps["loading"]
        .as_array()
        .map(|l| l.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if !loading.is_empty() {
        out.push_str(&format!("(loading: {})\n", loading.join(", ")));
    } else if models.is_empty() {
        out.push_str("(no models loaded; `strata load MODEL` loads one)\n");
    }
    Ok(out)
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn human_secs(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "-".into();
    }
    if s < 60.0 {
        format!("{s:.0}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_from_api_ps() -> anyhow::Result<()> {
        let ps = serde_json::json!({"models": [{"name": "gemma3-270m", "arch": "gemma3",
            "size_bytes": 291557888u64, "n_ctx": 4096, "parallel": 4, "kv_bytes": 1234567,
            "active_sequences": 1, "queued": 0, "idle_s": 0.0, "keep_alive_s": 300,
            "tokens_generated": 512}]});
        let table = render(&ps)?;
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2, "{table}");
        assert!(lines[0].starts_with("NAME"));
        for cell in [
            "gemma3-270m",
            "gemma3",
            "278.1 MiB",
            "1.2 MiB",
            "4096",
            "0s",
            "5m00s",
        ] {
            assert!(lines[1].contains(cell), "{cell} not in {table}");
        }
        Ok(())
    }

    #[test]
    fn empty_and_malformed_answers() {
        let empty = render(&serde_json::json!({"models": []}));
        assert!(empty.is_ok_and(|t| t.contains("no models loaded")));
        let loading = render(&serde_json::json!({"models": [], "loading": ["qwen"]}));
        assert!(loading.is_ok_and(|t| t.contains("(loading: qwen)")));
        let kept = render(&serde_json::json!({"models": [
            {"name": "m", "keep_alive_s": 300, "keep_loaded": true}]}));
        assert!(kept.is_ok_and(|t| t.contains("forever")));
        assert!(render(&serde_json::json!({"oops": 1})).is_err());
        // Missing or mistyped fields show as '-', never a panic.
        let odd = render(&serde_json::json!({"models": [{"name": 3, "idle_s": "x"}]}));
        assert!(odd.is_ok_and(|t| t.contains('?')));
    }
}

//! `strata run --socket PATH`: the same generation as `strata run`, done by a running stratad
//! (`POST /v1/completions`, streamed) instead of in-process. The prompt is echoed and the text
//! streamed exactly as the in-process path prints them, so scripts see the same output.

use std::io::{Read as _, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, bail};
use serde_json::json;

use super::Args;
use crate::client::{Client, error_message, read_sse};

/// Flags that only mean something in-process; given with `--socket`, they are an error rather
/// than silently ignored.
fn refuse_local_flags(args: &Args) -> anyhow::Result<()> {
    let refused = [
        (args.conversation, "-cnv (use `strata chat` with a daemon)"),
        (args.ignore_eos, "--ignore-eos"),
        (
            args.ctx_size.is_some(),
            "-c/--ctx-size (the daemon's ctx_size applies)",
        ),
        (
            args.threads.is_some(),
            "-t/--threads (the daemon's threads apply)",
        ),
        (
            args.residency.is_given(),
            "--ram-budget/--prefetch/--mmap/--io/-ot/--cpu-moe (the daemon loads the model)",
        ),
        (
            args.kv.is_given(),
            "--cache-type-k/--cache-type-v/--kv-budget (the daemon's kv settings apply)",
        ),
        (
            args.spec.is_given(),
            "-md/--spec-type/--spec-draft-n-max/--spec-draft-n-min (the daemon's per-model spec settings apply)",
        ),
        (args.verbose, "--verbose"),
        (args.mlock, "--mlock (the daemon holds the model)"),
        (
            args.threads_batch.is_some(),
            "-tb/--threads-batch (the daemon's threads apply)",
        ),
        (
            args.prompt_cache.is_some(),
            "--prompt-cache (the daemon keeps its own KV caches)",
        ),
    ];
    if let Some((_, flag)) = refused.iter().find(|(given, _)| *given) {
        bail!("{flag} cannot be used with --socket");
    }
    Ok(())
}

pub fn exec(
    args: &Args,
    model: &str,
    socket: PathBuf,
    prompt: Option<String>,
) -> anyhow::Result<()> {
    refuse_local_flags(args)?;
    let prompt = prompt.unwrap_or_default();
    let mut body = json!({
        "model": model,
        "prompt": prompt,
        "stream": true,
        "temperature": args.temp.max(0.0),
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repeat_penalty": args.repeat_penalty,
        "repeat_last_n": args.repeat_last_n,
    });
    if args.n_predict >= 0 {
        // The in-process path always prints the first sampled token, even with -n 0.
        body["max_tokens"] = json!(args.n_predict.max(1));
    }
    if !args.reverse_prompt.is_empty() {
        // The API's stop strings end the answer where a reverse prompt would (the daemon
        // leaves the stop string itself out of the text).
        body["stop"] = json!(args.reverse_prompt);
    }
    if args.seed >= 0 {
        body["seed"] = json!(args.seed);
    }
    let client = Client::new(Some(socket));
    let t0 = Instant::now();
    let resp = client.send("POST", "/v1/completions", Some(&body))?;
    if !(200..300).contains(&resp.status) {
        let mut bytes = Vec::new();
        let _ = resp.body.take(1 << 20).read_to_end(&mut bytes);
        bail!("{}", error_message(resp.status, &bytes));
    }
    let mut out = std::io::stdout().lock();
    if !args.no_display_prompt {
        out.write_all(prompt.as_bytes())?;
        out.flush()?;
    }
    let mut body = resp.body;
    let mut write_err = None;
    let mut usage = (0, 0);
    let mut t_first = None;
    read_sse(&mut body, &mut |v| {
        if let Some(text) = v["choices"][0]["text"].as_str()
            && !text.is_empty()
        {
            t_first.get_or_insert_with(Instant::now);
            if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                write_err = Some(e);
                return false;
            }
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            usage = (
                u["prompt_tokens"].as_u64().unwrap_or(0),
                u["completion_tokens"].as_u64().unwrap_or(0),
            );
        }
        true
    })
    .context("generating through the daemon")?;
    if let Some(e) = write_err {
        return Err(e.into());
    }
    writeln!(out)?;
    drop(out);
    let total = t0.elapsed().as_secs_f64();
    let gen_s = t_first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let tps = if gen_s > 0.0 && usage.1 > 1 {
        (usage.1 - 1) as f64 / gen_s
    } else {
        0.0
    };
    eprintln!();
    eprintln!(
        "strata: through stratad at {}: {} prompt tokens, {} generated in {total:.2} s \
         ({tps:.2} tokens per second after the first)",
        client.socket().display(),
        usage.0,
        usage.1
    );
    Ok(())
}

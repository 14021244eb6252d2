//! `strata load MODEL` and `strata unload MODEL`: ask the daemon to load a model now (so the
//! first request doesn't wait for it) or to free its memory.

use std::path::PathBuf;

use serde_json::json;

use crate::client::Client;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model: a store name (`strata list`).
    pub model: String,
    /// The daemon's socket (default: where stratad puts it).
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

pub fn load(args: Args) -> anyhow::Result<()> {
    let v =
        Client::new(args.socket).json("POST", "/api/load", Some(&json!({"model": args.model})))?;
    match (v["status"].as_str(), v["load_ms"].as_f64()) {
        (Some("already_loaded"), _) => println!("{} was already loaded", args.model),
        (_, Some(ms)) => println!("loaded {} in {:.0} ms", args.model, ms),
        _ => println!("loaded {}", args.model),
    }
    Ok(())
}

pub fn unload(args: Args) -> anyhow::Result<()> {
    Client::new(args.socket).json("POST", "/api/unload", Some(&json!({"model": args.model})))?;
    println!("unloaded {}", args.model);
    Ok(())
}

//! `strata rm NAME...`: delete models from the store.

use anyhow::Context as _;
use strata_storage::store::Store;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Names of the models to delete (as `strata list` shows them).
    #[arg(required = true)]
    pub names: Vec<String>,
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    let store = Store::open_default().context("opening the model store")?;
    for name in &args.names {
        store
            .remove(name)
            .with_context(|| format!("removing '{name}'"))?;
        eprintln!("deleted '{name}'");
    }
    Ok(())
}

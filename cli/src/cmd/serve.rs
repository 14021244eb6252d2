//! `strata serve`: Ollama's verb for starting the server, which in strata is its own binary,
//! `stratad`. The flags that follow go to it unchanged.

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// stratad's flags (`strata serve --help` is this text; `strata serve -- --help` is
    /// stratad's).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "STRATAD_FLAGS"
    )]
    pub flags: Vec<OsString>,
}

/// `stratad` beside this executable (both installed by cargo into the same bin folder, or
/// built into the same target folder), else the first on PATH.
fn find_stratad() -> Option<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("stratad")))
        .filter(|p| p.is_file());
    beside.or_else(|| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("stratad"))
                .find(|p| p.is_file())
        })
    })
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    let Some(stratad) = find_stratad() else {
        anyhow::bail!(
            "strata serve runs the daemon, stratad, which is not installed beside strata or on \
             PATH: install it with `cargo install --path daemon` (from strata's source), then \
             run `strata serve` or `stratad` again"
        );
    };
    let flags: Vec<OsString> = match args.flags.first() {
        Some(f) if f == "--" => args.flags[1..].to_vec(),
        _ => args.flags,
    };
    // exec only returns on failure.
    let e = std::process::Command::new(&stratad).args(flags).exec();
    Err(anyhow::Error::new(e).context(format!("starting {}", stratad.display())))
}

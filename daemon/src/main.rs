//! `stratad`: parses flags, binds the sockets, serves until SIGTERM, drains, exits 0.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use strata_daemon::listen;
use strata_daemon::manager::{Manager, ManagerConfig};
use strata_daemon::metrics::Metrics;
use strata_daemon::notify::notify;
use strata_daemon::server::{AppState, router};
use strata_daemon::shutdown::Shutdown;
use tokio::sync::watch;
use tokio::task::JoinSet;

#[derive(Parser, Debug)]
#[command(
    name = "stratad",
    version,
    about = "strata's inference service over a Unix socket"
)]
struct Args {
    /// Unix socket to serve on (default: $XDG_RUNTIME_DIR/strata/strata.sock, else
    /// /run/strata/strata.sock as root under systemd, else /tmp/strata-$UID/strata.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Also serve loopback TCP on this address (needs --token-file).
    #[arg(long, requires = "token_file")]
    listen: Option<std::net::SocketAddr>,
    /// File holding the bearer token TCP clients must send (mode 0600).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Store names of models to load at start (repeatable).
    #[arg(short = 'm', long = "model")]
    models: Vec<String>,
    /// Seconds a model stays loaded while idle; 0 keeps it forever.
    #[arg(long, default_value_t = 300)]
    keep_alive: u64,
    /// Requests that may wait per model before new ones get 503.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Sequences generated at once per model.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Context size of each sequence; 0 means the model's trained length.
    #[arg(short = 'c', long, default_value_t = 4096)]
    ctx_size: usize,
    /// Compute threads per model (default: one per core).
    #[arg(short = 't', long)]
    threads: Option<usize>,
    /// Seconds running streams get to finish after SIGTERM before they are cut off.
    #[arg(long, default_value_t = 10)]
    drain_timeout: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_args(a: &Args) -> anyhow::Result<()> {
    if a.parallel == 0 || a.parallel > 256 {
        anyhow::bail!("--parallel must be in 1..=256");
    }
    if a.max_queue == 0 || a.max_queue > 1_000_000 {
        anyhow::bail!("--max-queue must be in 1..=1000000");
    }
    if a.threads == Some(0) {
        anyhow::bail!("--threads must be at least 1");
    }
    if let Some(addr) = a.listen
        && !addr.ip().is_loopback()
    {
        anyhow::bail!("--listen {addr}: only loopback addresses are served");
    }
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    check_args(&args)?;
    // Bind everything before doing anything slow, so a bad flag fails fast.
    let (unix, bound_path) = match listen::activated_listener().context("socket activation")? {
        Some(std_l) => {
            tracing::info!("serving the socket systemd passed (fd 3)");
            (tokio::net::UnixListener::from_std(std_l)?, None)
        }
        None => {
            let path = args
                .socket
                .clone()
                .unwrap_or_else(listen::default_socket_path);
            let l = listen::bind_unix(&path)?;
            tracing::info!("listening on {}", path.display());
            (l, Some(path))
        }
    };
    let tcp = match (&args.listen, &args.token_file) {
        (Some(addr), Some(tf)) => {
            let token: Arc<str> = listen::read_token(tf)?.into();
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            tracing::info!("listening on tcp {addr} (bearer token required)");
            Some((l, token))
        }
        _ => None,
    };

    let metrics = Arc::new(Metrics::default());
    let shutdown = Arc::new(Shutdown::default());
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let manager = Manager::new(
        ManagerConfig {
            ctx_size: args.ctx_size,
            parallel: args.parallel,
            max_queue: args.max_queue,
            threads,
            keep_alive: (args.keep_alive > 0).then(|| Duration::from_secs(args.keep_alive)),
        },
        metrics.clone(),
        shutdown.clone(),
    );
    let state = Arc::new(AppState {
        manager,
        metrics,
        shutdown: shutdown.clone(),
        started: Instant::now(),
    });
    let app = router(state.clone());
    let (stop_tx, stop_rx) = watch::channel(false);

    notify("READY=1");

    for name in &args.models {
        let st = state.clone();
        let name = name.clone();
        tokio::spawn(async move {
            if let Err(e) = st.manager.get(&name).await {
                tracing::error!(model = %name, "loading at start: {e}");
            }
        });
    }
    let reaper = {
        let st = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                st.manager.reap_idle();
            }
        })
    };

    let mut conns = JoinSet::new();
    let mut tcp_conns = JoinSet::new();
    let unix_task = {
        let (app, stop) = (app.clone(), stop_rx.clone());
        tokio::spawn(async move {
            listen::accept_unix(unix, app, stop, &mut conns).await;
            conns
        })
    };
    let tcp_task = tcp.map(|(l, token)| {
        let (app, stop) = (app.clone(), stop_rx.clone());
        tokio::spawn(async move {
            listen::accept_tcp(l, app, token, stop, &mut tcp_conns).await;
            tcp_conns
        })
    });

    wait_for_signal().await?;
    notify("STOPPING=1");
    let drain = Duration::from_secs(args.drain_timeout);
    tracing::info!("stopping: draining for up to {}s", drain.as_secs());
    shutdown.begin(drain);
    let _ = stop_tx.send(true);
    reaper.abort();

    // Engine threads cut running sequences at the drain deadline; give the final events a
    // moment to reach the sockets, and never wait unboundedly on a stuck client.
    let hard_deadline = tokio::time::Instant::now() + drain + Duration::from_secs(5);
    let mut sets = Vec::new();
    if let Ok(set) = unix_task.await {
        sets.push(set);
    }
    if let Some(t) = tcp_task
        && let Ok(set) = t.await
    {
        sets.push(set);
    }
    for mut set in sets {
        while tokio::time::timeout_at(hard_deadline, set.join_next())
            .await
            .is_ok_and(|r| r.is_some())
        {}
        if !set.is_empty() {
            tracing::warn!(
                open = set.len(),
                "connections still open at the drain deadline"
            );
            set.abort_all();
        }
    }
    if state.manager.busy() > 0 {
        tracing::warn!("exiting with sequences still running");
    }
    if let Some(path) = bound_path {
        let _ = std::fs::remove_file(&path);
    }
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    Ok(())
}

//! `stratad`: parses flags, binds the sockets, serves until SIGTERM, drains, exits 0.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use strata_daemon::config::{self, Raw, Settings};
use strata_daemon::conns::{Conns, Limits};
use strata_daemon::listen::{self, Serving};
use strata_daemon::manager::{self, GpuSettings, KvSettings, Manager, ManagerConfig, Residency};
use strata_daemon::metrics::Metrics;
use strata_daemon::notify::{self, notify};
use strata_daemon::server::{AppState, router};
use strata_daemon::sessions::Sessions;
use strata_daemon::shutdown::Shutdown;
use strata_daemon::watchdog::Watchdog;
use strata_storage::session::SessionDir;
use strata_storage::store::Store;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Flags; each overrides the same key of the config file and of its `STRATA_*` variable
/// (module `config`). Values are parsed there, so every layer gets the same messages.
#[derive(Parser, Debug)]
#[command(
    name = "stratad",
    version,
    about = "strata's inference service over a Unix socket",
    after_help = "Settings come from /etc/strata/strata.toml (or --config / $STRATA_CONFIG), \
                  then STRATA_* environment variables (STRATA_MAX_QUEUE, ...), then these flags."
)]
struct Args {
    /// Config file (default /etc/strata/strata.toml, read when present; $STRATA_CONFIG).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Unix socket to serve on (default: $XDG_RUNTIME_DIR/strata/strata.sock, else
    /// /run/strata/strata.sock as root under systemd, else /tmp/strata-$UID/strata.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<String>,
    /// Group (name or id) given to the socket file, so its members may connect.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Also serve loopback TCP on this address (needs --token-file).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// File holding the bearer token TCP clients must send (mode 0600).
    #[arg(long, value_name = "FILE")]
    token_file: Option<String>,
    /// Store names of models to load at start (repeatable or comma-separated).
    #[arg(short = 'm', long = "model", value_name = "NAME")]
    models: Vec<String>,
    /// Seconds a model stays loaded while idle; 0 keeps it forever [default: 300].
    #[arg(long, value_name = "SECONDS")]
    keep_alive: Option<String>,
    /// Requests that may wait per model before new ones get 503 [default: 64].
    #[arg(long, value_name = "N")]
    max_queue: Option<String>,
    /// Sequences generated at once per model [default: 4].
    #[arg(long, value_name = "N")]
    parallel: Option<String>,
    /// Context size of each sequence; 0 means the model's trained length [default: 4096].
    #[arg(short = 'c', long, value_name = "TOKENS")]
    ctx_size: Option<String>,
    /// Compute threads per model [default: one per core].
    #[arg(short = 't', long, value_name = "N")]
    threads: Option<String>,
    /// Seconds running streams get to finish after SIGTERM before they are cut off
    /// [default: 10].
    #[arg(long, value_name = "SECONDS")]
    drain_timeout: Option<String>,
    /// What `POST /api/pull` may fetch besides store names: `urls`, `paths`, or both
    /// (comma-separated) [default: names only].
    #[arg(long, value_name = "SOURCES")]
    allow_pull: Option<String>,
    /// RAM each model's weights may use: bytes with K/M/G, or a percentage of the model's
    /// weights ("30%"); the rest streams from disk [default: all, when the model fits].
    #[arg(long, value_name = "SIZE")]
    ram_budget: Option<String>,
    /// Streaming buffers per model: the layer computing plus those read ahead [default: 3].
    #[arg(long, value_name = "N")]
    prefetch: Option<String>,
    /// Map model files and let the page cache decide what stays in RAM.
    #[arg(long)]
    mmap: bool,
    /// Tensor placement as `strata run -ot`: PATTERN=TYPE rules, comma-separated (TYPE: CPU,
    /// RAM to hold a tensor in RAM whatever ram_budget says, CUDA0… refused without a GPU).
    #[arg(long, visible_alias = "ot", value_name = "PATTERN=TYPE")]
    override_tensor: Option<String>,
    /// Directory of saved sessions [default: $STRATA_HOME/sessions].
    #[arg(long, value_name = "DIR")]
    session_dir: Option<String>,
    /// KV cache type of keys: f16, q8_0 or q4_0 [default: f16].
    #[arg(long = "cache-type-k", visible_alias = "ctk", value_name = "TYPE")]
    cache_type_k: Option<String>,
    /// KV cache type of values: f16, q8_0 or q4_0 [default: f16].
    #[arg(long = "cache-type-v", visible_alias = "ctv", value_name = "TYPE")]
    cache_type_v: Option<String>,
    /// RAM each sequence's KV cache may hold: bytes with K/M/G, or a percentage of a full
    /// context's cache; older pages go to SSD, and idle caches give their RAM back
    /// [default: all in RAM].
    #[arg(long, value_name = "SIZE")]
    kv_budget: Option<String>,
    /// Directory for KV pages on SSD [default: $STRATA_HOME/kv].
    #[arg(long, value_name = "DIR")]
    kv_dir: Option<String>,
    /// Finished sequences' KV caches kept per model, reused by requests that share their
    /// prefix [default: 4; 0 turns prefix reuse off].
    #[arg(long, value_name = "N")]
    prompt_cache: Option<String>,
    /// Open connections in all; past it the longest-idle one is closed, and a new one is
    /// refused only when all are busy [default: 512].
    #[arg(long, value_name = "N")]
    max_connections: Option<String>,
    /// Open connections per peer (uid on the socket, address on TCP) [default: 128].
    #[arg(long, value_name = "N")]
    max_connections_per_peer: Option<String>,
    /// Seconds a request's head, then its body, may take to arrive, and a kept-alive
    /// connection may sit idle [default: 15].
    #[arg(long, value_name = "SECONDS")]
    read_timeout: Option<String>,
    /// Where models compute: cpu, cuda (GPU 0), cuda:N, or sim (the simulated GPU: the CUDA
    /// kernels run on this CPU) [default: cuda when an NVIDIA driver is present, else cpu].
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
    /// llama.cpp's -ngl: the last N layers of each model on the GPU (the output projection
    /// counts as one) [default: as the planner's cost model places them].
    #[arg(long, visible_alias = "gpu-layers", value_name = "N")]
    n_gpu_layers: Option<String>,
    /// VRAM each model's weights and KV caches may use: bytes with K/M/G, or a percentage of
    /// the GPU's memory [default: 90% of it].
    #[arg(long, value_name = "SIZE")]
    vram_budget: Option<String>,
    /// llama.cpp's -nkvo: KV caches in host RAM, attention on the CPU.
    #[arg(long)]
    no_kv_offload: bool,
    /// VRAM each sequence's KV cache may hold (older pages go to RAM): bytes with K/M/G
    /// [default: what the planner leaves for the caches].
    #[arg(long, value_name = "SIZE")]
    kv_vram_budget: Option<String>,
    /// The hardware profile the planner uses: a shipped name (h100-sxm, rtx4090, …) or a file
    /// [default: $STRATA_HOME/hw.toml from `strata calibrate`, else cpu-2core].
    #[arg(long, visible_alias = "hw", value_name = "PROFILE")]
    hw_profile: Option<String>,
    /// Speculative decoding: none, draft, ngram-simple or ngram-map-k (llama.cpp's
    /// --spec-type) [default: draft for models with a model_draft, else none].
    #[arg(long, value_name = "TYPE")]
    spec_type: Option<String>,
    /// Draft models as MODEL=DRAFT store names, comma-separated or repeated (llama.cpp's -md,
    /// per model); a draft must share its model's vocabulary.
    #[arg(long, value_name = "MODEL=DRAFT")]
    model_draft: Vec<String>,
    /// Most tokens drafted per step (1..=15) [default: 15; fewer where it does not pay].
    #[arg(long, value_name = "N")]
    spec_draft_n_max: Option<String>,
    /// Fewest drafted tokens worth verifying [default: 0].
    #[arg(long, value_name = "N")]
    spec_draft_n_min: Option<String>,
}

impl Args {
    /// The settings: defaults, the config file, the environment, then these flags.
    fn settings(&self) -> Result<Settings, String> {
        let env = |k: &str| std::env::var(k).ok();
        let mut s = config::load(self.config.as_deref(), &env)?;
        let text = [
            ("socket", &self.socket),
            ("socket_group", &self.socket_group),
            ("listen", &self.listen),
            ("token_file", &self.token_file),
            ("keep_alive", &self.keep_alive),
            ("max_queue", &self.max_queue),
            ("parallel", &self.parallel),
            ("ctx_size", &self.ctx_size),
            ("threads", &self.threads),
            ("drain_timeout", &self.drain_timeout),
            ("allow_pull", &self.allow_pull),
            ("ram_budget", &self.ram_budget),
            ("prefetch", &self.prefetch),
            ("override_tensor", &self.override_tensor),
            ("session_dir", &self.session_dir),
            ("cache_type_k", &self.cache_type_k),
            ("cache_type_v", &self.cache_type_v),
            ("kv_budget", &self.kv_budget),
            ("kv_dir", &self.kv_dir),
            ("prompt_cache", &self.prompt_cache),
            ("max_connections", &self.max_connections),
            ("max_connections_per_peer", &self.max_connections_per_peer),
            ("read_timeout", &self.read_timeout),
            ("device", &self.device),
            ("n_gpu_layers", &self.n_gpu_layers),
            ("vram_budget", &self.vram_budget),
            ("kv_vram_budget", &self.kv_vram_budget),
            ("hw_profile", &self.hw_profile),
            ("spec_type", &self.spec_type),
            ("spec_draft_n_max", &self.spec_draft_n_max),
            ("spec_draft_n_min", &self.spec_draft_n_min),
        ];
        for (key, value) in text {
            if let Some(v) = value {
                s.set(key, Raw::Text(v), &config::flag(key))?;
            }
        }
        if !self.model_draft.is_empty() {
            s.set(
                "model_draft",
                Raw::List(&self.model_draft),
                &config::flag("model_draft"),
            )?;
        }
        if self.mmap {
            s.set("mmap", Raw::Text("true"), "--mmap")?;
        }
        if self.no_kv_offload {
            s.set("no_kv_offload", Raw::Text("true"), "--no-kv-offload")?;
        }
        if !self.models.is_empty() {
            s.set("models", Raw::List(&self.models), "--model")?;
        }
        s.check()?;
        Ok(s)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Colour only for a person at a terminal: journald, files and pipes get plain text.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
    let settings = match args.settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Settings) -> anyhow::Result<()> {
    // Models named at start must exist: a daemon started to serve one it cannot is a mistake
    // to report now, not a log line under a service that looks healthy.
    for name in &args.models {
        manager::store_path(name)
            .map_err(|e| anyhow::anyhow!("model '{name}' named at start: {e}"))?;
    }
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
            let l = listen::bind_unix(&path, args.socket_group.as_deref())?;
            tracing::info!("listening on {}", path.display());
            (l, Some(path))
        }
    };
    let tcp = match (&args.listen, &args.token_file) {
        (Some(addr), Some(tf)) => {
            let token: Arc<str> = listen::read_token(tf)?.into();
            let l = listen::bind_tcp(*addr).with_context(|| format!("binding {addr}"))?;
            tracing::info!("listening on tcp {addr} (bearer token required)");
            Some((l, token))
        }
        _ => None,
    };
    let conns = Conns::new(connection_limits(&args));
    // Pulls killed mid-way by a previous run (or by kill -9 of a `strata pull`).
    match Store::open_default().and_then(|s| s.clean_stale()) {
        Ok(0) => {}
        Ok(n) => tracing::info!("removed {n} abandoned temp files from the model store"),
        Err(e) => tracing::warn!("cleaning the model store's temp files: {e}"),
    }

    let gpu = gpu_settings(&args)?;
    let metrics = Arc::new(Metrics::default());
    let shutdown = Arc::new(Shutdown::default());
    let threads = args
        .threads
        .unwrap_or_else(strata_simd::topology::physical_cores);
    let watchdog = Watchdog::from_env();
    if watchdog.is_some() {
        tracing::info!("systemd watchdog enabled; the engine threads ping it");
    }
    let manager = Manager::new(
        ManagerConfig {
            ctx_size: args.ctx_size,
            parallel: args.parallel,
            max_queue: args.max_queue,
            threads,
            keep_alive: (args.keep_alive > 0).then(|| Duration::from_secs(args.keep_alive)),
            keep_loaded: args.models.clone(),
            residency: Residency {
                ram_budget: args.ram_budget.clone(),
                prefetch: args.prefetch,
                mmap: args.mmap,
                override_tensor: args.override_tensor.clone(),
            },
            kv: KvSettings {
                type_k: args.cache_type_k,
                type_v: args.cache_type_v,
                budget: args.kv_budget.clone(),
                dir: args
                    .kv_dir
                    .clone()
                    .unwrap_or_else(|| SessionDir::default_root().with_file_name("kv")),
                prompt_cache: args.prompt_cache,
            },
            gpu,
            spec: manager::SpecSettings {
                kind: args.spec_type,
                drafts: args.model_draft.clone(),
                n_max: args.spec_draft_n_max,
                n_min: args.spec_draft_n_min,
            },
        },
        metrics.clone(),
        shutdown.clone(),
        watchdog.clone(),
    );
    let read_timeout = Duration::from_secs(args.read_timeout);
    let state = Arc::new(AppState {
        manager,
        metrics,
        shutdown: shutdown.clone(),
        started: Instant::now(),
        allow_pull: args.allow_pull,
        sessions: Arc::new(Sessions::open(
            &args
                .session_dir
                .clone()
                .unwrap_or_else(SessionDir::default_root),
        )),
        read_timeout,
        conns: conns.clone(),
    });
    let serving = Serving {
        app: router(state.clone()),
        conns: conns.clone(),
        read_timeout,
    };
    let (stop_tx, stop_rx) = watch::channel(false);

    notify("READY=1");
    state.manager.report_ready();

    // A model named at start that fails to load stops the daemon (after the usual drain):
    // serving without it would look healthy while answering nothing the user asked for.
    let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::unbounded_channel::<anyhow::Error>();
    for name in &args.models {
        let st = state.clone();
        let name = name.clone();
        let fatal = fatal_tx.clone();
        tokio::spawn(async move {
            if let Err(e) = st.manager.get(&name).await {
                tracing::error!(model = %name, "loading at start: {e}");
                let _ = fatal.send(anyhow::anyhow!("loading model '{name}' at start: {e}"));
            }
        });
    }
    drop(fatal_tx);
    // Housekeeping: the keep-alive reaper, the watchdog while no engine thread runs, and
    // memory given back after a burst of connections.
    let reaper = {
        let st = state.clone();
        let wd = watchdog.clone();
        let every = wd.as_ref().map_or(Duration::from_secs(1), |w| {
            w.idle_wake().min(Duration::from_secs(1))
        });
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                st.manager.reap_idle();
                if let Some(w) = &wd {
                    w.idle_tick();
                }
                let (peak, open) = (st.conns.take_peak(), st.conns.open());
                if peak >= TRIM_AFTER_CONNECTIONS && open <= peak / 2 {
                    give_back_memory();
                }
            }
        })
    };

    let mut conns = JoinSet::new();
    let mut tcp_conns = JoinSet::new();
    let unix_task = {
        let (serving, stop) = (serving.clone(), stop_rx.clone());
        tokio::spawn(async move {
            listen::accept_unix(unix, serving, stop, &mut conns).await;
            conns
        })
    };
    let tcp_task = tcp.map(|(l, token)| {
        let (serving, stop) = (serving.clone(), stop_rx.clone());
        tokio::spawn(async move {
            listen::accept_tcp(l, serving, token, stop, &mut tcp_conns).await;
            tcp_conns
        })
    });

    // Once every start load has succeeded the channel closes, and only a signal ends this.
    let fatal = tokio::select! {
        r = wait_for_signal() => {
            r?;
            None
        }
        Some(e) = fatal_rx.recv() => Some(e),
    };
    notify("STOPPING=1");
    notify::status("stopping: draining open streams");
    let drain = Duration::from_secs(args.drain_timeout);
    tracing::info!("stopping: draining for up to {}s", drain.as_secs());
    shutdown.begin(drain);
    // The sockets stay open while anything runs, so that clients see the draining daemon
    // (`"status": "stopping"`, 503 with Retry-After for new work) rather than a refused
    // connection; the engine threads cut what still runs at the deadline.
    let deadline = tokio::time::Instant::now() + drain;
    while state.manager.busy() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(true);

    // Give the final events a moment to reach the sockets, and never wait unboundedly on a
    // stuck client.
    let hard_deadline = deadline.max(tokio::time::Instant::now()) + Duration::from_secs(5);
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
    reaper.abort();
    if state.manager.busy() > 0 {
        tracing::warn!("exiting with sequences still running");
    }
    if let Some(path) = bound_path {
        let _ = std::fs::remove_file(&path);
    }
    tracing::info!("stopped");
    fatal.map_or(Ok(()), Err)
}

/// The device and GPU settings every model loads with. Without `hw_profile`, the profile
/// `strata calibrate` measured this machine into is used when there is one (as `strata run`
/// does), so the daemon and the CLI place a model alike.
fn gpu_settings(args: &Settings) -> anyhow::Result<GpuSettings> {
    let device = args.device(strata_kernels::Device::cuda_driver_present());
    let profile = match &args.hw_profile {
        Some(p) => Some(p.clone()),
        None if device == config::GpuDevice::Cpu => None,
        None => {
            let path = Store::open_default()
                .context("opening the model store")?
                .root()
                .join("hw.toml");
            match path.exists() {
                false => None,
                true => Some(
                    strata_engine::plan::HwProfile::load(&path.display().to_string())
                        .with_context(|| {
                            format!(
                                "the calibrated hardware profile (used when hw_profile is not \
                                 set; `strata calibrate` writes it again): {}",
                                path.display()
                            )
                        })?,
                ),
            }
        }
    };
    tracing::info!("device: {device}");
    Ok(GpuSettings {
        device: device.spec(),
        n_gpu_layers: args.n_gpu_layers,
        vram_budget: args.vram_budget.clone(),
        no_kv_offload: args.no_kv_offload,
        kv_vram_budget: args
            .kv_vram_budget
            .map(|b| usize::try_from(b).unwrap_or(usize::MAX)),
        profile,
    })
}

/// Descriptors kept for everything but connections: model files, io_uring, session and KV
/// files, the engine's threads' needs.
const FD_RESERVE: u64 = 256;

/// The connection caps, raising the soft descriptor limit to the hard one (as servers do) and
/// lowering `max_connections` to fit under it, so the daemon never reaches EMFILE through
/// connections alone.
fn connection_limits(args: &Settings) -> Limits {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process's own limit with a valid, live struct.
    let fds = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            if lim.rlim_cur < lim.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: lim.rlim_max.min(1 << 20),
                    rlim_max: lim.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    lim.rlim_cur = raised.rlim_cur;
                }
            }
            Some(lim.rlim_cur)
        } else {
            None
        }
    };
    let mut max = args.max_connections;
    if let Some(fds) = fds {
        let fit = fds.saturating_sub(FD_RESERVE).max(16) as usize;
        if max > fit {
            tracing::warn!(
                "max_connections {max} lowered to {fit}: the descriptor limit is {fds} \
                 (raise LimitNOFILE= / ulimit -n for more)"
            );
            max = fit;
        }
    }
    Limits {
        max,
        per_peer: args.max_connections_per_peer.min(max),
    }
}

/// A burst of connections this large, then halved, is worth handing memory back for.
const TRIM_AFTER_CONNECTIONS: usize = 64;

/// Returns the allocator's free memory to the system. glibc keeps what many short-lived
/// connections freed in per-thread arenas for reuse, so the resident size of a daemon that
/// served a burst would otherwise stay at the burst's peak.
fn give_back_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
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

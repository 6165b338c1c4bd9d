//! `flotilla-server`: runs one Flotilla node until SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use flotilla_server::{Config, Server};

/// A Flotilla node. Flags override the configuration file.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML; see etc/flotilla.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// This node's id, unique in the cluster.
    #[arg(long)]
    node_id: Option<u64>,
    /// Data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// gRPC listen address (host:port).
    #[arg(long)]
    addr: Option<String>,
    /// Status HTTP listen address (host:port).
    #[arg(long)]
    status_addr: Option<String>,
    /// Nodes of a new cluster: 1=host:port,2=host:port,... Ignored when the
    /// data directory is already bootstrapped.
    #[arg(long)]
    initial_cluster: Option<String>,
    /// Shards of a new cluster. Ignored when already bootstrapped.
    #[arg(long)]
    initial_shards: Option<usize>,
    /// Members of a running cluster (host:port,...): a new data directory
    /// joins it instead of bootstrapping a new cluster.
    #[arg(long)]
    join: Option<String>,
    /// Placement labels, key=value,... (e.g. zone=a).
    #[arg(long)]
    labels: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut cfg = match &args.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    let s = &mut cfg.server;
    if let Some(v) = args.node_id {
        s.node_id = v;
    }
    if let Some(v) = args.data_dir {
        s.data_dir = v;
    }
    if let Some(v) = args.addr {
        s.addr = v;
    }
    if let Some(v) = args.status_addr {
        s.status_addr = v;
    }
    if let Some(v) = args.initial_cluster {
        s.initial_cluster = v;
    }
    if let Some(v) = args.initial_shards {
        s.initial_shards = v;
    }
    if let Some(v) = args.join {
        s.join = v;
    }
    if let Some(v) = args.labels {
        s.labels = v;
    }
    flotilla_server::logging::init(&cfg.log)?;
    // FAILPOINTS=name=action;... arms fail points (tests only).
    let _failpoints = fail::FailScenario::setup();
    // A panic anywhere (a failed fsync, a broken invariant) stops the whole
    // node: a poller thread must not die while the others go on.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!("fatal: {info}");
        default_hook(info);
        std::process::abort();
    }));

    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if cfg.server.grpc_threads > 0 {
        runtime.worker_threads(cfg.server.grpc_threads);
    }
    let runtime = runtime
        .enable_all()
        .thread_name("grpc")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let server = Server::start(cfg, None).await?;
        wait_for_signal().await;
        tracing::info!("shutting down");
        server.shutdown().await;
        Ok(())
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

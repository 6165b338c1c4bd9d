//! Assembles a node: engines, bootstrap, raftstore, transport, gRPC and
//! status servers, and the one shutdown path that stops them in order.
//!
//! Start-up:
//! 1. open RocksDB (`<data>/kv`) and raft-engine (`<data>/raft`);
//! 2. if the data dir holds no `NodeIdent`, bootstrap it from
//!    `--initial-cluster` and `--initial-shards` (every node derives the same
//!    layout); otherwise those flags are ignored and the recorded cluster is
//!    used;
//! 3. start the transport, the raftstore (which recovers every replica), and
//!    the gRPC (Kv, Admin, Raft) and status servers.
//!
//! Shutdown: stop accepting requests, stop the raftstore (pending requests
//! are answered "shutting down, outcome unknown"), then drop the engines.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use flotilla_proto::admin::admin_server::AdminServer;
use flotilla_proto::kv::kv_server::KvServer;
use flotilla_proto::meta::Node;
use flotilla_proto::raft::raft_server::RaftServer;
use flotilla_raftstore::bootstrap::{bootstrap_node, initial_layout};
use flotilla_raftstore::{Engines, Store, StoreRouter};
use flotilla_storage::{
    DiskMonitor, DiskStatus, KvConfig, KvEngine, RaftLogConfig, RaftLogEngine, SnapManager,
};
use flotilla_transport::{AddressBook, RaftClient, RaftClientConfig, RaftService};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::admin_service::AdminService;
use crate::cluster_meta::{MetaClient, MetaStore};
use crate::config::Config;
use crate::directory::Directory;
use crate::kv_service::KvService;
use crate::placement::Placement;
use crate::service::NodeContext;
use crate::status;

/// Pre-bound listeners (tests bind port 0 first to learn the ports).
pub struct Listeners {
    pub grpc: std::net::TcpListener,
    pub status: std::net::TcpListener,
}

impl Listeners {
    pub fn bind(grpc: &str, status: &str) -> anyhow::Result<Self> {
        let g = std::net::TcpListener::bind(grpc).with_context(|| format!("binding {grpc}"))?;
        let s = std::net::TcpListener::bind(status).with_context(|| format!("binding {status}"))?;
        Ok(Listeners { grpc: g, status: s })
    }
}

pub struct Server {
    ctx: Arc<NodeContext>,
    _disk_monitor: DiskMonitor,
    store: Store,
    transport: RaftClient,
    grpc_addr: SocketAddr,
    status_addr: SocketAddr,
    grpc_stop: Option<oneshot::Sender<()>>,
    /// Ends long-lived peer streams at shutdown.
    streams_stop: tokio::sync::watch::Sender<bool>,
    status_stop: Option<oneshot::Sender<()>>,
    grpc_task: Option<JoinHandle<()>>,
    status_task: Option<JoinHandle<()>>,
    /// Reports to and reads from the meta shard (cluster_meta).
    heartbeat_task: JoinHandle<()>,
    /// Splits shards the split checker found past a threshold.
    splitter_task: JoinHandle<()>,
    /// The placement driver (acts while this node leads the meta shard).
    placement_task: JoinHandle<()>,
}

/// Splits the shards the raftstore's split checker asks for, one at a time.
fn spawn_splitter(
    ctx: Arc<NodeContext>,
    meta_client: MetaClient,
    mut requests: tokio::sync::mpsc::UnboundedReceiver<(
        u64,
        flotilla_proto::meta::Epoch,
        bytes::Bytes,
    )>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some((shard_id, epoch, key)) = requests.recv().await {
            let r = crate::admin_service::split_shard(
                &ctx,
                &meta_client,
                shard_id,
                Some(epoch.version),
                key,
            )
            .await;
            crate::metrics::placement_operator("auto_split", &r);
            match r {
                Ok((left, right)) => tracing::info!(
                    shard_id,
                    new_shard_id = right.id,
                    split_key = %flotilla_raftstore::fmt_key(&right.start_key),
                    version = left.epoch().version,
                    "split a shard past a split threshold"
                ),
                Err(e) => {
                    tracing::info!(shard_id, error = %e.message(), "automatic split not done")
                }
            }
        }
    })
}

fn open_engines(cfg: &Config) -> anyhow::Result<Engines> {
    let dir = &cfg.server.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let kv_cfg = KvConfig {
        block_cache_size: cfg.rocksdb.block_cache_size_bytes,
        write_buffer_size: cfg.rocksdb.write_buffer_size_bytes,
        max_background_jobs: cfg.rocksdb.max_background_jobs,
        max_open_files: cfg.rocksdb.max_open_files,
    };
    let kv = KvEngine::open(&dir.join("kv"), &kv_cfg).context("opening RocksDB")?;
    let raft_cfg = RaftLogConfig {
        target_file_size: cfg.raft_engine.target_file_size_bytes,
        purge_threshold: cfg.raft_engine.purge_threshold_bytes,
        batch_compression_threshold: cfg.raft_engine.batch_compression_threshold_bytes,
        enable_log_recycle: cfg.raft_engine.enable_log_recycle,
        prefill_bytes: cfg.raft_engine.prefill_bytes,
    };
    let raft = RaftLogEngine::open(&dir.join("raft"), &raft_cfg).context("opening raft-engine")?;
    let snap_mgr = Arc::new(SnapManager::open(&dir.join("snap")).context("opening snap/")?);
    Ok(Engines { kv, raft, snap_mgr })
}

/// Bootstraps a new data dir, or checks an existing one; returns the nodes
/// of the cluster.
async fn ensure_bootstrapped(cfg: &Config, engines: &Engines) -> anyhow::Result<Vec<Node>> {
    let node_id = cfg.server.node_id;
    if let Some(ident) = engines.kv.node_ident()? {
        if ident.node_id != node_id {
            bail!(
                "data dir {} belongs to node {}, not node {node_id}",
                cfg.server.data_dir.display(),
                ident.node_id
            );
        }
        if !cfg.server.initial_cluster.is_empty() {
            tracing::info!(node_id, "data dir already holds a cluster; --initial-cluster and --initial-shards are ignored");
        }
        return Ok(ident.nodes);
    }
    let join = cfg.join();
    if !join.is_empty() {
        return join_cluster(cfg, engines, &join).await;
    }
    let initial = cfg.initial_cluster()?;
    if initial.is_empty() {
        bail!(
            "new data dir {}: --initial-cluster is required to bootstrap",
            cfg.server.data_dir.display()
        );
    }
    if !initial.iter().any(|n| n.id == node_id) {
        bail!("--initial-cluster does not list this node ({node_id})");
    }
    let nodes: Vec<Node> = initial
        .iter()
        .map(|n| Node {
            id: n.id,
            address: n.addr.clone(),
            ..Default::default()
        })
        .collect();
    let ids: Vec<u64> = nodes.iter().map(|n| n.id).collect();
    let layout = initial_layout(&ids, cfg.server.initial_shards);
    bootstrap_node(&engines.kv, &engines.raft, node_id, &nodes, &layout)?;
    tracing::info!(
        node_id,
        nodes = nodes.len(),
        shards = layout.len(),
        "bootstrapped a new cluster member"
    );
    Ok(nodes)
}

/// A new data dir joins a running cluster: learn its nodes from a member,
/// make sure this node's id is new to the registry (a removed node never
/// comes back under its old id), and record the membership. The node then
/// starts empty; its heartbeats register it and the placement driver gives
/// it replicas.
async fn join_cluster(
    cfg: &Config,
    engines: &Engines,
    seeds: &[String],
) -> anyhow::Result<Vec<Node>> {
    use flotilla_proto::admin::admin_client::AdminClient;
    let node_id = cfg.server.node_id;
    if !cfg.server.initial_cluster.is_empty() {
        bail!("set either --join (to join a running cluster) or --initial-cluster (to bootstrap a new one), not both");
    }
    let mut known = None;
    let mut errors = Vec::new();
    for seed in seeds {
        let r = async {
            let mut c = AdminClient::connect(format!("http://{seed}")).await?;
            let r = c
                .list_shards(flotilla_proto::admin::ListShardsRequest {})
                .await?;
            anyhow::Ok(r.into_inner().nodes)
        };
        match tokio::time::timeout(cfg.request_timeout(), r).await {
            Ok(Ok(nodes)) => {
                known = Some(nodes);
                break;
            }
            Ok(Err(e)) => errors.push(format!("{seed}: {e}")),
            Err(_) => errors.push(format!("{seed}: no answer")),
        }
    }
    let Some(mut nodes) = known else {
        bail!("--join: no member answered ({})", errors.join("; "));
    };
    let book = AddressBook::default();
    for n in &nodes {
        book.set(n.id, n.address.clone());
    }
    let registry = MetaClient::new(book, cfg.request_timeout())
        .list_nodes()
        .await
        .map_err(|s| anyhow::anyhow!("--join: reading the node registry: {}", s.message()))?;
    if let Some(n) = registry
        .iter()
        .filter_map(|i| i.node.as_ref())
        .find(|n| n.id == node_id)
    {
        bail!(
            "node id {node_id} is already taken in this cluster (state {:?}, address {:?}); a removed node never comes back under its old id: start with a new --node-id and an empty data dir",
            n.state(),
            n.address
        );
    }
    nodes.retain(|n| n.id != node_id);
    nodes.push(Node {
        id: node_id,
        address: cfg.server.addr.clone(),
        ..Default::default()
    });
    engines
        .kv
        .write_node_ident(&flotilla_proto::local::NodeIdent {
            node_id,
            nodes: nodes.clone(),
            initial_shards: 0,
        })?;
    tracing::info!(node_id, members = nodes.len(), "joined a running cluster");
    Ok(nodes)
}

fn register_metrics() {
    flotilla_storage::metrics::register();
    flotilla_raftstore::metrics::register();
    flotilla_transport::metrics::register();
    crate::metrics::register();
}

impl Server {
    /// Starts a node. Must run inside a multi-threaded tokio runtime.
    pub async fn start(cfg: Config, listeners: Option<Listeners>) -> anyhow::Result<Server> {
        cfg.validate()?;
        let started = Instant::now();
        register_metrics();
        flotilla_storage::metrics::set_detailed(cfg.server.detailed_metrics);
        let node_id = cfg.server.node_id;
        let listeners = match listeners {
            Some(l) => l,
            None => Listeners::bind(&cfg.server.addr, &cfg.server.status_addr)?,
        };
        let engines = open_engines(&cfg)?;
        let nodes = ensure_bootstrapped(&cfg, &engines).await?;
        let disk = Arc::new(DiskStatus::default());
        let disk_monitor = DiskMonitor::start(
            cfg.server.data_dir.clone(),
            cfg.server.reserve_space_bytes,
            Duration::from_millis(cfg.server.disk_check_interval_ms.max(10)),
            disk.clone(),
        );

        let addresses = AddressBook::default();
        for n in &nodes {
            addresses.set(n.id, n.address.clone());
        }
        let directory = Arc::new(Directory::new(engines.kv.load_directory()?));

        let max_msg = cfg.limits.max_request_size_bytes.max(64 << 20);
        let transport = RaftClient::new(
            node_id,
            RaftClientConfig {
                max_message_bytes: max_msg,
                snapshot: cfg.raftstore.to_snapshot(),
                ..Default::default()
            },
            addresses.clone(),
            engines.snap_mgr.clone(),
            tokio::runtime::Handle::current(),
        );
        // Shards past a split threshold are split by a task started below,
        // once the node's context exists.
        let (split_tx, split_rx) = tokio::sync::mpsc::unbounded_channel();
        let split_observer: flotilla_raftstore::worker::SplitObserver =
            Arc::new(move |shard_id, epoch, key| {
                let _ = split_tx.send((shard_id, epoch, key));
            });
        let store = Store::start(
            node_id,
            cfg.raftstore.to_raftstore(&cfg.placement),
            engines.clone(),
            Arc::new(transport.clone()),
            Some(split_observer),
        )?;
        let router: StoreRouter = store.router();
        transport.set_router(router.clone());

        let grpc_addr = listeners.grpc.local_addr()?;
        let status_addr = listeners.status.local_addr()?;
        let ctx = Arc::new(NodeContext {
            node_id,
            addr: addresses
                .get(node_id)
                .unwrap_or_else(|| grpc_addr.to_string()),
            cfg: cfg.clone(),
            router: router.clone(),
            kv: engines.kv.clone(),
            raft: engines.raft.clone(),
            directory,
            addresses,
            started,
            disk: disk.clone(),
            removed: Default::default(),
        });

        // Requests past the limit are refused by the handlers with a clear
        // INVALID_ARGUMENT; the transport's own cap only stops abuse.
        let decode_cap = cfg
            .limits
            .max_request_size_bytes
            .saturating_mul(4)
            .max(16 << 20);
        let (grpc_stop, grpc_stop_rx) = oneshot::channel::<()>();
        let (streams_stop, streams_stop_rx) = tokio::sync::watch::channel(false);
        let meta_store = Arc::new(MetaStore::new(ctx.clone()));
        let meta_client = MetaClient::new(ctx.addresses.clone(), ctx.request_timeout());
        let heartbeat_task = crate::cluster_meta::spawn_heartbeat(
            ctx.clone(),
            meta_client.clone(),
            cfg.placement.heartbeat_interval(),
            streams_stop.subscribe(),
        );
        let placement = Arc::new(Placement::new(ctx.clone(), meta_store.clone()));
        let placement_task = placement.clone().spawn(streams_stop.subscribe());
        let splitter_task = spawn_splitter(ctx.clone(), meta_client.clone(), split_rx);
        listeners.grpc.set_nonblocking(true)?;
        let incoming = tonic::transport::server::TcpIncoming::from(
            tokio::net::TcpListener::from_std(listeners.grpc)?,
        )
        .with_nodelay(Some(true));
        let grpc = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .add_service(
                KvServer::new(KvService::new(ctx.clone(), streams_stop.subscribe()))
                    .max_decoding_message_size(decode_cap),
            )
            .add_service(AdminServer::new(AdminService::new(
                ctx.clone(),
                meta_store,
                meta_client.clone(),
                placement,
            )))
            .add_service(
                RaftServer::new(RaftService::new(
                    node_id,
                    router.clone(),
                    streams_stop_rx,
                    engines.snap_mgr.clone(),
                    cfg.raftstore.snap_max_concurrent_recv,
                    disk.clone(),
                    transport.clone(),
                ))
                .max_decoding_message_size(max_msg),
            )
            .serve_with_incoming_shutdown(incoming, async {
                let _ = grpc_stop_rx.await;
            });
        let grpc_task = tokio::spawn(async move {
            if let Err(e) = grpc.await {
                tracing::error!(error = %e, "gRPC server failed");
            }
        });

        let (status_stop, status_stop_rx) = oneshot::channel::<()>();
        listeners.status.set_nonblocking(true)?;
        let status_listener = tokio::net::TcpListener::from_std(listeners.status)?;
        let app = status::router(ctx.clone());
        let status_task = tokio::spawn(async move {
            let r = axum::serve(status_listener, app)
                .with_graceful_shutdown(async {
                    let _ = status_stop_rx.await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "status server failed");
            }
        });

        tracing::info!(node_id, grpc = %grpc_addr, status = %status_addr, elapsed_ms = started.elapsed().as_millis() as u64, "node started");
        Ok(Server {
            ctx,
            _disk_monitor: disk_monitor,
            store,
            transport,
            grpc_addr,
            status_addr,
            grpc_stop: Some(grpc_stop),
            streams_stop,
            status_stop: Some(status_stop),
            grpc_task: Some(grpc_task),
            status_task: Some(status_task),
            heartbeat_task,
            splitter_task,
            placement_task,
        })
    }

    pub fn node_id(&self) -> u64 {
        self.ctx.node_id
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn status_addr(&self) -> SocketAddr {
        self.status_addr
    }

    pub fn router(&self) -> StoreRouter {
        self.ctx.router.clone()
    }

    /// The node's raft transport (tests install filters on it).
    pub fn transport(&self) -> &RaftClient {
        &self.transport
    }

    pub fn kv_engine(&self) -> &KvEngine {
        &self.ctx.kv
    }

    /// Stops serving and shuts the raftstore down.
    pub async fn shutdown(mut self) {
        self.stop().await;
    }

    async fn stop(&mut self) {
        let _ = self.streams_stop.send(true);
        self.heartbeat_task.abort();
        self.splitter_task.abort();
        self.placement_task.abort();
        if let Some(tx) = self.grpc_stop.take() {
            let _ = tx.send(());
        }
        if let Some(tx) = self.status_stop.take() {
            let _ = tx.send(());
        }
        // In-flight requests finish (each is bounded by the request
        // timeout) and connections close; the engines are released only
        // once every connection task has let go of the services.
        for task in [self.grpc_task.take(), self.status_task.take()]
            .into_iter()
            .flatten()
        {
            let abort = task.abort_handle();
            if tokio::time::timeout(self.ctx.request_timeout() + Duration::from_secs(1), task)
                .await
                .is_err()
            {
                tracing::warn!(
                    node_id = self.ctx.node_id,
                    "server did not stop in time; aborting it"
                );
                abort.abort();
            }
        }
        self.store.shutdown();
        self.transport.shutdown();
        tracing::info!(node_id = self.ctx.node_id, "node stopped");
    }
}

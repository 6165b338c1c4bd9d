//! In-process clusters for tests, in the style of TiKV's test_raftstore.
//!
//! Every node is a real `flotilla_server::Server`: RocksDB and raft-engine on
//! a temporary directory, real gRPC on a loopback port picked by the kernel.
//! Links between nodes are cut, made one-way or delayed with transport
//! filters; nodes stop and restart on their data; the test talks to the
//! cluster through the real client or straight to a node's store router.

use std::collections::BTreeMap;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use flotilla_client::{Client, ClientConfig};
use flotilla_proto::meta::ShardDescriptor;
use flotilla_raftstore::{NodeId, ShardId, StoreRouter};
use flotilla_server::{Config, Listeners, Server};
use flotilla_transport::{Filter, PartitionFilter};

pub use flotilla_transport::FilterDecision;

/// Installs a test log subscriber once (RUST_LOG controls it).
pub fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    });
}

pub struct ClusterBuilder {
    nodes: usize,
    shards: usize,
    tune: Box<dyn Fn(&mut Config)>,
    data_root: Option<std::path::PathBuf>,
}

impl ClusterBuilder {
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = n;
        self
    }

    /// Puts the nodes' data directories under `dir` (default: a temporary
    /// directory).
    pub fn data_root(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.data_root = Some(dir.into());
        self
    }

    /// Adjusts every node's configuration before start.
    pub fn configure(mut self, f: impl Fn(&mut Config) + 'static) -> Self {
        self.tune = Box::new(f);
        self
    }

    pub async fn start(self) -> TestCluster {
        init_logging();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut listeners = BTreeMap::new();
        for id in 1..=self.nodes as NodeId {
            let l = Listeners::bind("127.0.0.1:0", "127.0.0.1:0").expect("bind loopback");
            listeners.insert(id, l);
        }
        let initial: Vec<String> = listeners
            .iter()
            .map(|(id, l)| format!("{id}={}", l.grpc.local_addr().unwrap()))
            .collect();
        let mut configs = BTreeMap::new();
        for (id, l) in &listeners {
            let mut cfg = Config::default();
            cfg.server.node_id = *id;
            cfg.server.addr = l.grpc.local_addr().unwrap().to_string();
            cfg.server.status_addr = l.status.local_addr().unwrap().to_string();
            let root = self
                .data_root
                .clone()
                .unwrap_or_else(|| dir.path().to_path_buf());
            cfg.server.data_dir = root.join(format!("node{id}"));
            // A small reserve: test machines may have little free disk.
            cfg.server.reserve_space_bytes = 16 << 20;
            cfg.server.disk_check_interval_ms = 100;
            cfg.server.initial_cluster = initial.join(",");
            cfg.server.initial_shards = self.shards;
            // Fast clocks keep tests short: 20 ms ticks, 200-400 ms elections.
            cfg.raftstore.tick_interval_ms = 20;
            // Small RocksDB caches: several nodes share one process.
            cfg.rocksdb.block_cache_size_bytes = 8 << 20;
            cfg.rocksdb.write_buffer_size_bytes = 4 << 20;
            (self.tune)(&mut cfg);
            configs.insert(*id, cfg);
        }
        let mut cluster = TestCluster {
            _dir: dir,
            configs,
            servers: BTreeMap::new(),
            filters: Vec::new(),
        };
        // Start all nodes concurrently so elections can complete.
        let mut starting = Vec::new();
        for (id, l) in listeners {
            let cfg = cluster.configs[&id].clone();
            starting.push((id, tokio::spawn(Server::start(cfg, Some(l)))));
        }
        for (id, h) in starting {
            let s = h.await.expect("join").expect("node starts");
            cluster.servers.insert(id, s);
        }
        cluster
    }
}

pub struct TestCluster {
    _dir: tempfile::TempDir,
    configs: BTreeMap<NodeId, Config>,
    servers: BTreeMap<NodeId, Server>,
    filters: Vec<Arc<dyn Filter>>,
}

impl TestCluster {
    pub fn builder(nodes: usize) -> ClusterBuilder {
        ClusterBuilder {
            nodes,
            shards: 8,
            tune: Box::new(|_| {}),
            data_root: None,
        }
    }

    pub fn node_ids(&self) -> Vec<NodeId> {
        self.configs.keys().copied().collect()
    }

    pub fn running(&self) -> Vec<NodeId> {
        self.servers.keys().copied().collect()
    }

    pub fn server(&self, id: NodeId) -> &Server {
        &self.servers[&id]
    }

    pub fn router(&self, id: NodeId) -> StoreRouter {
        self.servers[&id].router()
    }

    pub fn config(&self, id: NodeId) -> &Config {
        &self.configs[&id]
    }

    pub fn grpc_addr(&self, id: NodeId) -> String {
        self.configs[&id].server.addr.clone()
    }

    /// A client that knows every node.
    pub async fn client(&self) -> Client {
        self.client_with_timeout(Duration::from_secs(15)).await
    }

    pub async fn client_with_timeout(&self, timeout: Duration) -> Client {
        let endpoints = self
            .node_ids()
            .iter()
            .map(|id| self.grpc_addr(*id))
            .collect();
        Client::connect(ClientConfig {
            endpoints,
            timeout,
            ..Default::default()
        })
        .await
        .expect("client connects")
    }

    /// Stops a node (its data stays).
    pub async fn stop_node(&mut self, id: NodeId) {
        if let Some(s) = self.servers.remove(&id) {
            s.shutdown().await;
        }
    }

    /// Starts a stopped node again on its data and its ports.
    pub async fn restart_node(&mut self, id: NodeId) {
        assert!(!self.servers.contains_key(&id), "node {id} is running");
        let cfg = self.configs[&id].clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        // The old sockets may linger for a moment.
        let listeners = loop {
            match Listeners::bind(&cfg.server.addr, &cfg.server.status_addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("rebinding node {id}: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot rebind node {id}: {e}"),
            }
        };
        let s = Server::start(cfg, Some(listeners))
            .await
            .expect("node restarts");
        for f in &self.filters {
            s.transport().add_filter(f.clone());
        }
        self.servers.insert(id, s);
    }

    /// Starts a new node `id` (configured like node 1, with `labels`) that
    /// joins the running cluster through its members; returns once it
    /// serves. Fails like `flotilla-server --join` would.
    pub async fn join_node(&mut self, id: NodeId, labels: &str) -> anyhow::Result<()> {
        let l = Listeners::bind("127.0.0.1:0", "127.0.0.1:0")?;
        let template = self.configs.values().next().expect("a node").clone();
        let mut cfg = template.clone();
        cfg.server.node_id = id;
        cfg.server.addr = l.grpc.local_addr()?.to_string();
        cfg.server.status_addr = l.status.local_addr()?.to_string();
        cfg.server.data_dir = self._dir.path().join(format!("node{id}-{}", rand_suffix()));
        cfg.server.initial_cluster = String::new();
        cfg.server.labels = labels.to_string();
        cfg.server.join = self
            .running()
            .iter()
            .map(|n| self.grpc_addr(*n))
            .collect::<Vec<_>>()
            .join(",");
        let s = Server::start(cfg.clone(), Some(l)).await?;
        for f in &self.filters {
            s.transport().add_filter(f.clone());
        }
        self.configs.insert(id, cfg);
        self.servers.insert(id, s);
        Ok(())
    }

    /// Installs a filter on every running node (and on nodes restarted
    /// later), until `heal`.
    pub fn add_filter(&mut self, f: Arc<dyn Filter>) {
        for s in self.servers.values() {
            s.transport().add_filter(f.clone());
        }
        self.filters.push(f);
    }

    /// Cuts every link between the two groups, both ways.
    pub fn partition(&mut self, a: &[NodeId], b: &[NodeId]) {
        self.add_filter(Arc::new(PartitionFilter::new(
            a.iter().copied(),
            b.iter().copied(),
        )));
    }

    /// Cuts node `id` off from every other node.
    pub fn isolate(&mut self, id: NodeId) {
        let others: Vec<_> = self.node_ids().into_iter().filter(|n| *n != id).collect();
        self.partition(&[id], &others);
    }

    /// Removes every filter.
    pub fn heal(&mut self) {
        for s in self.servers.values() {
            s.transport().clear_filters();
        }
        self.filters.clear();
    }

    /// `shard_id`'s descriptor as `node`'s replica knows it (panics when
    /// the node hosts none).
    pub fn descriptor(&self, node: NodeId, shard_id: ShardId) -> ShardDescriptor {
        self.router(node)
            .meta()
            .get(shard_id)
            .unwrap_or_else(|| panic!("node {node} hosts no replica of shard {shard_id}"))
            .descriptor
    }

    /// The node whose replica leads `shard_id`, among running nodes, as the
    /// replicas themselves report (the highest term wins).
    pub fn leader_of(&self, shard_id: ShardId) -> Option<NodeId> {
        self.servers
            .iter()
            .filter_map(|(id, s)| {
                let m = s.router().meta().get(shard_id)?;
                m.is_leader().then_some((m.term, *id))
            })
            .max()
            .map(|(_, id)| id)
    }

    /// Waits until `shard_id` has a leader among `among` (all running nodes
    /// when empty) that every running replica on those nodes agrees on.
    pub async fn wait_leader(
        &self,
        shard_id: ShardId,
        among: &[NodeId],
        timeout: Duration,
    ) -> NodeId {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader_of(shard_id) {
                if among.is_empty() || among.contains(&l) {
                    return l;
                }
            }
            assert!(
                Instant::now() < deadline,
                "shard {shard_id} has no leader among {among:?} after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every replica on every running node knows a leader.
    pub async fn wait_all_leaders(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let missing: usize = self
                .servers
                .values()
                .map(|s| s.router().meta().counts().without_leader)
                .sum();
            if missing == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{missing} replicas still without a leader after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Changes a shard's membership through its leader; returns once the
    /// change applied there.
    pub async fn change_replicas(
        &self,
        shard_id: ShardId,
        changes: Vec<flotilla_proto::admin::ReplicaChange>,
    ) -> flotilla_raftstore::Result<flotilla_proto::meta::ShardDescriptor> {
        let leader = self
            .wait_leader(shard_id, &[], Duration::from_secs(20))
            .await;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.router(leader).change_replicas(
            shard_id,
            changes,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )?;
        rx.await
            .map_err(|_| flotilla_raftstore::Error::Shutdown)?
            .map(|r| r.shard)
    }

    /// Has every replica of `shard_id` hash its data at one log index and
    /// panics unless the hashes (and key counts) agree.
    pub async fn assert_replicas_identical(&self, shard_id: ShardId) {
        let hashes = self.shard_hashes(shard_id, Duration::from_secs(30)).await;
        assert!(
            hashes
                .windows(2)
                .all(|w| (w[0].1, w[0].2) == (w[1].1, w[1].2)),
            "replicas of shard {shard_id} differ: {hashes:?}"
        );
    }

    /// A put sent straight to `node`'s replica of `shard_id`, bypassing the
    /// client (which would retry or redirect it); the receiver gets the
    /// store's answer.
    pub fn direct_put(
        &self,
        node: NodeId,
        shard_id: ShardId,
        key: &[u8],
        value: &[u8],
    ) -> tokio::sync::oneshot::Receiver<flotilla_raftstore::Result<flotilla_raftstore::WriteResult>>
    {
        use flotilla_proto::raftcmd::{op, Op, Put, WriteCommand};
        let (tx, rx) = tokio::sync::oneshot::channel();
        let epoch = self.descriptor(node, shard_id).epoch();
        self.router(node).write(flotilla_raftstore::WriteRequest {
            shard_id,
            epoch,
            command: WriteCommand {
                ops: vec![Op {
                    op: Some(op::Op::Put(Put {
                        key: bytes::Bytes::copy_from_slice(key),
                        value: bytes::Bytes::copy_from_slice(value),
                    })),
                }],
            },
            cb: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        rx
    }

    /// A replica's own view of itself.
    pub async fn replica_status(
        &self,
        node: NodeId,
        shard_id: ShardId,
    ) -> flotilla_raftstore::ReplicaStatus {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.router(node)
            .status(
                shard_id,
                Box::new(move |s| {
                    let _ = tx.send(s);
                }),
            )
            .expect("replica exists");
        rx.await.expect("status answered")
    }

    /// Has every replica of `shard_id` hash its data at one log index and
    /// returns each running node's (node, hash, keys) once all reached it. A
    /// replica that skips the hash entry (it caught up by snapshot) makes the
    /// leader hash again.
    pub async fn shard_hashes(
        &self,
        shard_id: ShardId,
        timeout: Duration,
    ) -> Vec<(NodeId, u64, u64)> {
        let deadline = Instant::now() + timeout;
        loop {
            let leader = self.wait_leader(shard_id, &[], timeout).await;
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.router(leader)
                .compute_hash(
                    shard_id,
                    Box::new(move |r| {
                        let _ = tx.send(r);
                    }),
                )
                .expect("leader exists");
            let index = match rx.await {
                Ok(Ok(r)) => r.index,
                _ => {
                    assert!(Instant::now() < deadline, "shard {shard_id} cannot hash");
                    continue;
                }
            };
            let round_end = (Instant::now() + Duration::from_secs(3)).min(deadline);
            while Instant::now() < round_end {
                let hosts = self
                    .servers
                    .values()
                    .filter(|s| s.router().meta().get(shard_id).is_some())
                    .count();
                let hashes: Vec<_> = self
                    .servers
                    .iter()
                    .filter_map(|(id, s)| {
                        let h = s.router().meta().hash(shard_id)?;
                        (h.index == index).then_some((*id, h.hash, h.keys))
                    })
                    .collect();
                if hashes.len() == hosts {
                    return hashes;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(
                Instant::now() < deadline,
                "replicas of shard {shard_id} did not all hash the same index"
            );
        }
    }

    /// Shuts every node down.
    pub async fn shutdown(mut self) {
        let ids: Vec<_> = self.servers.keys().copied().collect();
        for id in ids {
            self.stop_node(id).await;
        }
    }
}

/// A per-call suffix, so a node id joining twice gets a fresh data dir.
fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Polls `f` every 50 ms until it holds; panics naming `what` after 30 s.
pub async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Puts until the write is acknowledged, sending it again after an
/// Indeterminate outcome (the client never does: a blind retry can land
/// after someone else's newer write). Only for keys the caller alone
/// writes, where a repeated put is harmless. Panics on other errors.
pub async fn put_acked(
    client: &Client,
    key: impl Into<bytes::Bytes>,
    value: impl Into<bytes::Bytes>,
) {
    let (key, value) = (key.into(), value.into());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.put(key.clone(), value.clone()).await {
            Ok(()) => return,
            Err(e) if e.is_indeterminate() && Instant::now() < deadline => {}
            Err(e) => panic!("put {key:?}: {e}"),
        }
    }
}

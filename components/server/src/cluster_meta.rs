//! The cluster's replicated metadata, kept by the meta shard (shard 0, a
//! Raft group on up to 5 nodes whose data lives in RocksDB column family
//! `cluster`; see `flotilla_storage::keys::cluster` for its keys):
//!
//! - the id allocator: one sequence for shard and replica ids;
//! - the shard directory: every user shard's newest known descriptor;
//! - the node registry.
//!
//! Three parts:
//! - [`MetaStore`], on the node leading the meta shard: the operations, as
//!   linearizable reads and CompareAndSwap writes of the meta shard through
//!   the node's own raftstore. Every update is a CAS on the value just
//!   read, so two concurrent updates never lose one another (the loser
//!   reads again). A node that does not lead the meta shard answers
//!   NotLeader with the leader's node, like any shard's replica.
//! - [`MetaClient`], on every node: sends those operations to the meta
//!   shard's leader over the Admin service, following NotLeader answers.
//! - [`spawn_heartbeat`], on every node: every `placement.heartbeat-
//!   interval-ms` it reports the ids of the shards this node leads and the
//!   descriptors of those that changed or that it took over since its last
//!   report (`StoreMeta` keeps them as they change, so an idle beat walks
//!   nothing; all of them every 150th heartbeat or after a failed one, so
//!   splits and membership
//!   changes reach the directory even when the report right after them was
//!   lost), then refreshes the node's routing directory and address book
//!   from the meta shard when the meta leader says they changed (its Raft
//!   term and a count of its writes; also every 150th heartbeat). Any node
//!   therefore answers routes for shards it does not host, at most one
//!   interval behind. An idle node sends no descriptors and reads no
//!   directory, but the ids it leads go in every heartbeat (~10 KB for
//!   3,333). The meta leader answers it from the registry record it last
//!   confirmed, reading the record again (which wakes the sleeping meta
//!   shard) only after a registry write, a new term, or every
//!   `REGISTRY_READ_EVERY` intervals (`MetaStore::register`).
//!
//! Not done yet: a directory read is whole (no delta), which matters only
//! when something changed; the led ids could be sent only when they
//! changed since the last heartbeat this meta leader (same term) answered.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flotilla_proto::admin::admin_client::AdminClient;
use flotilla_proto::admin::{
    AllocIdsRequest, GetDirectoryRequest, GetDirectoryResponse, NodeHeartbeatRequest,
    NodeHeartbeatResponse, NodeStats,
};
use flotilla_proto::kv::{ReadMode, ShardContext};
use flotilla_proto::meta::{Epoch, Node, NodeState, ShardDescriptor};
use flotilla_proto::raftcmd::{op, Cas, Op, WriteCommand};
use flotilla_proto::Message as _;
use flotilla_storage::keys::cluster;
use flotilla_storage::{CF_CLUSTER, META_SHARD_ID};
use tonic::transport::Channel;
use tonic::{Code, Status};

use flotilla_transport::AddressBook;

use crate::service::{HandlerError, NodeContext};

/// The meta shard never splits, so its version stays at the bootstrap's.
fn meta_context() -> ShardContext {
    ShardContext {
        shard_id: META_SHARD_ID,
        epoch: Some(Epoch {
            conf_ver: 0,
            version: 1,
        }),
        replica_id: 0,
        read_mode: ReadMode::Leader as i32,
    }
}

/// A node without a meta replica answers like a follower that knows no
/// leader, so callers move on to the next node.
fn not_hosted_is_not_leader(e: HandlerError) -> HandlerError {
    match e {
        HandlerError::Store(flotilla_raftstore::Error::ShardNotFound(id))
            if id == META_SHARD_ID =>
        {
            HandlerError::Store(flotilla_raftstore::Error::NotLeader {
                shard_id: META_SHARD_ID,
                leader: None,
            })
        }
        e => e,
    }
}

/// CAS attempts before an update gives up (each failure means another
/// update of the same key got in first).
const CAS_ATTEMPTS: usize = 8;

/// The last heartbeat a node sent to this meta leader.
#[derive(Clone, Debug)]
pub struct Liveness {
    pub at: std::time::Instant,
    pub stats: NodeStats,
    /// Shards the node led (shared: the placement driver reads every
    /// node's each round).
    pub led: std::sync::Arc<Vec<u64>>,
}

/// (meta leader's Raft term, directory writes it made): see
/// `MetaStore::directory_version`.
type DirectoryVersion = (u64, u64);

/// Heartbeats between two linearizable reads of a node's registry record
/// when nothing changed (see `MetaStore::register`).
const REGISTRY_READ_EVERY: u32 = 10;

/// A node's registry record as `register` last read (or wrote) it.
struct Registered {
    /// `directory_version` before that read: any registry write by this
    /// leader since, or a new term, changes it.
    version: DirectoryVersion,
    record: Node,
    at: std::time::Instant,
}

/// Meta operations served by the node leading the meta shard.
pub struct MetaStore {
    ctx: Arc<NodeContext>,
    /// Allocations on this node go one at a time (they CAS one key).
    alloc: tokio::sync::Mutex<()>,
    /// Heartbeats heard while leading (not replicated: a new leader starts
    /// empty and gives every node a grace period).
    live: parking_lot::Mutex<std::collections::HashMap<u64, Liveness>>,
    led_generation: std::sync::atomic::AtomicU64,
    /// Directory and registry writes this node made (see
    /// `directory_version`).
    revision: Arc<std::sync::atomic::AtomicU64>,
    /// The last directory read and the version it was read at: the
    /// placement driver looks at it every round.
    cached: parking_lot::Mutex<Option<(DirectoryVersion, Arc<GetDirectoryResponse>)>>,
    /// What `register` last confirmed, per node.
    registered: parking_lot::Mutex<std::collections::HashMap<u64, Registered>>,
}

impl MetaStore {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        MetaStore {
            ctx,
            alloc: tokio::sync::Mutex::new(()),
            live: Default::default(),
            led_generation: Default::default(),
            revision: Default::default(),
            cached: Default::default(),
            registered: Default::default(),
        }
    }

    /// Whether this node's meta replica leads (what it says may be stale
    /// by an election; every write it makes is a CAS anyway).
    pub fn is_leader(&self) -> bool {
        self.ctx
            .router
            .meta()
            .get(META_SHARD_ID)
            .is_some_and(|m| m.is_leader())
    }

    /// The meta shard's descriptor as this node's replica knows it.
    pub fn meta_descriptor(&self) -> Option<ShardDescriptor> {
        self.ctx
            .router
            .meta()
            .get(META_SHARD_ID)
            .map(|m| m.descriptor)
    }

    /// A linearizable view of the meta shard's data (NotLeader elsewhere).
    async fn read(&self) -> Result<flotilla_storage::KvSnapshot, HandlerError> {
        let (snap, _) = self
            .ctx
            .read_barrier(
                &meta_context(),
                vec![flotilla_raftstore::KeySpan::Range {
                    start: Bytes::new(),
                    end: Bytes::new(),
                }],
            )
            .await
            .map_err(not_hosted_is_not_leader)?;
        Ok(snap)
    }

    fn get(snap: &flotilla_storage::KvSnapshot, key: &[u8]) -> Result<Option<Bytes>, Status> {
        snap.get(CF_CLUSTER, key)
            .map(|v| v.map(Bytes::from))
            .map_err(|e| Status::internal(format!("reading the meta shard: {e}")))
    }

    /// Sets `key` to `new` if it still holds `expected`.
    async fn cas(
        &self,
        key: Vec<u8>,
        expected: Option<Bytes>,
        new: Bytes,
    ) -> Result<bool, HandlerError> {
        let directory = key[..] != *cluster::NEXT_ID;
        let cmd = WriteCommand {
            ops: vec![Op {
                op: Some(op::Op::Cas(Cas {
                    key: key.into(),
                    expected_exists: expected.is_some(),
                    expected_value: expected.unwrap_or_default(),
                    new_value: new,
                    delete: false,
                })),
            }],
        };
        // Any write may have changed the directory or registry: nodes (and
        // `register`) read them again. Counted once its outcome is known,
        // after it applied, even if this call timed out first: a write that
        // commits late must still outdate what was read before it.
        let revision = self.revision.clone();
        let r = self
            .ctx
            .propose_in_then(meta_context(), cmd, move || {
                if directory {
                    revision.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            })
            .await;
        if directory && r.is_err() {
            // Not proposed, or the outcome is not known yet: count it now
            // too (the version only has to change, not count writes).
            self.revision
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        let r = r.map_err(not_hosted_is_not_leader)?;
        Ok(r.cas.first().is_some_and(|c| c.succeeded))
    }

    /// Where the directory and registry stand: (meta leader's term,
    /// changes made by this leader). Read before anything a node then reads.
    fn directory_version(&self) -> DirectoryVersion {
        let term = self
            .ctx
            .router
            .meta()
            .get(META_SHARD_ID)
            .map_or(0, |m| m.term);
        (
            term,
            self.revision.load(std::sync::atomic::Ordering::SeqCst),
        )
    }

    /// Hands out `count` fresh ids; returns the first.
    pub async fn alloc_ids(&self, count: u64) -> Result<u64, HandlerError> {
        let _one_at_a_time = self.alloc.lock().await;
        for _ in 0..CAS_ATTEMPTS {
            let snap = self.read().await?;
            let current = Self::get(&snap, cluster::NEXT_ID)?;
            let next = match &current {
                Some(v) if v.len() == 8 => u64::from_be_bytes(v[..].try_into().unwrap()),
                _ => {
                    return Err(Status::internal(
                        "the meta shard holds no id allocator (was the cluster bootstrapped by this version?)",
                    )
                    .into())
                }
            };
            let end = next
                .checked_add(count)
                .ok_or_else(|| Status::out_of_range("ids exhausted"))?;
            if self
                .cas(
                    cluster::NEXT_ID.to_vec(),
                    current,
                    Bytes::copy_from_slice(&end.to_be_bytes()),
                )
                .await?
            {
                crate::metrics::META_IDS_ALLOCATED.inc_by(count);
                return Ok(next);
            }
        }
        Err(Status::aborted("the id allocator was contended; retry").into())
    }

    /// The directory and registry as the meta shard holds them.
    pub async fn directory(&self) -> Result<GetDirectoryResponse, HandlerError> {
        let snap = self.read().await?;
        let scan = |start: &[u8], end: &[u8]| {
            snap.scan(CF_CLUSTER, start, end, usize::MAX, false)
                .map(|(pairs, _)| pairs)
                .map_err(|e| Status::internal(format!("reading the meta shard: {e}")))
        };
        let decode_err =
            |e: prost::DecodeError| Status::internal(format!("meta shard record: {e}"));
        let shards = scan(cluster::SHARD_PREFIX, cluster::SHARD_END)?
            .into_iter()
            .map(|(_, v)| ShardDescriptor::decode(&v[..]).map_err(decode_err))
            .collect::<Result<Vec<_>, _>>()?;
        let nodes = scan(cluster::NODE_PREFIX, cluster::NODE_END)?
            .into_iter()
            .map(|(_, v)| Node::decode(&v[..]).map_err(decode_err))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(GetDirectoryResponse { shards, nodes })
    }

    /// The directory as of this leader's last write: read again only
    /// when something was written since (or leadership changed).
    pub async fn directory_cached(&self) -> Result<Arc<GetDirectoryResponse>, HandlerError> {
        let version = self.directory_version();
        if let Some((v, dir)) = self.cached.lock().as_ref() {
            if *v == version && version.0 != 0 {
                return Ok(dir.clone());
            }
        }
        let dir = Arc::new(self.directory().await?);
        *self.cached.lock() = Some((version, dir.clone()));
        Ok(dir)
    }

    /// Records a node's address and labels; its state stays what the
    /// registry holds (UP for a node new to it). Returns that state.
    ///
    /// A heartbeat that brings the record this leader last confirmed, with
    /// no registry write by this leader and no new term since, is answered
    /// from that without a read. The read would wake the sleeping meta
    /// shard (a ReadIndex round, then a new hibernation handshake) on every
    /// heartbeat of every node, for a record that did not change. Only this
    /// leader writes the registry while it leads, and every write it makes
    /// changes `directory_version`, so the answer is what a read would say,
    /// as long as this node still leads. That last part is what a read
    /// checks: a leader cut off from the other meta replicas while its
    /// shard sleeps learns of its successor only on waking. So a record is
    /// read again at least every `REGISTRY_READ_EVERY` heartbeat intervals;
    /// until then, such a deposed leader may answer heartbeats of nodes
    /// that reach it (the successor, which starts with a grace period, does
    /// not count a node down for minutes).
    async fn register(&self, node: Node) -> Result<NodeState, HandlerError> {
        if let Some(state) = self.registered_unchanged(&node) {
            crate::metrics::META_REGISTRY_CHECKS
                .with_label_values(&["cached"])
                .inc();
            return Ok(state);
        }
        crate::metrics::META_REGISTRY_CHECKS
            .with_label_values(&["read"])
            .inc();
        let key = cluster::node_key(node.id);
        for _ in 0..CAS_ATTEMPTS {
            let version = self.directory_version();
            let at = std::time::Instant::now();
            let snap = self.read().await?;
            let held = Self::get(&snap, &key)?;
            let state = match &held {
                Some(h) => Node::decode(&h[..])
                    .map_err(|e| Status::internal(format!("meta shard record: {e}")))?
                    .state(),
                None => NodeState::Up,
            };
            let mut want = node.clone();
            want.set_state(state);
            let bytes = want.encode_to_vec();
            let confirmed = held.as_deref() == Some(&bytes[..]);
            if !confirmed && !self.cas(key.clone(), held, bytes.into()).await? {
                continue;
            }
            if !confirmed {
                tracing::info!(node_id = node.id, address = %node.address, labels = ?node.labels, "node registered");
            }
            // After a write of its own the version has moved on: the next
            // heartbeat reads once more, then relies on this.
            self.registered.lock().insert(
                node.id,
                Registered {
                    version,
                    record: want,
                    at,
                },
            );
            return Ok(state);
        }
        Err(Status::aborted("the node registry was contended; retry").into())
    }

    /// The node's state, if `register` confirmed this very record under the
    /// current directory version and recently enough, and this node still
    /// leads as far as it knows (a check-quorum step-down keeps the term).
    fn registered_unchanged(&self, node: &Node) -> Option<NodeState> {
        if !self.is_leader() {
            return None;
        }
        let version = self.directory_version();
        let registered = self.registered.lock();
        let r = registered.get(&node.id)?;
        let fresh =
            r.at.elapsed() < self.ctx.cfg.placement.heartbeat_interval() * REGISTRY_READ_EVERY;
        let mut same = node.clone();
        same.set_state(r.record.state());
        (version.0 != 0 && r.version == version && fresh && same == r.record)
            .then(|| r.record.state())
    }

    /// Moves a node from one of `from` to `to`; returns the record.
    pub async fn set_node_state(
        &self,
        node_id: u64,
        from: &[NodeState],
        to: NodeState,
    ) -> Result<Node, HandlerError> {
        let key = cluster::node_key(node_id);
        for _ in 0..CAS_ATTEMPTS {
            let snap = self.read().await?;
            let held = Self::get(&snap, &key)?
                .ok_or_else(|| Status::not_found(format!("no node {node_id} in the registry")))?;
            let mut node = Node::decode(&held[..])
                .map_err(|e| Status::internal(format!("meta shard record: {e}")))?;
            if node.state() == to {
                return Ok(node);
            }
            if !from.contains(&node.state()) {
                return Err(Status::failed_precondition(format!(
                    "node {node_id} is {:?}, not {:?}",
                    node.state(),
                    from
                ))
                .into());
            }
            node.set_state(to);
            if self
                .cas(key.clone(), Some(held), node.encode_to_vec().into())
                .await?
            {
                tracing::info!(node_id, state = ?to, "node state changed");
                return Ok(node);
            }
        }
        Err(Status::aborted("the node registry was contended; retry").into())
    }

    /// A node's heartbeat: registry, liveness, directory. Returns what
    /// the directory took and the node's state.
    pub async fn heartbeat(
        &self,
        req: NodeHeartbeatRequest,
    ) -> Result<NodeHeartbeatResponse, HandlerError> {
        let node = req
            .node
            .ok_or_else(|| Status::invalid_argument("node is required"))?;
        if node.id == 0 {
            return Err(Status::invalid_argument("node.id must not be 0").into());
        }
        let state = self.register(node.clone()).await?;
        {
            let mut live = self.live.lock();
            let led = match live.get(&node.id) {
                Some(l) if *l.led == req.led => l.led.clone(),
                _ => {
                    self.led_generation
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    std::sync::Arc::new(req.led)
                }
            };
            live.insert(
                node.id,
                Liveness {
                    at: std::time::Instant::now(),
                    stats: req.stats.unwrap_or_default(),
                    led,
                },
            );
        }
        let updated = self.report(req.shards).await?;
        // After this heartbeat's own writes: the node reads them back.
        let (directory_term, directory_revision) = self.directory_version();
        Ok(NodeHeartbeatResponse {
            updated,
            state: state as i32,
            directory_term,
            directory_revision,
        })
    }

    /// What this node heard from each node since it took the lead.
    pub fn liveness(&self) -> std::collections::HashMap<u64, Liveness> {
        self.live.lock().clone()
    }

    /// Forgets heartbeats (the meta leadership moved away: what the next
    /// leader term hears is all that counts).
    pub fn forget_liveness(&self) {
        self.live.lock().clear();
        self.registered.lock().clear();
        self.led_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Changes whenever some node's led shards (as heard) change.
    pub fn led_generation(&self) -> u64 {
        self.led_generation
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Keeps each descriptor that is newer than the directory's; returns
    /// how many replaced what it held.
    pub async fn report(&self, shards: Vec<ShardDescriptor>) -> Result<u64, HandlerError> {
        let mut updated = 0;
        // One read serves the whole report, taken at its first descriptor:
        // most heartbeats report none.
        let mut snap = None;
        for d in shards {
            if d.id == META_SHARD_ID || d.replicas.is_empty() {
                continue;
            }
            let key = cluster::shard_key(d.id);
            for attempt in 0.. {
                let view = match snap.take() {
                    Some(s) => s,
                    None => self.read().await?,
                };
                let held = Self::get(&view, &key)?;
                snap = Some(view);
                if let Some(h) = &held {
                    let h = ShardDescriptor::decode(&h[..])
                        .map_err(|e| Status::internal(format!("meta shard record: {e}")))?;
                    if !d.is_newer_than(&h) {
                        break;
                    }
                }
                if self
                    .cas(key.clone(), held, d.encode_to_vec().into())
                    .await?
                {
                    updated += 1;
                    break;
                }
                // Someone else wrote it since: read afresh.
                snap = None;
                if attempt + 1 == CAS_ATTEMPTS {
                    return Err(Status::aborted("the directory was contended; retry").into());
                }
            }
        }
        crate::metrics::META_DIRECTORY_UPDATES.inc_by(updated);
        Ok(updated)
    }
}

/// Reaches the meta shard's leader from any node.
#[derive(Clone)]
pub struct MetaClient {
    addresses: AddressBook,
    timeout: Duration,
    /// The node that led the meta shard last time (0 = unknown).
    leader: Arc<parking_lot::Mutex<u64>>,
    /// One lazily connected channel per address.
    channels: Arc<parking_lot::Mutex<std::collections::HashMap<String, Channel>>>,
}

impl MetaClient {
    /// `addresses`: the nodes to try (the node's own address book, kept
    /// current by the heartbeat); `timeout`: budget of one call.
    pub fn new(addresses: AddressBook, timeout: Duration) -> Self {
        MetaClient {
            addresses,
            timeout,
            leader: Arc::new(parking_lot::Mutex::new(0)),
            channels: Default::default(),
        }
    }

    fn channel(&self, node_id: u64) -> Option<AdminClient<Channel>> {
        let addr = self.addresses.get(node_id)?;
        let mut channels = self.channels.lock();
        let ch = match channels.get(&addr) {
            Some(ch) => ch.clone(),
            None => {
                let ch = Channel::from_shared(format!("http://{addr}"))
                    .ok()?
                    .connect_timeout(Duration::from_secs(1))
                    .timeout(self.timeout)
                    .connect_lazy();
                channels.insert(addr, ch.clone());
                ch
            }
        };
        Some(AdminClient::new(ch).max_decoding_message_size(64 << 20))
    }

    /// Runs `call` on the meta shard's leader: the one last seen, else each
    /// node in turn, following NotLeader answers, within the timeout.
    async fn on_leader<T, F, Fut>(&self, what: &str, call: F) -> Result<T, Status>
    where
        F: Fn(AdminClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut last = Status::unavailable(format!("{what}: no node to ask"));
        let mut backoff = Duration::from_millis(20);
        loop {
            let nodes: Vec<u64> = self.addresses.all().into_iter().map(|(id, _)| id).collect();
            let mut queue: std::collections::VecDeque<u64> = nodes.iter().copied().collect();
            let known = *self.leader.lock();
            if known != 0 {
                queue.push_front(known);
            }
            // Each node once, plus the leaders named on the way.
            let mut budget = 2 * nodes.len() + 1;
            while let (Some(id), true) = (queue.pop_front(), budget > 0) {
                budget -= 1;
                let Some(client) = self.channel(id) else {
                    continue;
                };
                match call(client).await {
                    Ok(v) => {
                        *self.leader.lock() = id;
                        return Ok(v);
                    }
                    Err(s) => {
                        if let Some(l) = s.metadata().get(flotilla_proto::NOT_LEADER_METADATA) {
                            let hint: u64 =
                                l.to_str().ok().and_then(|v| v.parse().ok()).unwrap_or(0);
                            if hint != 0 && hint != id {
                                queue.push_front(hint);
                            }
                        } else if matches!(
                            s.code(),
                            Code::InvalidArgument | Code::OutOfRange | Code::NotFound
                        ) || (s.code() == Code::FailedPrecondition)
                        {
                            return Err(s);
                        }
                        last = s;
                    }
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(last);
                }
            }
            *self.leader.lock() = 0;
            if tokio::time::Instant::now() + backoff >= deadline {
                return Err(last);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    pub async fn alloc_ids(&self, count: u64) -> Result<u64, Status> {
        self.on_leader("allocating ids", |mut c| async move {
            Ok(c.alloc_ids(AllocIdsRequest { count })
                .await?
                .into_inner()
                .first)
        })
        .await
    }

    pub async fn directory(&self) -> Result<GetDirectoryResponse, Status> {
        self.on_leader("reading the directory", |mut c| async move {
            Ok(c.get_directory(GetDirectoryRequest {}).await?.into_inner())
        })
        .await
    }

    pub async fn heartbeat(
        &self,
        req: NodeHeartbeatRequest,
    ) -> Result<NodeHeartbeatResponse, Status> {
        self.on_leader("sending a heartbeat", |mut c| {
            let req = req.clone();
            async move { Ok(c.node_heartbeat(req).await?.into_inner()) }
        })
        .await
    }

    pub async fn list_nodes(&self) -> Result<Vec<flotilla_proto::admin::NodeInfo>, Status> {
        self.on_leader("listing nodes", |mut c| async move {
            Ok(c.list_nodes(flotilla_proto::admin::ListNodesRequest {})
                .await?
                .into_inner()
                .nodes)
        })
        .await
    }
}

/// This node as the registry should know it, and its load.
fn heartbeat_request(
    ctx: &NodeContext,
    led: Vec<u64>,
    shards: Vec<ShardDescriptor>,
) -> NodeHeartbeatRequest {
    let status = crate::status::NodeStatus::of(ctx);
    NodeHeartbeatRequest {
        node: Some(Node {
            id: ctx.node_id,
            address: ctx.addr.clone(),
            labels: ctx.cfg.labels().unwrap_or_default(),
            state: NodeState::Up as i32,
        }),
        shards,
        stats: Some(NodeStats {
            replicas: status.shards as u64,
            leaders: status.leaders as u64,
            disk_available_bytes: status.disk_available_bytes,
            used_bytes: status.raft_engine_bytes + status.rocksdb_bytes,
        }),
        led,
    }
}

/// The user shards this node's replicas lead, by id.
fn led_ids(ctx: &NodeContext) -> Vec<u64> {
    let mut led = ctx.router.meta().led_ids();
    led.retain(|id| *id != META_SHARD_ID);
    // Sorted: the meta leader compares it with the node's last list.
    led.sort_unstable();
    led
}

/// Reports a split's two halves at once (the next heartbeat would).
pub async fn report_split(
    ctx: &NodeContext,
    client: &MetaClient,
    halves: Vec<ShardDescriptor>,
) -> Result<(), Status> {
    client
        .heartbeat(heartbeat_request(ctx, led_ids(ctx), halves))
        .await?;
    Ok(())
}

/// Every this many heartbeats a node reports every shard it leads and
/// reads the whole directory whatever changed (a safety net: five minutes
/// with the default interval; each costs O(shards) on both sides).
const FULL_HEARTBEAT_EVERY: u64 = 150;

/// What a node's heartbeats remember from one to the next, so an idle
/// node with thousands of shards sends and reads next to nothing.
#[derive(Default)]
pub struct HeartbeatState {
    /// The directory version this node's copy was read at.
    directory: Option<DirectoryVersion>,
    beats: u64,
}

/// One heartbeat: report this node, the shards it leads and those whose
/// descriptors changed, then, if the meta leader says the directory or
/// registry changed since this node last read them, refresh the directory
/// and address book and let go of replicas the directory says were removed
/// from this node while it was away. A failure forgets what was reported
/// and read: the next heartbeat sends and reads everything.
async fn heartbeat(
    ctx: &NodeContext,
    client: &MetaClient,
    st: &mut HeartbeatState,
) -> Result<(), Status> {
    let full = st.beats.is_multiple_of(FULL_HEARTBEAT_EVERY);
    st.beats += 1;
    let led = led_ids(ctx);
    let mut changed = ctx.router.meta().take_changed_led(full);
    changed.retain(|d| d.id != META_SHARD_ID);
    let r = match client.heartbeat(heartbeat_request(ctx, led, changed)).await {
        Ok(r) => r,
        Err(e) => {
            // What was taken is lost: the next heartbeat reports all.
            *st = HeartbeatState::default();
            return Err(e);
        }
    };
    let removed = r.state == NodeState::Removed as i32;
    if removed
        != ctx
            .removed
            .swap(removed, std::sync::atomic::Ordering::Relaxed)
        && removed
    {
        tracing::error!(
            node_id = ctx.node_id,
            "this node was removed from the cluster; it no longer serves requests"
        );
    }
    let version = (r.directory_term, r.directory_revision);
    if !full && version.0 != 0 && st.directory == Some(version) {
        return Ok(());
    }
    st.directory = None;
    let dir = client.directory().await?;
    // Addresses this node already has stay: nodes may reach one another
    // through different addresses than the ones they listen on.
    for n in dir.nodes {
        if !n.address.is_empty() && ctx.addresses.get(n.id).is_none() {
            ctx.addresses.set(n.id, n.address);
        }
    }
    let local = ctx.router.meta();
    for d in dir.shards {
        if let Some(m) = local.get(d.id) {
            let mine = m.descriptor.epoch();
            let gone = d.replica(m.replica_id).is_none();
            if gone && d.epoch().conf_ver > mine.conf_ver {
                ctx.router.tombstone_if_removed(d.clone());
            }
        }
        ctx.directory.update(d);
    }
    st.directory = Some(version);
    Ok(())
}

/// Runs [`heartbeat`] every `interval` until the node stops.
pub fn spawn_heartbeat(
    ctx: Arc<NodeContext>,
    client: MetaClient,
    interval: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let state = Arc::new(tokio::sync::Mutex::new(HeartbeatState::default()));
    every(interval, stop, move || {
        let (ctx, client, state) = (ctx.clone(), client.clone(), state.clone());
        async move {
            let mut st = state.lock().await;
            match heartbeat(&ctx, &client, &mut st).await {
                Ok(()) => crate::metrics::META_HEARTBEATS
                    .with_label_values(&["ok"])
                    .inc(),
                Err(e) => {
                    crate::metrics::META_HEARTBEATS
                        .with_label_values(&["failed"])
                        .inc();
                    tracing::debug!(node_id = ctx.node_id, error = %e.message(), "meta heartbeat failed");
                }
            }
        }
    })
}

/// Runs `f` every `interval` (no catching up after a slow run) until `stop`
/// turns true.
pub fn every<F, Fut>(
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut f: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            f().await;
        }
    })
}

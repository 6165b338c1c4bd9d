//! The placement driver: on the node leading the meta shard, every
//! `placement.schedule-interval-ms` it looks at the node registry, the
//! heartbeats this node heard and the shard directory, and starts
//! operators, at most `placement.max-operators` at once and one per shard:
//!
//! 1. **Repair** (first, for every shard and the meta shard): replicas on
//!    nodes that are down (silent longer than `max-down-time-ms`),
//!    decommissioning, removed or unknown are replaced by a replica on a
//!    healthy node (`move-replica`), or removed when the shard already has
//!    enough healthy ones; a shard short of replicas gets one
//!    (`add-replica`), one with too many loses one (`remove-replica`,
//!    learners first).
//! 2. **Replica balance** (user shards, when nothing needs repair): a replica
//!    moves from the node holding the most to the node holding the fewest
//!    while they differ by more than 5 % of the mean (at least 1).
//! 3. **Leader balance**: leadership moves from the node leading the most
//!    shards to one leading the fewest while they differ by more than 1,
//!    up to `max-operators` transfers a round. The nodes' led lists are up
//!    to a heartbeat interval old, so transfers running or finished within
//!    the cool-down count as done: a round never moves more than the
//!    imbalance left.
//!
//! Targets are UP nodes heard from within two heartbeat intervals; a target
//! in a zone (label `zone`) the shard does not use yet wins, then the one
//! with the fewest replicas (counting operators under way). A replica
//! move adds a learner, waits until it caught up, promotes it and demotes
//! the old replica in one joint-consensus change, then removes the old one
//! (`Client::move_replica`). User shards are operated on through the
//! Admin service like any operator would (`flotilla_client`); the meta
//! shard, which this node leads, through the local raftstore.
//!
//! A decommissioning node that holds no replica any more becomes REMOVED.
//! Operators that outlive `operator-timeout-ms` are abandoned; the next
//! rounds look at the shard afresh. Heartbeats are not replicated: a new
//! meta leader starts with none and gives every node `max-down-time-ms`
//! from its election before it calls any node down.
//!
//! Not done: merge of small shards, load (QPS) based balancing, store
//! capacity (disk) weighting.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_proto::admin::{NodeInfo, Operator};
use flotilla_proto::meta::{Node, NodeState, ReplicaRole, ShardDescriptor};
use flotilla_storage::META_SHARD_ID;
use parking_lot::Mutex;
use tonic::Status;

use crate::cluster_meta::MetaStore;
use crate::config::PlacementSection;
use crate::service::{HandlerError, NodeContext};

/// Finished operators kept for `operator list`.
const KEEP_FINISHED: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Add { to: u64 },
    Remove { from: u64 },
    Move { from: u64, to: u64 },
    TransferLeader { from: u64, to: u64 },
}

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Kind::Add { .. } => "add-replica",
            Kind::Remove { .. } => "remove-replica",
            Kind::Move { .. } => "move-replica",
            Kind::TransferLeader { .. } => "transfer-leader",
        }
    }

    fn nodes(&self) -> (u64, u64) {
        match *self {
            Kind::Add { to } => (0, to),
            Kind::Remove { from } => (from, 0),
            Kind::Move { from, to } | Kind::TransferLeader { from, to } => (from, to),
        }
    }
}

struct Op {
    id: u64,
    shard_id: u64,
    kind: Kind,
    reason: &'static str,
    started: Instant,
    finished: Option<Instant>,
    status: &'static str,
    error: String,
}

impl Op {
    fn to_pb(&self) -> Operator {
        let (from_node, to_node) = self.kind.nodes();
        Operator {
            id: self.id,
            shard_id: self.shard_id,
            kind: self.kind.name().into(),
            from_node,
            to_node,
            reason: self.reason.into(),
            status: self.status.into(),
            age_ms: self.started.elapsed().as_millis() as u64,
            error: self.error.clone(),
        }
    }
}

#[derive(Default)]
struct Ops {
    running: BTreeMap<u64, Op>,
    finished: VecDeque<Op>,
}

/// What a round knows of a node.
struct NodeView {
    node: Node,
    /// Heard from within two heartbeat intervals.
    alive: bool,
    /// Silent longer than max-down-time.
    down: bool,
}

impl NodeView {
    fn zone(&self) -> Option<&str> {
        self.node.labels.get("zone").map(String::as_str)
    }

    /// May receive replicas and leaders.
    fn schedulable(&self) -> bool {
        self.alive && self.node.state() == NodeState::Up
    }

    /// Its replicas count as healthy.
    fn healthy(&self) -> bool {
        !self.down && self.node.state() == NodeState::Up
    }
}

pub struct Placement {
    ctx: Arc<NodeContext>,
    store: Arc<MetaStore>,
    cfg: PlacementSection,
    ops: Mutex<Ops>,
    next_id: AtomicU64,
    /// When this node last became the meta leader (None: not leading).
    leading_since: Mutex<Option<Instant>>,
    client: tokio::sync::Mutex<Option<flotilla_client::Client>>,
    /// What the last round saw, when it found nothing to do: a round that
    /// would see the same skips planning (O(shards) every second).
    idle_inputs: Mutex<Option<RoundInputs>>,
}

/// What a round's plan depends on (besides operators, which must all be
/// over for a round to be skipped).
struct RoundInputs {
    directory: Arc<flotilla_proto::admin::GetDirectoryResponse>,
    /// The meta shard's descriptor (kept apart from the directory).
    meta: Option<ShardDescriptor>,
    /// (id, state, alive, down) by id.
    nodes: Vec<(u64, i32, bool, bool)>,
    /// Changes whenever a node reports a different set of led shards.
    leaders: u64,
}

impl PartialEq for RoundInputs {
    fn eq(&self, o: &Self) -> bool {
        Arc::ptr_eq(&self.directory, &o.directory)
            && self.meta == o.meta
            && self.nodes == o.nodes
            && self.leaders == o.leaders
    }
}

impl Placement {
    pub fn new(ctx: Arc<NodeContext>, store: Arc<MetaStore>) -> Self {
        let cfg = ctx.cfg.placement.clone();
        Placement {
            ctx,
            store,
            cfg,
            ops: Mutex::new(Ops::default()),
            next_id: AtomicU64::new(1),
            leading_since: Mutex::new(None),
            client: tokio::sync::Mutex::new(None),
            idle_inputs: Mutex::new(None),
        }
    }

    /// Runs rounds until `stop`.
    pub fn spawn(
        self: Arc<Self>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let interval = Duration::from_millis(self.cfg.schedule_interval_ms);
        crate::cluster_meta::every(interval, stop, move || {
            let this = self.clone();
            async move {
                if let Err(e) = this.round().await {
                    let msg = match e {
                        HandlerError::Status(s) => s.message().to_string(),
                        HandlerError::Store(e) => e.to_string(),
                    };
                    tracing::debug!(node_id = this.ctx.node_id, error = %msg, "placement round failed");
                }
            }
        })
    }

    /// Running operators, then recent finished ones.
    pub fn operators(&self) -> Vec<Operator> {
        let ops = self.ops.lock();
        ops.running
            .values()
            .chain(ops.finished.iter().rev())
            .map(Op::to_pb)
            .collect()
    }

    /// The registry with liveness and load (on the meta leader).
    pub async fn list_nodes(&self) -> Result<Vec<NodeInfo>, HandlerError> {
        let dir = self.store.directory().await?;
        let live = self.store.liveness();
        let since = self.leading_since.lock().unwrap_or_else(Instant::now);
        Ok(dir
            .nodes
            .into_iter()
            .map(|node| {
                let l = live.get(&node.id);
                let silent = l.map_or(since.elapsed(), |l| l.at.elapsed());
                let liveness = if silent > Duration::from_millis(self.cfg.max_down_time_ms) {
                    "down"
                } else if l.is_none() || silent > 2 * self.cfg.heartbeat_interval() {
                    "disconnected"
                } else {
                    "up"
                };
                NodeInfo {
                    last_heartbeat_ms: l.map_or(u64::MAX, |l| l.at.elapsed().as_millis() as u64),
                    liveness: liveness.into(),
                    stats: l.map(|l| l.stats),
                    node: Some(node),
                }
            })
            .collect())
    }

    async fn client(&self) -> Result<flotilla_client::Client, Status> {
        let mut c = self.client.lock().await;
        if let Some(c) = c.as_ref() {
            return Ok(c.clone());
        }
        let client = flotilla_client::Client::connect(flotilla_client::ClientConfig {
            endpoints: vec![self.ctx.addr.clone()],
            timeout: Duration::from_millis(self.cfg.operator_timeout_ms),
            ..Default::default()
        })
        .await
        .map_err(|e| Status::unavailable(format!("placement client: {e}")))?;
        *c = Some(client.clone());
        Ok(client)
    }

    async fn round(self: &Arc<Self>) -> Result<(), HandlerError> {
        if !self.store.is_leader() {
            if self.leading_since.lock().take().is_some() {
                self.store.forget_liveness();
                *self.client.lock().await = None;
            }
            return Ok(());
        }
        let since = *self.leading_since.lock().get_or_insert_with(Instant::now);
        // Most rounds of an idle cluster find nothing new: the directory
        // is read again only after a change.
        let dir = self.store.directory_cached().await?;
        // Operators on nodes this node has not heard of yet need their
        // addresses (the heartbeat would learn them a little later).
        for n in &dir.nodes {
            if !n.address.is_empty() && self.ctx.addresses.get(n.id).is_none() {
                self.ctx.addresses.set(n.id, n.address.clone());
            }
        }
        let live = self.store.liveness();
        let max_down = Duration::from_millis(self.cfg.max_down_time_ms);
        let alive_within = 2 * self.cfg.heartbeat_interval();
        let nodes: HashMap<u64, NodeView> = dir
            .nodes
            .iter()
            .cloned()
            .map(|node| {
                let silent = live
                    .get(&node.id)
                    .map_or(since.elapsed(), |l| l.at.elapsed());
                let alive = live.contains_key(&node.id) && silent <= alive_within;
                let view = NodeView {
                    alive,
                    down: silent > max_down,
                    node,
                };
                (view.node.id, view)
            })
            .collect();
        let meta = self.store.meta_descriptor();
        let cool_down = 3 * self.cfg.heartbeat_interval();
        let mut node_states: Vec<_> = nodes
            .values()
            .map(|v| (v.node.id, v.node.state, v.alive, v.down))
            .collect();
        node_states.sort_unstable();
        let inputs = RoundInputs {
            directory: dir.clone(),
            meta: meta.clone(),
            nodes: node_states,
            leaders: self.store.led_generation(),
        };
        let ops_over = {
            let ops = self.ops.lock();
            ops.running.is_empty()
                && ops
                    .finished
                    .iter()
                    .all(|op| op.finished.is_none_or(|t| t.elapsed() >= cool_down))
        };
        if ops_over && self.idle_inputs.lock().as_ref() == Some(&inputs) {
            return Ok(());
        }
        // (Borrowed: cloning 10,000 descriptors each second was most of an
        // idle meta leader's work.)
        let shards: Vec<&ShardDescriptor> = meta.iter().chain(&dir.shards).collect();
        let mut leaders: HashMap<u64, u64> = HashMap::new();
        for (node, l) in &live {
            for s in l.led.iter() {
                leaders.insert(*s, *node);
            }
        }
        leaders.insert(META_SHARD_ID, self.ctx.node_id);
        // Led lists are up to a heartbeat interval old: count the transfers
        // this driver has running, or finished within the cool-down, as done,
        // so that a round moves no more leaders than the imbalance left
        // (before, a round saw the imbalance as it was before the last
        // rounds' transfers, and could only start 4 at a time safely).
        {
            let ops = self.ops.lock();
            let recent = ops.finished.iter().filter(|op| {
                op.status == "done" && op.finished.is_some_and(|t| t.elapsed() < cool_down)
            });
            for op in ops.running.values().chain(recent) {
                // Only over the old holder: a list already showing another
                // node is newer than the transfer (the target crashed, say).
                if let Kind::TransferLeader { from, to } = op.kind {
                    if leaders.get(&op.shard_id) == Some(&from) {
                        leaders.insert(op.shard_id, to);
                    }
                }
            }
        }

        self.finish_decommissions(&nodes, &shards).await?;

        let mut plan = Plan::new(&nodes, &shards, &self.ops.lock(), cool_down);
        let budget = self
            .cfg
            .max_operators
            .saturating_sub(self.ops.lock().running.len());
        let mut started = Vec::new();
        for d in &shards {
            if started.len() >= budget {
                break;
            }
            if let Some((kind, reason)) = plan.repair(d, self.cfg.max_replicas) {
                started.push((d.id, kind, reason));
            }
        }
        let repairing = !started.is_empty()
            || self
                .ops
                .lock()
                .running
                .values()
                .any(|o| o.reason != "balance-replicas" && o.reason != "balance-leaders");
        if !repairing {
            while started.len() < budget {
                match plan.balance_replicas(&shards, &leaders) {
                    Some((id, kind)) => started.push((id, kind, "balance-replicas")),
                    None => break,
                }
            }
        }
        let moving = self
            .ops
            .lock()
            .running
            .values()
            .any(|o| !matches!(o.kind, Kind::TransferLeader { .. }));
        if started.is_empty() && !moving {
            while started.len() < budget {
                match plan.balance_leaders(&shards, &mut leaders) {
                    Some((id, kind)) => started.push((id, kind, "balance-leaders")),
                    None => break,
                }
            }
        }
        *self.idle_inputs.lock() = (started.is_empty() && ops_over).then_some(inputs);
        for (shard_id, kind, reason) in started {
            self.start(shard_id, kind, reason);
        }
        Ok(())
    }

    /// Marks decommissioning nodes that hold no replica any more REMOVED.
    async fn finish_decommissions(
        &self,
        nodes: &HashMap<u64, NodeView>,
        shards: &[&ShardDescriptor],
    ) -> Result<(), HandlerError> {
        for n in nodes.values() {
            if n.node.state() != NodeState::Decommissioning {
                continue;
            }
            let holds = shards.iter().any(|d| d.replica_on(n.node.id).is_some());
            if !holds {
                self.store
                    .set_node_state(n.node.id, &[NodeState::Decommissioning], NodeState::Removed)
                    .await?;
                tracing::info!(
                    node_id = n.node.id,
                    "decommissioned node emptied; it is removed"
                );
            }
        }
        Ok(())
    }

    fn start(self: &Arc<Self>, shard_id: u64, kind: Kind, reason: &'static str) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            operator = id,
            shard_id,
            kind = kind.name(),
            from = kind.nodes().0,
            to = kind.nodes().1,
            reason,
            "placement operator started"
        );
        crate::metrics::PD_OPERATORS
            .with_label_values(&[kind.name(), "started"])
            .inc();
        self.ops.lock().running.insert(
            id,
            Op {
                id,
                shard_id,
                kind,
                reason,
                started: Instant::now(),
                finished: None,
                status: "running",
                error: String::new(),
            },
        );
        let this = self.clone();
        tokio::spawn(async move {
            let timeout = Duration::from_millis(this.cfg.operator_timeout_ms);
            let (status, error) =
                match tokio::time::timeout(timeout, this.run(shard_id, kind)).await {
                    Ok(Ok(())) => ("done", String::new()),
                    Ok(Err(e)) => ("failed", e),
                    Err(_) => ("timed-out", format!("still running after {timeout:?}")),
                };
            crate::metrics::PD_OPERATORS
                .with_label_values(&[kind.name(), status])
                .inc();
            let mut ops = this.ops.lock();
            if let Some(mut op) = ops.running.remove(&id) {
                let took = op.started.elapsed();
                tracing::info!(
                    operator = id,
                    shard_id,
                    kind = kind.name(),
                    status,
                    error = %error,
                    elapsed_ms = took.as_millis() as u64,
                    "placement operator finished"
                );
                op.status = status;
                op.error = error;
                op.finished = Some(Instant::now());
                ops.finished.push_back(op);
                while ops.finished.len() > KEEP_FINISHED {
                    ops.finished.pop_front();
                }
            }
        });
    }

    async fn run(&self, shard_id: u64, kind: Kind) -> Result<(), String> {
        if shard_id == META_SHARD_ID {
            return self
                .run_on_meta(kind)
                .await
                .map_err(|s| s.message().to_string());
        }
        let c = self.client().await.map_err(|s| s.message().to_string())?;
        let r = match kind {
            Kind::Add { to } => c.add_replica(shard_id, to, true).await.map(Some),
            Kind::Remove { from } => c.remove_replica(shard_id, from).await.map(Some),
            Kind::Move { from, to } => c.move_replica(shard_id, from, to).await.map(Some),
            Kind::TransferLeader { to, .. } => c.transfer_leader(shard_id, to).await.map(|_| None),
        };
        // The directory learns the outcome now, not at the leader's next
        // heartbeat: the next round plans from it.
        if let Ok(Some(desc)) = &r {
            let _ = self.store.report(vec![desc.clone()]).await;
        }
        r.map(|_| ()).map_err(|e| e.to_string())
    }

    /// The meta shard is led here: change it through the local raftstore.
    /// A new replica joins as a voter at once (its data is small); the
    /// leader hands leadership away before its own replica is removed.
    async fn run_on_meta(&self, kind: Kind) -> Result<(), Status> {
        use flotilla_proto::admin::replica_change::Kind as Change;
        use flotilla_proto::admin::ReplicaChange;
        let router = &self.ctx.router;
        let change = |kind: Change, node_id: u64| ReplicaChange {
            kind: kind as i32,
            replica_id: 0,
            node_id,
        };
        let (add, remove) = match kind {
            Kind::Add { to } => (Some(to), None),
            Kind::Remove { from } => (None, Some(from)),
            Kind::Move { from, to } => (Some(to), Some(from)),
            Kind::TransferLeader { to, .. } => {
                let meta = router.meta().get(META_SHARD_ID);
                let to_replica = meta
                    .and_then(|m| m.descriptor.replica_on(to).map(|r| r.id))
                    .ok_or_else(|| Status::failed_precondition("no meta replica there"))?;
                return crate::admin_service::admin_call(&self.ctx, |cb| {
                    router.transfer_leader(META_SHARD_ID, to_replica, cb)
                })
                .await;
            }
        };
        if let Some(to) = add {
            // A learner first: a voter that cannot vote yet could cost the
            // meta shard its quorum while another replica is down.
            let added = crate::admin_service::admin_call(&self.ctx, |cb| {
                router.change_replicas(META_SHARD_ID, vec![change(Change::AddLearner, to)], cb)
            })
            .await?
            .shard;
            let replica_id = added
                .replica_on(to)
                .ok_or_else(|| Status::internal("the new meta replica is missing"))?
                .id;
            self.wait_meta_caught_up(to).await?;
            crate::admin_service::admin_call(&self.ctx, |cb| {
                router.change_replicas(
                    META_SHARD_ID,
                    vec![ReplicaChange {
                        kind: Change::AddVoter as i32,
                        replica_id,
                        node_id: to,
                    }],
                    cb,
                )
            })
            .await?;
        }
        if let Some(from) = remove {
            if from == self.ctx.node_id {
                // Hand the meta shard to another voter; the next leader's
                // placement finishes the removal.
                let meta = router
                    .meta()
                    .get(META_SHARD_ID)
                    .ok_or_else(|| Status::unavailable("no meta replica here"))?;
                let to = meta
                    .descriptor
                    .replicas
                    .iter()
                    .find(|r| r.node_id != from && r.role == ReplicaRole::Voter as i32)
                    .ok_or_else(|| Status::failed_precondition("no other meta voter"))?
                    .id;
                return crate::admin_service::admin_call(&self.ctx, |cb| {
                    router.transfer_leader(META_SHARD_ID, to, cb)
                })
                .await;
            }
            crate::admin_service::admin_call(&self.ctx, |cb| {
                router.change_replicas(META_SHARD_ID, vec![change(Change::Remove, from)], cb)
            })
            .await?;
        }
        Ok(())
    }
}

impl Placement {
    /// Waits until the meta replica on `node` applied what the local (leader)
    /// replica had committed when the wait began.
    async fn wait_meta_caught_up(&self, node: u64) -> Result<(), Status> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.ctx
            .router
            .status(
                META_SHARD_ID,
                Box::new(move |s| {
                    let _ = tx.send(s.commit_index);
                }),
            )
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let target = rx
            .await
            .map_err(|_| Status::unavailable("node is shutting down"))?;
        let addr = self
            .ctx
            .addresses
            .get(node)
            .ok_or_else(|| Status::unavailable(format!("no address for node {node}")))?;
        let client = self.client().await?;
        loop {
            if let Ok(s) = client.replica_status(&addr, META_SHARD_ID).await {
                if s.applied_index >= target {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn voters(d: &ShardDescriptor) -> usize {
    d.replicas
        .iter()
        .filter(|r| r.role == ReplicaRole::Voter as i32)
        .count()
}

/// One round's view: replica and leader counts per node, counting the
/// operators under way as if done, and the shards already being worked on.
struct Plan<'a> {
    nodes: &'a HashMap<u64, NodeView>,
    /// Nodes whose replicas count as healthy.
    usable: usize,
    replicas: HashMap<u64, i64>,
    busy: HashSet<u64>,
}

impl<'a> Plan<'a> {
    /// Counts user shards' replicas only: the meta shard's few replicas
    /// are placed by repair and would skew the balance.
    fn new(
        nodes: &'a HashMap<u64, NodeView>,
        shards: &[&ShardDescriptor],
        ops: &Ops,
        cool_down: Duration,
    ) -> Self {
        let mut replicas: HashMap<u64, i64> = nodes.keys().map(|n| (*n, 0)).collect();
        for d in shards.iter().filter(|d| d.id != META_SHARD_ID) {
            for r in &d.replicas {
                *replicas.entry(r.node_id).or_default() += 1;
            }
        }
        let mut busy = HashSet::new();
        // A shard whose operator just finished waits until the directory
        // surely shows the outcome.
        for op in &ops.finished {
            if op.finished.is_some_and(|t| t.elapsed() < cool_down) {
                busy.insert(op.shard_id);
            }
        }
        for op in ops.running.values() {
            busy.insert(op.shard_id);
            let (from, to) = op.kind.nodes();
            if op.shard_id != META_SHARD_ID && !matches!(op.kind, Kind::TransferLeader { .. }) {
                *replicas.entry(from).or_default() -= 1;
                *replicas.entry(to).or_default() += 1;
            }
        }
        Plan {
            usable: nodes.values().filter(|n| n.healthy()).count(),
            nodes,
            replicas,
            busy,
        }
    }

    /// Nodes that may receive replicas and leaders.
    fn schedulable(&self) -> Vec<u64> {
        self.nodes
            .values()
            .filter(|n| n.schedulable())
            .map(|n| n.node.id)
            .collect()
    }

    fn healthy(&self, node_id: u64) -> bool {
        self.nodes.get(&node_id).is_some_and(NodeView::healthy)
    }

    fn zone_of(&self, node_id: u64) -> Option<&str> {
        self.nodes.get(&node_id).and_then(NodeView::zone)
    }

    /// A replica of `d` on a node whose zone holds another replica of `d`,
    /// when some schedulable node's zone holds none (the later node of the
    /// pair, so the choice is stable).
    fn zone_duplicate(&self, d: &ShardDescriptor) -> Option<u64> {
        let used: Vec<(&str, u64)> = d
            .replicas
            .iter()
            .filter_map(|r| Some((self.zone_of(r.node_id)?, r.node_id)))
            .collect();
        let free_zone = self.nodes.values().any(|n| {
            n.schedulable() && n.zone().is_some_and(|z| used.iter().all(|(u, _)| *u != z))
        });
        if !free_zone {
            return None;
        }
        used.iter()
            .filter(|(z, n)| used.iter().any(|(z2, n2)| z2 == z && n2 < n))
            .map(|(_, n)| *n)
            .max()
    }

    /// The best node to put a replica of `d` on, if any.
    fn target(&self, d: &ShardDescriptor) -> Option<u64> {
        let used_zones: HashSet<&str> = d
            .replicas
            .iter()
            .filter(|r| self.healthy(r.node_id))
            .filter_map(|r| self.nodes.get(&r.node_id)?.zone())
            .collect();
        self.nodes
            .values()
            .filter(|n| n.schedulable() && d.replica_on(n.node.id).is_none())
            .min_by_key(|n| {
                let new_zone = n.zone().is_some_and(|z| !used_zones.contains(z));
                (
                    !new_zone,
                    self.replicas.get(&n.node.id).copied().unwrap_or(0),
                    n.node.id,
                )
            })
            .map(|n| n.node.id)
    }

    fn record(&mut self, shard_id: u64, kind: Kind) {
        self.busy.insert(shard_id);
        if shard_id == META_SHARD_ID {
            return;
        }
        let (from, to) = kind.nodes();
        *self.replicas.entry(from).or_default() -= 1;
        *self.replicas.entry(to).or_default() += 1;
    }

    /// What `d` needs, if anything: replace, add or remove a replica.
    fn repair(&mut self, d: &ShardDescriptor, max_replicas: usize) -> Option<(Kind, &'static str)> {
        if self.busy.contains(&d.id) {
            return None;
        }
        let usable = self.usable;
        let want = if d.id == META_SHARD_ID {
            if usable >= 5 {
                5
            } else {
                3
            }
        } else {
            max_replicas
        }
        .min(usable)
        .max(1);
        let (healthy, bad): (Vec<&flotilla_proto::meta::Replica>, Vec<_>) =
            d.replicas.iter().partition(|r| self.healthy(r.node_id));
        let reason_of = |node_id: u64| match self.nodes.get(&node_id) {
            Some(n) if n.node.state() == NodeState::Decommissioning => "decommission",
            Some(n) if n.node.state() == NodeState::Removed => "removed-node",
            Some(_) => "replace-down",
            None => "unknown-node",
        };
        let choice = if healthy.len() < want {
            let to = self.target(d)?;
            match bad.first() {
                Some(b) => Some((
                    Kind::Move {
                        from: b.node_id,
                        to,
                    },
                    reason_of(b.node_id),
                )),
                None => Some((Kind::Add { to }, "under-replicated")),
            }
        } else if let Some(b) = bad.first() {
            Some((Kind::Remove { from: b.node_id }, reason_of(b.node_id)))
        } else if let Some(from) = self.zone_duplicate(d) {
            // Two replicas share a zone while a zone without one has room:
            // move one of them there.
            let to = self.target(d)?;
            let new_zone = self.nodes.get(&to).and_then(NodeView::zone);
            if new_zone.is_none_or(|z| {
                d.replicas
                    .iter()
                    .any(|r| self.zone_of(r.node_id) == Some(z))
            }) {
                return None;
            }
            Some((Kind::Move { from, to }, "isolate-zones"))
        } else if voters(d) > want {
            // The voter on the most loaded node. (Learners are left alone:
            // an operator, of this driver or an operator's own, may be
            // adding them.)
            let r = d
                .replicas
                .iter()
                .filter(|r| r.role == ReplicaRole::Voter as i32)
                .max_by_key(|r| self.replicas.get(&r.node_id).copied().unwrap_or(0))
                .expect("voters");
            Some((Kind::Remove { from: r.node_id }, "too-many-replicas"))
        } else {
            None
        };
        if let Some((kind, _)) = &choice {
            self.record(d.id, *kind);
        }
        choice
    }

    /// One replica move from the fullest node to the emptiest, if they
    /// differ by more than 5 % of the mean (at least 1).
    fn balance_replicas(
        &mut self,
        shards: &[&ShardDescriptor],
        leaders: &HashMap<u64, u64>,
    ) -> Option<(u64, Kind)> {
        let targets = self.schedulable();
        if targets.len() < 2 {
            return None;
        }
        let count = |n: &u64| self.replicas.get(n).copied().unwrap_or(0);
        let total: i64 = targets.iter().map(count).sum();
        let mean = total as f64 / targets.len() as f64;
        let slack = ((mean * 0.05).ceil() as i64).max(1);
        let from = *targets.iter().max_by_key(|n| (count(n), **n))?;
        let to = *targets.iter().min_by_key(|n| (count(n), **n))?;
        if count(&from) - count(&to) <= slack {
            return None;
        }
        let zone = |n: u64| self.nodes.get(&n).and_then(|v| v.zone());
        let d = shards
            .iter()
            .filter(|d| {
                d.id != META_SHARD_ID
                    && !self.busy.contains(&d.id)
                    && d.replica_on(from).is_some()
                    && d.replica_on(to).is_none()
                    && d.replicas.iter().all(|r| self.healthy(r.node_id))
                    // Never trade a zone the shard lacks for one it has.
                    && (zone(from) == zone(to)
                        || !d.replicas.iter().any(|r| r.node_id != from && zone(r.node_id) == zone(to)))
            })
            // Prefer shards not led from `from` (no leader transfer).
            .min_by_key(|d| (leaders.get(&d.id) == Some(&from), d.id))?;
        let kind = Kind::Move { from, to };
        self.record(d.id, kind);
        Some((d.id, kind))
    }

    /// One leadership transfer from the node leading the most user shards
    /// to one leading the fewest, if they differ by more than 1.
    fn balance_leaders(
        &mut self,
        shards: &[&ShardDescriptor],
        leaders: &mut HashMap<u64, u64>,
    ) -> Option<(u64, Kind)> {
        let targets = self.schedulable();
        let mut led: HashMap<u64, i64> = targets.iter().map(|n| (*n, 0)).collect();
        for d in shards.iter().filter(|d| d.id != META_SHARD_ID) {
            if let Some(n) = leaders.get(&d.id) {
                if let Some(c) = led.get_mut(n) {
                    *c += 1;
                }
            }
        }
        let from = *targets.iter().max_by_key(|n| (led[*n], **n))?;
        let to = *targets.iter().min_by_key(|n| (led[*n], **n))?;
        if led[&from] - led[&to] <= 1 {
            return None;
        }
        let d = shards.iter().find(|d| {
            d.id != META_SHARD_ID
                && !self.busy.contains(&d.id)
                && leaders.get(&d.id) == Some(&from)
                && d.replica_on(to)
                    .is_some_and(|r| r.role == ReplicaRole::Voter as i32)
        })?;
        self.busy.insert(d.id);
        leaders.insert(d.id, to);
        Some((d.id, Kind::TransferLeader { from, to }))
    }
}

//! A node's raftstore: recovers every local replica, runs the raft and apply
//! poller pools and the node's single ticker, and exposes a [`StoreRouter`]
//! through which the server sends client commands and peer messages.
//!
//! There is one ticker thread for the whole node (no timer per shard): every
//! `tick_interval` it sends `Tick` to each replica's mailbox, except to
//! hibernated ones (`replica::fsm::hibernate`); the ticks of replicas with
//! nothing else to do are handled in the same poll rounds.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use flotilla_batch_system::{create_system, BasicMailbox, BatchSystem, SendError};
use flotilla_storage::{KvEngine, RaftLogEngine, SnapManager};

use crate::apply::{ApplyControlFsm, ApplyFsm, ApplyPollerBuilder};
use crate::config::Config;
use crate::liveness::NodeLiveness;
use crate::meta::{ShardMeta, StoreMeta};
use crate::msg::{
    AdminCallback, Callback, ControlMsg, ReadRequest, ReplicaMsg, ReplicaStatus, WriteRequest,
};
use crate::replica::poller::{ApplyRouter, PollContext, RaftRouter};
use crate::replica::{NodeFsm, RaftPollerBuilder, ReplicaFsm};
use crate::transport::{Extra, RaftMessage, Transport};
use crate::worker::{GcWorker, SnapWorker, SplitCheckWorker, SplitObserver};
use crate::{metrics, Error, NodeId, ReplicaId, Result, ShardId};

/// The node's two storage engines and its snapshot files.
#[derive(Clone)]
pub struct Engines {
    pub kv: KvEngine,
    pub raft: Arc<RaftLogEngine>,
    pub snap_mgr: Arc<SnapManager>,
}

/// The handle the server uses to reach replicas. Cheap to clone.
#[derive(Clone)]
pub struct StoreRouter {
    node_id: NodeId,
    raft: RaftRouter,
    meta: Arc<StoreMeta>,
    liveness: Arc<NodeLiveness>,
}

fn routing_error<T>(shard_id: ShardId, e: SendError<T>) -> (Error, T) {
    match e {
        SendError::NotFound(m) => (Error::ShardNotFound(shard_id), m),
        SendError::Full(m) => (
            Error::ServerIsBusy(format!("shard {shard_id}'s mailbox is full")),
            m,
        ),
        SendError::Disconnected(m) => (Error::Shutdown, m),
    }
}

impl StoreRouter {
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    pub fn meta(&self) -> &Arc<StoreMeta> {
        &self.meta
    }

    /// Sends a write; routing failures are answered through the callback.
    pub fn write(&self, req: WriteRequest) {
        let shard_id = req.shard_id;
        if let Err(e) = self.raft.send(shard_id, ReplicaMsg::Write(req)) {
            let (err, msg) = routing_error(shard_id, e);
            if let ReplicaMsg::Write(req) = msg {
                (req.cb)(Err(err));
            }
        }
    }

    /// Sends a linearizable read; routing failures are answered through the
    /// callback.
    pub fn read(&self, req: ReadRequest) {
        let shard_id = req.shard_id;
        if let Err(e) = self.raft.send(shard_id, ReplicaMsg::Read(req)) {
            let (err, msg) = routing_error(shard_id, e);
            if let ReplicaMsg::Read(req) = msg {
                (req.cb)(Err(err));
            }
        }
    }

    /// Delivers a raft message from a peer. Messages for unknown shards go
    /// to the control FSM; messages to an overloaded replica are dropped
    /// (Raft retransmits).
    pub fn raft_message(&self, msg: RaftMessage) {
        if let Some(Extra::NodeHeartbeat { incarnation }) = msg.extra {
            self.liveness.heartbeat(msg.from_node, incarnation);
            return;
        }
        let shard_id = msg.shard_id;
        match self.raft.send(shard_id, ReplicaMsg::Raft(Box::new(msg))) {
            Ok(()) => {}
            Err(SendError::NotFound(ReplicaMsg::Raft(m))) => {
                let _ = self.raft.send_control(ControlMsg::UnknownShard(m));
            }
            Err(_) => metrics::RAFT_MESSAGES_RECEIVED
                .with_label_values(&["dropped"])
                .inc(),
        }
    }

    /// Something arrived from node `node` (see `liveness`).
    pub fn heard_from(&self, node: NodeId) {
        self.liveness.heard_from(node);
    }

    /// Tells a replica that its messages to `to_replica` were not delivered.
    pub fn report_unreachable(&self, shard_id: ShardId, to_replica: ReplicaId) {
        let _ = self
            .raft
            .force_send(shard_id, ReplicaMsg::Unreachable { to_replica });
    }

    /// Asks a replica for its status.
    pub fn status(&self, shard_id: ShardId, cb: Callback<ReplicaStatus>) -> Result<()> {
        self.raft
            .force_send(shard_id, ReplicaMsg::Status(cb))
            .map_err(|e| routing_error(shard_id, e).0)
    }

    /// Tells a replica whether the snapshot it sent to `to_replica` arrived.
    pub fn report_snapshot(&self, shard_id: ShardId, to_replica: ReplicaId, ok: bool) {
        let _ = self
            .raft
            .force_send(shard_id, ReplicaMsg::SnapshotStatus { to_replica, ok });
    }

    /// Asks a shard's leader to compact its log now; `cb` gets the index the
    /// log is truncated to.
    pub fn compact_log(&self, shard_id: ShardId, cb: AdminCallback) -> Result<()> {
        self.raft
            .force_send(shard_id, ReplicaMsg::CompactLog(Some(cb)))
            .map_err(|e| routing_error(shard_id, e).0)
    }

    /// Asks a shard's leader to have every replica hash the shard at the
    /// same log index; `cb` gets that index.
    pub fn compute_hash(&self, shard_id: ShardId, cb: AdminCallback) -> Result<()> {
        self.raft
            .force_send(shard_id, ReplicaMsg::ComputeHash(cb))
            .map_err(|e| routing_error(shard_id, e).0)
    }

    /// Asks a shard's leader to change its membership; `cb` gets the log
    /// index of the change and the new descriptor once applied.
    pub fn change_replicas(
        &self,
        shard_id: ShardId,
        changes: Vec<flotilla_proto::admin::ReplicaChange>,
        cb: AdminCallback,
    ) -> Result<()> {
        self.raft
            .force_send(shard_id, ReplicaMsg::ChangeReplicas { changes, cb })
            .map_err(|e| routing_error(shard_id, e).0)
    }

    /// Tells a replica the directory's newer descriptor of its shard, which
    /// leaves it out: it destroys itself if it is initialized and older.
    pub fn tombstone_if_removed(&self, shard: flotilla_proto::meta::ShardDescriptor) {
        let _ = self.raft.force_send(shard.id, ReplicaMsg::Tombstone(shard));
    }

    /// Asks a shard's leader to split it at `key`; the new shard and its
    /// replicas take the given ids. `cb` gets the shard's new (left)
    /// descriptor once the split applied on the leader.
    pub fn split(
        &self,
        shard_id: ShardId,
        key: bytes::Bytes,
        new_shard_id: ShardId,
        new_replica_ids: Vec<ReplicaId>,
        cb: AdminCallback,
    ) -> Result<()> {
        self.raft
            .force_send(
                shard_id,
                ReplicaMsg::Split {
                    key,
                    new_shard_id,
                    new_replica_ids,
                    cb,
                },
            )
            .map_err(|e| routing_error(shard_id, e).0)
    }

    /// Asks the leader of a shard to hand leadership to `to_replica`.
    pub fn transfer_leader(
        &self,
        shard_id: ShardId,
        to_replica: ReplicaId,
        cb: Callback<Result<()>>,
    ) -> Result<()> {
        self.raft
            .force_send(shard_id, ReplicaMsg::TransferLeader { to_replica, cb })
            .map_err(|e| routing_error(shard_id, e).0)
    }
}

pub struct Store {
    router: StoreRouter,
    raft_system: BatchSystem<ReplicaFsm, NodeFsm>,
    apply_system: BatchSystem<ApplyFsm, ApplyControlFsm>,
    ticker: Option<(JoinHandle<()>, Sender<()>)>,
    snap_worker: SnapWorker,
    gc_worker: GcWorker,
    split_checker: Option<SplitCheckWorker>,
}

impl Store {
    /// Recovers every replica recorded in `engines` and starts the pollers
    /// and the ticker. The transport must be ready to queue messages.
    /// `split_observer` is asked to split shards that outgrew the split
    /// thresholds (with `cfg.split_check_ticks` > 0).
    pub fn start(
        node_id: NodeId,
        cfg: Config,
        engines: Engines,
        transport: Arc<dyn Transport>,
        split_observer: Option<SplitObserver>,
    ) -> Result<Store> {
        let started = Instant::now();
        let meta = Arc::new(StoreMeta::default());
        let liveness = Arc::new(NodeLiveness::new());

        let (ctl_tx, ctl_rx) = crossbeam_channel::unbounded();
        let raft_bs_cfg = flotilla_batch_system::Config {
            pool_size: cfg.raft_pollers,
            max_batch_size: cfg.max_batch_size,
            mailbox_capacity: cfg.mailbox_capacity,
            round_yields: cfg.raft_round_yields,
        };
        let (raft_router, mut raft_system) =
            create_system("raft", &raft_bs_cfg, ctl_tx, Box::new(NodeFsm::new(ctl_rx)));
        let (actl_tx, actl_rx) = crossbeam_channel::unbounded();
        let apply_bs_cfg = flotilla_batch_system::Config {
            pool_size: cfg.apply_pollers,
            max_batch_size: cfg.max_batch_size,
            // Apply mailboxes only carry committed entries: never refuse.
            mailbox_capacity: usize::MAX,
            // Apply rounds end in no fsync: nothing to share.
            round_yields: 0,
        };
        let (apply_router, mut apply_system): (ApplyRouter, _) = create_system(
            "apply",
            &apply_bs_cfg,
            actl_tx,
            Box::new(ApplyControlFsm::new(actl_rx)),
        );

        let snap_worker = SnapWorker::start(
            cfg.snap_workers,
            engines.snap_mgr.clone(),
            raft_router.clone(),
            meta.clone(),
        );
        let gc_worker = GcWorker::start(
            engines.kv.clone(),
            engines.raft.clone(),
            engines.snap_mgr.clone(),
            raft_router.clone(),
            cfg.raft_engine_purge_interval,
        );
        let split_checker = split_observer
            .filter(|_| cfg.split_check_ticks > 0)
            .map(SplitCheckWorker::start);
        let ctx = Arc::new(PollContext {
            node_id,
            cfg: cfg.clone(),
            raft_engine: engines.raft.clone(),
            kv: engines.kv.clone(),
            transport,
            apply_router: apply_router.clone(),
            raft_router: raft_router.clone(),
            meta: meta.clone(),
            snap_mgr: engines.snap_mgr.clone(),
            gc_tasks: gc_worker.sender(),
            split_checks: split_checker.as_ref().map(|w| w.sender()),
            liveness: liveness.clone(),
        });

        let mut shards = engines.kv.load_shards()?;
        // Finish snapshot installs a crash interrupted.
        let mut reload = false;
        for (state, apply_state) in &shards {
            let id = state.shard.as_ref().map(|d| d.id).unwrap_or_default();
            reload |= crate::snapshot::recover(
                &engines.kv,
                &engines.raft,
                &engines.snap_mgr,
                id,
                state.replica_id,
                apply_state.applied_index,
            )?;
        }
        if reload {
            shards = engines.kv.load_shards()?;
        }
        let mut raft_mailboxes = Vec::with_capacity(shards.len());
        let mut apply_mailboxes = Vec::with_capacity(shards.len());
        for (state, apply_state) in shards {
            if state.state != flotilla_proto::local::ShardState::Normal as i32 {
                continue;
            }
            let replica_id = state.replica_id;
            let descriptor = state.shard.clone().unwrap_or_default();
            let shard_id = descriptor.id;
            if descriptor.replica(replica_id).is_none() {
                // Removed by a membership change just before a crash.
                tracing::info!(
                    shard_id,
                    replica_id,
                    "replica no longer in its shard; finishing its removal"
                );
                crate::snapshot::destroy_replica(
                    &engines.kv,
                    &engines.raft,
                    &descriptor,
                    replica_id,
                    true,
                )?;
                continue;
            }

            let (atx, arx) = crossbeam_channel::unbounded();
            let apply = ApplyFsm::new(descriptor.clone(), replica_id, apply_state, arx);
            apply_mailboxes.push((shard_id, BasicMailbox::new(atx, Box::new(apply))));

            let (tx, rx) = crossbeam_channel::unbounded();
            let mut replica = ReplicaFsm::recover(&ctx, state, apply_state, rx)?;
            replica.maybe_campaign_on_start();
            meta.insert(ShardMeta {
                descriptor,
                replica_id,
                leader_id: replica.leader_id(),
                term: replica.term(),
                down_replicas: 0,
            });
            raft_mailboxes.push((shard_id, BasicMailbox::new(tx, Box::new(replica))));
        }
        let shard_ids: Vec<ShardId> = raft_mailboxes.iter().map(|(id, _)| *id).collect();
        metrics::SHARDS.set(shard_ids.len() as i64);
        metrics::LEADERS.set(0);
        apply_router.register_all(apply_mailboxes);
        raft_router.register_all(raft_mailboxes);

        apply_system.spawn(ApplyPollerBuilder {
            kv: engines.kv.clone(),
            snap_mgr: engines.snap_mgr.clone(),
            snap_jobs: snap_worker.sender(),
            raft_router: raft_router.clone(),
        });
        raft_system.spawn(RaftPollerBuilder { ctx: ctx.clone() });
        // Campaigns started above produced readies: run a round for each.
        for id in &shard_ids {
            let _ = raft_router.force_send(*id, ReplicaMsg::Wake);
        }

        let ticker = spawn_ticker(Ticker {
            node_id,
            router: raft_router.clone(),
            meta: meta.clone(),
            liveness: liveness.clone(),
            transport: ctx.transport.clone(),
            interval: cfg.tick_interval,
            // One election timeout: the sleeping followers of a dead node's
            // leaders then elect new ones within about the time raft gives
            // awake followers (1-2 s). Any raft message counts as a sign of
            // life, so a heartbeat queued behind a burst of raft traffic on
            // the same stream is no silence. A false "down" costs elections,
            // never safety (the lease ended).
            silence: cfg.election_timeout(),
            hibernate: cfg.hibernate,
            // Three node heartbeats per silence (300 ms by default): a peer
            // is called down only after three in a row went missing. Not the
            // raft heartbeat interval (200 ms): on an idle node with
            // thousands of sleeping shards these heartbeats are most of what
            // the node does, and each costs a wakeup at both ends.
            heartbeat_ticks: (cfg.election_ticks / 3).max(1) as u64,
            election_ticks: cfg.election_ticks.max(1) as u64,
        });
        tracing::info!(
            node_id,
            shards = shard_ids.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "raftstore started"
        );
        Ok(Store {
            router: StoreRouter {
                node_id,
                raft: raft_router,
                meta,
                liveness,
            },
            raft_system,
            apply_system,
            ticker: Some(ticker),
            snap_worker,
            gc_worker,
            split_checker,
        })
    }

    pub fn router(&self) -> StoreRouter {
        self.router.clone()
    }

    /// Stops the ticker and both poller pools. Pending client commands are
    /// dropped with their FSMs, which cancels their callbacks.
    pub fn shutdown(&mut self) {
        if let Some((handle, stop)) = self.ticker.take() {
            drop(stop);
            let _ = handle.join();
            self.raft_system.shutdown();
            self.apply_system.shutdown();
            self.snap_worker.stop();
            self.gc_worker.stop();
            if let Some(w) = self.split_checker.as_mut() {
                w.stop();
            }
            tracing::info!(node_id = self.router.node_id, "raftstore stopped");
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What the node's ticker thread needs.
struct Ticker {
    node_id: NodeId,
    router: RaftRouter,
    meta: Arc<StoreMeta>,
    liveness: Arc<NodeLiveness>,
    transport: Arc<dyn Transport>,
    interval: Duration,
    /// How long a peer node may be silent before it counts as down.
    silence: Duration,
    /// Replicas hear of peer nodes' changes only when they may sleep.
    hibernate: bool,
    /// Ticks between node heartbeats.
    heartbeat_ticks: u64,
    /// Ticks between the control FSM's ticks.
    election_ticks: u64,
}

/// The node-wide replica gauges, from the shared table (no poller).
fn set_store_gauges(meta: &StoreMeta) {
    let c = meta.counts();
    metrics::REPLICAS_HIBERNATED.set(c.asleep as i64);
    metrics::SHARDS.set(c.replicas as i64);
    metrics::SHARDS_WITHOUT_LEADER.set(c.without_leader as i64);
    metrics::REPLICAS_DOWN.set(c.down_replicas as i64);
}

fn spawn_ticker(t: Ticker) -> (JoinHandle<()>, Sender<()>) {
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
    let handle = std::thread::Builder::new()
        .name("raft-ticker".into())
        .spawn(move || {
            let mut next = Instant::now() + t.interval;
            let mut ticks: u64 = 0;
            let mut deferred = Vec::new();
            loop {
                let wait = next.saturating_duration_since(Instant::now());
                match stop_rx.recv_timeout(wait) {
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                // Never catch up after a stall with a burst of ticks: a
                // follower's election timeout must span real time for the
                // leader lease to hold (replica::lease).
                next = (next + t.interval).max(Instant::now() + t.interval);
                if ticks.is_multiple_of(t.heartbeat_ticks) {
                    crate::liveness::send_heartbeats(
                        t.node_id,
                        &t.liveness,
                        &t.meta,
                        &*t.transport,
                    );
                }
                ticks += 1;
                crate::liveness::tick(
                    t.node_id,
                    &t.liveness,
                    &t.meta,
                    &t.router,
                    t.silence,
                    t.hibernate,
                    &mut deferred,
                );
                // Only replicas that tick: an idle node's ticking costs
                // nothing per hosted shard (hibernated ones are left out).
                t.router.send_each(t.meta.awake(), || ReplicaMsg::Tick);
                set_store_gauges(&t.meta);
                // The control FSM only forgets old parked votes: waking a
                // raft poller for it every tick was most of an idle node's
                // poller work.
                if ticks.is_multiple_of(t.election_ticks) {
                    let _ = t.router.send_control(ControlMsg::Tick);
                }
            }
        })
        .expect("spawn ticker");
    (handle, stop_tx)
}

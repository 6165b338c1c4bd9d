//! The receiving side: the `Raft` gRPC service.

use std::sync::Arc;

use flotilla_proto::raft::raft_server::Raft;
use flotilla_proto::raft::{Done, RaftBatch, SnapshotChunk};
use flotilla_raftstore::{NodeId, RaftMessage, StoreRouter};
use flotilla_storage::{DiskLevel, DiskStatus, SnapManager};
use protobuf::Message as _;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status, Streaming};

use crate::metrics;
use crate::RaftClient;

pub struct RaftService {
    node_id: NodeId,
    router: StoreRouter,
    shutdown: tokio::sync::watch::Receiver<bool>,
    snap_mgr: Arc<SnapManager>,
    snap_recvs: Arc<Semaphore>,
    disk: Arc<DiskStatus>,
    /// Told when a peer opens a stream (`RaftClient::peer_is_up`).
    client: RaftClient,
}

impl RaftService {
    /// `shutdown` turning true ends every open stream, so a graceful server
    /// shutdown does not wait forever on peers' long-lived calls.
    pub fn new(
        node_id: NodeId,
        router: StoreRouter,
        shutdown: tokio::sync::watch::Receiver<bool>,
        snap_mgr: Arc<SnapManager>,
        max_concurrent_snapshot_recv: usize,
        disk: Arc<DiskStatus>,
        client: RaftClient,
    ) -> Self {
        RaftService {
            node_id,
            router,
            shutdown,
            snap_mgr,
            snap_recvs: Arc::new(Semaphore::new(max_concurrent_snapshot_recv.max(1))),
            disk,
            client,
        }
    }
}

#[tonic::async_trait]
impl Raft for RaftService {
    async fn snapshot(
        &self,
        req: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<Done>, Status> {
        if self.disk.level() == DiskLevel::Full {
            return Err(Status::resource_exhausted(
                "the disk is full; no snapshot is accepted until space is freed",
            ));
        }
        let mut shutdown = self.shutdown.clone();
        let receive = crate::snapshot::receive(
            self.node_id,
            &self.snap_mgr,
            &self.router,
            &self.snap_recvs,
            req.into_inner(),
        );
        tokio::select! {
            r = receive => r.map(|_| Response::new(Done {})),
            _ = shutdown.wait_for(|stop| *stop) => Err(Status::unavailable("node is shutting down")),
        }
    }

    async fn raft(&self, req: Request<Streaming<RaftBatch>>) -> Result<Response<Done>, Status> {
        let mut stream = req.into_inner();
        let mut shutdown = self.shutdown.clone();
        let mut opened = false;
        loop {
            let batch = tokio::select! {
                m = stream.message() => match m? {
                    Some(b) => b,
                    None => break,
                },
                _ = shutdown.wait_for(|stop| *stop) => {
                    return Err(Status::unavailable("node is shutting down"));
                }
            };
            let Some(first) = batch.messages.first() else {
                continue;
            };
            metrics::MESSAGES_RECEIVED
                .with_label_values(&[&first.from_node.to_string()])
                .inc_by(batch.messages.len() as u64);
            // Whatever a peer sends shows it alive (`liveness`).
            self.router.heard_from(first.from_node);
            if !opened {
                opened = true;
                self.client.peer_is_up(first.from_node);
            }
            for env in batch.messages {
                if env.to_node != self.node_id {
                    tracing::warn!(
                        to_node = env.to_node,
                        node_id = self.node_id,
                        "raft message addressed to another node; dropped"
                    );
                    continue;
                }
                let extra = match env.extra.as_ref().map(crate::extra::decode) {
                    None | Some(Ok(None)) => None,
                    Some(Ok(Some(x))) => Some(x),
                    Some(Err(e)) => {
                        tracing::warn!(from_node = env.from_node, shard_id = env.shard_id, error = %e, "undecodable extra message; dropped");
                        continue;
                    }
                };
                let msg = if extra.is_some() {
                    raft::eraftpb::Message::default()
                } else {
                    match raft::eraftpb::Message::parse_from_bytes(&env.message) {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::warn!(from_node = env.from_node, shard_id = env.shard_id, error = %e, "undecodable raft message; dropped");
                            continue;
                        }
                    }
                };
                // A full disk takes no new entries; the other replicas keep
                // the shard going and the leader retries later.
                if msg.get_msg_type() == raft::eraftpb::MessageType::MsgAppend
                    && !msg.entries.is_empty()
                    && self.disk.level() == DiskLevel::Full
                {
                    flotilla_raftstore::metrics::RAFT_MESSAGES_RECEIVED
                        .with_label_values(&["disk_full_dropped"])
                        .inc();
                    continue;
                }
                self.router.raft_message(RaftMessage {
                    shard_id: env.shard_id,
                    from_node: env.from_node,
                    to_node: env.to_node,
                    from_replica: env.from_replica,
                    to_replica: env.to_replica,
                    epoch: env.epoch.unwrap_or_default(),
                    msg,
                    extra,
                });
            }
        }
        Ok(Response::new(Done {}))
    }
}

//! The Admin gRPC service: routes and node status, answered by any node.

use std::sync::Arc;

use flotilla_proto::admin::admin_server::Admin;
use flotilla_proto::admin::*;
use flotilla_proto::meta::{Node, ShardDescriptor};
use tonic::{Request, Response, Status};

use crate::service::NodeContext;

pub struct AdminService {
    ctx: Arc<NodeContext>,
}

impl AdminService {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        AdminService { ctx }
    }

    fn route_of(&self, shard: ShardDescriptor) -> ShardRoute {
        let (leader_replica_id, leader_node_id) = self
            .ctx
            .router
            .meta()
            .get(shard.id)
            .and_then(|m| m.leader().map(|l| (l.id, l.node_id)))
            .unwrap_or((0, 0));
        ShardRoute {
            shard: Some(shard),
            leader_replica_id,
            leader_node_id,
        }
    }

    fn nodes(&self) -> Vec<Node> {
        self.ctx
            .addresses
            .all()
            .into_iter()
            .map(|(id, address)| Node { id, address })
            .collect()
    }
}

/// Local replicas may know a newer descriptor than the directory.
fn refresh_directory(ctx: &NodeContext) {
    for m in ctx.router.meta().all() {
        ctx.directory.update(m.descriptor);
    }
}

/// Waits for an admin callback of the raftstore.
async fn admin_call<T: Send + 'static>(
    ctx: &NodeContext,
    send: impl FnOnce(
        flotilla_raftstore::msg::Callback<flotilla_raftstore::Result<T>>,
    ) -> flotilla_raftstore::Result<()>,
) -> Result<T, Status> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    send(Box::new(move |r| {
        let _ = tx.send(r);
    }))
    .map_err(store_status)?;
    match tokio::time::timeout(ctx.request_timeout(), rx).await {
        Ok(Ok(r)) => r.map_err(store_status),
        Ok(Err(_)) => Err(Status::unavailable("node is shutting down")),
        Err(_) => Err(Status::deadline_exceeded(
            "the admin command did not apply in time",
        )),
    }
}

fn store_status(e: flotilla_raftstore::Error) -> Status {
    use flotilla_raftstore::Error as E;
    match e {
        E::NotLeader { leader, .. } => {
            // Machine-readable for clients that retry on the leader.
            let mut s = Status::failed_precondition(e.to_string());
            s.metadata_mut().insert(
                flotilla_proto::NOT_LEADER_METADATA,
                leader.map_or(0, |r| r.node_id).into(),
            );
            s
        }
        E::Rejected(why) => Status::failed_precondition(why),
        E::ShardNotFound(_) => Status::not_found(e.to_string()),
        E::Shutdown => Status::unavailable(e.to_string()),
        _ => Status::unavailable(e.to_string()),
    }
}

/// Operator calls, counted by their wrappers in the service.
impl AdminService {
    async fn do_change_replicas(
        &self,
        req: Request<ChangeReplicasRequest>,
    ) -> Result<Response<ChangeReplicasResponse>, Status> {
        let r = req.into_inner();
        if r.changes.is_empty() {
            return Err(Status::invalid_argument("changes must not be empty"));
        }
        for (i, c) in r.changes.iter().enumerate() {
            if flotilla_proto::admin::replica_change::Kind::try_from(c.kind).is_err() {
                return Err(Status::invalid_argument(format!(
                    "changes[{i}].kind {} is not a known kind",
                    c.kind
                )));
            }
            if c.replica_id == 0 && c.node_id == 0 {
                return Err(Status::invalid_argument(format!(
                    "changes[{i}] needs replica_id or node_id (non-zero)"
                )));
            }
        }
        let router = &self.ctx.router;
        let shard_id = r.shard_id;
        let shard = admin_call(&self.ctx, |cb| {
            router.change_replicas(shard_id, r.changes, cb)
        })
        .await?
        .shard;
        self.ctx.directory.update(shard.clone());
        Ok(Response::new(ChangeReplicasResponse { shard: Some(shard) }))
    }

    async fn do_transfer_leader(
        &self,
        req: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let r = req.into_inner();
        let to_replica = if r.to_replica_id != 0 {
            r.to_replica_id
        } else {
            let meta = self.ctx.router.meta().get(r.shard_id).ok_or_else(|| {
                store_status(flotilla_raftstore::Error::ShardNotFound(r.shard_id))
            })?;
            match meta.descriptor.replica_on(r.to_node_id) {
                Some(rep) => rep.id,
                None => {
                    return Err(Status::invalid_argument(format!(
                    "to_node_id {} holds no replica of shard {} (set to_replica_id or to_node_id)",
                    r.to_node_id, r.shard_id
                )))
                }
            }
        };
        let router = &self.ctx.router;
        admin_call(&self.ctx, |cb| {
            router.transfer_leader(r.shard_id, to_replica, cb)
        })
        .await?;
        Ok(Response::new(TransferLeaderResponse {}))
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn replica_status(
        &self,
        req: Request<ReplicaStatusRequest>,
    ) -> Result<Response<ReplicaStatusResponse>, Status> {
        let shard_id = req.into_inner().shard_id;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.ctx
            .router
            .status(
                shard_id,
                Box::new(move |s| {
                    let _ = tx.send(s);
                }),
            )
            .map_err(store_status)?;
        let s = rx
            .await
            .map_err(|_| Status::unavailable("node is shutting down"))?;
        Ok(Response::new(ReplicaStatusResponse {
            node_id: self.ctx.node_id,
            replica_id: s.replica_id,
            role: format!("{:?}", s.role).to_lowercase(),
            term: s.term,
            leader_replica_id: s.leader_id,
            commit_index: s.commit_index,
            applied_index: s.applied_index,
            last_index: s.last_index,
            truncated_index: s.truncated_index,
            pending_proposals: s.pending_proposals as u64,
            shard: Some(s.shard),
        }))
    }

    async fn compute_hash(
        &self,
        req: Request<ComputeHashRequest>,
    ) -> Result<Response<ComputeHashResponse>, Status> {
        let shard_id = req.into_inner().shard_id;
        let r = &self.ctx.router;
        let index = admin_call(&self.ctx, |cb| r.compute_hash(shard_id, cb))
            .await?
            .index;
        Ok(Response::new(ComputeHashResponse { index }))
    }

    async fn shard_hash(
        &self,
        req: Request<ShardHashRequest>,
    ) -> Result<Response<ShardHashResponse>, Status> {
        let shard_id = req.into_inner().shard_id;
        let h = self.ctx.router.meta().hash(shard_id).ok_or_else(|| {
            Status::not_found(format!("no hash of shard {shard_id} on this node yet"))
        })?;
        Ok(Response::new(ShardHashResponse {
            index: h.index,
            hash: h.hash,
            keys: h.keys,
        }))
    }

    async fn change_replicas(
        &self,
        req: Request<ChangeReplicasRequest>,
    ) -> Result<Response<ChangeReplicasResponse>, Status> {
        let r = self.do_change_replicas(req).await;
        crate::metrics::placement_operator("change_replicas", &r);
        r
    }

    async fn transfer_leader(
        &self,
        req: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let r = self.do_transfer_leader(req).await;
        crate::metrics::placement_operator("transfer_leader", &r);
        r
    }

    async fn compact_log(
        &self,
        req: Request<CompactLogRequest>,
    ) -> Result<Response<CompactLogResponse>, Status> {
        let shard_id = req.into_inner().shard_id;
        let r = &self.ctx.router;
        let index = admin_call(&self.ctx, |cb| r.compact_log(shard_id, cb))
            .await?
            .index;
        Ok(Response::new(CompactLogResponse { index }))
    }

    async fn get_route(
        &self,
        req: Request<GetRouteRequest>,
    ) -> Result<Response<GetRouteResponse>, Status> {
        let key = req.into_inner().key;
        refresh_directory(&self.ctx);
        let shard = self
            .ctx
            .directory
            .route(&key)
            .ok_or_else(|| Status::not_found(format!("no shard covers key {key:?}")))?;
        Ok(Response::new(GetRouteResponse {
            route: Some(self.route_of(shard)),
            nodes: self.nodes(),
        }))
    }

    async fn list_shards(
        &self,
        _req: Request<ListShardsRequest>,
    ) -> Result<Response<ListShardsResponse>, Status> {
        refresh_directory(&self.ctx);
        let shards = self
            .ctx
            .directory
            .list()
            .into_iter()
            .map(|s| self.route_of(s))
            .collect();
        Ok(Response::new(ListShardsResponse {
            shards,
            nodes: self.nodes(),
        }))
    }

    async fn node_status(
        &self,
        _req: Request<NodeStatusRequest>,
    ) -> Result<Response<NodeStatusResponse>, Status> {
        let s = crate::status::NodeStatus::of(&self.ctx);
        Ok(Response::new(NodeStatusResponse {
            node_id: s.node_id,
            address: s.address,
            version: s.version,
            uptime_seconds: s.uptime_seconds,
            replicas: s.shards as u64,
            leaders: s.leaders as u64,
            replicas_without_leader: s.shards_without_leader as u64,
            replicas_down: s.replicas_down as u64,
            raft_engine_bytes: s.raft_engine_bytes,
            rocksdb_bytes: s.rocksdb_bytes,
            disk_available_bytes: s.disk_available_bytes,
        }))
    }
}

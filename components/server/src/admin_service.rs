//! The Admin gRPC service: routes and node status, answered by any node;
//! operator calls (membership, leadership, split), answered by the shard's
//! leader; and the meta shard's operations (ids, directory), answered by
//! its leader (see `cluster_meta`).

use std::sync::Arc;

use flotilla_proto::admin::admin_server::Admin;
use flotilla_proto::admin::*;
use flotilla_proto::meta::{Node, ShardDescriptor};
use tonic::{Request, Response, Status};

use crate::cluster_meta::{MetaClient, MetaStore};
use crate::service::{HandlerError, NodeContext};

pub struct AdminService {
    ctx: Arc<NodeContext>,
    meta_store: Arc<MetaStore>,
    meta_client: MetaClient,
    placement: Arc<crate::placement::Placement>,
}

fn handler_status(e: HandlerError) -> Status {
    match e {
        HandlerError::Status(s) => s,
        HandlerError::Store(e) => store_status(e),
    }
}

impl AdminService {
    pub fn new(
        ctx: Arc<NodeContext>,
        meta_store: Arc<MetaStore>,
        meta_client: MetaClient,
        placement: Arc<crate::placement::Placement>,
    ) -> Self {
        AdminService {
            ctx,
            meta_store,
            meta_client,
            placement,
        }
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
            .map(|(id, address)| Node {
                id,
                address,
                ..Default::default()
            })
            .collect()
    }
}

/// Local replicas may know a newer descriptor than the directory.
fn refresh_directory(ctx: &NodeContext) {
    for m in ctx.router.meta().all() {
        ctx.directory.update(m.descriptor);
    }
}

/// The shard holding `key`, from the directory, made current by the local
/// replica of that shard if there is one. Only when that changes what
/// covers the key (a split the directory has not heard of) are all local
/// replicas consulted: a route lookup must not cost O(hosted shards).
fn route_key(ctx: &NodeContext, key: &[u8]) -> Option<ShardDescriptor> {
    if let Some(d) = ctx.directory.route(key) {
        match ctx.router.meta().get(d.id) {
            Some(m) if m.descriptor.is_newer_than(&d) => ctx.directory.update(m.descriptor),
            _ => return Some(d),
        }
        if let Some(d) = ctx.directory.route(key) {
            return Some(d);
        }
    }
    refresh_directory(ctx);
    ctx.directory.route(key)
}

/// Waits for an admin callback of the raftstore.
pub(crate) async fn admin_call<T: Send + 'static>(
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
        // Refused before anything was proposed: retry after a backoff.
        E::ServerIsBusy(_) => Status::resource_exhausted(e.to_string()),
        E::Shutdown => Status::unavailable(e.to_string()),
        _ => Status::unavailable(e.to_string()),
    }
}

/// Splits a shard this node leads at `key`, if its version is still
/// `version` when given (an automatic split checked an older state
/// otherwise): ids from the meta shard, then the split command through the
/// shard's log, then the new descriptors to the meta shard (the next
/// heartbeat reports them again if this report is lost). Returns the
/// shard's new descriptor and the new shard's.
pub async fn split_shard(
    ctx: &NodeContext,
    meta_client: &MetaClient,
    shard_id: u64,
    version: Option<u64>,
    key: bytes::Bytes,
) -> Result<(ShardDescriptor, ShardDescriptor), Status> {
    let meta = ctx
        .router
        .meta()
        .get(shard_id)
        .ok_or_else(|| store_status(flotilla_raftstore::Error::ShardNotFound(shard_id)))?;
    if !meta.is_leader() {
        return Err(store_status(flotilla_raftstore::Error::NotLeader {
            shard_id,
            leader: meta.leader().cloned(),
        }));
    }
    if version.is_some_and(|v| v != meta.descriptor.epoch().version) {
        return Err(Status::failed_precondition(format!(
            "shard {shard_id} changed since the split was asked for"
        )));
    }
    let replicas = meta.descriptor.replicas.len() as u64;
    let first = meta_client.alloc_ids(1 + replicas).await?;
    let new_replica_ids: Vec<u64> = (1..=replicas).map(|i| first + i).collect();
    let router = &ctx.router;
    let k = key.clone();
    let left = admin_call(ctx, |cb| {
        router.split(shard_id, k, first, new_replica_ids, cb)
    })
    .await?
    .shard;
    // The new shard's descriptor as the split made it.
    let mut right = left.clone();
    right.id = first;
    right.start_key = key;
    right.end_key = meta.descriptor.end_key.clone();
    for (rep, i) in right.replicas.iter_mut().zip(1..) {
        rep.id = first + i;
    }
    ctx.directory.update(left.clone());
    ctx.directory.update(right.clone());
    if let Err(e) =
        crate::cluster_meta::report_split(ctx, meta_client, vec![left.clone(), right.clone()]).await
    {
        tracing::warn!(shard_id, new_shard_id = first, error = %e.message(), "reporting a split to the meta shard failed; the next heartbeat will");
    }
    Ok((left, right))
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
        let mut changes = r.changes;
        // New replicas get ids from the meta shard, unique cluster-wide.
        if let Some(local) = router.meta().get(shard_id) {
            use flotilla_proto::admin::replica_change::Kind;
            let new: Vec<usize> = (0..changes.len())
                .filter(|&i| {
                    let c = &changes[i];
                    c.replica_id == 0
                        && matches!(
                            Kind::try_from(c.kind),
                            Ok(Kind::AddLearner | Kind::AddVoter)
                        )
                        && local.descriptor.replica_on(c.node_id).is_none()
                })
                .collect();
            if !new.is_empty() && local.is_leader() {
                let first = self.meta_client.alloc_ids(new.len() as u64).await?;
                for (i, id) in new.into_iter().zip(first..) {
                    changes[i].replica_id = id;
                }
            }
        }
        let shard = admin_call(&self.ctx, |cb| {
            router.change_replicas(shard_id, changes, cb)
        })
        .await?
        .shard;
        self.ctx.directory.update(shard.clone());
        Ok(Response::new(ChangeReplicasResponse { shard: Some(shard) }))
    }

    /// Splits a shard this node leads: ids from the meta shard, then the
    /// split command through the shard's log, then the new descriptors to
    /// the meta shard (the next heartbeat reports them again if this
    /// report is lost).
    async fn do_split_shard(
        &self,
        req: Request<SplitShardRequest>,
    ) -> Result<Response<SplitShardResponse>, Status> {
        let r = req.into_inner();
        let limits = &self.ctx.cfg.limits;
        crate::limits::check_key(limits, "split_key", &r.split_key)?;
        let (left, right) =
            split_shard(&self.ctx, &self.meta_client, r.shard_id, None, r.split_key).await?;
        Ok(Response::new(SplitShardResponse {
            left: Some(left),
            right: Some(right),
        }))
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
            hibernated: s.hibernated,
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

    async fn split_shard(
        &self,
        req: Request<SplitShardRequest>,
    ) -> Result<Response<SplitShardResponse>, Status> {
        let r = self.do_split_shard(req).await;
        crate::metrics::placement_operator("split", &r);
        r
    }

    async fn alloc_ids(
        &self,
        req: Request<AllocIdsRequest>,
    ) -> Result<Response<AllocIdsResponse>, Status> {
        let count = req.into_inner().count;
        if !(1..=1 << 20).contains(&count) {
            return Err(Status::invalid_argument(format!(
                "count must be in 1..={} (got {count})",
                1 << 20
            )));
        }
        let first = self
            .meta_store
            .alloc_ids(count)
            .await
            .map_err(handler_status)?;
        Ok(Response::new(AllocIdsResponse { first }))
    }

    async fn get_directory(
        &self,
        _req: Request<GetDirectoryRequest>,
    ) -> Result<Response<GetDirectoryResponse>, Status> {
        let d = self.meta_store.directory().await.map_err(handler_status)?;
        Ok(Response::new(d))
    }

    async fn node_heartbeat(
        &self,
        req: Request<NodeHeartbeatRequest>,
    ) -> Result<Response<NodeHeartbeatResponse>, Status> {
        let r = self
            .meta_store
            .heartbeat(req.into_inner())
            .await
            .map_err(handler_status)?;
        Ok(Response::new(r))
    }

    async fn list_nodes(
        &self,
        _req: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        let nodes = self.placement.list_nodes().await.map_err(handler_status)?;
        Ok(Response::new(ListNodesResponse { nodes }))
    }

    async fn decommission_node(
        &self,
        req: Request<DecommissionNodeRequest>,
    ) -> Result<Response<DecommissionNodeResponse>, Status> {
        use flotilla_proto::meta::NodeState;
        let node_id = req.into_inner().node_id;
        let node = self
            .meta_store
            .set_node_state(
                node_id,
                &[NodeState::Up, NodeState::Decommissioning],
                NodeState::Decommissioning,
            )
            .await
            .map_err(handler_status)?;
        Ok(Response::new(DecommissionNodeResponse { node: Some(node) }))
    }

    async fn list_operators(
        &self,
        _req: Request<ListOperatorsRequest>,
    ) -> Result<Response<ListOperatorsResponse>, Status> {
        if !self.meta_store.is_leader() {
            return Err(store_status(flotilla_raftstore::Error::NotLeader {
                shard_id: flotilla_storage::META_SHARD_ID,
                leader: self
                    .ctx
                    .router
                    .meta()
                    .get(flotilla_storage::META_SHARD_ID)
                    .and_then(|m| m.leader().cloned()),
            }));
        }
        Ok(Response::new(ListOperatorsResponse {
            operators: self.placement.operators(),
        }))
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
        let shard = route_key(&self.ctx, &key)
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

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

#[tonic::async_trait]
impl Admin for AdminService {
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
        let c = &self.ctx;
        let counts = c.router.meta().counts();
        Ok(Response::new(NodeStatusResponse {
            node_id: c.node_id,
            address: c.addr.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: c.started.elapsed().as_secs(),
            replicas: counts.replicas as u64,
            leaders: counts.leaders as u64,
            replicas_without_leader: counts.without_leader as u64,
        }))
    }
}

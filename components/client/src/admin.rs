//! Operator calls on one shard: membership changes, leadership transfer
//! and split, sent to the shard's leader.
//!
//! A call goes to the leader the route cache names (refreshing the cache
//! when the shard or its leader is unknown). A node that does not lead the
//! shard answers `FailedPrecondition` with the leader's node id in the
//! `flotilla-not-leader` metadata; the call follows it, backing off while
//! an election is under way, within the client's deadline.
//!
//! A membership change is not idempotent: when the connection fails after
//! it was sent, the outcome is unknown and `Indeterminate` is returned
//! (list the shard to see what applied).

use std::future::Future;
use std::time::Duration;

use flotilla_proto::admin::admin_client::AdminClient;
use flotilla_proto::admin::replica_change::Kind;
use flotilla_proto::admin::{
    ChangeReplicasRequest, ReplicaChange, SplitShardRequest, TransferLeaderRequest,
};
use flotilla_proto::meta::{ReplicaRole, ShardDescriptor};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::client::{never_sent, Client, Retry};
use crate::error::{Error, Result};
use crate::routes::CachedShard;

/// How often progress of a catch-up or a transfer is checked.
const POLL: Duration = Duration::from_millis(100);

impl Client {
    /// The cached shard `shard_id`, reloading the shard list when it is not
    /// cached or its leader is unknown.
    async fn shard_with_leader(&self, shard_id: u64, retry: &mut Retry) -> Result<CachedShard> {
        loop {
            let cached = self.inner.cache.read().by_id(shard_id);
            if let Some(s) = cached.filter(|s| s.leader_node != 0) {
                return Ok(s);
            }
            let why = match self.refresh_shard(shard_id).await {
                Ok(()) => match self.inner.cache.read().by_id(shard_id) {
                    None => return Err(Error::InvalidArgument(format!("no shard {shard_id}"))),
                    Some(_) => format!("shard {shard_id} has no known leader"),
                },
                Err(e) => e.to_string(),
            };
            retry.backoff(why).await?;
        }
    }

    /// The address of a node the route cache knows.
    fn node_addr(&self, node_id: u64) -> Option<String> {
        self.inner.cache.read().nodes.get(&node_id).cloned()
    }

    /// Runs `call` on the shard's leader, following leader changes.
    async fn on_leader<T, F, Fut>(&self, shard_id: u64, idempotent: bool, call: F) -> Result<T>
    where
        F: Fn(AdminClient<Channel>, CachedShard) -> Fut,
        Fut: Future<Output = std::result::Result<T, Status>>,
    {
        let mut retry = self.new_retry();
        loop {
            let shard = self.shard_with_leader(shard_id, &mut retry).await?;
            let Some(addr) = self.node_addr(shard.leader_node) else {
                self.inner.cache.write().set_leader(shard_id, 0);
                retry
                    .backoff(format!("no address for node {}", shard.leader_node))
                    .await?;
                continue;
            };
            let admin = self.admin(&addr)?;
            let status = match tokio::time::timeout(retry.remaining(), call(admin, shard)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(s)) => s,
                Err(_) => {
                    return Err(Error::DeadlineExceeded {
                        attempts: 1,
                        last: format!("no answer from {addr}"),
                    })
                }
            };
            if let Some(leader) = status.metadata().get(flotilla_proto::NOT_LEADER_METADATA) {
                let leader = leader.to_str().ok().and_then(|v| v.parse().ok());
                self.inner
                    .cache
                    .write()
                    .set_leader(shard_id, leader.unwrap_or(0));
                retry
                    .backoff(format!("{addr}: {}", status.message()))
                    .await?;
                continue;
            }
            match status.code() {
                Code::InvalidArgument => {
                    return Err(Error::InvalidArgument(status.message().to_string()))
                }
                Code::FailedPrecondition => {
                    return Err(Error::Server(status.message().to_string()))
                }
                Code::NotFound => self.inner.cache.write().invalidate(shard_id),
                // Refused before anything was proposed (another change in
                // progress, a full mailbox): try again.
                Code::ResourceExhausted => {}
                _ if !idempotent && !never_sent(&status) => {
                    return Err(Error::Indeterminate(format!(
                        "{addr} failed after the request was sent: {}",
                        status.message()
                    )))
                }
                _ => self.inner.cache.write().set_leader(shard_id, 0),
            }
            retry
                .backoff(format!("{addr}: {} {}", status.code(), status.message()))
                .await?;
        }
    }

    /// Applies membership changes to a shard through its leader (several
    /// changes go through joint consensus atomically) and returns the new
    /// descriptor. A change with `replica_id` 0 names the replica on its
    /// `node_id`, or has the leader allocate an id for a new replica.
    pub async fn change_replicas(
        &self,
        shard_id: u64,
        changes: Vec<ReplicaChange>,
    ) -> Result<ShardDescriptor> {
        let desc = self
            .on_leader(shard_id, false, |mut admin, _| {
                let changes = changes.clone();
                async move {
                    let r = admin
                        .change_replicas(ChangeReplicasRequest { shard_id, changes })
                        .await?;
                    r.into_inner()
                        .shard
                        .ok_or_else(|| Status::internal("the leader answered without a descriptor"))
                }
            })
            .await?;
        self.inner.cache.write().insert(desc.clone(), 0);
        Ok(desc)
    }

    /// Adds a replica of `shard_id` on `node_id` as a learner; with
    /// `voter`, waits until it caught up with the leader (by snapshot or
    /// log) and promotes it, so the shard never counts a replica that cannot
    /// vote in time towards its quorum.
    pub async fn add_replica(
        &self,
        shard_id: u64,
        node_id: u64,
        voter: bool,
    ) -> Result<ShardDescriptor> {
        let change = |kind: Kind, replica_id: u64| ReplicaChange {
            kind: kind as i32,
            replica_id,
            node_id,
        };
        let desc = self
            .change_replicas(shard_id, vec![change(Kind::AddLearner, 0)])
            .await?;
        if !voter {
            return Ok(desc);
        }
        let added = desc
            .replica_on(node_id)
            .ok_or_else(|| Error::Server(format!("node {node_id} missing after the change")))?
            .id;
        self.wait_caught_up(shard_id, node_id).await?;
        self.change_replicas(shard_id, vec![change(Kind::AddVoter, added)])
            .await
    }

    /// Waits until the replica on `node_id` applied what the leader had
    /// committed when the wait began.
    async fn wait_caught_up(&self, shard_id: u64, node_id: u64) -> Result<()> {
        let mut retry = self.new_retry();
        let shard = self.shard_with_leader(shard_id, &mut retry).await?;
        let (leader_addr, addr) = {
            let cache = self.inner.cache.read();
            (
                cache.nodes.get(&shard.leader_node).cloned(),
                cache.nodes.get(&node_id).cloned(),
            )
        };
        let (Some(leader_addr), Some(addr)) = (leader_addr, addr) else {
            return Err(Error::Server(format!(
                "no address for node {} or {node_id}",
                shard.leader_node
            )));
        };
        let target = self
            .replica_status(&leader_addr, shard_id)
            .await?
            .commit_index;
        loop {
            match self.replica_status(&addr, shard_id).await {
                Ok(s) if s.applied_index >= target => return Ok(()),
                Ok(s) => {
                    retry.last = format!(
                        "the new replica applied {} of {target} entries",
                        s.applied_index
                    )
                }
                Err(e) => retry.last = e.to_string(),
            }
            if retry.remaining() < POLL {
                return Err(Error::DeadlineExceeded {
                    attempts: retry.attempts,
                    last: std::mem::take(&mut retry.last),
                });
            }
            retry.attempts += 1;
            tokio::time::sleep(POLL).await;
        }
    }

    /// Removes the replica of `shard_id` on `node_id`. A voter is removed
    /// in one step; a replica that leads hands leadership to another voter
    /// first.
    pub async fn remove_replica(&self, shard_id: u64, node_id: u64) -> Result<ShardDescriptor> {
        let mut retry = self.new_retry();
        let shard = self.shard_with_leader(shard_id, &mut retry).await?;
        if shard.desc.replica_on(node_id).is_none() {
            return Err(Error::InvalidArgument(format!(
                "node {node_id} holds no replica of shard {shard_id}"
            )));
        }
        if shard.leader_node == node_id {
            let to = shard
                .desc
                .replicas
                .iter()
                .find(|r| r.node_id != node_id && r.role == ReplicaRole::Voter as i32)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "shard {shard_id} has no other voter to take over leadership"
                    ))
                })?;
            self.transfer_leader(shard_id, to.node_id).await?;
        }
        let change = ReplicaChange {
            kind: Kind::Remove as i32,
            replica_id: 0,
            node_id,
        };
        self.change_replicas(shard_id, vec![change]).await
    }

    /// Moves the replica of `shard_id` on `from` to `to`: a learner on `to`
    /// catches up, then one joint-consensus change makes it a voter and
    /// demotes the old replica (leadership leaves `from` first), then the
    /// old replica (now a learner) is removed. The shard keeps its voter
    /// count throughout, and never counts on a replica that cannot vote in
    /// time.
    pub async fn move_replica(&self, shard_id: u64, from: u64, to: u64) -> Result<ShardDescriptor> {
        let change = |kind: Kind, replica_id: u64, node_id: u64| ReplicaChange {
            kind: kind as i32,
            replica_id,
            node_id,
        };
        let mut retry = self.new_retry();
        let shard = self.shard_with_leader(shard_id, &mut retry).await?;
        // The leader's descriptor: the route cache may lag behind changes.
        let start = match self.node_addr(shard.leader_node) {
            Some(addr) => match self.replica_status(&addr, shard_id).await {
                Ok(s) if s.role == "leader" => s.shard.unwrap_or(shard.desc.clone()),
                _ => shard.desc.clone(),
            },
            None => shard.desc.clone(),
        };
        let old = start.replica_on(from).copied().ok_or_else(|| {
            Error::InvalidArgument(format!("node {from} holds no replica of shard {shard_id}"))
        })?;
        let desc = match start.replica_on(to) {
            Some(_) => start.clone(),
            None => {
                self.change_replicas(shard_id, vec![change(Kind::AddLearner, 0, to)])
                    .await?
            }
        };
        let new = *desc
            .replica_on(to)
            .ok_or_else(|| Error::Server(format!("node {to} missing after the change")))?;
        self.wait_caught_up(shard_id, to).await?;
        let shard = self.shard_with_leader(shard_id, &mut retry).await?;
        if shard.leader_node == from {
            let target = shard
                .desc
                .replicas
                .iter()
                .find(|r| r.node_id != from && r.role == ReplicaRole::Voter as i32)
                .map(|r| r.node_id)
                .unwrap_or(to);
            self.transfer_leader(shard_id, target).await?;
        }
        let is_voter = |r: &flotilla_proto::meta::Replica| r.role == ReplicaRole::Voter as i32;
        // The leader's answer, not the route cache (which may lag).
        let current = desc;
        let new_is_voter = current.replica(new.id).is_some_and(is_voter);
        let old_is_voter = current.replica(old.id).is_some_and(is_voter);
        if !new_is_voter || old_is_voter {
            let mut changes = Vec::new();
            if !new_is_voter {
                changes.push(change(Kind::AddVoter, new.id, to));
            }
            if old_is_voter {
                changes.push(change(Kind::DemoteToLearner, old.id, from));
            }
            self.change_replicas(shard_id, changes).await?;
        }
        self.change_replicas(shard_id, vec![change(Kind::Remove, old.id, from)])
            .await
    }

    /// Splits `shard_id` at `key` (strictly inside its range) through its
    /// leader; returns the shard's new descriptor (ending at `key`) and the
    /// new shard's (from `key`). Not retried once sent: an unknown outcome
    /// is `Indeterminate` (list the shards to see).
    pub async fn split_shard(
        &self,
        shard_id: u64,
        key: impl Into<bytes::Bytes>,
    ) -> Result<(ShardDescriptor, ShardDescriptor)> {
        let key = key.into();
        let (left, right) = self
            .on_leader(shard_id, false, |mut admin, _| {
                let split_key = key.clone();
                async move {
                    let r = admin
                        .split_shard(SplitShardRequest {
                            shard_id,
                            split_key,
                        })
                        .await?
                        .into_inner();
                    match (r.left, r.right) {
                        (Some(l), Some(r)) => Ok((l, r)),
                        _ => Err(Status::internal("the leader answered without descriptors")),
                    }
                }
            })
            .await?;
        {
            let mut cache = self.inner.cache.write();
            cache.insert(left.clone(), 0);
            cache.insert(right.clone(), 0);
        }
        Ok((left, right))
    }

    /// Hands leadership of `shard_id` to its replica on `to_node` and waits
    /// until that replica leads.
    pub async fn transfer_leader(&self, shard_id: u64, to_node: u64) -> Result<()> {
        let mut retry = self.new_retry();
        // Who leads decides whether there is anything to do: ask rather
        // than trust a cached leader (one route, not the whole table).
        if let Err(e) = self.refresh_shard(shard_id).await {
            retry.backoff(e.to_string()).await?;
        }
        loop {
            let shard = self.shard_with_leader(shard_id, &mut retry).await?;
            if shard.leader_node == to_node {
                return Ok(());
            }
            self.on_leader(shard_id, true, |mut admin, _| async move {
                admin
                    .transfer_leader(TransferLeaderRequest {
                        shard_id,
                        to_replica_id: 0,
                        to_node_id: to_node,
                    })
                    .await
                    .map(|_| ())
            })
            .await?;
            // The transfer takes an election round; look again after it.
            tokio::time::sleep(POLL).await;
            if let Err(e) = self.refresh_shard(shard_id).await {
                retry.backoff(e.to_string()).await?;
            } else {
                retry
                    .backoff(format!("leadership has not moved to node {to_node} yet"))
                    .await?;
            }
        }
    }
}

/// The cluster's node registry and placement driver, served by the node
/// leading the meta shard.
impl Client {
    /// Runs `call` on the meta shard's leader: each known node in turn,
    /// following `flotilla-not-leader` answers, within the deadline.
    async fn on_meta_leader<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: Fn(AdminClient<Channel>) -> Fut,
        Fut: Future<Output = std::result::Result<T, Status>>,
    {
        let mut retry = self.new_retry();
        let mut hint: Option<String> = None;
        loop {
            if self.inner.cache.read().nodes.is_empty() {
                if let Err(e) = self.refresh_all().await {
                    retry.backoff(e.to_string()).await?;
                    continue;
                }
            }
            let mut addrs: Vec<String> = self.candidates();
            if let Some(h) = hint.take() {
                addrs.insert(0, h);
            }
            for addr in addrs {
                let admin = self.admin(&addr)?;
                let status = match tokio::time::timeout(retry.remaining(), call(admin)).await {
                    Ok(Ok(v)) => return Ok(v),
                    Ok(Err(s)) => s,
                    Err(_) => {
                        return Err(Error::DeadlineExceeded {
                            attempts: retry.attempts + 1,
                            last: format!("no answer from {addr}"),
                        })
                    }
                };
                if let Some(leader) = status.metadata().get(flotilla_proto::NOT_LEADER_METADATA) {
                    let leader: u64 = leader
                        .to_str()
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    hint = self.node_addr(leader);
                    retry.last = format!("{addr}: {}", status.message());
                    if hint.is_some() {
                        break;
                    }
                    continue;
                }
                match status.code() {
                    Code::InvalidArgument | Code::NotFound => {
                        return Err(Error::InvalidArgument(status.message().to_string()))
                    }
                    Code::FailedPrecondition => {
                        return Err(Error::Server(status.message().to_string()))
                    }
                    _ => retry.last = format!("{addr}: {} {}", status.code(), status.message()),
                }
            }
            let why = std::mem::take(&mut retry.last);
            retry.backoff(why).await?;
        }
    }

    /// The node registry: each node's address, labels, state, liveness and
    /// load, as the meta shard's leader knows them.
    pub async fn list_nodes(&self) -> Result<Vec<flotilla_proto::admin::NodeInfo>> {
        self.on_meta_leader(|mut admin| async move {
            Ok(admin
                .list_nodes(flotilla_proto::admin::ListNodesRequest {})
                .await?
                .into_inner()
                .nodes)
        })
        .await
    }

    /// Starts emptying a node: the placement driver moves its replicas
    /// away, then marks it removed. Returns its registry record.
    pub async fn decommission_node(&self, node_id: u64) -> Result<flotilla_proto::meta::Node> {
        self.on_meta_leader(|mut admin| async move {
            admin
                .decommission_node(flotilla_proto::admin::DecommissionNodeRequest { node_id })
                .await?
                .into_inner()
                .node
                .ok_or_else(|| Status::internal("answer without a node"))
        })
        .await
    }

    /// The placement driver's operators: running, then recently finished.
    pub async fn list_operators(&self) -> Result<Vec<flotilla_proto::admin::Operator>> {
        self.on_meta_leader(|mut admin| async move {
            Ok(admin
                .list_operators(flotilla_proto::admin::ListOperatorsRequest {})
                .await?
                .into_inner()
                .operators)
        })
        .await
    }
}

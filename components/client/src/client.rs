//! The client proper: connection cache, retry loop and the operations.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_proto::admin::admin_client::AdminClient;
use flotilla_proto::admin::{GetRouteRequest, ListShardsRequest, NodeStatusRequest};
use flotilla_proto::error::{self as pb, error::Kind};
use flotilla_proto::kv::kv_client::KvClient;
use flotilla_proto::kv::{self as kvpb, ReadMode, ShardContext};
use flotilla_proto::meta::ShardDescriptor;
use parking_lot::{Mutex, RwLock};
use rand::Rng;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::conn::{BatchStream, KvConn, NOT_SENT};
use crate::error::{Error, Result};
use crate::routes::{CachedShard, RouteCache};

pub use flotilla_proto::admin::NodeStatusResponse as NodeStatus;

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Any nodes of the cluster (host:port); more are learned from routes.
    pub endpoints: Vec<String>,
    /// Total time budget of one operation, retries included.
    pub timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub connect_timeout: Duration,
    /// Largest gRPC message accepted (scan responses).
    pub max_message_bytes: usize,
    /// Send requests over one `BatchCommands` stream per node (many requests
    /// per HTTP/2 message when many are in flight) instead of one unary
    /// call each. See the `conn` module.
    pub batch_commands: bool,
    /// How long a node that refused a connection is passed over when
    /// another replica can take the request: after a node dies, followers
    /// keep naming it as their leader until they elect a new one, and
    /// following those hints (or the cached leader) would spend the
    /// retries on it.
    pub unreachable_for: Duration,
    /// Longest back-off while replicas answer that they know no leader, or
    /// name leaders that send the request back (an election or a transfer
    /// is under way): elections take a few hundred milliseconds,
    /// and asking a replica again is one cheap round trip, while the full
    /// back-off (up to `backoff_max`) would leave requests asleep long
    /// after the new leader is elected.
    pub election_backoff_max: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            endpoints: vec!["127.0.0.1:20161".into()],
            timeout: Duration::from_secs(10),
            backoff_base: Duration::from_millis(2),
            backoff_max: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(1),
            max_message_bytes: 64 << 20,
            batch_commands: true,
            unreachable_for: Duration::from_secs(1),
            election_backoff_max: Duration::from_millis(100),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvPair {
    pub key: Bytes,
    pub value: Bytes,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CasResult {
    pub succeeded: bool,
    /// The value before the operation, if the key existed.
    pub previous: Option<Bytes>,
}

#[derive(Clone, Debug)]
pub struct ShardInfo {
    pub descriptor: ShardDescriptor,
    /// 0 when the answering node did not know the leader.
    pub leader_node: u64,
}

/// What a shard-level call does, for routing and retries.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Call {
    /// Served under the client's read mode; retried freely.
    Read,
    /// Sent again only when it certainly was not applied; an unknown
    /// outcome is reported as Indeterminate. Even a put is not idempotent
    /// once others write: a retry applied after a newer write to the key
    /// brings the old value back (the chaos test's checker caught that).
    Write,
}

/// Why one shard-level operation did not return a value.
enum OpError {
    Public(Error),
    /// The keys no longer fit one shard: the caller must split them again.
    Regroup,
}

impl From<Error> for OpError {
    fn from(e: Error) -> Self {
        OpError::Public(e)
    }
}

fn public(e: OpError) -> Error {
    match e {
        OpError::Public(e) => e,
        OpError::Regroup => Error::Server("routing changed under a single-key request".into()),
    }
}

/// Retry state of one operation.
pub(crate) struct Retry {
    deadline: Instant,
    backoff: Duration,
    max: Duration,
    pub(crate) attempts: u32,
    pub(crate) last: String,
}

impl Retry {
    pub(crate) fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    pub(crate) async fn backoff(&mut self, why: String) -> Result<()> {
        self.backoff_at_most(why, self.max).await
    }

    /// Backs off, this time for no longer than `cap`.
    pub(crate) async fn backoff_at_most(&mut self, why: String, cap: Duration) -> Result<()> {
        self.attempts += 1;
        self.last = why;
        let jittered = self
            .backoff
            .min(cap)
            .mul_f64(rand::thread_rng().gen_range(0.5..1.0));
        tracing::debug!(attempt = self.attempts, sleep_ms = jittered.as_millis() as u64, why = %self.last, "retrying");
        if Instant::now() + jittered >= self.deadline {
            return Err(Error::DeadlineExceeded {
                attempts: self.attempts,
                last: std::mem::take(&mut self.last),
            });
        }
        tokio::time::sleep(jittered).await;
        self.backoff = (self.backoff * 2).min(self.max);
        Ok(())
    }
}

/// Whether a failed call certainly never reached the server (so even a
/// non-idempotent command can be retried): a failure to connect, or a
/// command the client's stream never sent (`conn::NOT_SENT`). A
/// connection reset or closed after the request went out ("connection
/// reset", "connection closed") may follow its execution, so it does not
/// count: retrying a compare-and-swap then could apply it twice.
pub(crate) fn never_sent(s: &Status) -> bool {
    refused_connection(s)
        || s.code() == Code::Unavailable && s.message().to_ascii_lowercase().starts_with(NOT_SENT)
}

/// Whether a call failed to connect at all (the node is down or not
/// listening), as opposed to a stream that broke or a request that was
/// queued on one: only then is the node passed over for a while.
fn refused_connection(s: &Status) -> bool {
    s.code() == Code::Unavailable && {
        let m = s.message().to_ascii_lowercase();
        m.contains("tcp connect error")
            || m.contains("error trying to connect")
            || m.contains("connection refused")
    }
}

pub(crate) struct Inner {
    pub(crate) cfg: ClientConfig,
    pub(crate) cache: RwLock<RouteCache>,
    channels: Mutex<HashMap<String, Channel>>,
    /// Behind an `Arc`: every call takes its node's stream, and cloning
    /// the stream itself would clone its unary client too.
    streams: Mutex<HashMap<String, Arc<BatchStream>>>,
    next_endpoint: AtomicUsize,
    /// Nodes that recently refused a connection, until when.
    unreachable: Mutex<HashMap<u64, Instant>>,
}

impl Inner {
    fn mark_unreachable(&self, node: u64) {
        self.unreachable
            .lock()
            .insert(node, Instant::now() + self.cfg.unreachable_for);
    }

    fn clear_unreachable(&self, node: u64) {
        self.unreachable.lock().remove(&node);
    }

    fn is_unreachable(&self, node: u64) -> bool {
        let mut m = self.unreachable.lock();
        match m.get(&node) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                m.remove(&node);
                false
            }
            None => false,
        }
    }
}

/// A Flotilla client. Cheap to clone; clones share caches and connections.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
    /// How reads (get, batch get, scan) are served; see [`ReadMode`].
    read_mode: ReadMode,
}

/// What a shard-level call hands back: the response's structured error, if
/// any, and its value.
type CallResult<T> = std::result::Result<(Option<pb::Error>, T), Status>;

impl Client {
    /// Creates a client and loads the shard list from the first endpoint
    /// that answers.
    pub async fn connect(cfg: ClientConfig) -> Result<Client> {
        if cfg.endpoints.is_empty() {
            return Err(Error::NoEndpoint("no endpoints given".into()));
        }
        let client = Client {
            inner: Arc::new(Inner {
                cfg,
                cache: RwLock::default(),
                channels: Mutex::default(),
                streams: Mutex::default(),
                next_endpoint: AtomicUsize::new(0),
                unreachable: Mutex::default(),
            }),
            read_mode: ReadMode::Leader,
        };
        client.refresh_all().await?;
        Ok(client)
    }

    /// A client sharing this one's connections and routes whose reads use
    /// `mode`: `Leader` (the default; linearizable, from the leader's lease
    /// when it holds one), `LeaderReadIndex` (linearizable, always confirmed
    /// by a quorum), `Follower` (linearizable, served by any replica after it
    /// asks the leader for its commit index) or `Stale` (any replica's
    /// applied state: may miss recent writes).
    pub fn with_read_mode(&self, mode: ReadMode) -> Client {
        Client {
            inner: self.inner.clone(),
            read_mode: mode,
        }
    }

    pub fn read_mode(&self) -> ReadMode {
        self.read_mode
    }

    fn channel(&self, addr: &str) -> Result<Channel> {
        let mut channels = self.inner.channels.lock();
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::NoEndpoint(format!("{addr}: {e}")))?
            .connect_timeout(self.inner.cfg.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let c = endpoint.connect_lazy();
        channels.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    fn kv(&self, addr: &str) -> Result<KvConn> {
        let m = self.inner.cfg.max_message_bytes;
        let unary = || -> Result<KvClient<Channel>> {
            Ok(KvClient::new(self.channel(addr)?)
                .max_decoding_message_size(m)
                .max_encoding_message_size(m))
        };
        if !self.inner.cfg.batch_commands {
            return Ok(KvConn::Unary(unary()?));
        }
        let mut streams = self.inner.streams.lock();
        match streams.get(addr) {
            Some(s) if !s.is_closed() => Ok(KvConn::Batch(s.clone())),
            _ => {
                let s = Arc::new(BatchStream::open(unary()?, addr.to_string()));
                streams.insert(addr.to_string(), s.clone());
                Ok(KvConn::Batch(s))
            }
        }
    }

    pub(crate) fn admin(&self, addr: &str) -> Result<AdminClient<Channel>> {
        Ok(AdminClient::new(self.channel(addr)?))
    }

    /// Endpoints and known nodes, starting from a rotating position.
    pub(crate) fn candidates(&self) -> Vec<String> {
        let mut v = self.inner.cfg.endpoints.clone();
        for a in self.inner.cache.read().nodes.values() {
            if !v.contains(a) {
                v.push(a.clone());
            }
        }
        let start = self.inner.next_endpoint.fetch_add(1, Ordering::Relaxed) % v.len();
        v.rotate_left(start);
        v
    }

    /// Reloads every shard's route from the first node that answers.
    pub async fn refresh_all(&self) -> Result<()> {
        let mut last = String::new();
        for addr in self.candidates() {
            let mut admin = match self.admin(&addr) {
                Ok(a) => a,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let call = admin.list_shards(ListShardsRequest {});
            match tokio::time::timeout(self.inner.cfg.connect_timeout * 2, call).await {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    let mut cache = self.inner.cache.write();
                    cache.set_nodes(r.nodes);
                    for s in r.shards {
                        cache.insert_route(s);
                    }
                    return Ok(());
                }
                Ok(Err(s)) => last = format!("{addr}: {}", s.message()),
                Err(_) => last = format!("{addr}: timed out"),
            }
        }
        Err(Error::NoEndpoint(last))
    }

    /// Refreshes one shard's route: by its start key when the cache knows
    /// it (one small call, however many shards the cluster has), else, or
    /// when that key now belongs to another shard, all routes.
    pub(crate) async fn refresh_shard(&self, shard_id: u64) -> Result<()> {
        let start = self
            .inner
            .cache
            .read()
            .by_id(shard_id)
            .map(|s| s.desc.start_key);
        if let Some(start) = start {
            let found = self.refresh_key(&start).await.is_ok()
                && self
                    .inner
                    .cache
                    .read()
                    .locate(&start)
                    .is_some_and(|s| s.desc.id == shard_id);
            if found {
                return Ok(());
            }
        }
        self.refresh_all().await
    }

    async fn refresh_key(&self, key: &[u8]) -> std::result::Result<(), String> {
        let mut last = String::new();
        for addr in self.candidates() {
            let Ok(mut admin) = self.admin(&addr) else {
                continue;
            };
            let call = admin.get_route(GetRouteRequest {
                key: Bytes::copy_from_slice(key),
            });
            match tokio::time::timeout(self.inner.cfg.connect_timeout * 2, call).await {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    let mut cache = self.inner.cache.write();
                    cache.set_nodes(r.nodes);
                    if let Some(route) = r.route {
                        cache.insert_route(route);
                    }
                    return Ok(());
                }
                Ok(Err(s)) => last = format!("{addr}: {}", s.message()),
                Err(_) => last = format!("{addr}: timed out"),
            }
        }
        Err(last)
    }

    async fn locate(&self, key: &[u8], retry: &mut Retry) -> Result<CachedShard> {
        loop {
            if let Some(s) = self.inner.cache.read().locate(key) {
                return Ok(s);
            }
            if let Err(e) = self.refresh_key(key).await {
                retry.backoff(format!("locating key: {e}")).await?;
            }
        }
    }

    async fn locate_before(&self, end: &[u8], retry: &mut Retry) -> Result<CachedShard> {
        loop {
            if let Some(s) = self.inner.cache.read().locate_before(end) {
                return Ok(s);
            }
            if let Err(e) = self.refresh_all().await {
                retry.backoff(format!("locating shards: {e}")).await?;
            }
        }
    }

    pub(crate) fn new_retry(&self) -> Retry {
        Retry {
            deadline: Instant::now() + self.inner.cfg.timeout,
            backoff: self.inner.cfg.backoff_base,
            max: self.inner.cfg.backoff_max,
            attempts: 0,
            last: String::new(),
        }
    }

    /// Runs `call` against the shard holding `anchor` (or, with `before`,
    /// the shard holding the keys just below `anchor`), retrying on routing
    /// and transport errors. `fits` says whether the request still fits the
    /// shard found (else `Regroup`). Returns the value and the descriptor of
    /// the shard that answered.
    async fn on_shard<T, F, Fut>(
        &self,
        anchor: &[u8],
        before: bool,
        kind: Call,
        fits: impl Fn(&ShardDescriptor) -> bool,
        call: F,
    ) -> std::result::Result<(T, ShardDescriptor), OpError>
    where
        F: Fn(KvConn, ShardContext, &ShardDescriptor) -> Fut,
        Fut: Future<Output = CallResult<T>>,
    {
        let idempotent = kind == Call::Read;
        let read_mode = if kind == Call::Read {
            self.read_mode
        } else {
            ReadMode::Leader
        };
        // Follower and stale reads spread over the replicas, from a random
        // one, moving on when one cannot serve.
        let any_replica = matches!(read_mode, ReadMode::Follower | ReadMode::Stale);
        let mut retry = self.new_retry();
        let mut replica_turn = if any_replica {
            rand::thread_rng().gen::<u16>() as usize
        } else {
            0
        };
        let mut followed_hint = false;
        loop {
            let mut electing = false;
            // Whether this attempt follows a leader hint the last one got.
            let following = std::mem::take(&mut followed_hint);
            let shard = if before {
                self.locate_before(anchor, &mut retry).await?
            } else {
                self.locate(anchor, &mut retry).await?
            };
            let CachedShard {
                desc,
                leader_node: cached_leader,
            } = shard;
            if !fits(&desc) {
                return Err(OpError::Regroup);
            }
            let inner = &self.inner;
            let node = if cached_leader != 0 && !any_replica && !inner.is_unreachable(cached_leader)
            {
                cached_leader
            } else if desc.replicas.is_empty() {
                0
            } else {
                // From this turn's replica, the first one not passed over.
                let n = desc.replicas.len();
                let turn = (0..n)
                    .map(|i| (replica_turn + i) % n)
                    .find(|i| !inner.is_unreachable(desc.replicas[*i].node_id))
                    .unwrap_or(replica_turn % n);
                desc.replicas[turn].node_id
            };
            let addr = self.inner.cache.read().nodes.get(&node).cloned();
            let Some(addr) = addr else {
                self.inner.cache.write().invalidate(desc.id);
                retry.backoff(format!("no address for node {node}")).await?;
                continue;
            };
            let ctx = ShardContext {
                shard_id: desc.id,
                epoch: desc.epoch,
                replica_id: desc.replica_on(node).map(|r| r.id).unwrap_or(0),
                read_mode: read_mode as i32,
            };
            let kv = self.kv(&addr)?;
            let outcome = tokio::time::timeout(retry.remaining(), call(kv, ctx, &desc)).await;
            let err = match outcome {
                Err(_) if !idempotent => {
                    return Err(Error::Indeterminate(format!(
                        "no answer from {addr} before the deadline"
                    ))
                    .into())
                }
                Err(_) => {
                    return Err(Error::DeadlineExceeded {
                        attempts: retry.attempts + 1,
                        last: format!("no answer from {addr}"),
                    }
                    .into())
                }
                Ok(Err(status)) => {
                    match status.code() {
                        Code::InvalidArgument => {
                            return Err(Error::InvalidArgument(status.message().to_string()).into())
                        }
                        Code::ResourceExhausted => {
                            return Err(
                                Error::ResourceExhausted(status.message().to_string()).into()
                            )
                        }
                        _ => {}
                    }
                    if !idempotent && !never_sent(&status) {
                        return Err(Error::Indeterminate(format!(
                            "{addr} failed after the request was sent: {}",
                            status.message()
                        ))
                        .into());
                    }
                    if refused_connection(&status) {
                        self.inner.mark_unreachable(node);
                    }
                    self.inner.cache.write().set_leader(desc.id, 0);
                    replica_turn += 1;
                    let why = format!(
                        "shard {} at {addr}: {} {}",
                        desc.id,
                        status.code(),
                        status.message()
                    );
                    // A node that refused, or whose stream broke before
                    // the request left, is gone, not busy: the next try
                    // goes to another replica. Back off as while an
                    // election is under way, not for up to `backoff_max`
                    // (in the failover bench, a 350 ms sleep after one more
                    // try of the dead node delayed writes past failover).
                    let cap = if never_sent(&status) {
                        self.inner.cfg.election_backoff_max
                    } else {
                        self.inner.cfg.backoff_max
                    };
                    retry.backoff_at_most(why, cap).await?;
                    continue;
                }
                Ok(Ok((None, value))) => return Ok((value, desc)),
                Ok(Ok((Some(err), _))) => err,
            };
            let why = format!("shard {} at {addr}: {}", desc.id, err.message);
            match err.kind {
                // This replica cannot serve (it knows no leader, has no data
                // yet or is installing a snapshot): try the next one.
                Some(Kind::NotLeader(_)) | Some(Kind::ServerIsBusy(_)) if any_replica => {
                    replica_turn += 1
                }
                Some(Kind::NotLeader(nl)) => {
                    let named = nl.leader.filter(|l| l.node_id != node && l.node_id != 0);
                    let mut cache = self.inner.cache.write();
                    if let Some(l) = named.filter(|_| !nl.leader_address.is_empty()) {
                        // A node back on a new address is no longer the one
                        // that refused.
                        if cache.nodes.get(&l.node_id) != Some(&nl.leader_address) {
                            cache.nodes.insert(l.node_id, nl.leader_address.clone());
                            self.inner.clear_unreachable(l.node_id);
                        }
                    }
                    let hint = named.filter(|l| !self.inner.is_unreachable(l.node_id));
                    match hint {
                        Some(l) => {
                            cache.set_leader(desc.id, l.node_id);
                        }
                        None => {
                            cache.set_leader(desc.id, 0);
                            replica_turn += 1;
                        }
                    }
                    drop(cache);
                    // Follow a fresh hint at once. Without one, or when
                    // hints bounce, an election or a leadership transfer is
                    // under way: back off no longer than while electing (a
                    // full back-off, up to `backoff_max`, once slept 397 ms
                    // after a survivor named the new leader in the failover
                    // bench).
                    if hint.is_some() && !following {
                        followed_hint = true;
                        continue;
                    }
                    electing = true;
                }
                Some(Kind::EpochNotMatch(e)) => {
                    let mut cache = self.inner.cache.write();
                    if e.current_shards.is_empty() {
                        cache.invalidate(desc.id);
                    }
                    for d in e.current_shards {
                        cache.insert(d, 0);
                    }
                }
                Some(Kind::ShardNotFound(_)) | Some(Kind::KeyNotInShard(_)) => {
                    self.inner.cache.write().invalidate(desc.id);
                }
                Some(Kind::ServerIsBusy(_)) | Some(Kind::StaleCommand(_)) => {}
                Some(Kind::Indeterminate(_)) => {
                    if !idempotent {
                        return Err(Error::Indeterminate(err.message).into());
                    }
                }
                None => return Err(Error::Server(err.message).into()),
            }
            if electing {
                retry
                    .backoff_at_most(why, self.inner.cfg.election_backoff_max)
                    .await?;
            } else {
                retry.backoff(why).await?;
            }
        }
    }

    async fn single<T, F, Fut>(&self, key: &[u8], kind: Call, call: F) -> Result<T>
    where
        F: Fn(KvConn, ShardContext, &ShardDescriptor) -> Fut,
        Fut: Future<Output = CallResult<T>>,
    {
        self.on_shard(key, false, kind, |_| true, call)
            .await
            .map(|(v, _)| v)
            .map_err(public)
    }

    /// Reads a key (linearizable unless the read mode is `Stale`).
    pub async fn get(&self, key: impl Into<Bytes>) -> Result<Option<Bytes>> {
        let key = key.into();
        self.single(&key, Call::Read, |mut kv, ctx, _| {
            let key = key.clone();
            async move {
                let r = kv
                    .get(kvpb::GetRequest {
                        context: Some(ctx),
                        key,
                    })
                    .await?;
                Ok((r.error, r.found.then_some(r.value)))
            }
        })
        .await
    }

    pub async fn put(&self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Result<()> {
        let (key, value) = (key.into(), value.into());
        self.single(&key, Call::Write, |mut kv, ctx, _| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                let r = kv
                    .put(kvpb::PutRequest {
                        context: Some(ctx),
                        key,
                        value,
                    })
                    .await?;
                Ok((r.error, ()))
            }
        })
        .await
    }

    pub async fn delete(&self, key: impl Into<Bytes>) -> Result<()> {
        let key = key.into();
        self.single(&key, Call::Write, |mut kv, ctx, _| {
            let key = key.clone();
            async move {
                let r = kv
                    .delete(kvpb::DeleteRequest {
                        context: Some(ctx),
                        key,
                    })
                    .await?;
                Ok((r.error, ()))
            }
        })
        .await
    }

    /// Atomically replaces the key's state if it matches `expected`
    /// (`None` = absent) with `new` (`None` = delete).
    pub async fn compare_and_swap(
        &self,
        key: impl Into<Bytes>,
        expected: Option<Bytes>,
        new: Option<Bytes>,
    ) -> Result<CasResult> {
        let key = key.into();
        self.single(&key, Call::Write, |mut kv, ctx, _| {
            let req = kvpb::CompareAndSwapRequest {
                context: Some(ctx),
                key: key.clone(),
                expected_exists: expected.is_some(),
                expected_value: expected.clone().unwrap_or_default(),
                new_value: new.clone().unwrap_or_default(),
                delete: new.is_none(),
            };
            async move {
                let r = kv.compare_and_swap(req).await?;
                Ok((
                    r.error,
                    CasResult {
                        succeeded: r.succeeded,
                        previous: r.previous_exists.then_some(r.previous_value),
                    },
                ))
            }
        })
        .await
    }

    /// Groups keys by the shard the cache says holds them.
    async fn group_by_shard(&self, keys: Vec<Bytes>) -> Result<Vec<Vec<Bytes>>> {
        let mut retry = self.new_retry();
        let mut groups: HashMap<u64, Vec<Bytes>> = HashMap::new();
        for k in keys {
            let s = self.locate(&k, &mut retry).await?;
            groups.entry(s.desc.id).or_default().push(k);
        }
        Ok(groups.into_values().collect())
    }

    /// Runs `per_group` on every shard group in parallel, regrouping keys
    /// whose shard changed meanwhile.
    async fn batched<T, F, Fut>(&self, keys: Vec<Bytes>, per_group: F) -> Result<Vec<T>>
    where
        F: Fn(Vec<Bytes>) -> Fut,
        Fut: Future<Output = std::result::Result<T, OpError>>,
    {
        let deadline = Instant::now() + self.inner.cfg.timeout;
        let mut out = Vec::new();
        let mut todo = keys;
        while !todo.is_empty() {
            if Instant::now() >= deadline {
                return Err(Error::DeadlineExceeded {
                    attempts: 0,
                    last: "shards kept changing under a batch".into(),
                });
            }
            let groups = self.group_by_shard(std::mem::take(&mut todo)).await?;
            let results = futures::future::join_all(groups.into_iter().map(|g| {
                let fut = per_group(g.clone());
                async move { (g, fut.await) }
            }))
            .await;
            for (g, r) in results {
                match r {
                    Ok(v) => out.push(v),
                    Err(OpError::Regroup) => todo.extend(g),
                    Err(OpError::Public(e)) => return Err(e),
                }
            }
        }
        Ok(out)
    }

    /// Reads many keys (each shard's part linearizable). Returns the pairs
    /// that exist, in no particular order across shards.
    pub async fn batch_get(&self, keys: Vec<Bytes>) -> Result<Vec<KvPair>> {
        let parts = self
            .batched(keys, |group| async move {
                let fits = |d: &ShardDescriptor| group.iter().all(|k| d.contains(k));
                let (pairs, _) = self
                    .on_shard(&group[0], false, Call::Read, fits, |mut kv, ctx, _| {
                        let keys = group.clone();
                        async move {
                            let r = kv
                                .batch_get(kvpb::BatchGetRequest {
                                    context: Some(ctx),
                                    keys,
                                })
                                .await?;
                            Ok((r.error, r.pairs))
                        }
                    })
                    .await?;
                Ok(pairs)
            })
            .await?;
        Ok(parts
            .into_iter()
            .flatten()
            .map(|p| KvPair {
                key: p.key,
                value: p.value,
            })
            .collect())
    }

    /// Writes many pairs; each shard's part is atomic, the whole is not.
    pub async fn batch_put(&self, pairs: Vec<(Bytes, Bytes)>) -> Result<()> {
        let values: HashMap<Bytes, Bytes> = pairs.into_iter().collect();
        let keys: Vec<Bytes> = values.keys().cloned().collect();
        let values = &values;
        self.batched(keys, |group| async move {
            let fits = |d: &ShardDescriptor| group.iter().all(|k| d.contains(k));
            self.on_shard(&group[0], false, Call::Write, fits, |mut kv, ctx, _| {
                let pairs = group
                    .iter()
                    .map(|k| kvpb::KvPair {
                        key: k.clone(),
                        value: values[k].clone(),
                    })
                    .collect();
                async move {
                    let r = kv
                        .batch_put(kvpb::BatchPutRequest {
                            context: Some(ctx),
                            pairs,
                        })
                        .await?;
                    Ok((r.error, ()))
                }
            })
            .await?;
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// Deletes every key in `[start, end)` (empty end = +inf), shard by
    /// shard.
    pub async fn delete_range(&self, start: impl Into<Bytes>, end: impl Into<Bytes>) -> Result<()> {
        let (start, end) = (start.into(), end.into());
        if !end.is_empty() && start >= end {
            return Ok(());
        }
        let mut cursor = start;
        loop {
            let end2 = end.clone();
            let (_, desc) = self
                .on_shard(
                    &cursor,
                    false,
                    Call::Write,
                    |_| true,
                    |mut kv, ctx, desc| {
                        let start = cursor.clone();
                        let end = clip_end(&end2, desc);
                        async move {
                            let r = kv
                                .delete_range(kvpb::DeleteRangeRequest {
                                    context: Some(ctx),
                                    start_key: start,
                                    end_key: end,
                                })
                                .await?;
                            Ok((r.error, ()))
                        }
                    },
                )
                .await
                .map_err(public)?;
            if reaches(&desc, &end) {
                return Ok(());
            }
            cursor = desc.end_key;
        }
    }

    /// Returns up to `limit` pairs of `[start, end)` (empty end = +inf) in
    /// key order, descending when `reverse`, across shards.
    pub async fn scan(
        &self,
        start: impl Into<Bytes>,
        end: impl Into<Bytes>,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<KvPair>> {
        let (start, end) = (start.into(), end.into());
        let mut out = Vec::new();
        if limit == 0 || (!end.is_empty() && start >= end) {
            return Ok(out);
        }
        // Forward: `lo` advances; reverse: `hi` descends.
        let mut lo = start.clone();
        let mut hi = end.clone();
        loop {
            let want = (limit - out.len()).min(u32::MAX as usize) as u32;
            let anchor = if reverse { hi.clone() } else { lo.clone() };
            let (lo2, hi2) = (lo.clone(), hi.clone());
            let ((pairs, more), desc) = self
                .on_shard(
                    &anchor,
                    reverse,
                    Call::Read,
                    |_| true,
                    |mut kv, ctx, desc| {
                        let (s, e) = if reverse {
                            (clip_start(&lo2, desc), hi2.clone())
                        } else {
                            (lo2.clone(), clip_end(&hi2, desc))
                        };
                        async move {
                            let r = kv
                                .scan(kvpb::ScanRequest {
                                    context: Some(ctx),
                                    start_key: s,
                                    end_key: e,
                                    limit: want,
                                    reverse,
                                })
                                .await?;
                            Ok((r.error, (r.pairs, r.more)))
                        }
                    },
                )
                .await
                .map_err(public)?;
            let last = pairs.last().map(|p| p.key.clone());
            out.extend(pairs.into_iter().map(|p| KvPair {
                key: p.key,
                value: p.value,
            }));
            if out.len() >= limit {
                out.truncate(limit);
                return Ok(out);
            }
            if more {
                // The shard has more in range: continue after the last key.
                let last = last.expect("more implies at least one pair");
                if reverse {
                    hi = last;
                } else {
                    let mut next = last.to_vec();
                    next.push(0);
                    lo = next.into();
                }
                continue;
            }
            if reverse {
                if desc.start_key.is_empty() || desc.start_key[..] <= start[..] {
                    return Ok(out);
                }
                hi = desc.start_key;
            } else {
                if reaches(&desc, &end) {
                    return Ok(out);
                }
                lo = desc.end_key;
            }
        }
    }

    /// Every shard with the leader the answering node knows.
    pub async fn list_shards(&self) -> Result<Vec<ShardInfo>> {
        self.refresh_all().await?;
        Ok(self
            .inner
            .cache
            .read()
            .all()
            .into_iter()
            .map(|s| ShardInfo {
                descriptor: s.desc,
                leader_node: s.leader_node,
            })
            .collect())
    }

    /// Known nodes (id, address).
    pub fn nodes(&self) -> Vec<(u64, String)> {
        let mut v: Vec<_> = self
            .inner
            .cache
            .read()
            .nodes
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        v.sort();
        v
    }

    /// Asks one node for its replica of a shard.
    pub async fn replica_status(
        &self,
        addr: &str,
        shard_id: u64,
    ) -> Result<flotilla_proto::admin::ReplicaStatusResponse> {
        let mut admin = self.admin(addr)?;
        let call = admin.replica_status(flotilla_proto::admin::ReplicaStatusRequest { shard_id });
        match tokio::time::timeout(self.inner.cfg.connect_timeout * 2, call).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(Error::Server(format!("{addr}: {}", s.message()))),
            Err(_) => Err(Error::NoEndpoint(format!("{addr}: timed out"))),
        }
    }

    /// Asks one node for its status.
    pub async fn node_status(&self, addr: &str) -> Result<NodeStatus> {
        let mut admin = self.admin(addr)?;
        let call = admin.node_status(NodeStatusRequest {});
        match tokio::time::timeout(self.inner.cfg.connect_timeout * 2, call).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(Error::NoEndpoint(format!("{addr}: {}", s.message()))),
            Err(_) => Err(Error::NoEndpoint(format!("{addr}: timed out"))),
        }
    }
}

/// `end` limited to the shard's end (empty = +inf).
fn clip_end(end: &Bytes, desc: &ShardDescriptor) -> Bytes {
    if desc.end_key.is_empty() {
        end.clone()
    } else if end.is_empty() || desc.end_key < *end {
        desc.end_key.clone()
    } else {
        end.clone()
    }
}

/// `start` raised to the shard's start.
fn clip_start(start: &Bytes, desc: &ShardDescriptor) -> Bytes {
    if desc.start_key > *start {
        desc.start_key.clone()
    } else {
        start.clone()
    }
}

/// Whether the shard extends to or past `end` (empty = +inf).
fn reaches(desc: &ShardDescriptor, end: &Bytes) -> bool {
    desc.end_key.is_empty() || (!end.is_empty() && desc.end_key[..] >= end[..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_a_failed_connect_counts_as_never_sent() {
        // A port nobody listens on: the call fails before anything is sent.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let channel = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect_lazy();
        let status = KvClient::new(channel)
            .get(kvpb::GetRequest::default())
            .await
            .unwrap_err();
        assert!(never_sent(&status), "{status:?}");
        // A connection that broke after the request went out.
        for m in [
            "transport error",
            "error reading a body from connection: connection reset",
            "connection closed before message completed",
            "h2 protocol error: broken pipe",
        ] {
            assert!(!never_sent(&Status::unavailable(m)), "{m}");
        }
    }
}

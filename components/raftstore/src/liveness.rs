//! Which peer nodes are alive, as this node sees them.
//!
//! Hibernated replicas do not tick (`replica::fsm::hibernate`), so a
//! follower cannot notice by itself that its leader went away. The node
//! notices instead, once for all its replicas: three times per election
//! timeout (every `election-ticks / 3` ticks) the ticker sends a tiny
//! `NodeHeartbeat` to every peer node that shares a shard with it, and the
//! transport's receiving side records when anything last arrived from each
//! peer ([`NodeLiveness::heard_from`]).
//!
//! The ticker polls this table every tick and turns changes into events
//! for the replicas that have a replica on that node:
//! - `Down`: nothing arrived for an election timeout while another peer
//!   was heard (every peer silent at once means this node is starved or
//!   cut off; calling them all down would only wake every shard). Sleeping
//!   followers whose leader lives there wake and grant votes at once (one
//!   of them campaigns at once): their leader's last message arrived before
//!   that silence began, so its lease (shorter than an election timeout, see
//!   `replica::lease`) is over. Awake followers that missed their leader's
//!   heartbeats do the same (so their own timers do not race the chosen
//!   voter); awake ones still hearing it ignore the event.
//!   Leaders with a follower there wake one election timeout later (see
//!   [`tick`]), so they count it down and raft's check-quorum runs again (a
//!   leader cut off from everyone steps down).
//! - `Up`: heard again after `Down`. Leaders wake to bring it up to date.
//! - `Restarted`: its heartbeat carries a new incarnation (the process
//!   restarted, maybe faster than an election timeout). Its old leaders'
//!   leases died with the process: followers of leaders there act as on
//!   `Down`; leaders wake to heartbeat its new replicas.
//!
//! Replicas also ask this table directly ([`NodeLiveness::silent_for`]): a
//! follower receiving a vote request while its leader's node has been
//! silent for longer than the lease bound grants it even if it has not
//! handled its own `Down` yet (`replica::fsm::hibernate`).
//!
//! Liveness is one-way: this node hearing a peer says nothing of the peer
//! hearing it; the peer decides for itself, as raft's followers do.
//!
//! Both the heartbeats and the polling run on the node's ticker thread
//! ([`send_heartbeats`], [`tick`]), not on the raft pollers: when thousands of replicas keep the
//! pollers busy (a start, an election storm), a heartbeat stuck behind them
//! would make peers call this node down and wake thousands more.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::meta::StoreMeta;
use crate::msg::ReplicaMsg;
use crate::replica::poller::RaftRouter;
use crate::transport::{RaftMessage, Transport};
use crate::{metrics, NodeId, ShardId};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerEvent {
    Down,
    Up,
    Restarted,
}

impl PeerEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerEvent::Down => "node_down",
            PeerEvent::Up => "node_up",
            PeerEvent::Restarted => "node_restarted",
        }
    }
}

#[derive(Debug)]
struct Peer {
    last_heard: Instant,
    incarnation: u64,
    up: bool,
    restarted: bool,
}

/// Shared by the transport's receiving side (writes) and the ticker
/// thread (polls).
pub struct NodeLiveness {
    /// This process's incarnation, sent in its heartbeats.
    incarnation: u64,
    peers: Mutex<HashMap<NodeId, Peer>>,
    /// When [`NodeLiveness::poll`] last ran.
    last_poll: Mutex<Option<Instant>>,
}

impl NodeLiveness {
    pub fn new() -> Self {
        // Distinct per process start: nanoseconds of the wall clock, mixed
        // with the process id in case two starts share a clock reading.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        NodeLiveness {
            incarnation: (nanos ^ ((std::process::id() as u64) << 48)).max(1),
            peers: Mutex::default(),
            last_poll: Mutex::default(),
        }
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Something arrived from `node`.
    pub fn heard_from(&self, node: NodeId) {
        self.touch(node, None);
    }

    /// A heartbeat from `node` arrived, naming its incarnation.
    pub fn heartbeat(&self, node: NodeId, incarnation: u64) {
        self.touch(node, Some(incarnation));
    }

    fn touch(&self, node: NodeId, incarnation: Option<u64>) {
        let now = Instant::now();
        let mut peers = self.peers.lock();
        let p = peers.entry(node).or_insert(Peer {
            last_heard: now,
            incarnation: 0,
            up: true,
            restarted: false,
        });
        p.last_heard = now;
        if let Some(inc) = incarnation {
            if p.incarnation != 0 && p.incarnation != inc {
                p.restarted = true;
            }
            p.incarnation = inc;
        }
    }

    /// The changes since the last poll: peers silent for `timeout` are
    /// down, down peers heard again are up, restarted peers say so.
    ///
    /// A poll coming a whole `timeout` after the previous one means this
    /// node itself stood still (stopped, paused with its VM, starved of
    /// CPU): the stall does not count as the peers' silence. Without that,
    /// the peer whose buffered heartbeat happens to be read first after the
    /// stall would get every other peer called down. Counting less silence
    /// only delays a `Down`; it never makes a follower grant a vote sooner
    /// ([`NodeLiveness::silent_for`]).
    pub fn poll(&self, timeout: Duration) -> Vec<(NodeId, PeerEvent)> {
        let now = Instant::now();
        let mut events = Vec::new();
        let mut peers = self.peers.lock();
        let last_poll = self.last_poll.lock().replace(now);
        if let Some(gap) = last_poll.map(|t| now.saturating_duration_since(t)) {
            if gap >= timeout {
                tracing::warn!(
                    stalled_ms = gap.as_millis() as u64,
                    "node liveness was not polled for an election timeout; the stall does not count as peer silence"
                );
                metrics::LIVENESS_STALLS.inc();
                for p in peers.values_mut() {
                    p.last_heard = (p.last_heard + gap).min(now);
                }
            }
        }
        // Every peer silent at once says more about this node (its
        // receiving side starved, or itself cut off, where waking replicas
        // cannot help) than about the peers: nobody is called down then.
        let heard_any = peers
            .values()
            .any(|p| now.saturating_duration_since(p.last_heard) < timeout);
        let judge = heard_any || peers.len() == 1;
        for (id, p) in peers.iter_mut() {
            let silent = judge && now.saturating_duration_since(p.last_heard) >= timeout;
            if std::mem::take(&mut p.restarted) {
                p.up = true;
                events.push((*id, PeerEvent::Restarted));
            } else if p.up && silent {
                p.up = false;
                events.push((*id, PeerEvent::Down));
            } else if !p.up && !silent {
                p.up = true;
                events.push((*id, PeerEvent::Up));
            }
        }
        events
    }

    /// Whether anything arrived from `node` within `within`.
    pub fn heard_within(&self, node: NodeId, within: Duration) -> bool {
        self.peers
            .lock()
            .get(&node)
            .is_some_and(|p| p.last_heard.elapsed() <= within)
    }

    /// How long nothing arrived from `node`; `None` if it was never heard
    /// (since this process started), which proves nothing.
    pub fn silent_for(&self, node: NodeId) -> Option<Duration> {
        self.peers.lock().get(&node).map(|p| p.last_heard.elapsed())
    }

    /// Peers currently considered down.
    pub fn down(&self) -> usize {
        self.peers.lock().values().filter(|p| !p.up).count()
    }
}

impl Default for NodeLiveness {
    fn default() -> Self {
        Self::new()
    }
}

/// A heartbeat to every peer node (on the ticker thread, three times per
/// silence that counts as down).
pub fn send_heartbeats(
    node_id: NodeId,
    liveness: &NodeLiveness,
    meta: &StoreMeta,
    transport: &dyn Transport,
) {
    let incarnation = liveness.incarnation();
    for to in meta.peer_nodes(node_id) {
        transport.send(RaftMessage::node_heartbeat(node_id, to, incarnation));
    }
    transport.flush();
}

/// `Down` events held back for the replicas that need not hear at once.
pub struct Deferred {
    due: Instant,
    node: NodeId,
    shards: Vec<ShardId>,
}

/// One tick of node liveness, on the ticker thread: the peers' changes
/// (down, up, restarted) logged, counted and, with `wake_replicas`
/// (hibernation on; ticking followers notice a dead leader by themselves),
/// sent to the replicas they concern.
///
/// A `Down` reaches the followers of the leaders that lived there at once
/// and everyone else one `timeout` later (from `deferred`): those elections
/// are what clients wait for, while waking every leader with a follower
/// there (a third of a node's shards on three nodes) only makes them tick
/// and heartbeat again, and on a node with thousands of shards that work
/// would queue in front of the elections. An `Up` or `Restarted` of the
/// node before then replaces its deferred `Down`.
pub fn tick(
    node_id: NodeId,
    liveness: &NodeLiveness,
    meta: &StoreMeta,
    router: &RaftRouter,
    timeout: Duration,
    wake_replicas: bool,
    deferred: &mut Vec<Deferred>,
) {
    for (node, event) in liveness.poll(timeout) {
        let (led_there, others) = meta.shards_with_replica_on(node);
        let shards = led_there.len() + others.len();
        match event {
            PeerEvent::Down => tracing::warn!(
                node_id,
                peer = node,
                shards,
                led_there = led_there.len(),
                "peer node silent for an election timeout; waking the replicas it concerns"
            ),
            _ => tracing::info!(
                node_id,
                peer = node,
                shards,
                event = event.as_str(),
                "peer node is back"
            ),
        }
        metrics::PEER_NODE_EVENTS
            .with_label_values(&[event.as_str()])
            .inc();
        deferred.retain(|d| d.node != node);
        if !wake_replicas {
            continue;
        }
        let make = || ReplicaMsg::PeerNode { node, event };
        router.send_each(led_there, make);
        if event == PeerEvent::Down {
            deferred.push(Deferred {
                due: Instant::now() + timeout,
                node,
                shards: others,
            });
        } else {
            router.send_each(others, make);
        }
    }
    let now = Instant::now();
    for d in deferred.extract_if(.., |d| d.due <= now) {
        let node = d.node;
        router.send_each(d.shards, || ReplicaMsg::PeerNode {
            node,
            event: PeerEvent::Down,
        });
    }
    metrics::PEER_NODES_DOWN.set(liveness.down() as i64);
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(200);

    /// Polls every 10 ms (as the ticker does) for `d`, hearing from
    /// `voices` before each poll; returns the events.
    fn poll_for(l: &NodeLiveness, d: Duration, voices: &[NodeId]) -> Vec<(NodeId, PeerEvent)> {
        let end = Instant::now() + d;
        let mut events = Vec::new();
        while Instant::now() < end {
            for v in voices {
                l.heard_from(*v);
            }
            events.extend(l.poll(TIMEOUT));
            std::thread::sleep(Duration::from_millis(10));
        }
        events
    }

    #[test]
    fn silence_down_voice_up_new_incarnation_restarted() {
        let l = NodeLiveness::new();
        l.heartbeat(2, 7);
        l.heard_from(3);
        assert!(l.poll(TIMEOUT).is_empty(), "first contact is no event");
        assert!(
            poll_for(&l, TIMEOUT + TIMEOUT / 4, &[]).is_empty(),
            "all silent: this node is the suspect"
        );
        l.heard_from(3);
        assert_eq!(l.poll(TIMEOUT), vec![(2, PeerEvent::Down)]);
        assert_eq!(l.down(), 1);
        assert!(l.poll(TIMEOUT).is_empty(), "an event fires once");
        l.heartbeat(2, 7);
        assert_eq!(l.poll(TIMEOUT), vec![(2, PeerEvent::Up)]);
        l.heartbeat(2, 8);
        assert_eq!(l.poll(TIMEOUT), vec![(2, PeerEvent::Restarted)]);
        l.heartbeat(2, 8);
        assert!(l.poll(TIMEOUT).is_empty());
        assert_eq!(l.down(), 0);
    }

    #[test]
    fn a_stall_of_this_node_is_not_the_peers_silence() {
        let l = NodeLiveness::new();
        l.heartbeat(2, 7);
        l.heard_from(3);
        assert!(l.poll(TIMEOUT).is_empty());
        // This node stands still for more than a timeout (no polls), then
        // reads peer 3's buffered heartbeat first.
        std::thread::sleep(TIMEOUT + TIMEOUT / 4);
        l.heard_from(3);
        assert!(l.poll(TIMEOUT).is_empty(), "peer 2 was not silent: we were");
        let silent = l.silent_for(2).unwrap();
        assert!(silent < TIMEOUT, "the stall is forgiven: {silent:?}");
        // A peer that stays silent once this node runs again is down.
        let events = poll_for(&l, 2 * TIMEOUT, &[3]);
        assert_eq!(events, vec![(2, PeerEvent::Down)]);
    }
}

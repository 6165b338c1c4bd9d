//! Message filters for fault-injection tests.

use std::collections::HashSet;
use std::time::Duration;

use flotilla_raftstore::{NodeId, RaftMessage};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterDecision {
    Pass,
    Drop,
    Delay(Duration),
}

/// Decides the fate of each outgoing message. Filters run in order; the
/// first non-`Pass` decision wins.
pub trait Filter: Send + Sync + 'static {
    fn decide(&self, msg: &RaftMessage) -> FilterDecision;
}

impl<F> Filter for F
where
    F: Fn(&RaftMessage) -> FilterDecision + Send + Sync + 'static,
{
    fn decide(&self, msg: &RaftMessage) -> FilterDecision {
        self(msg)
    }
}

/// Drops every message between the two sides (both directions when
/// installed on every node).
pub struct PartitionFilter {
    pub side_a: HashSet<NodeId>,
    pub side_b: HashSet<NodeId>,
}

impl PartitionFilter {
    pub fn new(a: impl IntoIterator<Item = NodeId>, b: impl IntoIterator<Item = NodeId>) -> Self {
        PartitionFilter {
            side_a: a.into_iter().collect(),
            side_b: b.into_iter().collect(),
        }
    }
}

impl Filter for PartitionFilter {
    fn decide(&self, m: &RaftMessage) -> FilterDecision {
        let crosses = (self.side_a.contains(&m.from_node) && self.side_b.contains(&m.to_node))
            || (self.side_b.contains(&m.from_node) && self.side_a.contains(&m.to_node));
        if crosses {
            FilterDecision::Drop
        } else {
            FilterDecision::Pass
        }
    }
}

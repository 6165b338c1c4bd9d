//! Tuning of one batch-system (pool size and round limits).

/// Sizes of one poller pool.
#[derive(Clone, Debug)]
pub struct Config {
    /// Number of poller threads.
    pub pool_size: usize,
    /// Most FSMs handled in one poll round.
    pub max_batch_size: usize,
    /// Soft capacity of each normal FSM's mailbox, in messages: `Router::send`
    /// refuses past it.
    pub mailbox_capacity: usize,
    /// Times a poller yields its CPU between taking the first FSM of a
    /// round and taking the rest (see `batch`).
    pub round_yields: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            pool_size: 2,
            max_batch_size: 256,
            mailbox_capacity: 40960,
            round_yields: 0,
        }
    }
}

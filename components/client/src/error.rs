//! Errors a caller of the client sees.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    /// The request was refused as malformed (a limit, an empty key...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The command may have been applied or not (CompareAndSwap only).
    #[error("outcome unknown: {0}")]
    Indeterminate(String),
    /// No attempt succeeded before the deadline; `last` is the last failure.
    #[error("deadline exceeded after {attempts} attempts; last error: {last}")]
    DeadlineExceeded { attempts: u32, last: String },
    #[error("no reachable endpoint: {0}")]
    NoEndpoint(String),
    /// The node refused for lack of a resource (a full disk); retrying soon
    /// will not help.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    #[error("server error: {0}")]
    Server(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn is_indeterminate(&self) -> bool {
        matches!(self, Error::Indeterminate(_))
    }
}

//! Request validation. Every check names the field and the configuration
//! key of the limit, so a client knows what to change.

use flotilla_proto::Message;
use tonic::Status;

use crate::config::Limits;

pub fn check_request_size<M: Message>(limits: &Limits, req: &M) -> Result<(), Status> {
    let n = req.encoded_len();
    if n > limits.max_request_size_bytes {
        return Err(Status::invalid_argument(format!(
            "request is {n} bytes; the limit is limits.max-request-size-bytes = {}",
            limits.max_request_size_bytes
        )));
    }
    Ok(())
}

pub fn check_key(limits: &Limits, field: &str, key: &[u8]) -> Result<(), Status> {
    if key.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{field} must not be empty"
        )));
    }
    check_bound(limits, field, key)
}

/// A range bound may be empty (meaning the start or end of the key space).
pub fn check_bound(limits: &Limits, field: &str, key: &[u8]) -> Result<(), Status> {
    if key.len() > limits.max_key_size_bytes {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes; the limit is limits.max-key-size-bytes = {}",
            key.len(),
            limits.max_key_size_bytes
        )));
    }
    Ok(())
}

pub fn check_value(limits: &Limits, field: &str, value: &[u8]) -> Result<(), Status> {
    if value.len() > limits.max_value_size_bytes {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes; the limit is limits.max-value-size-bytes = {}",
            value.len(),
            limits.max_value_size_bytes
        )));
    }
    Ok(())
}

pub fn check_batch(limits: &Limits, field: &str, n: usize) -> Result<(), Status> {
    if n == 0 {
        return Err(Status::invalid_argument(format!(
            "{field} must not be empty"
        )));
    }
    if n > limits.max_batch_keys {
        return Err(Status::invalid_argument(format!(
            "{field} has {n} entries; the limit is limits.max-batch-keys = {}",
            limits.max_batch_keys
        )));
    }
    Ok(())
}

/// `[start, end)` with an empty end meaning +inf must not be inverted.
pub fn check_range(start: &[u8], end: &[u8]) -> Result<(), Status> {
    if !end.is_empty() && start > end {
        return Err(Status::invalid_argument(
            "start_key must not be greater than end_key (empty end_key means the end of the key space)",
        ));
    }
    Ok(())
}

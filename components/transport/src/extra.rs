//! Wire form of the messages between nodes that raft-rs does not know
//! (`flotilla_raftstore::transport::Extra`).

use flotilla_proto::raft::{ExtraMessage, ExtraType};
use flotilla_raftstore::transport::Extra;

pub fn encode(extra: Extra) -> ExtraMessage {
    match extra {
        Extra::WakeUp => ExtraMessage {
            r#type: ExtraType::WakeUp as i32,
            incarnation: 0,
        },
        Extra::NodeHeartbeat { incarnation } => ExtraMessage {
            r#type: ExtraType::NodeHeartbeat as i32,
            incarnation,
        },
    }
}

/// `Ok(None)`: no extra message (a plain raft message).
pub fn decode(m: &ExtraMessage) -> Result<Option<Extra>, String> {
    match ExtraType::try_from(m.r#type) {
        Ok(ExtraType::ExtraNone) => Ok(None),
        Ok(ExtraType::WakeUp) => Ok(Some(Extra::WakeUp)),
        Ok(ExtraType::NodeHeartbeat) => Ok(Some(Extra::NodeHeartbeat {
            incarnation: m.incarnation,
        })),
        Err(_) => Err(format!("unknown extra message type {}", m.r#type)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for x in [Extra::WakeUp, Extra::NodeHeartbeat { incarnation: 42 }] {
            assert_eq!(decode(&encode(x)), Ok(Some(x)));
        }
        assert_eq!(decode(&ExtraMessage::default()), Ok(None));
        let unknown = ExtraMessage {
            r#type: 99,
            incarnation: 0,
        };
        assert!(decode(&unknown).unwrap_err().contains("99"));
    }
}

//! Wire form of the messages between nodes that raft-rs does not know
//! (`flotilla_raftstore::transport::Extra`).

use flotilla_proto::raft::{ExtraMessage, ExtraType};
use flotilla_raftstore::transport::Extra;

pub fn encode(extra: Extra) -> ExtraMessage {
    let of = |t: ExtraType| ExtraMessage {
        r#type: t as i32,
        ..Default::default()
    };
    match extra {
        Extra::WakeUp => of(ExtraType::WakeUp),
        Extra::NodeHeartbeat { incarnation } => ExtraMessage {
            incarnation,
            ..of(ExtraType::NodeHeartbeat)
        },
        Extra::Hibernate {
            term,
            index,
            commit,
        } => ExtraMessage {
            term,
            index,
            commit,
            ..of(ExtraType::Hibernate)
        },
        Extra::HibernateAck { term } => ExtraMessage {
            term,
            ..of(ExtraType::HibernateAck)
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
        Ok(ExtraType::Hibernate) => Ok(Some(Extra::Hibernate {
            term: m.term,
            index: m.index,
            commit: m.commit,
        })),
        Ok(ExtraType::HibernateAck) => Ok(Some(Extra::HibernateAck { term: m.term })),
        Err(_) => Err(format!("unknown extra message type {}", m.r#type)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for x in [
            Extra::WakeUp,
            Extra::NodeHeartbeat { incarnation: 42 },
            Extra::Hibernate {
                term: 3,
                index: 17,
                commit: 16,
            },
            Extra::HibernateAck { term: 3 },
        ] {
            assert_eq!(decode(&encode(x)), Ok(Some(x)));
        }
        assert_eq!(decode(&ExtraMessage::default()), Ok(None));
        let unknown = ExtraMessage {
            r#type: 99,
            ..Default::default()
        };
        assert!(decode(&unknown).unwrap_err().contains("99"));
    }
}

//! Log set-up: `tracing` with an env filter (`RUST_LOG` wins over
//! `log.level`) and text or JSON output. Events of the raftstore carry
//! `shard_id` and `replica_id` fields.

use tracing_subscriber::EnvFilter;

use crate::config::LogSection;

pub fn init(cfg: &LogSection) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::new(v),
        _ => EnvFilter::new(&cfg.level),
    };
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let r = match cfg.format.as_str() {
        "json" => builder.json().try_init(),
        "text" => builder.try_init(),
        other => anyhow::bail!("log.format must be text or json, not {other:?}"),
    };
    r.map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))
}

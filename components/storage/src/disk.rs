//! Free space on the data directory's filesystem, watched by a background
//! thread, so a full disk refuses writes cleanly instead of failing a write
//! half way.
//!
//! Levels, from the bytes available to unprivileged users:
//! - `Normal`;
//! - `AlmostFull` below the reserve: client writes are refused (reads and
//!   admin work that frees space go on);
//! - `Full` below half the reserve: replicas also stop accepting new log
//!   entries from leaders (the other replicas keep the shard going).
//!
//! Writes resume by themselves once space is freed.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DiskLevel {
    Normal = 0,
    AlmostFull = 1,
    Full = 2,
}

/// The latest reading, shared by everything that refuses work on a full
/// disk. Cheap to read on hot paths.
#[derive(Default)]
pub struct DiskStatus {
    level: AtomicU8,
    available: AtomicU64,
    reserve: AtomicU64,
}

impl DiskStatus {
    pub fn level(&self) -> DiskLevel {
        match self.level.load(Ordering::Relaxed) {
            0 => DiskLevel::Normal,
            1 => DiskLevel::AlmostFull,
            _ => DiskLevel::Full,
        }
    }

    pub fn available(&self) -> u64 {
        self.available.load(Ordering::Relaxed)
    }

    pub fn reserve(&self) -> u64 {
        self.reserve.load(Ordering::Relaxed)
    }

    /// Records a reading of `available` bytes against `reserve`.
    pub fn update(&self, available: u64, reserve: u64) -> DiskLevel {
        let level = if available < reserve / 2 {
            DiskLevel::Full
        } else if available < reserve {
            DiskLevel::AlmostFull
        } else {
            DiskLevel::Normal
        };
        self.available.store(available, Ordering::Relaxed);
        self.reserve.store(reserve, Ordering::Relaxed);
        self.level.store(level as u8, Ordering::Relaxed);
        crate::metrics::DISK_AVAILABLE.set(available as i64);
        crate::metrics::DISK_RESERVE.set(reserve as i64);
        crate::metrics::DISK_LEVEL.set(level as i64);
        level
    }

    /// Why writes are refused, or None when they are not.
    pub fn refusal(&self) -> Option<String> {
        (self.level() >= DiskLevel::AlmostFull).then(|| {
            format!(
                "the disk is almost full: {} bytes free, below server.reserve-space-bytes = {}; writes resume once space is freed",
                self.available(),
                self.reserve()
            )
        })
    }
}

/// Bytes available to unprivileged users on the filesystem of `path`.
pub fn available_bytes(path: &Path) -> std::io::Result<u64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out
    // pointer for the duration of the call.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Polls free space until dropped.
pub struct DiskMonitor {
    /// Dropping it wakes the thread to exit.
    stop: Option<std::sync::mpsc::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl DiskMonitor {
    pub fn start(dir: PathBuf, reserve: u64, interval: Duration, status: Arc<DiskStatus>) -> Self {
        if let Ok(a) = available_bytes(&dir) {
            status.update(a, reserve);
        }
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name("disk-monitor".into())
            .spawn(move || {
                let mut last = status.level();
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(interval) {
                    match available_bytes(&dir) {
                        Ok(a) => {
                            let level = status.update(a, reserve);
                            if level != last {
                                if level == DiskLevel::Normal {
                                    tracing::info!(available = a, reserve, "disk space recovered; writes resume");
                                } else {
                                    tracing::warn!(available = a, reserve, ?level, "disk almost full; refusing writes");
                                }
                                last = level;
                            }
                        }
                        Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot read free disk space"),
                    }
                }
            })
            .expect("spawn disk monitor");
        DiskMonitor {
            stop: Some(tx),
            handle: Some(handle),
        }
    }
}

impl Drop for DiskMonitor {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_follow_the_reserve() {
        let s = DiskStatus::default();
        assert_eq!(s.update(100, 50), DiskLevel::Normal);
        assert!(s.refusal().is_none());
        assert_eq!(s.update(40, 50), DiskLevel::AlmostFull);
        assert!(s
            .refusal()
            .unwrap()
            .contains("server.reserve-space-bytes = 50"));
        assert_eq!(s.update(10, 50), DiskLevel::Full);
        assert!(available_bytes(Path::new("/")).unwrap() > 0);
    }
}

//! A network the test controls between real server processes on loopback,
//! without privileges: every ordered pair of nodes (from, to) gets its own
//! TCP proxy, and node `from` is told (through its `--initial-cluster`) that
//! node `to` lives at that proxy. Node `from`'s connections to `to` carry
//! `from`'s Raft messages and snapshots to `to` (and the client requests it
//! forwards there), so blocking one proxy cuts one direction of one link:
//! partitions, isolated nodes and one-way links are sets of blocked proxies.
//!
//! A blocked link is a black hole, like a firewall dropping packets: bytes
//! stop flowing both ways on its open connections and new connections hang
//! unanswered; nothing is closed. When the link heals those connections
//! are closed (the nodes reconnect) and new ones flow again.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// (from, to) node ids.
pub type LinkId = (u64, u64);

pub struct Net {
    blocked: Mutex<HashSet<LinkId>>,
    /// Bumped on every change, so proxies re-check their link.
    version: watch::Sender<u64>,
}

impl Net {
    pub fn new() -> Arc<Net> {
        Arc::new(Net {
            blocked: Mutex::default(),
            version: watch::channel(0).0,
        })
    }

    /// Starts the proxy of link (from, to) forwarding to `target`; returns
    /// its address. Must run inside a tokio runtime.
    pub fn proxy(self: &Arc<Self>, link: LinkId, target: String) -> String {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = std_listener.local_addr().unwrap().to_string();
        std_listener.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(std_listener).unwrap();
        let net = self.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(net.clone().serve(link, conn, target.clone()));
            }
        });
        addr
    }

    fn is_blocked(&self, link: LinkId) -> bool {
        self.blocked.lock().unwrap().contains(&link)
    }

    /// Waits until the link's state is `blocked`.
    async fn wait_state(&self, link: LinkId, blocked: bool) {
        let mut rx = self.version.subscribe();
        while self.is_blocked(link) != blocked {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    async fn serve(self: Arc<Self>, link: LinkId, mut conn: TcpStream, target: String) {
        // A connection made while the link is cut hangs until it heals, and
        // is then closed: the node connects again.
        if self.is_blocked(link) {
            self.wait_state(link, false).await;
            return;
        }
        let Ok(mut up) = TcpStream::connect(&target).await else {
            return;
        };
        let _ = up.set_nodelay(true);
        let _ = conn.set_nodelay(true);
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut conn, &mut up) => {}
            _ = self.wait_state(link, true) => {
                // Black hole: keep both ends open, move nothing, until healed.
                self.wait_state(link, false).await;
            }
        }
        let _ = conn.shutdown().await;
        let _ = up.shutdown().await;
    }

    fn set(&self, links: impl IntoIterator<Item = LinkId>, blocked: bool) {
        {
            let mut b = self.blocked.lock().unwrap();
            for l in links {
                if blocked {
                    b.insert(l);
                } else {
                    b.remove(&l);
                }
            }
        }
        self.version.send_modify(|v| *v += 1);
    }

    /// Cuts the given directions.
    pub fn block(&self, links: impl IntoIterator<Item = LinkId>) {
        self.set(links, true);
    }

    /// Cuts every link between the two sides, both ways.
    pub fn partition(&self, a: &[u64], b: &[u64]) {
        let mut links = Vec::new();
        for &x in a {
            for &y in b {
                links.push((x, y));
                links.push((y, x));
            }
        }
        self.block(links);
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.blocked.lock().unwrap().clear();
        self.version.send_modify(|v| *v += 1);
    }
}

//! Who may hold a listener's connections: loopback peers have connections of their own
//! that remote peers cannot take, and one remote peer (an IP address) holds at most so
//! many of the rest.
//!
//! The proxy beside keyward and the probes of a sidecar reach it over loopback; anyone
//! on the pod network reaches a data plane that listens on the pod's address. Without
//! this, one peer that opened a few thousand connections and never finished their
//! headers held every connection for the header bound, again as it reconnected, and the
//! proxy and the probes waited in the listen queue behind it.
//!
//! A listener takes a slot ([`Gate::slot`]) before it accepts: with all its connections
//! (remote and loopback) in use, the next one waits in the kernel's listen queue, as
//! before. The peer is known only once the connection is accepted, so a remote
//! connection over the remote budget or over its peer's cap is closed at once,
//! unanswered ([`Gate::admit`]): left in the queue, it would keep every loopback
//! connection behind it waiting too. Closed rather than answered 503: an answer would
//! mean reading the request first, the work (a buffer, the header bound) the cap is
//! there to refuse; the client sees a closed connection and retries, or goes to another
//! replica, as it would for a replica that is restarting.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::Bounds;

/// Why a connection was closed unanswered (the `reason` of
/// `keyward_connections_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Its peer held as many connections as one peer may.
    PeerCap,
    /// Every connection the listener serves for remote peers was in use.
    RemoteCap,
}

impl Refusal {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Refusal::PeerCap => "peer_cap",
            Refusal::RemoteCap => "remote_cap",
        }
    }
}

/// Whether `peer` is this host: 127.0.0.0/8, `::1`, or an IPv4-mapped loopback address.
fn is_loopback(peer: IpAddr) -> bool {
    peer.to_canonical().is_loopback()
}

/// One listener's connections: how many it serves, how many of them remote peers may
/// hold, and how many one remote peer may.
pub(super) struct Gate {
    /// Every connection the listener serves at once, loopback's included.
    all: Arc<Semaphore>,
    /// The part of `all` that remote peers may hold.
    remote: Arc<Semaphore>,
    /// Remote connections by peer, when the listener caps them.
    peers: Option<Peers>,
}

/// What a connection the gate let in holds until it closes.
pub(super) struct Held {
    _slot: OwnedSemaphorePermit,
    _remote: Option<OwnedSemaphorePermit>,
    _peer: Option<PeerSlot>,
}

impl Gate {
    /// The gate of a listener with these bounds; `per_peer`: at most that many of its
    /// remote connections from one IP address (`None`: no cap of its own).
    pub(super) fn new(bounds: &Bounds, per_peer: Option<usize>) -> Gate {
        Gate {
            all: Arc::new(Semaphore::new(bounds.remote + bounds.loopback)),
            remote: Arc::new(Semaphore::new(bounds.remote)),
            peers: per_peer.map(|cap| Peers {
                cap: u32::try_from(cap).unwrap_or(u32::MAX),
                open: Arc::default(),
            }),
        }
    }

    /// A slot of the listener, to take before accepting: while every one is in use, this
    /// waits (and the next connection in the listen queue). `None` once closed.
    pub(super) async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        self.all.clone().acquire_owned().await.ok()
    }

    /// Lets the connection accepted with `slot` from `peer` in, or says why not (the
    /// slot is then free again). Loopback peers need nothing more than the slot.
    pub(super) fn admit(&self, slot: OwnedSemaphorePermit, peer: IpAddr) -> Result<Held, Refusal> {
        if is_loopback(peer) {
            return Ok(Held {
                _slot: slot,
                _remote: None,
                _peer: None,
            });
        }
        // The listener's bound first: a peer whose cap is all of them (no cap of its
        // own) is refused for that.
        let remote = self
            .remote
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::RemoteCap)?;
        // One peer whether it connects over IPv4 or IPv4-mapped IPv6.
        let peer = peer.to_canonical();
        let peer_slot = match &self.peers {
            Some(peers) => Some(peers.take(peer).ok_or(Refusal::PeerCap)?),
            None => None,
        };
        Ok(Held {
            _slot: slot,
            _remote: Some(remote),
            _peer: peer_slot,
        })
    }
}

/// Open connections by remote peer. An entry exists only while its count is above 0, so
/// the map holds at most one entry per open connection.
struct Peers {
    cap: u32,
    open: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl Peers {
    /// One more connection of `peer`, or `None` when it holds the cap.
    fn take(&self, peer: IpAddr) -> Option<PeerSlot> {
        // A panic cannot leave the map half-updated (each change is one statement).
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let held = open.get(&peer).copied().unwrap_or(0);
        if held >= self.cap {
            return None;
        }
        open.insert(peer, held + 1);
        Some(PeerSlot {
            open: self.open.clone(),
            peer,
        })
    }
}

/// One connection of a peer: counted until dropped.
struct PeerSlot {
    open: Arc<Mutex<HashMap<IpAddr, u32>>>,
    peer: IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Entry::Occupied(mut held) = open.entry(self.peer) {
            *held.get_mut() -= 1;
            if *held.get() == 0 {
                held.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn bounds(remote: usize, loopback: usize) -> Bounds {
        Bounds {
            headers: Duration::from_secs(1),
            request: Duration::from_secs(1),
            remote,
            loopback,
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// Takes a slot and asks the gate, as the accept loop does.
    async fn let_in(gate: &Gate, peer: &str) -> Result<Held, Refusal> {
        let slot = gate.slot().await.unwrap();
        gate.admit(slot, ip(peer))
    }

    /// The setting is declared in `config`, which cannot see these bounds.
    #[test]
    fn the_per_peer_setting_says_the_data_planes_bounds() {
        use crate::config::{declared, Kind};
        let setting = declared::MAX_CONNECTIONS_PER_PEER;
        let Kind::Whole { max, .. } = setting.kind else {
            panic!("not a whole number: {setting:?}");
        };
        assert_eq!(max, Bounds::DATA.remote as u64);
        assert!(setting
            .help
            .contains(&format!("of its {} for", Bounds::DATA.remote)));
        assert!(setting
            .help
            .contains(&format!("have {} more", Bounds::DATA.loopback)));
    }

    #[test]
    fn loopback_is_every_form_of_this_host() {
        for peer in ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"] {
            assert!(is_loopback(ip(peer)), "{peer}");
        }
        for peer in ["10.0.0.1", "192.0.2.2", "::ffff:10.0.0.1", "fe80::1", "::"] {
            assert!(!is_loopback(ip(peer)), "{peer}");
        }
    }

    #[tokio::test]
    async fn a_peer_holds_at_most_its_cap_and_its_entry_goes_with_its_last_connection() {
        let gate = Gate::new(&bounds(10, 2), Some(2));
        let first = let_in(&gate, "10.0.0.1").await.unwrap();
        let second = let_in(&gate, "10.0.0.1").await.unwrap();
        assert_eq!(
            let_in(&gate, "10.0.0.1").await.err(),
            Some(Refusal::PeerCap)
        );
        // The same peer over IPv6 (IPv4-mapped) is the same peer.
        assert_eq!(
            let_in(&gate, "::ffff:10.0.0.1").await.err(),
            Some(Refusal::PeerCap)
        );
        let other = let_in(&gate, "10.0.0.2").await.unwrap();
        drop(first);
        let third = let_in(&gate, "10.0.0.1").await.unwrap();
        let peers = gate.peers.as_ref().unwrap();
        assert_eq!(peers.open.lock().unwrap().len(), 2);
        drop((second, third, other));
        assert!(peers.open.lock().unwrap().is_empty());
        // Refused ones gave their slots back.
        assert_eq!(gate.all.available_permits(), 12);
        assert_eq!(gate.remote.available_permits(), 10);
    }

    #[tokio::test]
    async fn remote_peers_cannot_take_loopbacks_connections() {
        let gate = Gate::new(&bounds(3, 2), None);
        let mut held = Vec::new();
        for peer in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
            held.push(let_in(&gate, peer).await.unwrap());
        }
        assert_eq!(
            let_in(&gate, "10.0.0.4").await.err(),
            Some(Refusal::RemoteCap)
        );
        assert_eq!(gate.all.available_permits(), 2);
        // Loopback's two, then the listen queue.
        held.push(let_in(&gate, "127.0.0.1").await.unwrap());
        held.push(let_in(&gate, "::1").await.unwrap());
        assert!(gate.all.clone().try_acquire_owned().is_err());
        drop(held);
        assert_eq!(gate.all.available_permits(), 5);
    }
}

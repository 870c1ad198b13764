//! Whom this daemon's peer links are with: the hosts listed in its
//! configuration (`[[peers]]`), each by address and public key, and this
//! host's own identity.
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{Identity, PeerError, PublicKey};

/// A host this daemon links with: one `[[peers]]` entry.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// A name for logs and errors.
    pub name: String,
    /// Its daemon's `peer_listen` address: where migrations to it go.
    pub address: SocketAddr,
    /// Its public key (`dataplane keygen` on that host prints it). Required
    /// unless `peer_insecure`.
    #[serde(default)]
    pub key: Option<PublicKey>,
}

/// Whom peer links are with and how they are kept.
#[derive(Clone, Debug)]
pub struct Trust {
    /// This host's key; none: links cross in clear and anyone is admitted
    /// (`peer_insecure`).
    identity: Option<Identity>,
    peers: Vec<Peer>,
}

impl Trust {
    /// Sealed links with `identity`, admitting the `peers` by their keys.
    pub fn sealed(identity: Identity, peers: Vec<Peer>) -> Self {
        Self {
            identity: Some(identity),
            peers,
        }
    }

    /// Links in clear that admit anyone who connects; migrations still go
    /// only to listed `peers`.
    pub fn insecure(peers: Vec<Peer>) -> Self {
        Self {
            identity: None,
            peers,
        }
    }

    /// This host's identity, if links are sealed.
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    /// The listed peer at `address`: the only hosts this one connects to.
    pub fn peer(&self, address: SocketAddr) -> Result<&Peer, PeerError> {
        self.peers
            .iter()
            .find(|p| p.address == address)
            .ok_or(PeerError::NotListed(address))
    }

    /// The listed peer whose key a connecting host proved it holds.
    pub(super) fn admit(&self, key: PublicKey) -> Option<&Peer> {
        self.peers.iter().find(|p| p.key == Some(key))
    }
}

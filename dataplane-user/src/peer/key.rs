//! The peer link's shared key and the handshake's proofs: HMAC-SHA256 over
//! a role label and both ends' fresh nonces.
use serde::{Deserialize, Serialize};

use super::PeerError;

/// Bytes of a handshake nonce.
pub(super) const NONCE_BYTES: usize = 32;

/// A fresh random nonce.
pub(super) fn random_nonce() -> Result<[u8; NONCE_BYTES], PeerError> {
    let mut nonce = [0; NONCE_BYTES];
    getrandom::fill(&mut nonce).map_err(|e| PeerError::Io(e.into()))?;
    Ok(nonce)
}

/// Which end of the link a proof speaks for: each signs its own label, so
/// neither's proof can be replayed as the other's.
#[derive(Clone, Copy)]
pub(super) enum Role {
    Listener,
    Connector,
}

/// The secret both daemons of a peer link share (`peer_key`): at least 16
/// bytes, written as hex. Its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerKey(Vec<u8>);

impl PeerKey {
    /// Fewest bytes a key may have (32 hex digits); 32 bytes are recommended.
    pub const MIN_BYTES: usize = 16;
    /// Most bytes a key may have.
    pub const MAX_BYTES: usize = 1024;

    /// A key from hex digits (whitespace around them is ignored).
    pub fn from_hex(text: &str) -> Result<Self, String> {
        let bytes = hex::decode(text.trim()).map_err(|_| {
            "peer_key is not hex: write it as hex digits, e.g. the output of `openssl rand -hex 32`"
                .to_string()
        })?;
        if !(Self::MIN_BYTES..=Self::MAX_BYTES).contains(&bytes.len()) {
            return Err(format!(
                "peer_key has {} bytes; it needs {} to {} (`openssl rand -hex 32` makes one)",
                bytes.len(),
                Self::MIN_BYTES,
                Self::MAX_BYTES
            ));
        }
        Ok(Self(bytes))
    }

    fn mac(&self, role: Role, connector: &[u8], listener: &[u8]) -> hmac::Hmac<sha2::Sha256> {
        use hmac::{KeyInit, Mac};
        let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&self.0)
            .expect("HMAC takes keys of any length");
        mac.update(match role {
            Role::Listener => b"dataplane-peer v1 listener",
            Role::Connector => b"dataplane-peer v1 connector",
        });
        mac.update(connector);
        mac.update(listener);
        mac
    }

    /// HMAC-SHA256 over `role`'s label, the connector's nonce and the listener's.
    pub(super) fn prove(&self, role: Role, connector: &[u8], listener: &[u8]) -> Vec<u8> {
        use hmac::Mac;
        self.mac(role, connector, listener)
            .finalize()
            .into_bytes()
            .to_vec()
    }

    /// Checks a proof in constant time.
    pub(super) fn verify(
        &self,
        role: Role,
        connector: &[u8],
        listener: &[u8],
        proof: &[u8],
    ) -> bool {
        use hmac::Mac;
        self.mac(role, connector, listener)
            .verify_slice(proof)
            .is_ok()
    }
}

impl std::fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerKey(..)")
    }
}

impl Serialize for PeerKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&hex::encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for PeerKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::from_hex(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_hex_of_16_bytes_or_more_and_never_shown() {
        let key = PeerKey::from_hex(&"ab".repeat(32)).unwrap();
        assert_eq!(format!("{key:?}"), "PeerKey(..)");
        assert!(PeerKey::from_hex(&"ab".repeat(15)).is_err(), "too short");
        assert!(PeerKey::from_hex(&"zz".repeat(32)).is_err(), "not hex");
        assert!(PeerKey::from_hex(&"+a".repeat(32)).is_err(), "not hex");
        assert!(PeerKey::from_hex("abc").is_err(), "odd length");
    }

    #[test]
    fn proofs_bind_the_role_the_nonces_and_the_key() {
        let key = PeerKey::from_hex(&"11".repeat(32)).unwrap();
        let other = PeerKey::from_hex(&"22".repeat(32)).unwrap();
        let (a, b) = ([1u8; NONCE_BYTES], [2u8; NONCE_BYTES]);
        let proof = key.prove(Role::Listener, &a, &b);
        assert!(key.verify(Role::Listener, &a, &b, &proof));
        assert!(
            !key.verify(Role::Connector, &a, &b, &proof),
            "not as the other end's"
        );
        assert!(
            !key.verify(Role::Listener, &b, &a, &proof),
            "not for other nonces"
        );
        assert!(
            !other.verify(Role::Listener, &a, &b, &proof),
            "not under another key"
        );
        assert!(
            !key.verify(Role::Listener, &a, &b, &proof[..16]),
            "not truncated"
        );
        assert_ne!(random_nonce().unwrap(), random_nonce().unwrap());
    }
}

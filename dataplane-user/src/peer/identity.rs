//! A host's identity on the peer link: an X25519 key pair (the Noise
//! static key). The private key lives in a file only root reads; the public
//! key is what other hosts list under `[[peer]]`.
use std::{
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use snow::{params::DHChoice, resolvers::CryptoResolver};

/// Bytes of an X25519 key, private or public.
const KEY_BYTES: usize = 32;

/// This host's key pair. Its `Debug` shows the public key only.
#[derive(Clone)]
pub struct Identity {
    private: [u8; KEY_BYTES],
    public: PublicKey,
}

impl Identity {
    /// A fresh random key pair.
    pub fn generate() -> Result<Self, IdentityError> {
        let mut private = [0; KEY_BYTES];
        getrandom::fill(&mut private).map_err(|e| IdentityError::Random(e.to_string()))?;
        Ok(Self::from_private(private))
    }

    /// The key pair whose private half is `private`.
    fn from_private(private: [u8; KEY_BYTES]) -> Self {
        let mut dh = snow::resolvers::DefaultResolver
            .resolve_dh(&DHChoice::Curve25519)
            .expect("snow's default resolver has X25519");
        dh.set(&private);
        let public = PublicKey(dh.pubkey().try_into().expect("X25519 keys are 32 bytes"));
        Self { private, public }
    }

    /// The identity in the file at `path` (the private key in hex), made
    /// first, mode 0600, if there is none; whether it was made. A file that
    /// others may read is refused: whoever reads it is this host to its peers.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), IdentityError> {
        let error = |source| IdentityError::File {
            path: path.to_owned(),
            source,
        };
        match std::fs::metadata(path) {
            Ok(metadata) => {
                let mode = metadata.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(IdentityError::Readable {
                        path: path.to_owned(),
                        mode,
                    });
                }
                let text = std::fs::read_to_string(path).map_err(error)?;
                let private = decode_key(text.trim()).ok_or_else(|| IdentityError::Malformed {
                    path: path.to_owned(),
                })?;
                Ok((Self::from_private(private), false))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let identity = Self::generate()?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(error)?;
                }
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(error)?;
                writeln!(file, "{}", hex::encode(identity.private)).map_err(error)?;
                file.sync_all().map_err(error)?;
                Ok((identity, true))
            }
            Err(e) => Err(error(e)),
        }
    }

    /// The public key, which peers list.
    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// The private key, for the Noise handshake.
    pub(super) fn private(&self) -> &[u8] {
        &self.private
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.public)
    }
}

/// A host's public key: 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; KEY_BYTES]);

impl PublicKey {
    /// The key a Noise handshake presented, if it is one.
    pub(super) fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }
}

impl std::str::FromStr for PublicKey {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        decode_key(text.trim()).map(Self).ok_or_else(|| {
            format!(
                "{text:?} is not a public key: 64 hex digits, as `dataplane keygen` prints them"
            )
        })
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

fn decode_key(text: &str) -> Option<[u8; KEY_BYTES]> {
    hex::decode(text).ok()?.try_into().ok()
}

/// An identity file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("identity key {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "identity key {path} may be read by others (mode {mode:o}): chmod 600 it, \
         and make a new one (`dataplane keygen`) if anyone else read it"
    )]
    Readable { path: PathBuf, mode: u32 },
    #[error("identity key {path} is not 64 hex digits (a private key `dataplane keygen` made)")]
    Malformed { path: PathBuf },
    #[error("no random bytes for a key: {0}")]
    Random(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_is_made_once_kept_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/identity.key");
        let (made, created) = Identity::load_or_create(&path).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (read, created) = Identity::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(read.public(), made.public());
        assert!(!format!("{read:?}").contains(&hex::encode(read.private)));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let readable = Identity::load_or_create(&path).unwrap_err().to_string();
        assert!(readable.contains("chmod 600"), "{readable}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "not a key\n").unwrap();
        assert!(matches!(
            Identity::load_or_create(&path),
            Err(IdentityError::Malformed { .. })
        ));
    }

    #[test]
    fn public_keys_are_64_hex_digits() {
        let key = Identity::generate().unwrap().public();
        assert_eq!(key.to_string().parse::<PublicKey>(), Ok(key));
        assert_ne!(key, Identity::generate().unwrap().public());
        for bad in ["", "ab", &"zz".repeat(32), &"ab".repeat(33)] {
            assert!(bad.parse::<PublicKey>().is_err(), "{bad:?}");
        }
    }
}

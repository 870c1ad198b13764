//! The peer link between two hosts' daemons: TCP, a versioned handshake,
//! then length-prefixed frames.
//!
//! A frame is `u32` big-endian length (of what follows), one type byte, and
//! the payload. The first frame each way is the handshake: `HELLO` from the
//! connecting daemon, `WELCOME` or `REFUSE` back, each with a JSON payload.
//! A peer that speaks another version, or anything that is not a hello, is
//! refused with a `REFUSE` frame saying why, logged, and disconnected.
//!
//! With a shared [`PeerKey`] (`peer_key` in both daemons' configuration) the
//! handshake authenticates both ends: the hello carries the connector's
//! fresh nonce, the welcome the listener's nonce and its HMAC-SHA256 proof
//! over both, and the connector answers with `AUTH`, its own proof, before
//! the listener acts on anything (`AUTH_OK`). A peer that fails, or does
//! not authenticate, is refused, logged with its address and disconnected.
use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// The peer-link protocol version this build speaks.
pub const VERSION: u32 = 3;
/// Marks a hello as ours.
pub const MAGIC: &str = "dataplane-peer";
/// Largest frame accepted after the handshake (checkpoint images come in chunks).
pub const MAX_FRAME: u32 = 16 << 20;
/// Largest handshake frame: a hello is small, and a stranger gets no more.
pub const MAX_HELLO: u32 = 4096;

mod key;
mod link;
pub mod transfer;

pub use key::PeerKey;
use key::{NONCE_BYTES, Role, random_nonce};
pub use link::Link;

/// Frame types.
pub mod frame {
    pub const HELLO: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const REFUSE: u8 = 3;
    pub const PING: u8 = 4;
    pub const PONG: u8 = 5;
    /// Starts a checkpoint image transfer: JSON `{"migration": ID}`.
    pub const IMAGES: u8 = 6;
    /// One image file follows: JSON `{"name", "size"}`, then DATA frames, then FILE_END.
    pub const FILE: u8 = 7;
    /// A chunk of the current file.
    pub const DATA: u8 = 8;
    /// The transfer is complete.
    pub const IMAGES_END: u8 = 9;
    /// The receiver has every file, checksums verified: JSON `{"files", "bytes"}`.
    pub const IMAGES_OK: u8 = 10;
    // 11 to 13 were a replay over the link, retired (docs/api.md).
    /// One step of a migration, source to destination: JSON [`crate::migration::protocol::Step`].
    pub const MIGRATE: u8 = 14;
    /// The destination's answer to a step: JSON `{"ok": VALUE}` or `{"error": TEXT}`.
    pub const MIGRATED: u8 = 15;
    /// The connector's proof, after a WELCOME with the listener's: JSON `{"proof": HEX}`.
    pub const AUTH: u8 = 16;
    /// The listener accepted the connector's proof: the link is up.
    pub const AUTH_OK: u8 = 17;
    /// The current file's last DATA frame went: JSON `{"sha256": HEX}` of its bytes.
    pub const FILE_END: u8 = 18;
}

/// The handshake payload, both ways.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    pub magic: String,
    pub version: u32,
    /// The sending host's name, for logs.
    pub host: String,
    /// With a [`PeerKey`]: the sender's fresh random nonce, 32 bytes in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// In a WELCOME with a [`PeerKey`]: the listener's proof, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<String>,
}

impl Hello {
    /// This daemon's hello.
    pub fn ours() -> Self {
        Self {
            magic: MAGIC.into(),
            version: VERSION,
            host: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            nonce: None,
            proof: None,
        }
    }
}

/// Errors of the peer link.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer link I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes is over the limit of {1}")]
    TooLong(u32, u32),
    #[error("the peer refused: {0}")]
    Refused(String),
    /// The peer ran a migration step and it failed there (the caller
    /// names the peer).
    #[error("{0}")]
    StepFailed(String),
    #[error("not a dataplane peer: {0}")]
    Garbage(String),
    #[error("peer speaks version {0}, this daemon speaks {VERSION}")]
    Version(u32),
    #[error("checkpoint images: {0}")]
    Images(String),
    #[error("authentication failed: {0}")]
    Auth(String),
}

/// Writes one frame.
pub async fn write_frame<S: AsyncWrite + Unpin>(
    stream: &mut S,
    kind: u8,
    payload: &[u8],
) -> Result<(), PeerError> {
    let len =
        u32::try_from(payload.len() + 1).map_err(|_| PeerError::TooLong(u32::MAX, MAX_FRAME))?;
    if len > MAX_FRAME {
        return Err(PeerError::TooLong(len, MAX_FRAME));
    }
    let mut buf = Vec::with_capacity(5 + payload.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.push(kind);
    buf.extend_from_slice(payload);
    stream.write_all(&buf).await?;
    Ok(())
}

/// Reads one frame of at most `limit` bytes: (type, payload).
pub async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: u32,
) -> Result<(u8, Vec<u8>), PeerError> {
    let len = stream.read_u32().await?;
    if len == 0 || len > limit {
        return Err(PeerError::TooLong(len, limit));
    }
    let kind = stream.read_u8().await?;
    let mut payload = vec![0; len as usize - 1];
    stream.read_exact(&mut payload).await?;
    Ok((kind, payload))
}

/// How long connecting and the handshake may take.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long the listener waits for a connecting daemon's hello and proof.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes the listener runs at once; further connections are closed.
pub const MAX_HANDSHAKES: usize = 32;

/// The key [`connect`] authenticates with: the daemon's `peer_key`.
static OUR_KEY: OnceLock<PeerKey> = OnceLock::new();

/// Sets the key [`connect`] authenticates with (the daemon does, from its
/// `peer_key`, at start); only the first call counts.
pub fn set_key(key: PeerKey) {
    let _ = OUR_KEY.set(key);
}

/// Connects to the peer daemon at `address` and completes the handshake,
/// within [`CONNECT_TIMEOUT`], authenticating with the key [`set_key`] set
/// (none: an unauthenticated link).
pub async fn connect(address: SocketAddr) -> Result<(Link, Hello), PeerError> {
    connect_with(address, OUR_KEY.get()).await
}

/// [`connect`] with `key` (or none).
pub async fn connect_with(
    address: SocketAddr,
    key: Option<&PeerKey>,
) -> Result<(Link, Hello), PeerError> {
    tokio::time::timeout(CONNECT_TIMEOUT, handshake(address, key))
        .await
        .map_err(|_| PeerError::Io(std::io::ErrorKind::TimedOut.into()))?
}

async fn handshake(address: SocketAddr, key: Option<&PeerKey>) -> Result<(Link, Hello), PeerError> {
    let mut stream = TcpStream::connect(address).await?;
    tune(&stream)?;
    let nonce = key.map(|_| random_nonce()).transpose()?;
    let hello = Hello {
        nonce: nonce.as_ref().map(hex::encode),
        ..Hello::ours()
    };
    let hello = serde_json::to_vec(&hello).expect("a hello serializes");
    write_frame(&mut stream, frame::HELLO, &hello).await?;
    let theirs = match read_frame(&mut stream, MAX_HELLO).await? {
        (frame::WELCOME, payload) => serde_json::from_slice::<Hello>(&payload)
            .map_err(|e| PeerError::Garbage(format!("welcome: {e}")))?,
        (frame::REFUSE, reason) => {
            return Err(PeerError::Refused(
                String::from_utf8_lossy(&reason).into_owned(),
            ));
        }
        (other, _) => {
            return Err(PeerError::Garbage(format!(
                "frame type {other} instead of a welcome"
            )));
        }
    };
    let (Some(key), Some(ours)) = (key, nonce) else {
        return Ok((Link::plain(stream), theirs));
    };
    let theirs_nonce = theirs.nonce.as_deref().and_then(|h| hex::decode(h).ok());
    let proof = theirs.proof.as_deref().and_then(|h| hex::decode(h).ok());
    let failure = match (theirs_nonce, proof) {
        (Some(nonce), Some(proof)) if nonce.len() == NONCE_BYTES => {
            if key.verify(Role::Listener, &ours, &nonce, &proof) {
                let proof = key.prove(Role::Connector, &ours, &nonce);
                let auth = serde_json::json!({ "proof": hex::encode(&proof) });
                write_frame(&mut stream, frame::AUTH, auth.to_string().as_bytes()).await?;
                return match read_frame(&mut stream, MAX_HELLO).await? {
                    (frame::AUTH_OK, _) => Ok((Link::plain(stream), theirs)),
                    (frame::REFUSE, reason) => Err(PeerError::Refused(
                        String::from_utf8_lossy(&reason).into_owned(),
                    )),
                    (other, _) => Err(PeerError::Garbage(format!(
                        "frame type {other} instead of accepting our proof"
                    ))),
                };
            }
            "the listener's proof does not match this daemon's peer_key: \
             the two daemons' peer_key differ"
        }
        _ => {
            "the listener did not authenticate (it has no peer_key?): \
             configure the same peer_key on both daemons"
        }
    };
    // Tell the listener why, so that its log says so too.
    let reason = PeerError::Auth(failure.into());
    let _ = write_frame(&mut stream, frame::REFUSE, reason.to_string().as_bytes()).await;
    Err(reason)
}

/// Round trip of one PING on an established link.
pub async fn ping(link: &mut Link) -> Result<std::time::Duration, PeerError> {
    let start = Instant::now();
    link.send(frame::PING, &[]).await?;
    match link.recv(MAX_FRAME).await? {
        (frame::PONG, _) => Ok(start.elapsed()),
        (other, _) => Err(PeerError::Garbage(format!(
            "frame type {other} instead of a pong"
        ))),
    }
}

/// Checks a hello; the reason for refusing it otherwise.
pub fn check_hello(kind: u8, payload: &[u8]) -> Result<Hello, PeerError> {
    if kind != frame::HELLO {
        return Err(PeerError::Garbage(format!(
            "frame type {kind} before a hello"
        )));
    }
    let hello: Hello =
        serde_json::from_slice(payload).map_err(|e| PeerError::Garbage(format!("hello: {e}")))?;
    if hello.magic != MAGIC {
        return Err(PeerError::Garbage(format!("magic {:?}", hello.magic)));
    }
    if hello.version != VERSION {
        return Err(PeerError::Version(hello.version));
    }
    Ok(hello)
}

/// Asks the destination for one migration step; its answer.
pub async fn migrate_step(
    link: &mut Link,
    step: &impl Serialize,
) -> Result<serde_json::Value, PeerError> {
    let request = serde_json::to_vec(step).expect("a step serializes");
    link.send(frame::MIGRATE, &request).await?;
    match link.recv(MAX_FRAME).await? {
        (frame::MIGRATED, payload) => migration_answer(&payload),
        (frame::REFUSE, reason) => Err(PeerError::Refused(
            String::from_utf8_lossy(&reason).into_owned(),
        )),
        (other, _) => Err(PeerError::Garbage(format!(
            "frame type {other} instead of a migration answer"
        ))),
    }
}

/// The destination's answer to a step, from a `MIGRATED` frame's payload.
pub fn migration_answer(payload: &[u8]) -> Result<serde_json::Value, PeerError> {
    let mut answer: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(payload)
        .map_err(|e| PeerError::Garbage(format!("migration answer: {e}")))?;
    match (answer.remove("ok"), answer.remove("error")) {
        (Some(ok), None) => Ok(ok),
        (None, Some(error)) => Err(PeerError::StepFailed(
            error.as_str().unwrap_or_default().to_string(),
        )),
        _ => Err(PeerError::Garbage(
            "migration answer without ok or error".into(),
        )),
    }
}

/// How long the peer may leave data unacknowledged, or an idle link
/// unanswered, before the link counts as gone: a cut link fails the step
/// in progress within this time instead of TCP's minutes of retries, and a
/// destination rolls back by itself.
pub const LINK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Peer-link socket options: no Nagle delay for the small step frames, and
/// a dead peer detected within `LINK_TIMEOUT`, busy or idle.
fn tune(stream: &TcpStream) -> std::io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    stream.set_nodelay(true)?;
    let timeout_ms = LINK_TIMEOUT.as_millis() as u32;
    setsockopt(stream, sockopt::TcpUserTimeout, &timeout_ms)?;
    setsockopt(stream, sockopt::KeepAlive, &true)?;
    setsockopt(stream, sockopt::TcpKeepIdle, &1)?;
    setsockopt(stream, sockopt::TcpKeepInterval, &1)?;
    Ok(())
}

/// Accepts peer links on `listener` until the task is dropped: each gets
/// the handshake (authenticated with `key`, if any) and then `on_link`.
pub async fn serve<F, Fut>(listener: TcpListener, key: Option<PeerKey>, on_link: F)
where
    F: Fn(Link, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), PeerError>> + Send,
{
    let key = Arc::new(key);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let mut turned_away = 0u64;
    loop {
        match listener.accept().await {
            Ok((stream, from)) => {
                let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                    turned_away += 1;
                    if turned_away.is_power_of_two() {
                        tracing::warn!(%from, turned_away,
                            "closed a peer link: {MAX_HANDSHAKES} handshakes in progress already");
                    }
                    continue;
                };
                let (key, on_link) = (key.clone(), on_link.clone());
                tokio::spawn(async move {
                    let key = Option::as_ref(&key);
                    let outcome = match admit(stream, from, key, permit).await {
                        Ok(Some(link)) => on_link(link, from).await,
                        Ok(None) => Ok(()),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = outcome {
                        tracing::warn!(%from, "peer link closed: {e}");
                    }
                });
            }
            Err(e) => tracing::warn!("accepting a peer link: {e}"),
        }
    }
}

/// The listener's handshake on one link, within [`HANDSHAKE_TIMEOUT`]: the
/// stream once the peer is admitted, none if it was refused (and told why).
async fn admit(
    mut stream: TcpStream,
    from: SocketAddr,
    key: Option<&PeerKey>,
    handshake: tokio::sync::OwnedSemaphorePermit,
) -> Result<Option<Link>, PeerError> {
    tune(&stream)?;
    let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, accept(&mut stream, key))
        .await
        .unwrap_or_else(|_| {
            Err(PeerError::Garbage(format!(
                "no handshake within {} s",
                HANDSHAKE_TIMEOUT.as_secs()
            )))
        });
    drop(handshake);
    match accepted {
        Ok(hello) => {
            tracing::info!(%from, host = %hello.host, version = hello.version,
                authenticated = key.is_some(), "peer link up");
            Ok(Some(Link::plain(stream)))
        }
        Err(reason) => {
            tracing::warn!(%from, "refused a peer link: {reason}");
            // Best effort: a garbage sender may not read it.
            let _ = write_frame(&mut stream, frame::REFUSE, reason.to_string().as_bytes()).await;
            Ok(None)
        }
    }
}

/// The listener's side of the handshake: the connector's hello, checked,
/// and with a key both proofs; nothing else is read before it succeeds.
async fn accept(stream: &mut TcpStream, key: Option<&PeerKey>) -> Result<Hello, PeerError> {
    let (kind, payload) = read_frame(stream, MAX_HELLO).await?;
    let hello = check_hello(kind, &payload)?;
    let (key, theirs) = match (key, hello.nonce.as_deref()) {
        (None, None) => {
            let welcome = serde_json::to_vec(&Hello::ours()).expect("a hello serializes");
            write_frame(stream, frame::WELCOME, &welcome).await?;
            return Ok(hello);
        }
        (None, Some(_)) => {
            return Err(PeerError::Auth(
                "the connecting daemon has a peer_key and this one has none: \
                 configure the same peer_key on both daemons"
                    .into(),
            ));
        }
        (Some(_), None) => {
            return Err(PeerError::Auth(
                "this daemon requires authentication (peer_key) and the connecting daemon \
                 sent none: configure the same peer_key on both daemons"
                    .into(),
            ));
        }
        (Some(key), Some(nonce)) => match hex::decode(nonce).ok() {
            Some(nonce) if nonce.len() == NONCE_BYTES => (key, nonce),
            _ => {
                return Err(PeerError::Auth(
                    "the hello's nonce is not 32 bytes in hex".into(),
                ));
            }
        },
    };
    let ours = random_nonce()?;
    let welcome = Hello {
        nonce: Some(hex::encode(ours)),
        proof: Some(hex::encode(key.prove(Role::Listener, &theirs, &ours))),
        ..Hello::ours()
    };
    let welcome = serde_json::to_vec(&welcome).expect("a hello serializes");
    write_frame(stream, frame::WELCOME, &welcome).await?;
    let proof = match read_frame(stream, MAX_HELLO).await? {
        (frame::AUTH, payload) => serde_json::from_slice::<serde_json::Value>(&payload)
            .ok()
            .and_then(|v| v.get("proof")?.as_str().and_then(|h| hex::decode(h).ok())),
        (frame::REFUSE, reason) => {
            return Err(PeerError::Refused(
                String::from_utf8_lossy(&reason).into_owned(),
            ));
        }
        (other, _) => {
            return Err(PeerError::Auth(format!(
                "frame type {other} instead of the connecting daemon's proof"
            )));
        }
    };
    match proof {
        Some(proof) if key.verify(Role::Connector, &theirs, &ours, &proof) => {
            write_frame(stream, frame::AUTH_OK, &[]).await?;
            Ok(hello)
        }
        Some(_) => Err(PeerError::Auth(
            "the connecting daemon's proof does not match this daemon's peer_key: \
             the two daemons' peer_key differ"
                .into(),
        )),
        None => Err(PeerError::Auth(
            "an AUTH frame without a proof in hex".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_hellos() {
        let ours = serde_json::to_vec(&Hello::ours()).unwrap();
        assert!(check_hello(frame::HELLO, &ours).is_ok());
        assert!(matches!(
            check_hello(frame::PING, &ours),
            Err(PeerError::Garbage(_))
        ));
        assert!(matches!(
            check_hello(frame::HELLO, b"GET / HTTP/1.1"),
            Err(PeerError::Garbage(_))
        ));
        let future = Hello {
            version: VERSION + 1,
            ..Hello::ours()
        };
        let future = serde_json::to_vec(&future).unwrap();
        assert!(matches!(
            check_hello(frame::HELLO, &future),
            Err(PeerError::Version(v)) if v == VERSION + 1
        ));
        let stranger = Hello {
            magic: "other".into(),
            ..Hello::ours()
        };
        let stranger = serde_json::to_vec(&stranger).unwrap();
        assert!(matches!(
            check_hello(frame::HELLO, &stranger),
            Err(PeerError::Garbage(_))
        ));
    }

    /// A listener on loopback with `key`; its address.
    async fn listener(key: Option<PeerKey>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        // A link that answers pings, as the destination's does.
        let on_link = |mut link: Link, _| async move {
            while let (frame::PING, _) = link.recv(MAX_FRAME).await? {
                link.send(frame::PONG, &[]).await?;
            }
            Ok(())
        };
        tokio::spawn(serve(listener, key, on_link));
        address
    }

    #[tokio::test]
    async fn the_handshake_authenticates_both_ends_with_a_shared_key() {
        let key = PeerKey::from_hex(&"5a".repeat(32)).unwrap();
        let other = PeerKey::from_hex(&"a5".repeat(32)).unwrap();
        let keyed = listener(Some(key.clone())).await;
        let open = listener(None).await;

        let (mut link, theirs) = connect_with(keyed, Some(&key)).await.unwrap();
        assert_eq!(theirs.version, VERSION);
        ping(&mut link).await.unwrap();
        let (mut link, _) = connect_with(open, None).await.unwrap();
        ping(&mut link).await.unwrap();

        let wrong = connect_with(keyed, Some(&other)).await.unwrap_err();
        assert!(matches!(wrong, PeerError::Auth(_)), "{wrong}");
        assert!(wrong.to_string().contains("differ"), "{wrong}");
        let none = connect_with(keyed, None).await.unwrap_err().to_string();
        assert!(none.contains("requires authentication"), "{none}");
        let unkeyed = connect_with(open, Some(&key))
            .await
            .unwrap_err()
            .to_string();
        assert!(unkeyed.contains("has none"), "{unkeyed}");
        // The keyed listener still serves its peer.
        let (mut link, _) = connect_with(keyed, Some(&key)).await.unwrap();
        ping(&mut link).await.unwrap();
    }
}

//! The peer link between two hosts' daemons: TCP, a versioned handshake,
//! then length-prefixed frames, sealed.
//!
//! A frame is `u32` big-endian length (of what follows), one type byte, and
//! the payload. The handshake opens with `HELLO` from the connecting daemon
//! and `WELCOME` (or `REFUSE`) back, in clear, each JSON saying the
//! protocol version and whether the sender seals its links. A peer that
//! speaks another version, or sends anything but a hello, is refused with
//! a `REFUSE` frame saying why, logged, and disconnected.
//!
//! Then, unless the daemons run with `peer_insecure`, a Noise XX handshake
//! (`NOISE` frames; see [`seal`]) over X25519 static keys, one per host
//! (its identity): each end proves it holds its key, the connector checks
//! that the listener's is the one its `[[peers]]` entry lists, and the
//! listener that the connector's is listed at all, then says `ADMITTED`.
//! The handshake's prologue is the hello and the welcome, so a change to
//! either fails it. From there every frame is sealed under keys only this
//! session has: a host in the middle can neither read nor alter nor relay
//! a link into one of its own.
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// The peer-link protocol version this build speaks.
pub const VERSION: u32 = 11;
/// Marks a hello as ours.
pub const MAGIC: &str = "dataplane-peer";
/// Largest frame accepted after the handshake (checkpoint images come in chunks).
pub const MAX_FRAME: u32 = 16 << 20;
/// Largest handshake frame: a hello is small, and a stranger gets no more.
pub const MAX_HELLO: u32 = 4096;

mod identity;
mod link;
pub mod seal;
pub mod transfer;
mod trust;

pub use identity::{Identity, IdentityError, PublicKey};
pub use link::Link;
use seal::Seal;
pub use trust::{Peer, Trust};

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
    // 16 was a shared key's proof (protocol 3), retired.
    /// The listener admitted the connecting daemon: the link is up (sealed).
    pub const ADMITTED: u8 = 17;
    /// The current file's last DATA frame went: JSON `{"sha256": HEX}` of its bytes.
    pub const FILE_END: u8 = 18;
    /// One Noise handshake message, in clear.
    pub const NOISE: u8 = 19;
}

/// The handshake's first payload, both ways.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    pub magic: String,
    pub version: u32,
    /// The sending host's name, for logs.
    pub host: String,
    /// The sender seals its links (it has an identity): both ends must.
    #[serde(default)]
    pub sealed: bool,
}

impl Hello {
    /// This daemon's hello.
    pub fn ours(sealed: bool) -> Self {
        Self {
            magic: MAGIC.into(),
            version: VERSION,
            host: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sealed,
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
    #[error("{0} is not a listed peer: add it to [[peers]] (address and key) in the configuration")]
    NotListed(SocketAddr),
}

/// A frame's length field for `payload`, if it is within [`MAX_FRAME`].
fn frame_len(payload: &[u8]) -> Result<u32, PeerError> {
    let len =
        u32::try_from(payload.len() + 1).map_err(|_| PeerError::TooLong(u32::MAX, MAX_FRAME))?;
    if len > MAX_FRAME {
        return Err(PeerError::TooLong(len, MAX_FRAME));
    }
    Ok(len)
}

/// Writes one frame.
pub async fn write_frame<S: AsyncWrite + Unpin>(
    stream: &mut S,
    kind: u8,
    payload: &[u8],
) -> Result<(), PeerError> {
    let len = frame_len(payload)?;
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
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the listener waits for a connecting daemon's handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes the listener runs at once; further connections are closed.
pub const MAX_HANDSHAKES: usize = 32;

/// Connects to the listed peer at `address` and completes the handshake
/// within [`CONNECT_TIMEOUT`]: sealed, the peer proving the key its
/// `[[peers]]` entry lists, unless `trust` is insecure.
pub async fn connect(trust: &Trust, address: SocketAddr) -> Result<(Link, Hello), PeerError> {
    let peer = trust.peer(address)?;
    let open = async {
        let stream = TcpStream::connect(address).await?;
        tune(&stream)?;
        let mut link = Link::plain(stream);
        match open(&mut link, trust.identity(), peer).await {
            Ok(theirs) => Ok((link, theirs)),
            Err(reason @ PeerError::Auth(_)) => {
                // Tell the listener why, so that its log says so too.
                let _ = link
                    .send(frame::REFUSE, reason.to_string().as_bytes())
                    .await;
                Err(reason)
            }
            Err(e) => Err(e),
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, open)
        .await
        .map_err(|_| PeerError::Io(std::io::ErrorKind::TimedOut.into()))?
}

/// The connecting side of the handshake: hello and welcome in clear, then
/// with an identity Noise XX, whose prologue is both, so that neither can
/// be altered unseen, and the listener's word that it admits this host.
async fn open(
    link: &mut Link,
    identity: Option<&Identity>,
    peer: &Peer,
) -> Result<Hello, PeerError> {
    let hello = serde_json::to_vec(&Hello::ours(identity.is_some())).expect("a hello serializes");
    link.send(frame::HELLO, &hello).await?;
    let welcome = match link.recv(MAX_HELLO).await? {
        (frame::WELCOME, payload) => payload,
        (frame::REFUSE, reason) => return Err(refused(&reason)),
        (other, _) => {
            return Err(PeerError::Garbage(format!(
                "frame type {other} instead of a welcome"
            )));
        }
    };
    let theirs = check_hello(frame::HELLO, &welcome)?;
    same_sealing(identity.is_some(), theirs.sealed, &peer.name)?;
    let Some(identity) = identity else {
        return Ok(theirs);
    };
    let prologue = prologue(&hello, &welcome);
    let mut noise = seal::noise(identity, &prologue)
        .build_initiator()
        .map_err(noise_error)?;
    noise_send(link, &mut noise).await?;
    noise_recv(link, &mut noise).await?;
    let presented = noise.get_remote_static().and_then(PublicKey::from_slice);
    if presented.is_none() || presented != peer.key {
        return Err(PeerError::Auth(format!(
            "{} presented key {}, not the key its [[peers]] entry lists",
            peer.name,
            presented.map_or("none".into(), |k| k.to_string())
        )));
    }
    noise_send(link, &mut noise).await?;
    link.seal(Seal::new(noise.into_transport_mode().map_err(noise_error)?));
    match link.recv(MAX_HELLO).await? {
        (frame::ADMITTED, _) => Ok(theirs),
        (frame::REFUSE, reason) => Err(refused(&reason)),
        (other, _) => Err(PeerError::Garbage(format!(
            "frame type {other} instead of being admitted"
        ))),
    }
}

/// Both ends must agree on sealing: a sealed daemon never falls back to
/// clear for a peer that asks for it.
fn same_sealing(ours: bool, theirs: bool, peer: &str) -> Result<(), PeerError> {
    match (ours, theirs) {
        (true, false) => Err(PeerError::Auth(format!(
            "{peer} runs with peer_insecure and this daemon seals its peer links: \
             give {peer} an identity and list the peers on both"
        ))),
        (false, true) => Err(PeerError::Auth(format!(
            "this daemon runs with peer_insecure and {peer} seals its peer links"
        ))),
        _ => Ok(()),
    }
}

/// What both ends said in clear, length-prefixed, for the handshake to
/// authenticate.
fn prologue(hello: &[u8], welcome: &[u8]) -> Vec<u8> {
    let mut prologue = format!("{MAGIC} v{VERSION}\0").into_bytes();
    for said in [hello, welcome] {
        prologue.extend_from_slice(&(said.len() as u32).to_be_bytes());
        prologue.extend_from_slice(said);
    }
    prologue
}

/// Sends this end's next handshake message.
async fn noise_send(link: &mut Link, noise: &mut snow::HandshakeState) -> Result<(), PeerError> {
    let mut message = [0; 256];
    let n = noise
        .write_message(&[], &mut message)
        .map_err(noise_error)?;
    link.send(frame::NOISE, &message[..n]).await
}

/// Reads the other end's next handshake message.
async fn noise_recv(link: &mut Link, noise: &mut snow::HandshakeState) -> Result<(), PeerError> {
    match link.recv(MAX_HELLO).await? {
        (frame::NOISE, message) => {
            let mut payload = vec![0; message.len()];
            noise
                .read_message(&message, &mut payload)
                .map_err(noise_error)?;
            Ok(())
        }
        (frame::REFUSE, reason) => Err(refused(&reason)),
        (other, _) => Err(PeerError::Garbage(format!(
            "frame type {other} in the handshake"
        ))),
    }
}

fn noise_error(e: snow::Error) -> PeerError {
    PeerError::Auth(format!("handshake: {e}"))
}

pub(super) fn refused(reason: &[u8]) -> PeerError {
    PeerError::Refused(String::from_utf8_lossy(reason).into_owned())
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
        (frame::REFUSE, reason) => Err(refused(&reason)),
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
/// the handshake `trust` asks for and, once admitted, `on_link`.
pub async fn serve<F, Fut>(listener: TcpListener, trust: Arc<Trust>, on_link: F)
where
    F: Fn(Link, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), PeerError>> + Send,
{
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
                let (trust, on_link) = (trust.clone(), on_link.clone());
                tokio::spawn(async move {
                    let outcome = match admit(stream, from, &trust, permit).await {
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
/// link once the peer is admitted, none if it was refused (and told why).
async fn admit(
    stream: TcpStream,
    from: SocketAddr,
    trust: &Trust,
    handshake: tokio::sync::OwnedSemaphorePermit,
) -> Result<Option<Link>, PeerError> {
    tune(&stream)?;
    let mut link = Link::plain(stream);
    let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, accept(&mut link, trust))
        .await
        .unwrap_or_else(|_| {
            Err(PeerError::Garbage(format!(
                "no handshake within {} s",
                HANDSHAKE_TIMEOUT.as_secs()
            )))
        });
    drop(handshake);
    match accepted {
        Ok((hello, peer)) => {
            tracing::info!(%from, host = %hello.host, peer = %peer.unwrap_or("(insecure)"),
                sealed = link.is_sealed(), "peer link up");
            Ok(Some(link))
        }
        Err(reason) => {
            tracing::warn!(%from, "refused a peer link: {reason}");
            // Best effort, sealed once the handshake is: a garbage sender
            // may not read it.
            let _ = link
                .send(frame::REFUSE, reason.to_string().as_bytes())
                .await;
            Ok(None)
        }
    }
}

/// The listener's side of the handshake: the connector's hello, checked,
/// the welcome, and with an identity Noise XX, after which the connector's
/// key must be a listed peer's. Nothing else is read before it succeeds.
/// The hello and the name of the listed peer it is.
async fn accept<'t>(
    link: &mut Link,
    trust: &'t Trust,
) -> Result<(Hello, Option<&'t str>), PeerError> {
    let (kind, hello) = link.recv(MAX_HELLO).await?;
    let theirs = check_hello(kind, &hello)?;
    let identity = trust.identity();
    same_sealing(identity.is_some(), theirs.sealed, "the connecting daemon")?;
    let welcome = serde_json::to_vec(&Hello::ours(identity.is_some())).expect("a hello serializes");
    link.send(frame::WELCOME, &welcome).await?;
    let Some(identity) = identity else {
        return Ok((theirs, None));
    };
    let prologue = prologue(&hello, &welcome);
    let mut noise = seal::noise(identity, &prologue)
        .build_responder()
        .map_err(noise_error)?;
    noise_recv(link, &mut noise).await?;
    noise_send(link, &mut noise).await?;
    noise_recv(link, &mut noise).await?;
    let key = noise
        .get_remote_static()
        .and_then(PublicKey::from_slice)
        .ok_or_else(|| PeerError::Auth("the handshake ended without a key".into()))?;
    link.seal(Seal::new(noise.into_transport_mode().map_err(noise_error)?));
    let peer = trust.admit(key).ok_or_else(|| {
        PeerError::Auth(format!("key {key} is not among this daemon's [[peers]]"))
    })?;
    link.send(frame::ADMITTED, &[]).await?;
    Ok((theirs, Some(peer.name.as_str())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_hellos() {
        let ours = serde_json::to_vec(&Hello::ours(true)).unwrap();
        assert!(check_hello(frame::HELLO, &ours).is_ok());
        assert!(matches!(
            check_hello(frame::PING, &ours),
            Err(PeerError::Garbage(_))
        ));
        assert!(matches!(
            check_hello(frame::HELLO, b"GET / HTTP/1.1"),
            Err(PeerError::Garbage(_))
        ));
        let older = br#"{"magic":"dataplane-peer","version":3,"host":"a","nonce":"00"}"#;
        assert!(matches!(
            check_hello(frame::HELLO, older),
            Err(PeerError::Version(3))
        ));
        let stranger = Hello {
            magic: "other".into(),
            ..Hello::ours(true)
        };
        let stranger = serde_json::to_vec(&stranger).unwrap();
        assert!(matches!(
            check_hello(frame::HELLO, &stranger),
            Err(PeerError::Garbage(_))
        ));
    }

    /// A listener on loopback with `trust`; its address.
    async fn listener(trust: Trust) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        // A link that answers pings, as the destination's does.
        let on_link = |mut link: Link, _| async move {
            while let (frame::PING, _) = link.recv(MAX_FRAME).await? {
                link.send(frame::PONG, &[]).await?;
            }
            Ok(())
        };
        tokio::spawn(serve(listener, Arc::new(trust), on_link));
        address
    }

    fn peer(name: &str, address: SocketAddr, key: Option<&Identity>) -> Peer {
        Peer {
            name: name.into(),
            address,
            key: key.map(Identity::public),
        }
    }

    #[tokio::test]
    async fn links_are_sealed_between_listed_keys_only() {
        let (a, b, mallory) = (
            Identity::generate().unwrap(),
            Identity::generate().unwrap(),
            Identity::generate().unwrap(),
        );
        let unused: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let b_at = listener(Trust::sealed(b.clone(), vec![peer("a", unused, Some(&a))])).await;
        let a_trust = Trust::sealed(a.clone(), vec![peer("b", b_at, Some(&b))]);

        let (mut link, theirs) = connect(&a_trust, b_at).await.unwrap();
        assert!(link.is_sealed() && theirs.sealed);
        ping(&mut link).await.unwrap();

        // Only listed addresses are dialled.
        let other: SocketAddr = "127.0.0.1:10".parse().unwrap();
        assert!(matches!(
            connect(&a_trust, other).await,
            Err(PeerError::NotListed(_))
        ));
        // A key b does not list is refused, named.
        let m_trust = Trust::sealed(mallory.clone(), vec![peer("b", b_at, Some(&b))]);
        let refused = connect(&m_trust, b_at).await.unwrap_err().to_string();
        assert!(refused.contains(&mallory.public().to_string()), "{refused}");
        assert!(refused.contains("not among"), "{refused}");
        // A listener that is not the key listed for its address is refused.
        let wrong = Trust::sealed(a.clone(), vec![peer("b", b_at, Some(&mallory))]);
        let refused = connect(&wrong, b_at).await.unwrap_err().to_string();
        assert!(
            refused.contains("not the key its [[peers]] entry lists"),
            "{refused}"
        );
        // Sealed and insecure daemons refuse each other.
        let insecure = Trust::insecure(vec![peer("b", b_at, None)]);
        let refused = connect(&insecure, b_at).await.unwrap_err().to_string();
        assert!(refused.contains("peer_insecure"), "{refused}");
        let open_at = listener(Trust::insecure(vec![])).await;
        let to_open = Trust::sealed(a.clone(), vec![peer("open", open_at, Some(&b))]);
        let refused = connect(&to_open, open_at).await.unwrap_err().to_string();
        assert!(refused.contains("peer_insecure"), "{refused}");
        // Two insecure daemons link in clear.
        let clear = Trust::insecure(vec![peer("open", open_at, None)]);
        let (mut link, theirs) = connect(&clear, open_at).await.unwrap();
        assert!(!link.is_sealed() && !theirs.sealed);
        ping(&mut link).await.unwrap();
        // The listener still serves its peer.
        let (mut link, _) = connect(&a_trust, b_at).await.unwrap();
        ping(&mut link).await.unwrap();
    }
}

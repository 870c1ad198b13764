//! The peer link between two hosts' daemons: TCP, a versioned handshake,
//! then length-prefixed frames.
//!
//! A frame is `u32` big-endian length (of what follows), one type byte, and
//! the payload. The first frame each way is the handshake: `HELLO` from the
//! connecting daemon, `WELCOME` or `REFUSE` back, each with a JSON payload.
//! A peer that speaks another version, or anything that is not a hello, is
//! refused with a `REFUSE` frame saying why, logged, and disconnected.
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Instant};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// The peer-link protocol version this build speaks.
pub const VERSION: u32 = 1;
/// Marks a hello as ours.
pub const MAGIC: &str = "dataplane-peer";
/// Largest frame accepted after the handshake (checkpoint images come in chunks).
pub const MAX_FRAME: u32 = 16 << 20;
/// Largest handshake frame: a hello is small, and a stranger gets no more.
pub const MAX_HELLO: u32 = 4096;

pub mod replay;
pub mod target;
pub mod transfer;

/// Frame types.
pub mod frame {
    pub const HELLO: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const REFUSE: u8 = 3;
    pub const PING: u8 = 4;
    pub const PONG: u8 = 5;
    /// Starts a checkpoint image transfer: JSON `{"migration": ID}`.
    pub const IMAGES: u8 = 6;
    /// One image file follows: JSON `{"name", "size", "sha256"}`, then DATA frames.
    pub const FILE: u8 = 7;
    /// A chunk of the current file.
    pub const DATA: u8 = 8;
    /// The transfer is complete.
    pub const IMAGES_END: u8 = 9;
    /// The receiver has every file, checksums verified: JSON `{"files", "bytes"}`.
    pub const IMAGES_OK: u8 = 10;
    /// One logged input to inject: a RecordHeader (host order) and the frame.
    pub const REPLAY: u8 = 11;
    /// The replay is complete.
    pub const REPLAY_END: u8 = 12;
    /// The receiver injected them all: JSON `{"inputs", "elapsed_us"}`.
    pub const REPLAY_OK: u8 = 13;
    /// One step of a migration, source to destination: JSON [`super::target::Step`].
    pub const MIGRATE: u8 = 14;
    /// The destination's answer to a step: JSON `{"ok": VALUE}` or `{"error": TEXT}`.
    pub const MIGRATED: u8 = 15;
}

/// The handshake payload, both ways.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    pub magic: String,
    pub version: u32,
    /// The sending host's name, for logs.
    pub host: String,
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
    #[error("the peer refused the link: {0}")]
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
}

/// Writes one frame.
pub async fn write_frame(
    stream: &mut TcpStream,
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
pub async fn read_frame(stream: &mut TcpStream, limit: u32) -> Result<(u8, Vec<u8>), PeerError> {
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

/// Connects to the peer daemon at `address` and completes the handshake,
/// within [`CONNECT_TIMEOUT`].
pub async fn connect(address: SocketAddr) -> Result<(TcpStream, Hello), PeerError> {
    tokio::time::timeout(CONNECT_TIMEOUT, handshake(address))
        .await
        .map_err(|_| PeerError::Io(std::io::ErrorKind::TimedOut.into()))?
}

async fn handshake(address: SocketAddr) -> Result<(TcpStream, Hello), PeerError> {
    let mut stream = TcpStream::connect(address).await?;
    tune(&stream)?;
    let hello = serde_json::to_vec(&Hello::ours()).expect("a hello serializes");
    write_frame(&mut stream, frame::HELLO, &hello).await?;
    let (kind, payload) = read_frame(&mut stream, MAX_HELLO).await?;
    match kind {
        frame::WELCOME => {
            let theirs: Hello = serde_json::from_slice(&payload)
                .map_err(|e| PeerError::Garbage(format!("welcome: {e}")))?;
            Ok((stream, theirs))
        }
        frame::REFUSE => Err(PeerError::Refused(
            String::from_utf8_lossy(&payload).into_owned(),
        )),
        other => Err(PeerError::Garbage(format!(
            "frame type {other} instead of a welcome"
        ))),
    }
}

/// Round trip of one PING on an established link.
pub async fn ping(stream: &mut TcpStream) -> Result<std::time::Duration, PeerError> {
    let start = Instant::now();
    write_frame(stream, frame::PING, &[]).await?;
    match read_frame(stream, MAX_FRAME).await? {
        (frame::PONG, _) => Ok(start.elapsed()),
        (other, _) => Err(PeerError::Garbage(format!(
            "frame type {other} instead of a pong"
        ))),
    }
}

/// Checks a hello; the reason for refusing it otherwise.
fn check_hello(kind: u8, payload: &[u8]) -> Result<Hello, PeerError> {
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

/// What the peer-link server works with on this host.
#[derive(Clone)]
pub struct Host {
    /// Where received checkpoint images go.
    pub images_root: PathBuf,
    /// The pinned dataplane, whose ingress program replays inputs.
    pub pin_root: PathBuf,
    /// The service-facing interface, where a migrated service's addresses are announced.
    pub interface: String,
    /// The interface replayed inputs arrive on, as mirror copies do.
    pub peer_interface: Option<String>,
    /// Restores migrated services.
    pub criu: crate::criu::Criu,
    /// The daemon's readers of the input and output logs.
    pub inputs: Option<Arc<crate::capture::Tap>>,
    pub outputs: Option<Arc<crate::capture::Tap>>,
}

/// Asks the destination for one migration step; its answer.
pub async fn migrate_step(
    stream: &mut TcpStream,
    step: &target::Step,
) -> Result<serde_json::Value, PeerError> {
    let request = serde_json::to_vec(step).expect("a step serializes");
    write_frame(stream, frame::MIGRATE, &request).await?;
    match read_frame(stream, MAX_FRAME).await? {
        (frame::MIGRATED, payload) => {
            let mut answer: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&payload)
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
        (frame::REFUSE, reason) => Err(PeerError::Refused(
            String::from_utf8_lossy(&reason).into_owned(),
        )),
        (other, _) => Err(PeerError::Garbage(format!(
            "frame type {other} instead of a migration answer"
        ))),
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

/// Accepts peer links on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, host: Host) {
    let host = Arc::new(host);
    loop {
        match listener.accept().await {
            Ok((stream, from)) => {
                let host = host.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_one(stream, from, &host).await {
                        tracing::warn!(%from, "peer link closed: {e}");
                    }
                });
            }
            Err(e) => tracing::warn!("accepting a peer link: {e}"),
        }
    }
}

async fn serve_one(mut stream: TcpStream, from: SocketAddr, host: &Host) -> Result<(), PeerError> {
    tune(&stream)?;
    let hello = match read_frame(&mut stream, MAX_HELLO).await {
        Ok((kind, payload)) => check_hello(kind, &payload),
        Err(e) => Err(e),
    };
    let hello = match hello {
        Ok(hello) => hello,
        Err(reason) => {
            tracing::warn!(%from, "refused a peer link: {reason}");
            // Best effort: a garbage sender may not read it.
            let _ = write_frame(&mut stream, frame::REFUSE, reason.to_string().as_bytes()).await;
            return Ok(());
        }
    };
    tracing::info!(%from, host = %hello.host, version = hello.version, "peer link up");
    let welcome = serde_json::to_vec(&Hello::ours()).expect("a hello serializes");
    write_frame(&mut stream, frame::WELCOME, &welcome).await?;
    // A migration to this host, driven over this link.
    let mut target: Option<target::Target> = None;
    loop {
        let (kind, payload) = match read_frame(&mut stream, MAX_FRAME).await {
            Ok(frame) => frame,
            Err(PeerError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                tracing::info!(%from, "peer link closed by the peer");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        match kind {
            frame::PING => write_frame(&mut stream, frame::PONG, &[]).await?,
            frame::IMAGES => {
                let received = transfer::receive(&mut stream, &payload, &host.images_root).await;
                if let Ok(r) = &received {
                    tracing::info!(%from, migration = %r.migration, files = r.files,
                        bytes = r.bytes, "received checkpoint images");
                }
                answer(&mut stream, from, received, frame::IMAGES_OK).await?;
            }
            frame::REPLAY => {
                let replayed = match host.peer_interface.as_deref() {
                    None => Err(PeerError::Garbage(
                        "this daemon has no peer interface to replay on".into(),
                    )),
                    Some(interface) => {
                        match crate::replay::Injector::open(&host.pin_root, interface) {
                            Ok(injector) => replay::receive(&mut stream, payload, &injector).await,
                            Err(e) => Err(PeerError::Garbage(e.to_string())),
                        }
                    }
                };
                if let Ok(r) = &replayed {
                    tracing::info!(%from, inputs = r.inputs, rate = r.rate(), "replayed inputs");
                }
                answer(&mut stream, from, replayed, frame::REPLAY_OK).await?;
            }
            frame::MIGRATE => {
                let outcome = match serde_json::from_slice::<target::Step>(&payload) {
                    Err(e) => Err(format!("not a migration step: {e}")),
                    Ok(target::Step::Prepare { migration, flows }) if target.is_none() => {
                        tracing::info!(%from, %migration, "preparing a migration to this host");
                        target::Target::prepare(host, migration, flows).map(|t| {
                            target = Some(t);
                            serde_json::json!({})
                        })
                    }
                    Ok(step) => match target.as_mut() {
                        Some(t) => t.step(step).await,
                        None => Err("no migration is prepared on this link".into()),
                    },
                };
                if target.as_ref().is_some_and(|t| t.ended()) {
                    target = None;
                }
                let answer = match outcome {
                    Ok(ok) => serde_json::json!({ "ok": ok }),
                    Err(error) => {
                        tracing::warn!(%from, "migration step failed: {error}");
                        serde_json::json!({ "error": error })
                    }
                };
                let answer = serde_json::to_vec(&answer).expect("serializes");
                write_frame(&mut stream, frame::MIGRATED, &answer).await?;
            }
            other => {
                let reason = format!("unexpected frame type {other}");
                let _ = write_frame(&mut stream, frame::REFUSE, reason.as_bytes()).await;
                return Err(PeerError::Garbage(reason));
            }
        }
    }
}

/// Answers a request that moved data: its receipt in an `ok_kind` frame,
/// or a `REFUSE` with the reason, after which the link closes (the error
/// is returned).
async fn answer<T: Serialize>(
    stream: &mut TcpStream,
    from: SocketAddr,
    outcome: Result<T, PeerError>,
    ok_kind: u8,
) -> Result<(), PeerError> {
    match outcome {
        Ok(receipt) => {
            let ok = serde_json::to_vec(&receipt).expect("serializes");
            write_frame(stream, ok_kind, &ok).await
        }
        Err(e) => {
            tracing::warn!(%from, "refused: {e}");
            // Best effort: the link may be gone already.
            let _ = write_frame(stream, frame::REFUSE, e.to_string().as_bytes()).await;
            Err(e)
        }
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
            Err(PeerError::Version(2))
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
}

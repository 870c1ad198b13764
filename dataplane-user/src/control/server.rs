//! The daemon's side of the control socket: binding it, accepting
//! connections up to a limit, reading bounded request lines, a token bucket
//! per connection, and streaming `migration.watch` notifications. What a
//! request does is the [`Handler`]'s business (the daemon's).
use std::{
    num::NonZeroU32,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock},
    middleware::NoOpMiddleware,
    state::{InMemoryState, NotKeyed},
};
use serde::Deserialize;
use serde_json::Value;
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream, unix::UCred},
    sync::broadcast,
};

use crate::{
    control::{
        Response, RpcError,
        answer::Event,
        code,
        method::{Call, Method},
        parse_request,
    },
    report::Report,
};

/// What serves the requests: the daemon.
pub trait Handler: Send + Sync + 'static {
    /// Runs `call` for a client: its answer (a type of
    /// [`answer`](super::answer)'s) as it goes on the wire.
    fn call(&self, call: Call) -> impl Future<Output = Result<Value, RpcError>> + Send;
    /// Migration reports as their phases change, for `migration.watch`.
    fn events(&self) -> broadcast::Receiver<Report>;
}

/// How much one client, and all of them, may ask of the daemon.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Requests a second on one connection (0: no limit).
    pub rate: u32,
    /// Requests one connection may send at once.
    pub burst: u32,
    /// Connections open at once.
    pub max_connections: u32,
}

/// Why the control socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("control socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("socket group {0:?} does not exist")]
    NoGroup(String),
}

/// Binds the control socket at `path`: a stale file is replaced, the mode
/// is 0660, and the group is `group` (default: the daemon's).
pub fn bind(path: &Path, group: Option<&str>) -> Result<UnixListener, BindError> {
    let err = |source| BindError::Socket {
        path: path.to_owned(),
        source,
    };
    // A directory made here lets everyone reach the socket (the daemon's
    // umask would keep socket_group out): its own mode and group decide.
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(err)?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another daemon serves it",
        )));
    }
    // Bound under a temporary name and renamed into place once its mode and
    // group are set, so no client ever finds it with looser permissions.
    let staging = path.with_extension(format!("staging-{}", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging).map_err(err)?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    if let Some(group) = group {
        let gid = nix::unistd::Group::from_name(group)
            .ok()
            .flatten()
            .ok_or_else(|| BindError::NoGroup(group.to_owned()))?
            .gid;
        nix::unistd::chown(&staging, None, Some(gid)).map_err(|e| err(e.into()))?;
    }
    std::fs::rename(&staging, path).map_err(err)?;
    Ok(listener)
}

/// Serves clients on `listener` until `stop` completes.
pub async fn serve<H: Handler>(
    listener: UnixListener,
    handler: Arc<H>,
    limits: Limits,
    stop: impl Future<Output = ()>,
) {
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections as usize));
    let mut turned_away = 0u64;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match connections.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let handler = handler.clone();
                        tokio::spawn(async move {
                            serve_client(handler.as_ref(), stream, limits).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        turned_away += 1;
                        let most = limits.max_connections;
                        if turned_away.is_power_of_two() {
                            let peer = stream.peer_cred().ok();
                            tracing::warn!(
                                pid = peer.and_then(|c| c.pid()),
                                uid = peer.map(|c| c.uid()),
                                gid = peer.map(|c| c.gid()),
                                turned_away,
                                "refused a control connection: {most} are open"
                            );
                        }
                        tokio::spawn(refuse_connection(stream, most));
                    }
                },
                Err(e) => tracing::warn!("accepting a control connection: {e}"),
            },
            () = &mut stop => return,
        }
    }
}

async fn serve_client<H: Handler>(handler: &H, stream: UnixStream, limits: Limits) {
    let peer = stream.peer_cred().ok();
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut watching: Option<broadcast::Receiver<Report>> = None;
    let (rate, burst) = (limits.rate, limits.burst);
    let limit = RateLimit::new(rate, burst);
    let mut limited = 0u64;
    loop {
        let line = match &mut watching {
            None => read_line(&mut reader).await,
            Some(events) => tokio::select! {
                line = read_line(&mut reader) => line,
                event = events.recv() => {
                    let event = match event {
                        Ok(report) => Event::Phase(Box::new(report)),
                        Err(broadcast::error::RecvError::Lagged(missed)) => Event::Lagged { missed },
                        Err(broadcast::error::RecvError::Closed) => return,
                    };
                    if write.write_all(event.line().as_bytes()).await.is_err() {
                        return;
                    }
                    continue;
                }
            },
        };
        if let Ok(Line::Text(_) | Line::TooLong) = &line
            && !limit.allow()
        {
            limited += 1;
            if limited.is_power_of_two() {
                tracing::warn!(
                    pid = peer.and_then(|c| c.pid()),
                    uid = peer.map(|c| c.uid()),
                    gid = peer.map(|c| c.gid()),
                    limited,
                    "control connection rate limited: over {rate} requests a second"
                );
            }
            let text = match &line {
                Ok(Line::Text(text)) => &text[..],
                _ => b"",
            };
            if let Some(reply) = rate_limited(text, rate, burst)
                && write.write_all(reply.line().as_bytes()).await.is_err()
            {
                return;
            }
            continue;
        }
        let reply = match line {
            Ok(Line::Closed) | Err(_) => return,
            Ok(Line::Endless) => {
                let error = RpcError::new(
                    code::INVALID_REQUEST,
                    format!(
                        "request line over {MAX_SKIP} bytes and no end in sight: closing the connection"
                    ),
                );
                let reply = Response::to(Value::Null, Err(error)).line();
                let _ = write.write_all(reply.as_bytes()).await;
                return;
            }
            Ok(Line::TooLong) => Some(Response::to(
                Value::Null,
                Err(RpcError::new(
                    code::INVALID_REQUEST,
                    format!("request line over {MAX_LINE} bytes"),
                )),
            )),
            Ok(Line::Text(text)) => {
                let (reply, watch) = answer(handler, &text, watching.is_some(), peer).await;
                if watch {
                    watching = Some(handler.events());
                }
                reply
            }
        };
        if let Some(reply) = reply
            && write.write_all(reply.line().as_bytes()).await.is_err()
        {
            return;
        }
    }
}

/// The reply to one request line (none for a notification), and whether
/// the connection now streams migration events.
async fn answer<H: Handler>(
    handler: &H,
    text: &[u8],
    streaming: bool,
    peer: Option<UCred>,
) -> (Option<Response>, bool) {
    let request = match parse_request(text) {
        Ok(request) => request,
        Err(response) => return (Some(*response), false),
    };
    let call = Call::parse(&request.method, request.params);
    let method = call.as_ref().ok().map(Call::method);
    let outcome = match call {
        _ if streaming => Err(RpcError::new(
            code::STREAMING,
            "this connection streams migration.watch notifications; send requests on another connection",
        )),
        Err(e) => Err(e),
        Ok(call) => {
            if !call.method().reads_only() {
                tracing::info!(
                    method = call.method().name(),
                    pid = peer.and_then(|c| c.pid()),
                    uid = peer.map(|c| c.uid()),
                    gid = peer.map(|c| c.gid()),
                    "control request"
                );
            }
            handler.call(call).await
        }
    };
    let watch = method == Some(Method::MigrationWatch) && outcome.is_ok();
    let reply = request.id.map(|id| Response::to(id, outcome));
    (reply, watch)
}

/// Tells a client over `socket_max_connections` why, and closes.
async fn refuse_connection(mut stream: UnixStream, most: u32) {
    let error = RpcError::new(
        code::BUSY,
        format!(
            "{most} control connections are open already (socket_max_connections): close one and retry"
        ),
    );
    let reply = Response::to(Value::Null, Err(error)).line();
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(reply.as_bytes())).await;
}

/// Longest request line the daemon reads (64 KiB); longer ones get
/// `INVALID_REQUEST` and are skipped up to their newline without being kept.
pub const MAX_LINE: usize = 64 << 10;
/// Most bytes of one over-long line the daemon skips (4 MiB): a connection
/// that sends more without a newline gets `INVALID_REQUEST` and is closed.
pub const MAX_SKIP: usize = 4 << 20;

/// One line read from a client.
pub enum Line {
    /// A complete line, without its newline.
    Text(Vec<u8>),
    /// A line over [`MAX_LINE`], read and discarded up to its newline.
    TooLong,
    /// Over [`MAX_SKIP`] bytes without a newline: the connection should close.
    Endless,
    /// The client closed the connection.
    Closed,
}

/// Reads one line of at most [`MAX_LINE`] bytes, never buffering more; an
/// over-long line is skipped up to its newline, for at most [`MAX_SKIP`] bytes.
pub async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R) -> std::io::Result<Line> {
    let mut line = Vec::new();
    let mut too_long = false;
    let mut skipped = 0usize;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(if line.is_empty() && !too_long {
                Line::Closed
            } else if too_long {
                Line::TooLong
            } else {
                Line::Text(line)
            });
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if !too_long {
            if line.len() + chunk.len() > MAX_LINE {
                too_long = true;
                line = Vec::new();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        let used = done.unwrap_or(buf.len());
        reader.consume(used);
        if too_long {
            skipped += used;
            if done.is_none() && skipped > MAX_SKIP {
                return Ok(Line::Endless);
            }
        }
        if done.is_some() {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Text(line)
            });
        }
    }
}

/// A connection's rate limit: `rate` requests a second, bursts of up to
/// `burst` (governor's GCRA, the token bucket's equivalent); `rate` 0 allows
/// everything.
pub struct RateLimit<C: Clock = DefaultClock>(
    Option<RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>>,
);

impl RateLimit {
    pub fn new(rate: u32, burst: u32) -> Self {
        Self::with_clock(rate, burst, DefaultClock::default())
    }
}

impl<C: Clock> RateLimit<C> {
    /// A full bucket on `clock`.
    pub fn with_clock(rate: u32, burst: u32, clock: C) -> Self {
        Self(NonZeroU32::new(rate).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
            RateLimiter::direct_with_clock(Quota::per_second(rate).allow_burst(burst), clock)
        }))
    }

    /// Takes a token: whether the request may run.
    pub fn allow(&self) -> bool {
        self.0.as_ref().is_none_or(|limit| limit.check().is_ok())
    }
}

/// The `RATE_LIMITED` reply to a request line, echoing its `id`; none for a
/// notification (a JSON object without an `id`), which is dropped.
pub fn rate_limited(text: &[u8], rate: u32, burst: u32) -> Option<Response> {
    #[derive(Deserialize)]
    struct IdOnly {
        #[serde(default)]
        id: Option<Value>,
    }
    let id = match serde_json::from_slice::<IdOnly>(text) {
        Ok(IdOnly { id: None }) => return None,
        Ok(IdOnly { id: Some(id) }) => id,
        Err(_) => Value::Null,
    };
    let error = RpcError::new(
        code::RATE_LIMITED,
        format!(
            "rate limited: over {rate} requests a second (bursts of {burst}) on this connection; \
             the request was not run, retry after a pause"
        ),
    );
    Some(Response::to(id, Err(error)))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8]) -> Vec<String> {
        let mut reader = tokio::io::BufReader::with_capacity(7, input);
        let mut out = Vec::new();
        loop {
            match read_line(&mut reader).await.unwrap() {
                Line::Text(t) => out.push(String::from_utf8(t).unwrap()),
                Line::TooLong => out.push("<too long>".into()),
                Line::Endless => out.push("<endless>".into()),
                Line::Closed => return out,
            }
        }
    }

    #[tokio::test]
    async fn reads_lines_and_bounds_them() {
        assert_eq!(lines(b"a\nbb\n\nccc").await, ["a", "bb", "", "ccc"]);
        let mut big = vec![b'x'; MAX_LINE + 1];
        big.extend_from_slice(b"\nnext\n");
        assert_eq!(lines(&big).await, ["<too long>", "next"]);
        let mut exact = vec![b'y'; MAX_LINE];
        exact.push(b'\n');
        assert_eq!(lines(&exact).await[0].len(), MAX_LINE);
    }

    #[tokio::test]
    async fn an_endless_line_ends_the_connection() {
        let mut endless = vec![b'z'; MAX_SKIP + 2 * MAX_LINE + 2];
        endless.extend_from_slice(b"\nnext\n");
        let mut reader = tokio::io::BufReader::new(&endless[..]);
        assert!(matches!(
            read_line(&mut reader).await.unwrap(),
            Line::Endless
        ));
        let mut skippable = vec![b'z'; MAX_SKIP];
        skippable.extend_from_slice(b"\nnext\n");
        assert_eq!(lines(&skippable).await, ["<too long>", "next"]);
    }

    #[test]
    fn the_rate_limit_allows_bursts_then_the_rate() {
        let clock = governor::clock::FakeRelativeClock::default();
        let limit = RateLimit::with_clock(100, 200, clock.clone());
        assert_eq!((0..300).filter(|_| limit.allow()).count(), 200);
        clock.advance(Duration::from_millis(100));
        assert_eq!((0..300).filter(|_| limit.allow()).count(), 10);
        clock.advance(Duration::from_secs(60));
        assert_eq!((0..300).filter(|_| limit.allow()).count(), 200);
        let unlimited = RateLimit::with_clock(0, 0, clock);
        assert!((0..10_000).all(|_| unlimited.allow()));
    }

    #[test]
    fn rate_limited_replies_echo_the_id() {
        let reply = rate_limited(br#"{"jsonrpc":"2.0","id":7,"method":"status"}"#, 100, 200);
        let reply = reply.unwrap();
        assert_eq!(reply.id, Value::from(7));
        assert_eq!(reply.error.unwrap().code, code::RATE_LIMITED);
        assert!(rate_limited(br#"{"jsonrpc":"2.0","method":"status"}"#, 1, 1).is_none());
        assert_eq!(rate_limited(b"garbage", 1, 1).unwrap().id, Value::Null);
    }
}

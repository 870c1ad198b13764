//! The control protocol: JSON-RPC 2.0 over a Unix socket, one JSON object a
//! line. This module has the wire types, the line reader that bounds a
//! request's size, and the blocking client the CLI uses. docs/api.md
//! documents every method.
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// Longest request line the daemon reads (64 KiB); longer ones get
/// `INVALID_REQUEST` and are skipped up to their newline without being kept.
pub const MAX_LINE: usize = 64 << 10;
/// Most bytes of one over-long line the daemon skips (4 MiB): a connection
/// that sends more without a newline gets `INVALID_REQUEST` and is closed.
pub const MAX_SKIP: usize = 4 << 20;

/// Stable error codes: JSON-RPC's own, and the daemon's in -32000..-32099.
pub mod code {
    /// The line is not JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// Not a JSON-RPC 2.0 request, or a line over 64 KiB.
    pub const INVALID_REQUEST: i64 = -32600;
    /// No such method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Parameters missing or of the wrong type.
    pub const INVALID_PARAMS: i64 = -32602;
    /// A bug or an unexpected system failure; the message says which.
    pub const INTERNAL_ERROR: i64 = -32603;
    /// The kernel dataplane refused an operation (a map update, a pin).
    pub const DATAPLANE: i64 = -32001;
    /// The flow, service or migration named does not exist.
    pub const NOT_FOUND: i64 = -32002;
    /// The flow or service exists already, or the service is migrating.
    pub const CONFLICT: i64 = -32003;
    /// The method exists but what it asks for is not built yet.
    pub const NOT_IMPLEMENTED: i64 = -32004;
    /// This connection streams `migration.watch`; send requests on another.
    pub const STREAMING: i64 = -32005;
    /// The peer daemon could not be reached or refused the link.
    pub const PEER: i64 = -32006;
    /// This connection sent requests faster than `socket_rate` (bursts of
    /// `socket_burst`): the request was not run; retry after a pause.
    pub const RATE_LIMITED: i64 = -32007;
    /// `socket_max_connections` connections are open already: this one is
    /// closed after the reply.
    pub const BUSY: i64 = -32008;
}

/// A JSON-RPC request as it arrives: a JSON object. (A derived
/// `Deserialize` would also take an array of the fields in order, such as
/// `["2.0", 1, "status"]`, which is not a request.)
#[derive(Debug)]
pub struct Request {
    pub jsonrpc: String,
    /// Absent for a notification; echoed in the response otherwise.
    pub id: Option<Value>,
    pub method: String,
    pub params: Value,
}

impl<'de> Deserialize<'de> for Request {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Fields {
            jsonrpc: String,
            #[serde(default)]
            id: Option<Value>,
            method: String,
            #[serde(default)]
            params: Value,
        }
        let object = serde_json::Map::deserialize(deserializer)?;
        let Fields {
            jsonrpc,
            id,
            method,
            params,
        } = Fields::deserialize(Value::Object(object)).map_err(serde::de::Error::custom)?;
        Ok(Self {
            jsonrpc,
            id,
            method,
            params,
        })
    }
}

/// A JSON-RPC error object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} (error {code})")]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl RpcError {
    /// An error with `code` and a message that says what to do.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            data: None,
        }
    }
}

/// A JSON-RPC response: `result` or `error`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub jsonrpc: String,
    pub id: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RpcError>,
}

impl Response {
    /// The response to request `id`.
    pub fn to(id: Value, outcome: Result<Value, RpcError>) -> Self {
        let (result, error) = match outcome {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e)),
        };
        Self {
            jsonrpc: "2.0".into(),
            id,
            result,
            error,
        }
    }

    /// This response as one line.
    pub fn line(&self) -> String {
        let mut s = serde_json::to_string(self).expect("a response serializes");
        s.push('\n');
        s
    }
}

/// A server-to-client notification line (`migration.watch`).
pub fn notification(method: &str, params: Value) -> String {
    let mut s =
        serde_json::json!({"jsonrpc": "2.0", "method": method, "params": params}).to_string();
    s.push('\n');
    s
}

/// Parses one request line as the daemon does: the request, or the error
/// response to send (`PARSE_ERROR` for a line that is not JSON,
/// `INVALID_REQUEST` for JSON that is not a JSON-RPC 2.0 request, echoing
/// its `id` if it has one).
pub fn parse_request(text: &[u8]) -> Result<Request, Box<Response>> {
    let value: Value = match serde_json::from_slice(text) {
        Ok(v) => v,
        Err(e) => {
            let error = RpcError::new(code::PARSE_ERROR, format!("not JSON: {e}"));
            return Err(Box::new(Response::to(Value::Null, Err(error))));
        }
    };
    let id = value.get("id").cloned().unwrap_or(Value::Null);
    match serde_json::from_value::<Request>(value) {
        Ok(r) if r.jsonrpc == "2.0" => Ok(r),
        _ => {
            let error = RpcError::new(
                code::INVALID_REQUEST,
                "not a JSON-RPC 2.0 request: send {\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"status\"}",
            );
            Err(Box::new(Response::to(id, Err(error))))
        }
    }
}

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

/// A token bucket: `rate` requests a second, bursts of up to `burst`.
#[derive(Clone, Debug)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: std::time::Instant,
}

impl RateLimit {
    /// A full bucket; `rate` 0 allows everything.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: rate.into(),
            burst: burst.max(1).into(),
            tokens: burst.max(1).into(),
            last: std::time::Instant::now(),
        }
    }

    /// Takes a token at `now`: whether the request may run.
    pub fn allow(&mut self, now: std::time::Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
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

/// Why a call through [`Client`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the daemon at {path}: {source} (is `dataplane daemon` running?)")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("talking to the daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon sent something that is not a JSON-RPC response: {0}")]
    Garbled(String),
    #[error("{0}")]
    Rpc(#[from] RpcError),
}

/// A blocking control-socket client, one request at a time.
pub struct Client {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    next_id: u64,
}

impl Client {
    /// Connects to the daemon's socket at `path`.
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            next_id: 1,
        })
    }

    /// Calls `method` with `params` and returns its result.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let request =
            serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        writeln!(self.writer, "{request}")?;
        let response: Response = serde_json::from_str(&self.next_line()?)
            .map_err(|e| ClientError::Garbled(e.to_string()))?;
        match (response.result, response.error) {
            (_, Some(error)) => Err(error.into()),
            (Some(result), None) => Ok(result),
            (None, None) => Err(ClientError::Garbled("neither result nor error".into())),
        }
    }

    /// The next line the daemon sends (a response or a notification).
    pub fn next_line(&mut self) -> Result<String, ClientError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(ClientError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        Ok(line)
    }
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
    fn the_token_bucket_allows_bursts_then_the_rate() {
        let mut limit = RateLimit::new(100, 200);
        let start = std::time::Instant::now();
        assert_eq!((0..300).filter(|_| limit.allow(start)).count(), 200);
        let later = start + std::time::Duration::from_millis(100);
        assert_eq!((0..300).filter(|_| limit.allow(later)).count(), 10);
        let much_later = start + std::time::Duration::from_secs(60);
        assert_eq!((0..300).filter(|_| limit.allow(much_later)).count(), 200);
        let mut unlimited = RateLimit::new(0, 0);
        assert!((0..10_000).all(|_| unlimited.allow(start)));
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

    /// Found with the control_request fuzz target's property: an array of
    /// the fields in order parsed as a request (and was answered with id null).
    #[test]
    fn only_objects_are_requests() {
        let request = parse_request(br#"{"jsonrpc":"2.0","id":1,"method":"status"}"#).unwrap();
        assert_eq!(
            (request.id, request.method.as_str()),
            (Some(Value::from(1)), "status")
        );
        assert_eq!(request.params, Value::Null);
        let request = parse_request(br#"{"jsonrpc":"2.0","id":null,"method":"m"}"#).unwrap();
        assert_eq!(request.id, None);
        for line in [
            &br#"["2.0",1,"status"]"#[..],
            br#"["2.0",null,"flow.add",{"cps":"192.0.2.1:4000"}]"#,
            br#"[{"jsonrpc":"2.0","id":1,"method":"status"}]"#,
            br#""2.0""#,
            br#"{"jsonrpc":"2.0","id":1}"#,
            br#"{"jsonrpc":"1.0","id":1,"method":"status"}"#,
        ] {
            let reply = parse_request(line).unwrap_err();
            assert_eq!(reply.error.unwrap().code, code::INVALID_REQUEST, "{line:?}");
        }
        let reply = parse_request(br#"{"jsonrpc":"2.0","id":9,"method":7}"#).unwrap_err();
        assert_eq!(reply.id, Value::from(9));
        let reply = parse_request(b"{\"jsonrpc\"").unwrap_err();
        assert_eq!(reply.error.unwrap().code, code::PARSE_ERROR);
    }

    #[test]
    fn responses_carry_result_or_error() {
        let ok = Response::to(Value::from(1), Ok(Value::from("x"))).line();
        assert_eq!(ok, "{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":\"x\"}\n");
        let err = Response::to(Value::Null, Err(RpcError::new(code::PARSE_ERROR, "bad"))).line();
        assert!(err.contains("\"error\":{\"code\":-32700,\"message\":\"bad\"}"));
    }
}

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

/// Longest request line the daemon reads; longer ones get `INVALID_REQUEST`.
pub const MAX_LINE: usize = 1 << 20;

/// Stable error codes: JSON-RPC's own, and the daemon's in -32000..-32099.
pub mod code {
    /// The line is not JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// Not a JSON-RPC 2.0 request, or a line over 1 MiB.
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
}

/// A JSON-RPC request as it arrives.
#[derive(Debug, Deserialize)]
pub struct Request {
    pub jsonrpc: String,
    /// Absent for a notification; echoed in the response otherwise.
    #[serde(default)]
    pub id: Option<Value>,
    pub method: String,
    #[serde(default)]
    pub params: Value,
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

/// One line read from a client.
pub enum Line {
    /// A complete line, without its newline.
    Text(Vec<u8>),
    /// A line over [`MAX_LINE`], read and discarded up to its newline.
    TooLong,
    /// The client closed the connection.
    Closed,
}

/// Reads one line of at most [`MAX_LINE`] bytes, never buffering more.
pub async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R) -> std::io::Result<Line> {
    let mut line = Vec::new();
    let mut too_long = false;
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
        if done.is_some() {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Text(line)
            });
        }
    }
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

    #[test]
    fn responses_carry_result_or_error() {
        let ok = Response::to(Value::from(1), Ok(Value::from("x"))).line();
        assert_eq!(ok, "{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":\"x\"}\n");
        let err = Response::to(Value::Null, Err(RpcError::new(code::PARSE_ERROR, "bad"))).line();
        assert!(err.contains("\"error\":{\"code\":-32700,\"message\":\"bad\"}"));
    }
}

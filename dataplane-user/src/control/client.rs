//! A blocking control-socket client, one request at a time: the CLI's, and
//! the tests'.
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::control::{Response, RpcError, method::Call};

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
    #[error(
        "the daemon's answer to {method} is not what this client reads ({source}): is it another version?"
    )]
    Answer {
        method: &'static str,
        source: serde_json::Error,
    },
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

    /// Makes `call` and reads its result as `A`, the method's answer type
    /// (docs/api.md and [`answer`](super::answer) say which it is).
    pub fn request<A: DeserializeOwned>(&mut self, call: &Call) -> Result<A, ClientError> {
        let method = call.method().name();
        let result = self.call(method, call.params())?;
        serde_json::from_value(result).map_err(|source| ClientError::Answer { method, source })
    }

    /// Calls `method` with `params` as they go on the wire, as a script in
    /// any language does, and returns its result.
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

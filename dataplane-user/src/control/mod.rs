//! The control protocol: JSON-RPC 2.0 over a Unix socket, one JSON object a
//! line. This module has the wire types; [`method`] the typed methods,
//! [`answer`] what they answer, [`server`] the daemon's side (bounded
//! lines, rate limits, connection limits), [`client`] the blocking client
//! the CLI uses. docs/api.md documents every method.
pub mod answer;
pub mod client;
pub mod method;
pub mod server;

use serde::{Deserialize, Serialize};
use serde_json::Value;

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

#[cfg(test)]
mod tests {
    use super::*;

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

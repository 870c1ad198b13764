//! The control socket's methods, typed: [`Method`] names them (the one list
//! of their wire names), [`Call`] is a method with its parameters. The
//! daemon parses each request into a `Call`; the CLI builds `Call`s and the
//! [`Client`](super::client::Client) sends them. [`answer`](super::answer)
//! has what each answers. docs/api.md documents each.
use std::net::SocketAddr;

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::{
    control::{RpcError, code},
    migration::{Request, replica::ReplicaRequest},
    service::{FlowSpec, Service},
};

/// A control method, by its wire name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Status,
    Metrics,
    FlowAdd,
    FlowRemove,
    FlowList,
    ServiceRegister,
    ServiceStart,
    ServiceStandby,
    ServiceUnregister,
    ServiceList,
    MigrationStart,
    MigrationStatus,
    MigrationAbort,
    MigrationWatch,
    ReplicaStart,
    ReplicaStop,
    PeerPing,
}

impl Method {
    /// Every method.
    pub const ALL: [Method; 17] = [
        Method::Status,
        Method::Metrics,
        Method::FlowAdd,
        Method::FlowRemove,
        Method::FlowList,
        Method::ServiceRegister,
        Method::ServiceStart,
        Method::ServiceStandby,
        Method::ServiceUnregister,
        Method::ServiceList,
        Method::MigrationStart,
        Method::MigrationStatus,
        Method::MigrationAbort,
        Method::MigrationWatch,
        Method::ReplicaStart,
        Method::ReplicaStop,
        Method::PeerPing,
    ];

    /// The method's name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Method::Status => "status",
            Method::Metrics => "metrics",
            Method::FlowAdd => "flow.add",
            Method::FlowRemove => "flow.remove",
            Method::FlowList => "flow.list",
            Method::ServiceRegister => "service.register",
            Method::ServiceStart => "service.start",
            Method::ServiceStandby => "service.standby",
            Method::ServiceUnregister => "service.unregister",
            Method::ServiceList => "service.list",
            Method::MigrationStart => "migration.start",
            Method::MigrationStatus => "migration.status",
            Method::MigrationAbort => "migration.abort",
            Method::MigrationWatch => "migration.watch",
            Method::ReplicaStart => "replica.start",
            Method::ReplicaStop => "replica.stop",
            Method::PeerPing => "peer.ping",
        }
    }

    /// The method named `name` on the wire.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Whether the method only reads. The daemon logs every other request
    /// with its caller's credentials (pid, uid, gid).
    pub fn reads_only(self) -> bool {
        matches!(
            self,
            Method::Status
                | Method::Metrics
                | Method::FlowList
                | Method::ServiceList
                | Method::MigrationStatus
                | Method::MigrationWatch
        )
    }
}

/// A method with its parameters.
#[derive(Clone, Debug)]
pub enum Call {
    Status,
    Metrics,
    FlowAdd(FlowSpec),
    FlowRemove(FlowSpec),
    FlowList,
    ServiceRegister(Service),
    ServiceStart(ServiceStart),
    ServiceStandby(ServiceName),
    ServiceUnregister(ServiceName),
    ServiceList,
    MigrationStart(Request),
    /// One migration, or (none) every one.
    MigrationStatus(Option<MigrationId>),
    MigrationAbort(MigrationId),
    MigrationWatch,
    ReplicaStart(ReplicaRequest),
    ReplicaStop(ServiceName),
    PeerPing(PeerAddress),
}

impl Call {
    /// The call a request names: `METHOD_NOT_FOUND` for an unknown method,
    /// `INVALID_PARAMS` for parameters it does not take. Methods without
    /// parameters ignore any they are sent.
    pub fn parse(method: &str, params: Value) -> Result<Self, RpcError> {
        let Some(method) = Method::from_name(method) else {
            return Err(RpcError::new(
                code::METHOD_NOT_FOUND,
                format!("no method {method:?}; docs/api.md lists them"),
            ));
        };
        Ok(match method {
            Method::Status => Call::Status,
            Method::Metrics => Call::Metrics,
            Method::FlowAdd => Call::FlowAdd(parse(params)?),
            Method::FlowRemove => Call::FlowRemove(parse(params)?),
            Method::FlowList => Call::FlowList,
            Method::ServiceRegister => Call::ServiceRegister(parse(params)?),
            Method::ServiceStart => Call::ServiceStart(parse(params)?),
            Method::ServiceStandby => Call::ServiceStandby(parse(params)?),
            Method::ServiceUnregister => Call::ServiceUnregister(parse(params)?),
            Method::ServiceList => Call::ServiceList,
            Method::MigrationStart => Call::MigrationStart(parse(params)?),
            Method::MigrationStatus => Call::MigrationStatus(match params {
                Value::Null => None,
                Value::Object(o) if o.is_empty() => None,
                params => Some(parse(params)?),
            }),
            Method::MigrationAbort => Call::MigrationAbort(parse(params)?),
            Method::MigrationWatch => Call::MigrationWatch,
            Method::ReplicaStart => Call::ReplicaStart(parse(params)?),
            Method::ReplicaStop => Call::ReplicaStop(parse(params)?),
            Method::PeerPing => Call::PeerPing(parse(params)?),
        })
    }

    pub fn method(&self) -> Method {
        match self {
            Call::Status => Method::Status,
            Call::Metrics => Method::Metrics,
            Call::FlowAdd(_) => Method::FlowAdd,
            Call::FlowRemove(_) => Method::FlowRemove,
            Call::FlowList => Method::FlowList,
            Call::ServiceRegister(_) => Method::ServiceRegister,
            Call::ServiceStart(_) => Method::ServiceStart,
            Call::ServiceStandby(_) => Method::ServiceStandby,
            Call::ServiceUnregister(_) => Method::ServiceUnregister,
            Call::ServiceList => Method::ServiceList,
            Call::MigrationStart(_) => Method::MigrationStart,
            Call::MigrationStatus(_) => Method::MigrationStatus,
            Call::MigrationAbort(_) => Method::MigrationAbort,
            Call::MigrationWatch => Method::MigrationWatch,
            Call::ReplicaStart(_) => Method::ReplicaStart,
            Call::ReplicaStop(_) => Method::ReplicaStop,
            Call::PeerPing(_) => Method::PeerPing,
        }
    }

    /// The parameters as they go on the wire.
    pub fn params(&self) -> Value {
        let value = match self {
            Call::Status
            | Call::Metrics
            | Call::FlowList
            | Call::ServiceList
            | Call::MigrationWatch
            | Call::MigrationStatus(None) => return Value::Object(Default::default()),
            Call::FlowAdd(p) => serde_json::to_value(p),
            Call::FlowRemove(p) => serde_json::to_value(p),
            Call::ServiceRegister(p) => serde_json::to_value(p),
            Call::ServiceStart(p) => serde_json::to_value(p),
            Call::ServiceStandby(p) | Call::ServiceUnregister(p) | Call::ReplicaStop(p) => {
                serde_json::to_value(p)
            }
            Call::ReplicaStart(p) => serde_json::to_value(p),
            Call::MigrationStart(p) => serde_json::to_value(p),
            Call::MigrationStatus(Some(p)) | Call::MigrationAbort(p) => serde_json::to_value(p),
            Call::PeerPing(p) => serde_json::to_value(p),
        };
        value.expect("parameters serialize")
    }
}

/// `service.start`: a service the daemon starts, as CRIU needs it, from
/// `command`, with its flows, and (`standby`) a standby from the same
/// command in this host's standbys' namespace.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceStart {
    pub name: String,
    pub flows: Vec<FlowSpec>,
    #[serde(default)]
    pub standby: bool,
    pub command: Vec<String>,
    /// Run `command` in a runc container of this image
    /// (`container_images/IMAGE`), named after the service.
    #[serde(default)]
    pub image: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceName {
    pub name: String,
}

/// A migration by its id: what `migration.status` and `migration.abort`
/// take, and what `migration.start` answers.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MigrationId {
    pub id: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerAddress {
    pub address: SocketAddr,
}

/// Parses a method's params, naming what is wrong with them.
fn parse<T: DeserializeOwned>(params: Value) -> Result<T, RpcError> {
    serde_json::from_value(params).map_err(|e| {
        RpcError::new(
            code::INVALID_PARAMS,
            format!("invalid params: {e}; see docs/api.md"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_parse_back() {
        for method in Method::ALL {
            assert_eq!(Method::from_name(method.name()), Some(method));
        }
        let mut names: Vec<_> = Method::ALL.iter().map(|m| m.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Method::ALL.len());
    }

    /// What the CLI sends, the daemon parses back to the same call.
    #[test]
    fn calls_round_trip_through_the_wire_form() {
        let calls = [
            Call::Status,
            Call::FlowAdd(FlowSpec {
                cps: "192.0.2.1:4000".parse().unwrap(),
                service: "192.0.2.10:5000".parse().unwrap(),
            }),
            Call::MigrationStatus(None),
            Call::MigrationStatus(Some(MigrationId { id: "x-1".into() })),
            Call::PeerPing(PeerAddress {
                address: "198.51.100.2:7070".parse().unwrap(),
            }),
        ];
        for call in calls {
            let again = Call::parse(call.method().name(), call.params()).unwrap();
            assert_eq!(format!("{again:?}"), format!("{call:?}"));
        }
    }

    #[test]
    fn unknown_methods_and_bad_params_get_their_codes() {
        let unknown = Call::parse("flow.explode", Value::Null).unwrap_err();
        assert_eq!(unknown.code, code::METHOD_NOT_FOUND);
        let bad = Call::parse("flow.add", serde_json::json!({"cps": "nope"})).unwrap_err();
        assert_eq!(bad.code, code::INVALID_PARAMS);
        let extra = Call::parse("migration.abort", serde_json::json!({"id": "a", "x": 1}));
        assert_eq!(extra.unwrap_err().code, code::INVALID_PARAMS);
        // Methods without parameters take `{}` (and anything else) as none.
        assert!(matches!(
            Call::parse("status", serde_json::json!({})),
            Ok(Call::Status)
        ));
    }
}

//! What each control method answers, typed once: the daemon's handlers
//! build these and the [`Client`](super::client::Client) reads them back
//! ([`Client::request`](super::client::Client::request)). docs/api.md shows
//! each; a test here checks its examples against these types.
//!
//! Answers that are types of their own elsewhere: `metrics` a `String` (the
//! OpenMetrics page), `flow.list` a `Vec<FlowInfo>`, `service.list` a
//! `Vec<Service>`, `migration.start` a [`MigrationId`](super::method::MigrationId),
//! `migration.status` a [`Report`] (with no id, a `Vec<Report>`).
use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::{report::Report, service::Service};

/// `status`: the daemon's view of itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pin_root: PathBuf,
    /// The daemon found the dataplane pinned and running (a restart)
    /// rather than loading it.
    pub adopted: bool,
    pub uptime_s: u64,
    pub interfaces: Interfaces,
    /// The attached programs, `INTERFACE/PROGRAM`.
    pub programs: Vec<String>,
    pub flows: Vec<FlowInfo>,
    /// Every counter of the kernel programs, by name.
    pub counters: BTreeMap<String, u64>,
    pub services: Vec<Service>,
    pub migrations: Vec<Report>,
    pub peer_listen: Option<SocketAddr>,
    /// This host's public key: its peer links are sealed. None with
    /// `peer_insecure` (or no peer link).
    pub peer_key: Option<String>,
    /// The names of the listed peers.
    pub peers: Vec<String>,
    /// The services this host took over from a source that stopped (a
    /// hot replica's failover), since the daemon started.
    #[serde(default)]
    pub takeovers: Vec<crate::migration::failover::Takeover>,
}

/// `status`'s interfaces.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Interfaces {
    pub service: String,
    pub peer: Option<String>,
    /// Where mirror frames are taken (`mirror_from`, or the peer interface).
    pub mirror_from: Option<String>,
}

/// A row of `flow.list` (and of `status`'s `flows`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlowInfo {
    pub id: u32,
    pub cps: SocketAddr,
    pub service: SocketAddr,
    pub mirror: bool,
    /// The last input numbered on this host.
    pub last_seq: u64,
    /// The last input the local instance got.
    pub last_delivered: u64,
}

/// `flow.add`: the new flow's id, and the flow as the daemon names it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FlowAdded {
    pub id: u32,
    pub flow: String,
}

/// `flow.remove`: the flow, as the daemon names it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FlowRemoved {
    pub removed: String,
}

/// `service.register`: the service's name.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceRegistered {
    pub registered: String,
}

/// `service.start`: the service's name and the processes started.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceStarted {
    pub started: String,
    pub pid: u32,
    pub standby_pid: Option<u32>,
}

/// `service.standby`: the service's name and its new standby.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StandbySeeded {
    pub service: String,
    pub standby_pid: u32,
}

/// `service.unregister`: the service's name.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceUnregistered {
    pub unregistered: String,
}

/// `migration.abort`: the migration that stops at its next phase boundary.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MigrationAborting {
    pub aborting: String,
}

/// `replica.stop`: the replica that ends (its report says when).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicaStopping {
    pub stopping: String,
}

/// `migration.watch`: from now on the connection carries [`Event`]s.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Watching {
    pub watching: bool,
}

/// `peer.ping`: who answered, and the round trip.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerPong {
    /// The peer daemon's host name.
    pub host: String,
    /// Its peer-link protocol version.
    pub version: u32,
    pub rtt_us: u64,
}

/// A notification on a connection that called `migration.watch`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "method", content = "params")]
pub enum Event {
    /// A migration's report after a phase change (or, during the
    /// transfer, more image bytes).
    #[serde(rename = "migration.phase")]
    Phase(Box<Report>),
    /// A reader too slow for the events missed this many.
    #[serde(rename = "migration.lagged")]
    Lagged { missed: u64 },
}

impl Event {
    /// This event as a JSON-RPC notification line.
    pub fn line(&self) -> String {
        #[derive(Serialize)]
        struct Notification<'a> {
            jsonrpc: &'static str,
            #[serde(flatten)]
            event: &'a Event,
        }
        let notification = Notification {
            jsonrpc: "2.0",
            event: self,
        };
        let mut s = serde_json::to_string(&notification).expect("an event serializes");
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use serde::de::DeserializeOwned;
    use serde_json::Value;

    use super::*;
    use crate::control::method::MigrationId;

    /// docs/api.md's example result of each method that shows one: the
    /// first code after "Result" in the method's section, where it is JSON.
    fn documented_results() -> Vec<(&'static str, Value)> {
        let api = include_str!("../../../docs/api.md");
        api.split("\n### ")
            .skip(1)
            .filter_map(|section| {
                let (method, text) = section.split_once('\n')?;
                let text = &text[text.find("Result")?..];
                let code = &text[text.find('`')?..];
                let code = match code.strip_prefix("```json") {
                    Some(block) => &block[..block.find("```")?],
                    None => code[1..].split('`').next()?,
                };
                Some((method, serde_json::from_str(code).ok()?))
            })
            .collect()
    }

    /// `example` read as an `A` and written again.
    fn again<A: Serialize + DeserializeOwned>(example: &Value) -> Value {
        let answer: A = serde_json::from_value(example.clone())
            .unwrap_or_else(|e| panic!("{example} as {}: {e}", std::any::type_name::<A>()));
        serde_json::to_value(answer).unwrap()
    }

    /// Each documented result reads as the method's answer type and writes
    /// back the same: the docs name no field the type lacks, and the type
    /// has none the docs leave out.
    #[test]
    fn the_documented_results_are_the_answers() {
        let results = documented_results();
        for (method, example) in &results {
            let written = match *method {
                "status" => again::<Status>(example),
                "flow.add" => again::<FlowAdded>(example),
                "flow.remove" => again::<FlowRemoved>(example),
                "flow.list" => again::<Vec<FlowInfo>>(example),
                "service.register" => again::<ServiceRegistered>(example),
                "service.start" => again::<ServiceStarted>(example),
                "service.standby" => again::<StandbySeeded>(example),
                "service.unregister" => again::<ServiceUnregistered>(example),
                "migration.start" => again::<MigrationId>(example),
                "migration.status" => again::<Report>(example),
                "migration.abort" => again::<MigrationAborting>(example),
                "migration.watch" => again::<Watching>(example),
                "replica.start" => again::<MigrationId>(example),
                "replica.stop" => again::<ReplicaStopping>(example),
                "peer.ping" => again::<PeerPong>(example),
                other => panic!("docs/api.md shows a result of {other}: check it here"),
            };
            assert_eq!(&written, example, "{method}");
        }
        // Every method but metrics and service.list (prose only) shows one.
        assert_eq!(results.len(), 15, "{results:?}");
    }

    #[test]
    fn events_are_notification_lines() {
        let lagged = Event::Lagged { missed: 3 }.line();
        assert_eq!(
            lagged,
            "{\"jsonrpc\":\"2.0\",\"method\":\"migration.lagged\",\"params\":{\"missed\":3}}\n"
        );
        let report = Report {
            id: "plc-1".into(),
            ..Default::default()
        };
        let phase = Event::Phase(Box::new(report)).line();
        assert!(phase.starts_with(
            "{\"jsonrpc\":\"2.0\",\"method\":\"migration.phase\",\"params\":{\"id\":\"plc-1\","
        ));
        match serde_json::from_str(&phase).unwrap() {
            Event::Phase(report) => assert_eq!(report.id, "plc-1"),
            other => panic!("{other:?}"),
        }
    }
}

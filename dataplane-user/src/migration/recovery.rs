//! At a daemon's start: finishes what migrations left when its previous
//! run died, from their journals ([`super::journal`]), on either side.
//! Each journal and its images are removed afterwards, whatever came of it.
use std::{path::PathBuf, sync::Arc};

use crate::{
    migration::{
        destination,
        journal::{Files, Incoming, Journal, Outgoing, Side},
        source,
    },
    registry::Registry,
};

/// What recovery works with on this host.
pub struct Host {
    pub files: Files,
    /// This host's dataplane.
    pub pin_root: PathBuf,
    /// The standby's dataplane, if this host keeps one.
    pub standby_pin_root: Option<PathBuf>,
    /// Where a destination announces the addresses of a service it kept.
    pub interface: String,
    /// Where a destination registers a service it kept.
    pub services: Arc<Registry>,
    /// Where the containers of this host's services are kept.
    pub containers: crate::host::container::Containers,
    /// Whether this daemon serves the peer link: only then does it keep
    /// the hot replicas it held ([`Recovered::replicas`]).
    pub keeps_replicas: bool,
}

/// What recovery left for the daemon to take up again: hot replicas in
/// sync, by migration id, with their journals (which stay).
#[derive(Default)]
pub struct Recovered {
    /// What was done, one line per migration.
    pub done: Vec<String>,
    /// Hot replicas of services served here, to attach to again.
    pub sources: Vec<(String, Outgoing)>,
    /// Hot replicas held here, to park for their sources.
    pub replicas: Vec<(String, Incoming)>,
}

/// Acts on every journal left but those of hot replicas in sync, which
/// it leaves to the daemon. A journal that cannot be read (the disk failed it: the daemon never
/// leaves a torn one) is acted on last, from what the kernel and /proc
/// say is still in a migration's state once the others are undone.
pub fn recover(host: &Host) -> Recovered {
    host.files.remove_unfinished_writes();
    let mut left = host.files.left();
    left.sort_by_key(|l| l.journal.is_err());
    let mut recovered = Recovered::default();
    for left in left {
        let outcome = match (left.journal, left.side) {
            (Ok(Journal::Source(outgoing)), _)
                if source::keeps_replica(&host.pin_root, &outgoing) =>
            {
                recovered.sources.push((left.id, outgoing));
                continue;
            }
            (Ok(Journal::Destination(incoming)), _)
                if host.keeps_replicas && incoming.replica.is_some() =>
            {
                recovered.replicas.push((left.id, incoming));
                continue;
            }
            (Err(e), Side::Source) => format!(
                "{e}; {}",
                source::recover_unjournaled(&host.pin_root, host.standby_pin_root.as_deref())
            ),
            (Err(e), Side::Destination) => format!(
                "{e}; {}",
                destination::recover_unjournaled(&host.pin_root, &host.interface)
            ),
            (Ok(Journal::Source(outgoing)), _) => source::recover(
                &host.pin_root,
                host.standby_pin_root.as_deref(),
                &host.interface,
                &host.containers,
                &outgoing,
            ),
            (Ok(Journal::Destination(incoming)), _) => destination::recover(
                &host.pin_root,
                &host.interface,
                &host.services,
                &host.containers,
                &incoming,
            ),
        };
        host.files.remove(left.side, &left.id);
        let line = match left.side {
            Side::Source => format!("migration {} from this host: {outcome}", left.id),
            Side::Destination => format!("migration {} to this host: {outcome}", left.id),
        };
        tracing::warn!("{line}");
        recovered.done.push(line);
    }
    recovered
}

/// Undoes a migration from this host that recovery left to the daemon (a
/// hot replica it could not take up again), as [`recover`] would have.
pub fn undo_source(host: &Host, id: &str, outgoing: &Outgoing) -> String {
    let outcome = source::recover(
        &host.pin_root,
        host.standby_pin_root.as_deref(),
        &host.interface,
        &host.containers,
        outgoing,
    );
    host.files.remove(Side::Source, id);
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        migration::journal::{FlowBefore, Incoming, Outgoing},
        service::FlowSpec,
    };

    #[test]
    fn every_journal_is_acted_on_reported_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::new(dir.path());
        let flow = FlowSpec {
            cps: "10.0.0.1:5000".parse().unwrap(),
            service: "10.0.0.2:6000".parse().unwrap(),
        };
        let source = Journal::Source(Outgoing {
            flow_id: 1,
            flows: vec![FlowBefore { flow, flags: 0 }],
            instances: vec![],
            containers: vec![],
            runtime: Default::default(),
            replica: None,
        });
        files.write("out", &source).unwrap();
        std::fs::create_dir_all(files.images(Side::Source, "out")).unwrap();
        files
            .write(
                "in",
                &Journal::Destination(Incoming {
                    service: None,
                    flows: vec![],
                    instance: None,
                    deadline_ms: 10_000,
                    local_addresses: vec![],
                    command: None,
                    standby: false,
                    replica: None,
                    container: None,
                }),
            )
            .unwrap();
        std::fs::create_dir_all(dir.path().join("journal")).unwrap();
        std::fs::write(dir.path().join("journal/torn.destination.json"), "{").unwrap();
        // A write the daemon did not finish: no journal, and removed.
        let unfinished = dir.path().join("journal/half.source.partial");
        std::fs::write(&unfinished, "{\"side\":").unwrap();
        let host = Host {
            files: files.clone(),
            // No dataplane here: recovery says so and still cleans up.
            pin_root: dir.path().join("no-dataplane"),
            standby_pin_root: None,
            interface: "lo".into(),
            services: Arc::new(Registry::open(&dir.path().join("services.json")).unwrap().0),
            containers: crate::config::DaemonConfig {
                runc_root: dir.path().join("runc"),
                ..toml::from_str("interface = \"lo\"").unwrap()
            }
            .containers(),
            keeps_replicas: true,
        };
        let done = recover(&host).done;
        assert_eq!(done.len(), 3, "{done:#?}");
        assert!(
            done[0].starts_with("migration in to this host: no dataplane"),
            "{}",
            done[0]
        );
        assert!(
            done[1].starts_with("migration out from this host: no dataplane is pinned"),
            "{}",
            done[1]
        );
        assert!(
            done[2].contains("torn") && done[2].contains("is not a journal"),
            "{}",
            done[2]
        );
        assert!(files.left().is_empty());
        assert!(!unfinished.exists());
        assert!(!files.images(Side::Source, "out").exists());
    }
}

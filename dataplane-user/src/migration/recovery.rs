//! At a daemon's start: finishes what migrations left when its previous
//! run died, from their journals ([`super::journal`]), on either side.
//! Each journal and its images are removed afterwards, whatever came of it.
use std::path::PathBuf;

use crate::migration::{
    destination,
    journal::{Files, Journal, Side},
    source,
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
}

/// Acts on every journal left; what was done, one line per migration.
pub fn recover(host: &Host) -> Vec<String> {
    let mut done = Vec::new();
    for left in host.files.left() {
        let outcome = match left.journal {
            Err(e) => format!("{e}; removed"),
            Ok(Journal::Source {
                flow_id,
                flow,
                flags,
                instances,
            }) => source::recover(
                &host.pin_root,
                host.standby_pin_root.as_deref(),
                flow_id,
                &flow,
                flags,
                &instances,
            ),
            Ok(Journal::Destination {
                flows,
                instance,
                deadline_ms,
            }) => destination::recover(
                &host.pin_root,
                &host.interface,
                &flows,
                instance,
                deadline_ms,
            ),
        };
        host.files.remove(left.side, &left.id);
        let line = match left.side {
            Side::Source => format!("migration {} from this host: {outcome}", left.id),
            Side::Destination => format!("migration {} to this host: {outcome}", left.id),
        };
        tracing::warn!("{line}");
        done.push(line);
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::FlowSpec;

    #[test]
    fn every_journal_is_acted_on_reported_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::new(dir.path());
        let flow = FlowSpec {
            cps: "10.0.0.1:5000".parse().unwrap(),
            service: "10.0.0.2:6000".parse().unwrap(),
        };
        let source = Journal::Source {
            flow_id: 1,
            flow,
            flags: 0,
            instances: vec![],
        };
        files.write("out", &source).unwrap();
        std::fs::create_dir_all(files.images(Side::Source, "out")).unwrap();
        files
            .write(
                "in",
                &Journal::Destination {
                    flows: vec![],
                    instance: None,
                    deadline_ms: 10_000,
                },
            )
            .unwrap();
        std::fs::create_dir_all(dir.path().join("journal")).unwrap();
        std::fs::write(dir.path().join("journal/torn.destination.json"), "{").unwrap();
        let host = Host {
            files: files.clone(),
            // No dataplane here: recovery says so and still cleans up.
            pin_root: dir.path().join("no-dataplane"),
            standby_pin_root: None,
            interface: "lo".into(),
        };
        let done = recover(&host);
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
        assert!(!files.images(Side::Source, "out").exists());
    }
}

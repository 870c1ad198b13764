//! What a migration leaves on disk while it runs, so that a daemon that dies
//! mid-migration can undo (or keep) it at its next start.
use std::path::PathBuf;

use dataplane_common::GATE_DELIVER_ALL;
use serde::{Deserialize, Serialize};

use crate::{
    kernel::{flow, loader::Dataplane},
    service::{FlowSpec, Service},
};
/// What a source daemon that dies mid-migration leaves to undo.
#[derive(Serialize, Deserialize)]
pub(super) struct SourceJournal {
    pub(super) flow_id: u32,
    pub(super) flow: FlowSpec,
    /// The flow's flags before the migration.
    pub(super) flags: u32,
}

impl SourceJournal {
    pub(super) fn write(&self, path: &std::path::Path) -> Result<(), String> {
        let text = serde_json::to_vec(self).expect("a journal serializes");
        path.parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(path, text))
            .map_err(|e| format!("writing {}: {e}", path.display()))
    }
}

pub(super) fn spec_of(service: &Service) -> crate::service::FlowSpec {
    service.flows[0].clone()
}

pub(super) fn source_journal_path(images_dir: &std::path::Path, id: &str) -> PathBuf {
    images_dir
        .join("outgoing")
        .join(format!("{id}.journal.json"))
}

/// At a daemon's start: undoes what migrations from this host left when
/// its previous run died. Before the flip: the flow's mirroring goes back
/// to what it was and its gates (and the standby's, under
/// `standby_pin_root`) deliver again (inputs held when the daemon died are
/// lost to the instance: the gap is the time until this start). Flipped:
/// the destination serves; inputs above K keep going to it. What was done,
/// one line per migration.
pub fn recover(
    pin_root: &std::path::Path,
    images_dir: &std::path::Path,
    standby_pin_root: Option<&std::path::Path>,
) -> Vec<String> {
    let outgoing = images_dir.join("outgoing");
    let Ok(entries) = std::fs::read_dir(&outgoing) else {
        return Vec::new();
    };
    let mut done = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".journal.json") else {
            continue;
        };
        let outcome = recover_source(pin_root, &entry.path(), standby_pin_root);
        let _ = std::fs::remove_dir_all(outgoing.join(id));
        let _ = std::fs::remove_file(entry.path());
        let line = format!("migration {id} from this host: {outcome}");
        tracing::warn!("{line}");
        done.push(line);
    }
    done
}

fn recover_source(
    pin_root: &std::path::Path,
    journal: &std::path::Path,
    standby_pin_root: Option<&std::path::Path>,
) -> String {
    let journal: SourceJournal = match std::fs::read(journal)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(journal) => journal,
        Err(e) => return format!("unreadable journal ({e}); removed"),
    };
    let undo = || -> Result<(), String> {
        let mut dataplane = Dataplane::open(pin_root).map_err(|e| e.to_string())?;
        let window = dataplane.gate_window().map_err(|e| e.to_string())?;
        if let Err(k) = window.unflip(journal.flow_id) {
            return Err(format!(
                "handed over at K = {k}: inputs above K keep going to the destination"
            ));
        }
        let key = flow::udp(journal.flow.cps, journal.flow.service);
        dataplane
            .set_flow_flags(&key, journal.flags)
            .and_then(|()| dataplane.set_input_gate(journal.flow_id, GATE_DELIVER_ALL, 0))
            .map_err(|e| e.to_string())?;
        if let Some(root) = standby_pin_root {
            let mut standby = Dataplane::open(root).map_err(|e| e.to_string())?;
            standby
                .set_input_gate(journal.flow_id, GATE_DELIVER_ALL, 0)
                .map_err(|e| format!("the standby's gate: {e}"))?;
        }
        Ok(())
    };
    match undo() {
        Ok(()) => "rolled back: mirroring off, gates delivering".into(),
        Err(e) => e,
    }
}

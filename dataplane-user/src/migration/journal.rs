//! What a migration keeps on disk on either host: its checkpoint images,
//! and a journal of what it changed, so that a daemon that dies
//! mid-migration can undo (or keep) it at its next start
//! ([`super::recovery`]). One format and one place for both sides:
//!
//! ```text
//! <images_dir>/outgoing/<id>/              images a source sends
//! <images_dir>/<id>/                       images a destination received
//! <images_dir>/journal/<id>.<side>.json    the journal, side: source | destination
//! ```
use std::{
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{host::tasks::Identity, migration::protocol::TargetFlow, service::FlowSpec};

/// One migration's journal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "side", rename_all = "snake_case")]
pub enum Journal {
    /// A migration from this host.
    Source(Outgoing),
    /// A migration to this host.
    Destination(Incoming),
}

/// What a migration from this host changed, to put back (or, once the
/// destination serves, to let go of).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outgoing {
    /// The id the service's flows share here.
    pub flow_id: u32,
    pub flows: Vec<FlowBefore>,
    /// The service's processes here (the serving instance, the standby),
    /// as registered: they go once the destination serves (journals
    /// written before it: none).
    #[serde(default)]
    pub instances: Vec<Identity>,
    /// Those of them that are containers, by their ids in this host's
    /// `runtime`: they leave it with their instances.
    #[serde(default)]
    pub containers: Vec<String>,
    /// The runtime of those containers.
    #[serde(default)]
    pub runtime: crate::service::Runtime,
    /// A hot replica in sync on the destination: kept, not undone, by a
    /// restarted daemon whose instances still run, which attaches to it
    /// again with this request.
    #[serde(default)]
    pub replica: Option<super::Request>,
}

/// One flow of a migration from this host, and its flags before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowBefore {
    pub flow: FlowSpec,
    pub flags: u32,
}

/// What a migration to this host changed: the flows it adopted, the
/// addresses it made local and the instance it restored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incoming {
    /// The service's name, registered here if it was handed over
    /// (journals written before it: none).
    #[serde(default)]
    pub service: Option<String>,
    pub flows: Vec<TargetFlow>,
    pub instance: Option<Identity>,
    /// The source's `deadline_ms`: how long an armed handover is waited
    /// for at recovery (journals written before it: 10 s).
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    /// The service addresses put on lo for the restore, which a rollback
    /// takes off.
    #[serde(default)]
    pub local_addresses: Vec<std::net::IpAddr>,
    /// The command the service was started with, registered with it.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Whether the service had a standby on its source (journals written
    /// before it: none).
    #[serde(default)]
    pub standby: bool,
    /// A hot replica in sync here: kept, not undone, by a restarted daemon
    /// while its instance runs, for its source to attach to again.
    #[serde(default)]
    pub replica: Option<ReplicaHere>,
    /// The container the instance is, if it is one: runc knows it here
    /// under the service's name, and a rollback deletes it there.
    #[serde(default)]
    pub container: Option<crate::host::runc::Image>,
}

/// A hot replica held on this host: whose it is, and whom it watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaHere {
    /// The address its source's daemon links from: only that host may
    /// attach to it again.
    pub source: std::net::IpAddr,
    /// The source's MAC on the service network, which the watch probes.
    pub holder: [u8; 6],
}

fn default_deadline_ms() -> u64 {
    super::DEFAULT_DEADLINE_MS
}

impl Journal {
    pub fn side(&self) -> Side {
        match self {
            Journal::Source(_) => Side::Source,
            Journal::Destination(_) => Side::Destination,
        }
    }
}

/// Which end of a migration this host is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Destination => "destination",
        }
    }
}

/// A journal that cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("writing the journal {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("reading the journal {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("the journal {} is not a journal: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The migrations' files under one `images_dir`.
#[derive(Clone, Debug)]
pub struct Files {
    images_dir: PathBuf,
}

/// A journal found on disk.
pub struct Left {
    pub id: String,
    pub side: Side,
    pub journal: Result<Journal, JournalError>,
}

impl Files {
    pub fn new(images_dir: impl Into<PathBuf>) -> Self {
        Self {
            images_dir: images_dir.into(),
        }
    }

    /// Where the images of migration `id` are on this `side`.
    pub fn images(&self, side: Side, id: &str) -> PathBuf {
        match side {
            Side::Source => self.images_dir.join("outgoing").join(id),
            Side::Destination => self.images_dir.join(id),
        }
    }

    /// Where a destination receives images (the images of `id` go to `<root>/<id>`).
    pub fn incoming_root(&self) -> &Path {
        &self.images_dir
    }

    /// Whether `id` would name one of this layout's own entries as a
    /// destination's images (`journal`, `outgoing`, or another
    /// migration's `.partial` directory), which receiving it would replace.
    pub fn reserved(id: &str) -> bool {
        ["journal", "outgoing"].contains(&id) || id.ends_with(".partial")
    }

    fn journal_dir(&self) -> PathBuf {
        self.images_dir.join("journal")
    }

    fn journal_path(&self, side: Side, id: &str) -> PathBuf {
        self.journal_dir()
            .join(format!("{id}.{}.json", side.name()))
    }

    /// Creates `images_dir` for root only, or makes it so: images hold a
    /// service's whole memory.
    pub fn create(&self) -> io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.images_dir)?;
        std::fs::set_permissions(&self.images_dir, std::fs::Permissions::from_mode(0o700))
    }

    /// Writes (or replaces) the journal of `id`. The old journal stays
    /// whole until the new one is on disk: a daemon killed, or a host that
    /// loses power, mid-write leaves one of the two, never a torn file.
    pub fn write(&self, id: &str, journal: &Journal) -> Result<(), JournalError> {
        let path = self.journal_path(journal.side(), id);
        let text = serde_json::to_vec(journal).expect("a journal serializes");
        crate::host::replace_file(&path, &text)
            .map_err(|source| JournalError::Write { path, source })
    }

    /// Removes the journal and the images of `id` on `side`: the migration
    /// is over here, either way.
    pub fn remove(&self, side: Side, id: &str) {
        let _ = std::fs::remove_dir_all(self.images(side, id));
        let _ = std::fs::remove_file(self.journal_path(side, id));
    }

    /// Removes the temporary files of journal writes a daemon did not
    /// finish: the journal before each one (if any) stands, and a first
    /// write comes before anything it would record is changed.
    pub fn remove_unfinished_writes(&self) {
        let Ok(entries) = std::fs::read_dir(self.journal_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.path().extension().is_some_and(|e| e == "partial") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Every journal on disk, read.
    pub fn left(&self) -> Vec<Left> {
        let Ok(entries) = std::fs::read_dir(self.journal_dir()) else {
            return Vec::new();
        };
        let mut left = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            let (id, side) = match stem.rsplit_once('.') {
                Some((id, "source")) => (id, Side::Source),
                Some((id, "destination")) => (id, Side::Destination),
                _ => continue,
            };
            let path = entry.path();
            let journal = std::fs::read(&path)
                .map_err(|source| JournalError::Read {
                    path: path.clone(),
                    source,
                })
                .and_then(|bytes| {
                    serde_json::from_slice(&bytes)
                        .map_err(|source| JournalError::Parse { path, source })
                });
            left.push(Left {
                id: id.to_string(),
                side,
                journal,
            });
        }
        left.sort_by(|a, b| a.id.cmp(&b.id));
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> (tempfile::TempDir, Files) {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::new(dir.path());
        (dir, files)
    }

    fn source() -> Journal {
        Journal::Source(Outgoing {
            flow_id: 3,
            flows: vec![FlowBefore {
                flow: FlowSpec {
                    cps: "10.0.0.1:5000".parse().unwrap(),
                    service: "10.0.0.2:6000".parse().unwrap(),
                },
                flags: 1,
            }],
            instances: vec![Identity {
                pid: 41,
                start_time: 6,
            }],
            containers: vec!["plc".into()],
            runtime: crate::service::Runtime::Podman,
            replica: None,
        })
    }

    #[test]
    fn both_sides_of_one_id_are_kept_apart_and_read_back() {
        let (_dir, files) = files();
        let destination = Journal::Destination(Incoming {
            service: Some("markov".into()),
            flows: vec![],
            instance: Some(Identity {
                pid: 42,
                start_time: 7,
            }),
            deadline_ms: 2500,
            local_addresses: vec!["192.0.2.10".parse().unwrap()],
            command: Some(vec!["plc".into(), "--period-ms".into(), "1".into()]),
            standby: false,
            replica: Some(ReplicaHere {
                source: "192.0.2.1".parse().unwrap(),
                holder: [2, 0, 0, 0, 0, 1],
            }),
            container: Some(crate::host::runc::Image {
                name: "plc".into(),
                spec: serde_json::json!({"root": {"path": "rootfs"}}),
                runtime: crate::service::Runtime::Podman,
            }),
        });
        files.write("m1", &source()).unwrap();
        files.write("m1", &destination).unwrap();
        let left = files.left();
        let read: Vec<_> = left
            .iter()
            .map(|l| (l.id.as_str(), l.side, l.journal.as_ref().unwrap().clone()))
            .collect();
        // Sorted by id; both sides of "m1" present, each with its own content.
        assert_eq!(
            read.len(),
            2,
            "{:?}",
            read.iter().map(|r| r.1).collect::<Vec<_>>()
        );
        assert!(read.contains(&("m1", Side::Source, source())));
        assert!(read.contains(&("m1", Side::Destination, destination)));
    }

    #[test]
    fn a_torn_or_foreign_journal_is_reported_not_skipped() {
        let (dir, files) = files();
        std::fs::create_dir_all(dir.path().join("journal")).unwrap();
        std::fs::write(
            dir.path().join("journal/m2.source.json"),
            b"{\"side\":\"sou",
        )
        .unwrap();
        std::fs::write(dir.path().join("journal/notes.txt"), b"x").unwrap();
        let left = files.left();
        assert_eq!(left.len(), 1);
        assert_eq!((left[0].id.as_str(), left[0].side), ("m2", Side::Source));
        assert!(matches!(left[0].journal, Err(JournalError::Parse { .. })));
    }

    #[test]
    fn an_instance_is_the_same_process_only_with_the_same_start_time() {
        // A journal names a restored instance by pid and start time: a
        // reused pid must not be killed at recovery.
        let me = Identity::of(std::process::id()).expect("this process runs");
        assert!(me.runs());
        let reused = Identity {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!reused.runs());
        assert_eq!(Identity::of(u32::MAX), None);
    }

    #[test]
    fn the_images_dir_is_for_root_only_and_a_write_leaves_no_partial_file() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, _) = files();
        let files = Files::new(dir.path().join("images"));
        files.create().unwrap();
        std::fs::set_permissions(
            dir.path().join("images"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        // An existing directory too: a daemon makes it so at every start.
        files.create().unwrap();
        let mode = std::fs::metadata(dir.path().join("images"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        files.write("m4", &source()).unwrap();
        let names: Vec<String> = std::fs::read_dir(dir.path().join("images/journal"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["m4.source.json"]);
    }

    #[test]
    fn a_journal_from_before_the_deadline_field_reads_with_the_default() {
        let old = br#"{"side":"destination","flows":[],"instance":null}"#;
        let journal: Journal = serde_json::from_slice(old).unwrap();
        let Journal::Destination(incoming) = journal else {
            panic!("{journal:?} is not a destination's");
        };
        assert_eq!(incoming.deadline_ms, 10_000);
        assert!(incoming.local_addresses.is_empty());
    }

    #[test]
    fn ids_that_name_the_layouts_own_entries_are_reserved() {
        for id in ["journal", "outgoing", "m1.partial"] {
            assert!(Files::reserved(id), "{id}");
        }
        for id in ["m1", "journal-1", "outgoing2", "partial"] {
            assert!(!Files::reserved(id), "{id}");
        }
    }

    #[test]
    fn remove_takes_the_journal_and_the_images_of_that_side_only() {
        let (_dir, files) = files();
        files.write("m3", &source()).unwrap();
        std::fs::create_dir_all(files.images(Side::Source, "m3")).unwrap();
        std::fs::create_dir_all(files.images(Side::Destination, "m3")).unwrap();
        files.remove(Side::Source, "m3");
        assert!(files.left().is_empty());
        assert!(!files.images(Side::Source, "m3").exists());
        assert!(files.images(Side::Destination, "m3").exists());
    }
}

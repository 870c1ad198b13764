//! A live migration, driven by the source daemon: prepare the destination,
//! checkpoint at an exact position S, transfer the images, restore and
//! replay S+1.. on the destination, compare outputs until N match in a row,
//! cut over at the input K the source's kernel picks, announce the service
//! from the destination, stop the source instance.
//!
//! Any failure before the flip rolls back: the source instance keeps (or
//! resumes) serving with every input, the destination removes what it did.
//!
//! The source's side is in [`source`] (with [`converge`] and [`cutover`]),
//! the destination's in [`destination`]; [`protocol`] has the steps between
//! them, [`hold`] the exact checkpoint position, [`error`] why a migration
//! fails, [`journal`] what a migration keeps on disk on either side,
//! [`recovery`] what a restarted daemon does with it, and
//! [`crate::report`] what a migration tells its watchers.
// A migration's errors carry the kernel's (aya's errors are over 100
// bytes); they are returned once per failed step, at millisecond scale, so
// their size costs nothing that boxing each would buy back.
#![allow(clippy::result_large_err)]
pub mod converge;
pub mod cutover;
pub mod destination;
pub mod error;
pub mod failover;
pub mod hold;
pub mod instance;
pub mod journal;
pub mod protocol;
pub mod recovery;
pub mod replica;
pub mod seed;
pub mod source;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, atomic::AtomicBool},
};

use serde::{Deserialize, Serialize};
pub use source::run;

use crate::{
    criu::Criu,
    kernel::logs::Tap,
    migration::{converge::Comparator, journal::Files},
    report::Mode,
};

/// What to migrate, where, and how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// A registered service.
    pub service: String,
    /// The destination daemon's peer link address.
    pub to: SocketAddr,
    #[serde(default)]
    pub mode: Mode,
    /// Consecutive matching outputs needed for the handover.
    #[serde(default = "default_converge")]
    pub converge: u32,
    /// How long convergence may take, and the wait for K after the flip,
    /// in ms (1 to [`MAX_DEADLINE_MS`]). The destination is told it at
    /// `prepare` and waits at least as long (docs/migration.md, timing).
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    /// How outputs are compared (byte-equal without fields).
    #[serde(default)]
    pub compare: Comparator,
    /// At most this many CRIU pre-dump rounds (kaur2020) before the
    /// checkpoint, while the instance runs unheld; 0: none. A kernel
    /// without memory tracking gets a single dump, and the report says so.
    #[serde(default)]
    pub pre_dump_rounds: usize,
    /// How much the checkpoint's hold of the instance's inputs may keep.
    #[serde(default)]
    pub hold: hold::Budget,
    /// A handover to a hot replica only: this host keeps its instance as
    /// the new serving host's hot replica (fed from K+1 on, no CRIU).
    #[serde(default)]
    pub keep_replica: bool,
}

impl Request {
    /// Refuses a request the migration could not honour: one that would
    /// hand over without comparing an output, hold nothing, or compare past
    /// any output.
    pub fn check(&self) -> Result<(), InvalidRequest> {
        if self.converge == 0 {
            return Err(InvalidRequest::Converge);
        }
        if !(1..=MAX_DEADLINE_MS).contains(&self.deadline_ms) {
            return Err(InvalidRequest::Deadline(self.deadline_ms));
        }
        if !self.hold.is_valid() {
            return Err(InvalidRequest::Hold);
        }
        self.compare.check().map_err(InvalidRequest::Compare)
    }
}

/// A migration request that is refused before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum InvalidRequest {
    #[error("converge must be 1 or more: the handover needs matching outputs")]
    Converge,
    #[error("hold: ms, inputs and bytes must be 1 or more: a hold of nothing cannot drain")]
    Hold,
    #[error("compare: {0}")]
    Compare(converge::InvalidField),
    #[error("deadline_ms must be 1 to {MAX_DEADLINE_MS}, not {0}")]
    Deadline(u64),
}

/// The longest `deadline_ms` a migration may have: the destination holds
/// a migration's state for about that long without a word from the source.
pub const MAX_DEADLINE_MS: u64 = 600_000;

pub(crate) fn default_converge() -> u32 {
    10
}
/// The `deadline_ms` of a request that gives none.
pub const DEFAULT_DEADLINE_MS: u64 = 10_000;

pub(crate) fn default_deadline_ms() -> u64 {
    DEFAULT_DEADLINE_MS
}

/// What the source daemon lends a migration.
#[derive(Clone)]
pub struct Context {
    pub pin_root: PathBuf,
    /// The service-facing interface (replays to a leave-running instance arrive there).
    pub interface: String,
    /// The interface on the migration network, where the mirror copies leave.
    pub peer_interface: Option<String>,
    /// Where the outgoing images and the journal go.
    pub files: Files,
    pub criu: Criu,
    /// The containers services here run as.
    pub containers: crate::host::container::Containers,
    pub inputs: Arc<Tap>,
    pub outputs: Arc<Tap>,
    /// Standby mode: the standby's network namespace and dataplane pin root.
    pub standby: Option<(PathBuf, PathBuf)>,
    /// Set by `migration.abort` (or a stopping daemon): the migration stops
    /// at its next phase and rolls back.
    pub abort: Arc<AtomicBool>,
    /// Whom the peer link goes to, and how it is sealed.
    pub trust: Arc<crate::peer::Trust>,
    /// This host's side of migrations to it, where it holds hot replicas
    /// (none without a peer link): a handover with `keep_replica` parks
    /// the instance it keeps there.
    pub replicas: Option<Arc<destination::Host>>,
}

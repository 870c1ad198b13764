//! Iterative pre-copy (kaur2020, docs/design.md requirement 4): pre-dump rounds
//! while the service runs, stopped by `policy::StopPolicy`, then the final
//! dump on top of the last round.
//!
//! A pre-dump needs the kernel's soft-dirty memory tracking; without it
//! CRIU 4.2.1 hits a BUG. FEATURE_CHECK comes first, and where it says no
//! (this project's machines) the driver says so and takes a single dump:
//! no round is faked.
use std::{hash::Hasher, path::Path, time::Instant};

use crate::{
    criu::{Criu, CriuError, DumpRequest, stats, warn_no_memory_tracking},
    planning::policy::{Round, Stop, StopPolicy},
};

/// How an iterative dump went.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IterativeDump {
    /// Whether CRIU can track memory here.
    pub mem_track: bool,
    /// The pre-dump rounds, in `<images_dir>/pre-N`.
    pub rounds: Vec<Round>,
    /// Why the rounds stopped (none when there were none).
    pub stop: Option<Stop>,
    /// The last round's directory, relative to the images directory: the
    /// final dump's parent.
    pub parent: Option<String>,
}

impl Criu {
    /// Pre-dumps `dump`'s tree round by round while `policy` says go on,
    /// then dumps it into `dump.images_dir` with the last round as parent.
    /// Each round's images go to `pre-N` below the images directory, so a
    /// recursive copy of it moves the whole chain.
    pub fn iterative_dump(
        &self,
        dump: &DumpRequest,
        policy: &StopPolicy,
    ) -> Result<IterativeDump, CriuError> {
        let rounds = self.pre_dump(dump, policy)?;
        self.dump(&rounds.final_dump(dump), false, &mut |_| true)?;
        Ok(rounds)
    }

    /// The pre-dump rounds of [`Criu::iterative_dump`] alone, the service
    /// left running after each: a live migration takes them before it holds
    /// the service's inputs for the final dump.
    pub fn pre_dump(
        &self,
        dump: &DumpRequest,
        policy: &StopPolicy,
    ) -> Result<IterativeDump, CriuError> {
        let mem_track = self.features()?.mem_track.unwrap_or(false);
        let mut done = IterativeDump {
            mem_track,
            ..IterativeDump::default()
        };
        if !mem_track {
            warn_no_memory_tracking();
        }
        while mem_track && done.stop.is_none() {
            let name = format!("pre-{}", done.rounds.len());
            let round = DumpRequest {
                images_dir: dump.images_dir.join(&name),
                leave_running: true,
                track_mem: true,
                parent_img: done.parent.as_ref().map(|p| format!("../{p}")),
                ..dump.clone()
            };
            let start = Instant::now();
            self.dump(&round, true, &mut |_| true)?;
            done.rounds.push(Round {
                pages_written: stats::dump(&round.images_dir).map_or(0, |s| s.pages_written),
                duration_us: start.elapsed().as_micros() as u64,
                images_hash: pages_hash(&round.images_dir),
            });
            done.stop = policy.decide(&done.rounds);
            done.parent = Some(name);
        }
        Ok(done)
    }
}

impl IterativeDump {
    /// `dump` on top of these rounds: their last as parent, memory tracked
    /// where the kernel can.
    pub fn final_dump(&self, dump: &DumpRequest) -> DumpRequest {
        DumpRequest {
            parent_img: self.parent.clone(),
            track_mem: self.mem_track,
            ..dump.clone()
        }
    }
}

/// A hash of a round's page images (kaur2020 stops when two rounds' are equal).
fn pages_hash(dir: &Path) -> u64 {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("pages-"))
        })
        .collect();
    names.sort();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for name in names {
        hasher.write(&std::fs::read(name).unwrap_or_default());
    }
    hasher.finish()
}

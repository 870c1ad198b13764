//! An instance a checkpoint is taken of, with its dataplane: holding its
//! inputs for the dump and giving them back after, as a migration's
//! source does and as a host seeding a standby from its serving instance
//! does.
use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use crate::{
    criu::{Criu, DumpRequest, netns_inode, stats},
    host::runc::{self, Image},
    kernel::{injector::Injector, loader::Dataplane, logs::Records},
    migration::{
        error::{Cause, ResumeError},
        hold::{self, Budget, FlowPosition},
    },
};

/// What a checkpoint of an instance took.
pub struct Taken {
    /// The instance's position: the last input it got before the dump.
    pub position: FlowPosition,
    /// CRIU's dump request, wall time, µs.
    pub dump_us: u64,
    /// How long CRIU kept the instance frozen, µs.
    pub frozen_us: u64,
    /// How long its inputs were held, µs: the hold, the dump and the
    /// replay of what came meanwhile.
    pub held_us: u64,
}

/// The instance a checkpoint is taken of: the serving one, or a standby in
/// a network namespace of its own with a dataplane of its own.
pub struct Checkpointed {
    pub pid: u32,
    pub dataplane: Dataplane,
    pub netns: Option<PathBuf>,
    /// Where its inputs arrive (replays are injected as if there).
    pub interface: String,
    /// The container it runs as, if it does: its rootfs and its image.
    pub container: Option<(PathBuf, Image)>,
}

impl Checkpointed {
    /// A dump of it left running into `images` (emptied first), its
    /// network namespace an external the restore supplies (`extnet`).
    pub fn dump_request(&self, images: &Path) -> Result<DumpRequest, Cause> {
        let pid = self.pid;
        let _ = std::fs::remove_dir_all(images);
        let inode = netns_inode(pid).map_err(|source| Cause::Netns { pid, source })?;
        let Some((rootfs, image)) = &self.container else {
            return Ok(DumpRequest {
                pid,
                images_dir: images.to_owned(),
                leave_running: true,
                external: vec![format!("net[{inode}]:extnet")],
                ..Default::default()
            });
        };
        // As runc has CRIU dump a container, for `runc restore`.
        let mut external = vec![format!("net[{inode}]:{}", runc::NETNS_KEY)];
        external.extend(image.external_mounts());
        external.extend(runc::cgroup_mounts(pid)?);
        Ok(DumpRequest {
            pid,
            images_dir: images.to_owned(),
            leave_running: true,
            external,
            root: Some(rootfs.clone()),
            ..Default::default()
        })
    }

    /// Holds the instance's inputs of `flow_id`, waits for its socket to
    /// drain, dumps it as `dump` says (left running), and gives it the
    /// inputs held meanwhile (from `log`, in order) once the dump is over
    /// or has failed. The hold ends early (and so does a dump under way)
    /// past `budget`, on an input the replay could not give back, or on
    /// `abort`.
    pub fn checkpoint(
        &mut self,
        flow_id: u32,
        log: &mut (impl Records + Send),
        criu: &Criu,
        dump: &DumpRequest,
        budget: Budget,
        abort: &AtomicBool,
    ) -> Result<Taken, Cause> {
        // Inputs before the hold: if one is beyond the replay, the next
        // could come during the hold and be lost to the instance.
        hold::check_before_hold(log, flow_id)?;
        let held = Instant::now();
        let position = hold::hold(&mut self.dataplane, flow_id)?;
        // The held inputs as they come, against the budget.
        let mut inputs = hold::Held::new(log, position, held, budget);
        let dumped = (|| -> Result<Option<(u64, u64)>, Cause> {
            let dataplane = &self.dataplane;
            let mut stop = || inputs.watch(dataplane) || abort.load(Ordering::Relaxed);
            if !hold::drain(self.pid, &mut stop)? {
                return Ok(None);
            }
            let start = Instant::now();
            criu.dump_until(dump, &mut stop).map_err(Cause::Dump)?;
            let dump_us = start.elapsed().as_micros() as u64;
            let frozen = stats::dump(&dump.images_dir).map_or(0, |s| s.frozen_time.into());
            Ok(Some((dump_us, frozen)))
        })();
        // Dumped or not, the instance gets the inputs held meanwhile, in
        // order; the gate opens only over those it could not get, named.
        let resumed = self.resume(position, &mut inputs);
        let held_us = held.elapsed().as_micros() as u64;
        if let Err(error) = resumed {
            let lost = hold::open(&mut self.dataplane, flow_id).ok().flatten();
            return Err(Cause::Resume { error, lost });
        }
        hold::release(&mut self.dataplane, flow_id)?;
        if let Some(end) = inputs.end() {
            return Err(end.clone().into());
        }
        if abort.load(Ordering::Relaxed) {
            return Err(Cause::Aborted);
        }
        // Without an end of its own, a hold ends early only on an abort.
        let (dump_us, frozen_us) = dumped?.ok_or(Cause::Aborted)?;
        // What runc restores a container with besides CRIU's images: the
        // instance runs on as dumped, so it is read once the hold is over.
        if self.container.is_some() {
            runc::write_descriptors(self.pid, &dump.images_dir)?;
        }
        Ok(Taken {
            position,
            dump_us,
            frozen_us,
            held_us,
        })
    }

    /// Replays the inputs held since `position` (from `log`) into the
    /// instance, on a thread in its network namespace: injection resolves
    /// the interface in the caller's namespace.
    pub fn resume(
        &mut self,
        position: FlowPosition,
        log: &mut (impl Records + Send),
    ) -> Result<u64, ResumeError> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    if let Some(netns) = &self.netns {
                        std::fs::File::open(netns)
                            .and_then(|ns| {
                                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                                    .map_err(std::io::Error::from)
                            })
                            .map_err(|source| ResumeError::Netns {
                                path: netns.clone(),
                                source,
                            })?;
                    }
                    let mut injector = Injector::open(self.dataplane.pin_root(), &self.interface)?;
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_time()
                        .build()
                        .map_err(ResumeError::Runtime)?;
                    Ok(runtime.block_on(hold::resume(
                        &mut self.dataplane,
                        position,
                        self.pid,
                        &mut injector,
                        log,
                    ))?)
                })
                .join()
                .map_err(|_| ResumeError::Panicked)?
        })
    }
}

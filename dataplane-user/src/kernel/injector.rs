//! Injecting logged inputs into the local instance, through the same gate
//! as the live mirror.
//!
//! The injector queues rebuilt mirror frames in the pinned REPLAY_FRAMES
//! map and runs the pinned `ingress` XDP program once per frame, in one
//! BPF_PROG_RUN in live-frames mode, on a trigger frame that carries the
//! dataplane's replay key: each run takes the next queued frame as if it
//! had arrived on the peer interface, the program gates it like a live
//! copy (a sequenced gate delivers it only when it is next, once) and an
//! XDP_PASS verdict hands it to the local stack. The frames carry
//! `MIRROR_FLAG_REPLAY`, so they are not logged twice. No extra device is
//! needed. The program is attached (in the kernel's XDP dispatcher), which
//! a run of several frames needs to be cheap: the kernel adds a program it
//! runs repeatedly to the dispatcher for the call, and rebuilding that
//! takes milliseconds.
use std::{path::Path, sync::Mutex};

use aya::{
    maps::{Array, MapData},
    programs::{ProgramError, TestRun, TestRunAttrs, TestRunOptions, Xdp},
};
use aya_obj::programs::XdpAttachType;
use dataplane_common::{
    CaptureMeta, MIRROR_FLAG_QUEUED, MIRROR_FLAG_REPLAY, REPLAY_BATCH, REPLAY_FRAME_MAX,
    ReplaySlot, mirror_headers,
};

use crate::{
    host::netdev::Interface,
    kernel::{gate::GateWindow, loader::LoadError, logs::Record},
};

/// Errors of injecting a replayed input.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("opening the pinned ingress program: {0} (is the dataplane loaded?)")]
    Program(ProgramError),
    #[error(transparent)]
    Dataplane(#[from] LoadError),
    #[error(transparent)]
    Interface(#[from] crate::host::netdev::InterfaceError),
    #[error("injecting input {seq}: {source}")]
    Inject { seq: u64, source: ProgramError },
    #[error("queueing input {seq} for replay: {source}")]
    Queue {
        seq: u64,
        source: aya::maps::MapError,
    },
    #[error(transparent)]
    Unreplayable(#[from] Unreplayable),
    #[error("this thread is not in the network namespace the injector was opened in")]
    WrongNamespace,
}

/// The largest input a replay takes: what a queued frame holds besides
/// the mirror headers (a full-size Ethernet frame and a VLAN tag fit).
pub const MAX_REPLAY_INPUT: usize =
    REPLAY_FRAME_MAX as usize - 1 - dataplane_common::MIRROR_OVERHEAD as usize;

/// A logged input that a replay cannot give whole.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unreplayable {
    #[error(
        "input {seq} is a {len}-byte frame: a replay takes frames of up to {MAX_REPLAY_INPUT} \
         bytes"
    )]
    TooLarge { seq: u64, len: usize },
    #[error(
        "input {seq} was logged cut to {captured} of its {len} bytes (snap_len): a replay would \
         give it cut"
    )]
    Cut {
        seq: u64,
        len: usize,
        captured: usize,
    },
}

impl Unreplayable {
    /// Whether a replay can give the logged input `record` whole, as it arrived.
    pub fn check(record: &Record) -> Result<(), Unreplayable> {
        let seq = record.header.seq;
        let (len, captured) = (record.header.frame_len as usize, record.frame.len());
        if len.max(captured) > MAX_REPLAY_INPUT {
            Err(Unreplayable::TooLarge {
                seq,
                len: len.max(captured),
            })
        } else if captured < len {
            Err(Unreplayable::Cut { seq, len, captured })
        } else {
            Ok(())
        }
    }
}

/// One batch at a time in this process: the queue maps of a dataplane are
/// one, and two injectors may be open on it (two migrations at once).
static BATCH: Mutex<()> = Mutex::new(());

/// Runs the ingress program on batches of replayed inputs, as if received on one interface.
pub struct Injector {
    program: Xdp,
    frames: Array<MapData, ReplaySlot>,
    next: Array<MapData, u32>,
    /// The frame each run of a batch starts from: the largest frame a
    /// batch takes, a trigger with the dataplane's replay key.
    trigger: Vec<u8>,
    interface: Interface,
    /// The gates: a replayed input leaves its gate pending until the
    /// injection has returned (`decide::sequenced_exchange`).
    gates: GateWindow,
    /// The network namespace `interface` is in: the kernel resolves the
    /// ifindex in the calling thread's namespace, so injecting from another
    /// one would hand frames to an unrelated device.
    netns: u64,
}

fn thread_netns() -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/thread-self/ns/net")?.ino())
}

/// `struct xdp_md` as BPF_PROG_TEST_RUN takes it.
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

impl Injector {
    /// Inputs one [`Injector::inject`] takes at most.
    pub const BATCH: usize = REPLAY_BATCH as usize;

    /// An injector for the dataplane pinned at `pin_root`, delivering as if
    /// frames arrived on `interface`, looked up in the calling thread's
    /// network namespace; it injects only from that namespace.
    pub fn open(pin_root: &Path, interface: &str) -> Result<Self, ReplayError> {
        let program = Xdp::from_pin(
            pin_root.join("programs").join("ingress"),
            XdpAttachType::Interface,
        )
        .map_err(ReplayError::Program)?;
        let frames = crate::kernel::loader::pinned_array(pin_root, "REPLAY_FRAMES")?;
        let next = crate::kernel::loader::pinned_array(pin_root, "REPLAY_NEXT")?;
        let key: Array<MapData, u64> =
            crate::kernel::loader::pinned_array(pin_root, crate::kernel::loader::MAP_REPLAY_KEY)?;
        let key = key.get(&0, 0).map_err(|source| LoadError::Map {
            name: crate::kernel::loader::MAP_REPLAY_KEY,
            source,
        })?;
        let interface = Interface::by_name(interface)?;
        let meta = CaptureMeta {
            seq: key,
            ..Default::default()
        };
        let mut trigger = replay_headers(interface.mac, &meta, 0).to_vec();
        trigger[16..18].copy_from_slice(&MIRROR_FLAG_QUEUED.to_be_bytes());
        trigger.resize(REPLAY_FRAME_MAX as usize - 1, 0);
        Ok(Self {
            program,
            frames,
            next,
            trigger,
            interface,
            gates: GateWindow::open(pin_root).map_err(LoadError::from)?,
            netns: thread_netns().map_err(|_| ReplayError::WrongNamespace)?,
        })
    }

    /// Injects logged inputs (records of the input log), at most
    /// [`Injector::BATCH`], in their order, with one BPF_PROG_RUN. In
    /// live-frames mode the kernel reports no verdict: the gate's counters
    /// and the instance tell what became of each.
    pub fn inject(&mut self, records: &[Record]) -> Result<(), ReplayError> {
        assert!(
            records.len() <= Self::BATCH,
            "a replay batch is at most {}",
            Self::BATCH
        );
        let Some(first) = records.first() else {
            return Ok(());
        };
        if thread_netns().ok() != Some(self.netns) {
            return Err(ReplayError::WrongNamespace);
        }
        let _batch = BATCH.lock().unwrap_or_else(|e| e.into_inner());
        let mut slot = ReplaySlot {
            len: 0,
            frame: [0; REPLAY_FRAME_MAX as usize],
        };
        for (index, record) in records.iter().enumerate() {
            let seq = record.header.seq;
            Unreplayable::check(record)?;
            let frame = replay_frame(self.interface.mac, record);
            slot.len = frame.len() as u32;
            slot.frame[..frame.len()].copy_from_slice(&frame);
            self.frames
                .set(index as u32, slot, 0)
                .map_err(|source| ReplayError::Queue { seq, source })?;
        }
        self.next
            .set(0, 0, 0)
            .map_err(|source| ReplayError::Queue {
                seq: first.header.seq,
                source,
            })?;
        // The kernel wants data_end to be the frame's length (no metadata in front).
        let ctx = XdpMd {
            data_end: self.trigger.len() as u32,
            ingress_ifindex: self.interface.index,
            ..Default::default()
        };
        let ctx = bytemuck::bytes_of(&ctx);
        let run = self.program.test_run(TestRunOptions {
            data_in: Some(&self.trigger),
            ctx_in: Some(ctx),
            repeat: records.len() as u32,
            // Each frame goes to the stack as soon as the gate has let
            // it through. A larger kernel batch holds passed frames
            // until its end, and a live input the gate lets through
            // meanwhile would reach the instance before them.
            attrs: TestRunAttrs::new().xdp_live_frames(1),
            ..Default::default()
        });
        // Returned: every frame the gates let through is in the socket's
        // queue (local delivery runs in this call), and live inputs may
        // follow them.
        let mut flows: Vec<u32> = records.iter().map(|r| r.header.flow_id).collect();
        flows.sort_unstable();
        flows.dedup();
        for flow_id in flows {
            self.gates.replay_delivered(flow_id);
        }
        run.map(drop).map_err(|source| ReplayError::Inject {
            seq: first.header.seq,
            source,
        })
    }
}

/// A logged input as a replayed mirror frame addressed to `mac`: the
/// receive path logs nothing for it and passes it to the flow's gate under
/// the record's number.
pub fn replay_frame(mac: [u8; 6], record: &Record) -> Vec<u8> {
    let h = record.header;
    let meta = CaptureMeta {
        flow_id: h.flow_id,
        seq: h.seq,
        timestamp_ns: h.timestamp_ns,
        ..Default::default()
    };
    let mut frame = replay_headers(mac, &meta, record.frame.len() as u32).to_vec();
    frame[16..18].copy_from_slice(&MIRROR_FLAG_REPLAY.to_be_bytes());
    frame.extend_from_slice(&record.frame);
    frame
}

/// Mirror headers from `mac` to itself.
fn replay_headers(
    mac: [u8; 6],
    meta: &CaptureMeta,
    frame_len: u32,
) -> [u8; dataplane_common::MIRROR_OVERHEAD as usize] {
    mirror_headers((mac, mac), meta, frame_len)
}

//! Injecting logged inputs into the local instance, through the same gate
//! as the live mirror.
//!
//! The injector runs the pinned `ingress` XDP program on a rebuilt mirror
//! frame with BPF_PROG_TEST_RUN in live-frames mode, as if the frame had
//! arrived on the peer interface: the program gates it like a live copy
//! (a sequenced gate delivers it only when it is next, once) and an
//! XDP_PASS verdict hands it to the local stack. The frame carries
//! `MIRROR_FLAG_REPLAY`, so it is not logged twice. No extra device is needed.
use std::path::Path;

use aya::programs::{ProgramError, TestRun, TestRunAttrs, TestRunOptions, Xdp};
use aya_obj::programs::XdpAttachType;
use dataplane_common::{CaptureMeta, Config, MIRROR_FLAG_REPLAY, mirror_headers};

use crate::{capture::Record, netdev::Interface};

/// Errors of injecting a replayed input.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("opening the pinned ingress program: {0} (is the dataplane loaded?)")]
    Program(ProgramError),
    #[error(transparent)]
    Interface(#[from] crate::loader::LoadError),
    #[error("injecting input {seq}: {source}")]
    Inject { seq: u64, source: ProgramError },
    #[error("this thread is not in the network namespace the injector was opened in")]
    WrongNamespace,
}

/// Runs the ingress program on replayed inputs, as if received on one interface.
pub struct Injector {
    program: Xdp,
    interface: Interface,
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
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

impl Injector {
    /// An injector for the dataplane pinned at `pin_root`, delivering as if
    /// frames arrived on `interface`, looked up in the calling thread's
    /// network namespace; it injects only from that namespace.
    pub fn open(pin_root: &Path, interface: &str) -> Result<Self, ReplayError> {
        let program = Xdp::from_pin(
            pin_root.join("programs").join("ingress"),
            XdpAttachType::Interface,
        )
        .map_err(ReplayError::Program)?;
        Ok(Self {
            program,
            interface: Interface::by_name(interface)?,
            netns: thread_netns().map_err(|_| ReplayError::WrongNamespace)?,
        })
    }

    /// Injects one logged input (a record of the input log). In live-frames
    /// mode the kernel reports no verdict: the gate's counters and the
    /// instance tell what became of it.
    pub fn inject(&self, record: &Record) -> Result<(), ReplayError> {
        if thread_netns().ok() != Some(self.netns) {
            return Err(ReplayError::WrongNamespace);
        }
        let frame = replay_frame(self.interface.mac, record);
        // The kernel wants data_end to be the frame's length (no metadata in front).
        let ctx = XdpMd {
            data_end: frame.len() as u32,
            ingress_ifindex: self.interface.index,
            ..Default::default()
        };
        // SAFETY: XdpMd is plain #[repr(C)] integers.
        let ctx = unsafe {
            std::slice::from_raw_parts((&raw const ctx).cast::<u8>(), size_of::<XdpMd>())
        };
        self.program
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                ctx_in: Some(ctx),
                repeat: 1,
                attrs: TestRunAttrs::new().xdp_live_frames(1),
                ..Default::default()
            })
            .map(drop)
            .map_err(|source| ReplayError::Inject {
                seq: record.header.seq,
                source,
            })
    }
}

/// A logged input as a replayed mirror frame addressed to `mac`: the
/// receive path logs nothing for it and passes it to the flow's gate under
/// the record's number.
pub fn replay_frame(mac: [u8; 6], record: &Record) -> Vec<u8> {
    let h = record.header;
    let config = Config {
        mirror_dst_mac: mac,
        mirror_src_mac: mac,
        ..Default::default()
    };
    let meta = CaptureMeta {
        flow_id: h.flow_id,
        seq: h.seq,
        timestamp_ns: h.timestamp_ns,
        ..Default::default()
    };
    let mut frame = mirror_headers(&config, &meta, record.frame.len() as u32).to_vec();
    frame[16..18].copy_from_slice(&MIRROR_FLAG_REPLAY.to_be_bytes());
    frame.extend_from_slice(&record.frame);
    frame
}

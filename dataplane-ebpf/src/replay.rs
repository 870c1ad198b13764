//! Queued replay batches: a trigger frame takes the next frame that user
//! space queued in REPLAY_FRAMES (see `take_queued_replay`).

use aya_ebpf::{
    helpers::generated::{bpf_xdp_adjust_tail, bpf_xdp_store_bytes},
    programs::XdpContext,
};
use dataplane_common::{MIRROR_FLAG_QUEUED, MirrorHeader, REPLAY_FRAME_MAX};

use crate::{
    maps::{REPLAY_FRAMES, REPLAY_KEY, REPLAY_NEXT},
    parse::ptr_at,
};

/// What `take_queued_replay` made of a mirror frame.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Queued {
    /// Not a replay batch's trigger: a frame as it came in.
    No,
    /// A trigger with the key: the packet is now the next frame this host's
    /// daemon queued.
    Taken,
    /// A trigger without the key: not made by this host's daemon.
    Forged,
    /// A trigger with the key, but no queued frame could be written.
    Lost,
}

/// A replay batch: user space queues rebuilt mirror frames in REPLAY_FRAMES
/// and runs `ingress` with BPF_PROG_RUN in live-frames mode, `repeat` set to
/// their number, on a trigger frame: a mirror frame flagged
/// MIRROR_FLAG_QUEUED whose sequence field is REPLAY_KEY. Each run writes
/// the next queued frame over the trigger (the kernel starts every run from
/// the same bytes) and receives it like any replayed copy. A live test run
/// sets up a page pool per call, and the kernel frees one only once its
/// packets are consumed, walking every pool not yet freed: one call per
/// input would cost more per input the faster inputs are replayed. The key
/// (random, set at load, readable by root only) keeps a frame from the wire
/// from taking queued frames.
///
/// `Queued::Taken` is also the only way the program knows a frame is a
/// replay. The kernel cannot tell a test run from a frame off the wire by
/// the context: the injector sets `ingress_ifindex` (and the receive queue)
/// to the interface its frames are to seem to arrive on, a real one. What
/// only the daemon can do is pass the key, and the frame written here comes
/// from REPLAY_FRAMES, which only root writes; a frame's own flags are
/// whatever its sender chose.
///
/// Out of line: the verifier refused the inlined form (LLVM spilled a
/// register that is not set on every path into `ingress`).
#[inline(never)]
pub(crate) fn take_queued_replay(ctx: &XdpContext) -> Queued {
    let Some(header) = ptr_at::<MirrorHeader>(ctx.data(), ctx.data_end(), 14) else {
        return Queued::No;
    };
    // SAFETY: ptr_at checked that the header lies inside the packet.
    let (flags, key) = unsafe { ((*header).flags, (*header).seq) };
    if u16::from_be(flags) & MIRROR_FLAG_QUEUED == 0 {
        return Queued::No;
    }
    let ours = REPLAY_KEY.get(0).copied().unwrap_or(0);
    if ours == 0 || u64::from_be(key) != ours {
        return Queued::Forged;
    }
    let Some(next) = REPLAY_NEXT.get_ptr_mut(0) else {
        return Queued::Lost;
    };
    // SAFETY: the array slot lives as long as the map; one batch runs at a
    // time on one CPU (user space serializes them).
    let index = unsafe { *next };
    // SAFETY: as above.
    unsafe { *next = index + 1 };
    match write_replay_frame(ctx, index) {
        Some(()) => Queued::Taken,
        None => Queued::Lost,
    }
}

/// Makes the packet the frame queued in slot `index` of REPLAY_FRAMES.
#[inline(always)]
pub(crate) fn write_replay_frame(ctx: &XdpContext, index: u32) -> Option<()> {
    let slot = REPLAY_FRAMES.get_ptr(index)?;
    // The verifier needs 0 < len < REPLAY_FRAME_MAX for the copy below;
    // black_box keeps the mask (see record::write_class).
    // SAFETY: the slot lives as long as the map; user space filled it
    // before the run.
    let len = core::hint::black_box(unsafe { (*slot).len }) & (REPLAY_FRAME_MAX - 1);
    let have = (ctx.data_end() - ctx.data()) as u32;
    if len == 0 || len > have {
        return None;
    }
    // SAFETY: the helper bounds-checks against the packet; the slot holds len bytes.
    let stored = unsafe { bpf_xdp_store_bytes(ctx.ctx, 0, (*slot).frame.as_ptr() as *mut _, len) };
    if stored != 0 {
        return None;
    }
    // SAFETY: shrinks the packet to the frame's length.
    (unsafe { bpf_xdp_adjust_tail(ctx.ctx, len as i32 - have as i32) } == 0).then_some(())
}

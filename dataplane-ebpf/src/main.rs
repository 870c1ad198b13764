//! The dataplane's kernel programs.
//!
//! - `ingress` (XDP): numbers, timestamps and logs the inputs of known CPS
//!   flows, hands the number to `mirror` in the packet metadata; receives
//!   mirror frames from the peer host, logs them and gates them.
//! - `mirror` (TC ingress): clones a numbered input to the mirror interface.
//! - `egress` (TC egress): wraps those clones in the mirror header on the
//!   mirror interface, and logs the local instance's outputs.
//! - `mirror_port`, `deliver_port` (XDP devmap programs): in `MIRROR_DEVMAP`
//!   mode `ingress` broadcasts an input through `MIRROR_PORTS` instead, and
//!   these prepare the mirror copy and the local copy.
//!
//! Every frame the programs do not handle passes untouched.
#![no_std]
#![no_main]
// The BPF target's core has no atomic read-modify-write methods; the
// intrinsic compiles to BPF's atomic fetch-and-add (with SeqCst: for Relaxed,
// LLVM 22 emits the add without fetch yet reads the register as its result).
#![feature(core_intrinsics)]

mod parse;
mod record;

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_F_BROADCAST, BPF_F_MMAPABLE, TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    helpers::generated::{
        bpf_clone_redirect, bpf_ktime_get_ns, bpf_skb_change_head, bpf_skb_load_bytes,
        bpf_skb_store_bytes, bpf_skb_vlan_pop, bpf_xdp_adjust_head, bpf_xdp_adjust_meta,
        bpf_xdp_adjust_tail, bpf_xdp_store_bytes,
    },
    macros::{classifier, map, xdp},
    maps::{Array, DevMap, HashMap, PerCpuArray, RingBuf},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::warn;
use dataplane_common::{
    CAPTURE_META_MAGIC, CAPTURE_META_MASK, CUT_AT_NEXT, CaptureMeta, Config, FLOW_MIRROR,
    FLOW_STANDBY, FlowConfig, FlowKey, FlowSequence, GATE_DELIVER_ALL, GATE_HOLD_ALL,
    GATE_SEQUENCED, Gate, MAX_FLOWS, MAX_FRAME, MAX_SEQ, META_DELIVER, META_PEER, META_STANDBY,
    MIRROR_CLONE, MIRROR_DEVMAP, MIRROR_FLAG_QUEUED, MIRROR_FLAG_REPLAY, MIRROR_OVERHEAD,
    MIRROR_VERSION, MirrorHeader, OUTPUT_ARMED, OUTPUT_FROM, OUTPUT_MUTE, PORT_MIRROR,
    RECORD_INPUT, RECORD_MIRRORED, RECORD_OUTPUT, REPLAY_BATCH, REPLAY_FRAME_MAX, RecordHeader,
    ReplaySlot, TAG_COUNTED, counter, mirror_headers,
};
use parse::{Frame, Skip, parse, ptr_at};
use record::{Skb, Xdp};

/// Known CPS flows, written by user space.
#[map]
static FLOWS: HashMap<FlowKey, FlowConfig> = HashMap::pinned(MAX_FLOWS, 0);

/// Per-flow sequence numbers, indexed by flow id.
#[map]
static SEQUENCES: Array<FlowSequence> = Array::pinned(MAX_FLOWS, 0);

/// Per-flow gates, indexed by flow id: whether inputs (captured here or
/// mirrored from the peer) reach the local instance or are held in the log.
/// Memory-mappable so that user space can flip a gate with one store.
#[map]
static GATES: Array<Gate> = Array::pinned(MAX_FLOWS, BPF_F_MMAPABLE);

/// Host-wide settings, element 0.
#[map]
static CONFIG: Array<Config> = Array::pinned(1, 0);

/// Per-CPU counters, indexed by `counter::*`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::COUNT, 0);

/// The input log: captured and mirrored inputs. User space sets the size at load.
#[map]
static INPUTS: RingBuf = RingBuf::pinned(1 << 24, 0);

/// The output log: the local instance's outputs.
#[map]
static OUTPUTS: RingBuf = RingBuf::pinned(1 << 22, 0);

/// `MIRROR_DEVMAP` mode: the mirror interface (`PORT_MIRROR`, with the
/// `mirror_port` program) and the local-delivery interface (`PORT_DELIVER`,
/// with `deliver_port`) that an input is broadcast to.
#[map]
static MIRROR_PORTS: DevMap = DevMap::pinned(2, 0);

/// The capture metadata of the input being cloned on this CPU, set by `mirror`
/// around its bpf_clone_redirect and read by `egress`, which the kernel runs
/// for the clone synchronously inside that call on the same CPU.
#[map]
static MIRROR_PENDING: PerCpuArray<CaptureMeta> = PerCpuArray::with_max_entries(1, 0);

/// Replay frames user space queued for one replay batch (`take_queued_replay`).
#[map]
static REPLAY_FRAMES: Array<ReplaySlot> = Array::pinned(REPLAY_BATCH, 0);

/// Element 0: the slot of REPLAY_FRAMES the next run of a replay batch
/// takes; user space sets it to 0 before each batch.
#[map]
static REPLAY_NEXT: Array<u32> = Array::pinned(1, 0);

/// Element 0: the key of replay triggers, random, set at load.
#[map]
static REPLAY_KEY: Array<u64> = Array::pinned(1, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot; nothing else on this CPU runs while we hold it.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn config() -> Config {
    CONFIG.get(0).copied().unwrap_or_default()
}

/// Bytes of a `frame_len`-byte frame that go into the log.
#[inline(always)]
fn captured_len(frame_len: u32, snap_len: u32) -> u32 {
    let limit = if snap_len == 0 || snap_len > MAX_FRAME {
        MAX_FRAME
    } else {
        snap_len
    };
    if frame_len < limit { frame_len } else { limit }
}

#[xdp]
pub fn ingress(ctx: XdpContext) -> u32 {
    count(counter::SEEN);
    match parse(ctx.data(), ctx.data_end()) {
        Ok(Frame::Udp(key, _)) => return capture(&ctx, &key),
        Ok(Frame::Mirror) => {
            if take_queued_replay(&ctx) {
                return receive(&ctx);
            }
            count(counter::MIRROR_RECEIVED);
            count(counter::MIRROR_ERRORS);
        }
        Err(Skip::Malformed) => count(counter::MALFORMED),
        Err(Skip::NotUdp) => count(counter::NOT_UDP),
    }
    xdp_action::XDP_PASS
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
/// Returns whether the packet is now a frame to receive: not a trigger, or
/// a trigger with the key whose queued frame is written. Out of line: the
/// verifier refused the inlined form (LLVM spilled a register that is not
/// set on every path into `ingress`).
#[inline(never)]
fn take_queued_replay(ctx: &XdpContext) -> bool {
    let Some(header) = ptr_at::<MirrorHeader>(ctx.data(), ctx.data_end(), 14) else {
        return true;
    };
    // SAFETY: ptr_at checked that the header lies inside the packet.
    let (flags, key) = unsafe { ((*header).flags, (*header).seq) };
    if u16::from_be(flags) & MIRROR_FLAG_QUEUED == 0 {
        return true;
    }
    let ours = REPLAY_KEY.get(0).copied().unwrap_or(0);
    if ours == 0 || u64::from_be(key) != ours {
        return false;
    }
    let Some(next) = REPLAY_NEXT.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: the array slot lives as long as the map; one batch runs at a
    // time on one CPU (user space serializes them).
    let index = unsafe { *next };
    unsafe { *next = index + 1 };
    write_replay_frame(ctx, index).is_some()
}

/// Makes the packet the frame queued in slot `index` of REPLAY_FRAMES.
#[inline(always)]
fn write_replay_frame(ctx: &XdpContext, index: u32) -> Option<()> {
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

/// Numbers and logs an input of a known flow; it then passes to the stack,
/// or in `MIRROR_DEVMAP` mode is broadcast to the mirror and delivery ports.
#[inline(always)]
fn capture(ctx: &XdpContext, key: &FlowKey) -> u32 {
    // SAFETY: a hash map value is only read here; user space replaces whole entries.
    let Some(flow) = (unsafe { FLOWS.get(key) }).copied() else {
        count(counter::UNMATCHED);
        return xdp_action::XDP_PASS;
    };
    // User space keeps flow ids below MAX_FLOWS; the check is for the verifier.
    let Some(sequence) = SEQUENCES.get_ptr_mut(flow.flow_id) else {
        count(counter::UNMATCHED);
        return xdp_action::XDP_PASS;
    };
    let config = config();
    let frame_len = (ctx.data_end() - ctx.data()) as u32;
    let timestamp_ns = unsafe { bpf_ktime_get_ns() };
    let header = RecordHeader {
        timestamp_ns,
        kind: RECORD_INPUT,
        flow_id: flow.flow_id,
        ifindex: unsafe { (*ctx.ctx).ingress_ifindex },
        frame_len,
        captured_len: captured_len(frame_len, config.snap_len),
        ..Default::default()
    };
    let next_seq = || {
        // SAFETY: the array slot lives as long as the map; the atomic add makes
        // numbers unique and gap-free across CPUs.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(&raw mut (*sequence).last_seq, 1)
                + 1
        }
    };
    let gate = GATES.get_ptr_mut(flow.flow_id);
    let Some(seq) = record::write(&INPUTS, &Xdp(ctx.ctx), 0, header, next_seq) else {
        // Unnumbered: only an open gate lets it through (a migration that
        // needs it must abort; ring_full says so).
        count(counter::RING_FULL);
        // SAFETY: the array slot lives as long as the map.
        let open = gate.is_none_or(|g| unsafe { (*g).mode } == GATE_DELIVER_ALL);
        return if open {
            xdp_action::XDP_PASS
        } else {
            xdp_action::XDP_DROP
        };
    };
    count(counter::CAPTURED);
    // The local instance gets the input if its gate lets it and it is not
    // past a cutover; the peer gets every input of a mirrored flow, so that
    // its log is complete whatever happens here (a hold for a checkpoint,
    // a replay in progress, a cutover).
    let gated = apply_gate(gate, seq).is_some();
    let past = gate.is_some_and(|g| past_cutover(g, seq));
    if past {
        count(counter::FORWARDED);
    }
    let deliver = !gated && !past;
    if deliver {
        delivered(sequence, gate, seq);
    }
    let local = if deliver {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    };
    let to_peer = flow.flags & FLOW_MIRROR != 0 && config.mirror_ifindex != 0;
    // A standby copy is made by `mirror` only (clone mode).
    let to_standby = flow.flags & FLOW_STANDBY != 0
        && config.standby_ifindex != 0
        && config.mirror_mode == MIRROR_CLONE;
    if !to_peer && !to_standby {
        return local;
    }
    let targets = if deliver { META_DELIVER } else { 0 }
        | if to_peer { META_PEER } else { 0 }
        | if to_standby { META_STANDBY } else { 0 };
    // Past the cutover the peer is the one numbering authority: inputs go
    // to it unnumbered (0), so that inputs reaching it directly and inputs
    // forwarded from here (the CPS's path may swing back and forth while
    // neighbours learn the address's new owner) share one numbering.
    let mirrored_seq = if past { 0 } else { seq };
    if !hand_to_mirror(ctx, flow.flow_id, mirrored_seq, timestamp_ns, targets) {
        count(counter::MIRROR_ERRORS);
        return local;
    }
    if config.mirror_mode != MIRROR_DEVMAP {
        // `mirror` clones it, and drops the original unless it is delivered.
        return xdp_action::XDP_PASS;
    }
    let flags = if deliver { BPF_F_BROADCAST as u64 } else { 0 };
    match MIRROR_PORTS.redirect(PORT_MIRROR, flags) {
        Ok(action) => {
            count(counter::MIRRORED);
            action
        }
        Err(_) => {
            count(counter::MIRROR_ERRORS);
            local
        }
    }
}

/// Raises the flow's `last_seq` to `seq` unless it is higher already; a
/// few compare-and-exchange attempts, bounded for the verifier (the other
/// writers, numbering fetch-adds, only ever raise it too).
#[inline(always)]
fn raise(sequence: *mut FlowSequence, seq: u64) {
    for _ in 0..4 {
        // SAFETY: the array slot lives as long as the map.
        let current = unsafe { core::ptr::read_volatile(&raw const (*sequence).last_seq) };
        if current >= seq {
            return;
        }
        // SAFETY: as above; the exchange is atomic across CPUs.
        let (_, done) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                &raw mut (*sequence).last_seq,
                current,
                seq,
            )
        };
        if done {
            return;
        }
    }
}

/// Whether input `seq` comes after the gate's cutover point K
/// (`deliver_until`). While user space's flip (`CUT_AT_NEXT`) waits, the
/// first input numbered after it picks K = its number - 1: one
/// compare-and-exchange, so every CPU agrees on K, and no input numbered
/// between a choice of K and the flip can reach both instances. (A flow's
/// frames come in on one receive queue, whose NAPI poll runs on one CPU at
/// a time: numbering order is the order in which this runs.)
#[inline(always)]
fn past_cutover(gate: *mut Gate, seq: u64) -> bool {
    // SAFETY: the array slot lives as long as the map. A volatile read: user
    // space flips this word through a memory mapping.
    let mut k = unsafe { core::ptr::read_volatile(&raw const (*gate).deliver_until) };
    if k == CUT_AT_NEXT && seq > 1 {
        // SAFETY: as above; the exchange is atomic across CPUs and with user space.
        let (prev, done) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                &raw mut (*gate).deliver_until,
                CUT_AT_NEXT,
                seq - 1,
            )
        };
        k = if done { seq - 1 } else { prev };
    }
    k != 0 && k != CUT_AT_NEXT && seq > k
}

/// On a destination armed for the cutover (`OUTPUT_ARMED`): input `seq`
/// was forwarded past the source's cutover, so its outputs, and those of
/// every later input, leave from here. `answer_from` only ever comes down
/// to the lowest such input (frames handled on several CPUs may race), and
/// it is lowered before the output gate opens.
#[inline(always)]
fn arm_answer(gate: *mut Gate, seq: u64) {
    // SAFETY: the array slot lives as long as the map; user space arms it
    // through a memory mapping.
    let output = unsafe { core::ptr::read_volatile(&raw const (*gate).output) };
    if output != OUTPUT_ARMED && output != OUTPUT_FROM {
        return;
    }
    for _ in 0..4 {
        // SAFETY: as above.
        let current = unsafe { core::ptr::read_volatile(&raw const (*gate).answer_from) };
        if current <= seq {
            break;
        }
        // SAFETY: as above; the exchange is atomic across CPUs.
        let (_, done) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                &raw mut (*gate).answer_from,
                current,
                seq,
            )
        };
        if done {
            break;
        }
    }
    if output == OUTPUT_ARMED {
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(&raw mut (*gate).output, OUTPUT_FROM) };
    }
}

/// Puts the input's number into the packet metadata, where the `mirror` TC
/// program or the `mirror_port` devmap program finds it; `targets`
/// (`META_*`) says where copies go and whether the original is delivered.
#[inline(always)]
fn hand_to_mirror(
    ctx: &XdpContext,
    flow_id: u32,
    seq: u64,
    timestamp_ns: u64,
    targets: u32,
) -> bool {
    let meta_len = core::mem::size_of::<CaptureMeta>() as i32;
    // SAFETY: the helper checks the headroom.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -meta_len) } != 0 {
        return false;
    }
    let Some(meta) = ptr_at::<CaptureMeta>(ctx.metadata(), ctx.data(), 0) else {
        return false;
    };
    let meta = meta.cast_mut();
    // SAFETY: ptr_at checked that the metadata area holds a CaptureMeta.
    unsafe {
        meta.write_unaligned(CaptureMeta {
            magic: CAPTURE_META_MAGIC | targets,
            flow_id,
            seq,
            timestamp_ns,
        })
    };
    true
}

/// Logs a mirror frame from the peer and lets the flow's gate decide whether
/// the mirrored input goes on to the local instance (decapsulated) or is held
/// (dropped here, kept in the log for replay). A frame with a header this
/// build does not understand passes untouched, and the stack discards it.
#[inline(always)]
fn receive(ctx: &XdpContext) -> u32 {
    count(counter::MIRROR_RECEIVED);
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(header) = ptr_at::<MirrorHeader>(data, data_end, 14) else {
        count(counter::MIRROR_ERRORS);
        return xdp_action::XDP_PASS;
    };
    // SAFETY: ptr_at checked the bounds.
    let header = unsafe { header.read_unaligned() };
    let inner_len = (data_end - data) as u32 - MIRROR_OVERHEAD;
    let frame_len = u32::from_be(header.frame_len);
    let flow_id = u32::from_be(header.flow_id);
    let sent_seq = u64::from_be(header.seq);
    if header.version != MIRROR_VERSION
        || header.header_len as u32 != MIRROR_OVERHEAD - 14
        || frame_len < 14
        || frame_len > inner_len
        || sent_seq > MAX_SEQ
    {
        count(counter::MIRROR_ERRORS);
        warn!(
            ctx,
            "refused a mirror frame: version {} header_len {} frame_len {} of {} bytes, seq {}",
            header.version,
            header.header_len,
            frame_len,
            inner_len,
            sent_seq
        );
        return xdp_action::XDP_PASS;
    }
    // The inner frame must be an input of a flow this host has, under the
    // id the header names: a mirror frame of a flow it does not have (or no
    // longer has, after a rollback) must not be logged, raise that id's
    // numbering or reach the stack.
    let known = match parse(data + MIRROR_OVERHEAD as usize, data_end) {
        Ok(Frame::Udp(key, headers)) if headers <= frame_len as usize => {
            // SAFETY: a hash map value is only read here.
            unsafe { FLOWS.get(&key) }.is_some_and(|flow| flow.flow_id == flow_id)
        }
        _ => false,
    };
    let (true, Some(gate), Some(sequence)) = (
        known,
        GATES.get_ptr_mut(flow_id),
        SEQUENCES.get_ptr_mut(flow_id),
    ) else {
        count(counter::MIRROR_ERRORS);
        return xdp_action::XDP_PASS;
    };
    let replayed = u16::from_be(header.flags) & MIRROR_FLAG_REPLAY != 0;
    if sent_seq == 0 && replayed {
        count(counter::MIRROR_ERRORS);
        return xdp_action::XDP_PASS;
    }
    // The highest number seen from the peer: inputs that arrive here
    // directly, or forwarded unnumbered after the cutover, are numbered on
    // from it.
    if sent_seq != 0 {
        raise(sequence, sent_seq);
    }
    let record = RecordHeader {
        timestamp_ns: u64::from_be(header.timestamp_ns),
        kind: RECORD_MIRRORED,
        flow_id,
        ifindex: unsafe { (*ctx.ctx).ingress_ifindex },
        frame_len,
        captured_len: captured_len(frame_len, config().snap_len),
        ..Default::default()
    };
    let number = || {
        if sent_seq != 0 {
            return sent_seq;
        }
        // SAFETY: the array slot lives as long as the map; the atomic add
        // makes numbers unique across CPUs and with the capture path.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(&raw mut (*sequence).last_seq, 1)
                + 1
        }
    };
    let seq = if replayed {
        sent_seq
    } else {
        match record::write(&INPUTS, &Xdp(ctx.ctx), MIRROR_OVERHEAD, record, number) {
            Some(seq) => seq,
            None => {
                count(counter::RING_FULL);
                if sent_seq == 0 {
                    // Unnumbered and not in the log: no gate can place it.
                    return xdp_action::XDP_DROP;
                }
                sent_seq
            }
        }
    };
    if sent_seq == 0 {
        arm_answer(gate, seq);
    }
    if let Some(action) = apply_gate(Some(gate), seq) {
        return action;
    }
    if deliver(ctx, inner_len - frame_len).is_none() {
        count(counter::MIRROR_ERRORS);
        return xdp_action::XDP_PASS;
    }
    delivered(sequence, Some(gate), seq);
    count(counter::DELIVERED);
    xdp_action::XDP_PASS
}

/// Notes that input `seq` goes on to the local instance. A counting gate
/// learns its first input here (before `last_delivered` moves, which the
/// egress program reads first); later deliveries only read the word.
#[inline(always)]
fn delivered(sequence: *mut FlowSequence, gate: Option<*mut Gate>, seq: u64) {
    if let Some(gate) = gate {
        // SAFETY: the array slot lives as long as the map; the exchange is
        // atomic across CPUs, so only the first delivery sets the start.
        unsafe {
            if (*gate).tagging == TAG_COUNTED
                && core::ptr::read_volatile(&raw const (*gate).next_answer) == 0
            {
                atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                    &raw mut (*gate).next_answer,
                    0,
                    seq,
                );
            }
        }
    }
    // SAFETY: as above; a plain store, the latest delivered input wins.
    unsafe { core::ptr::write_volatile(&raw mut (*sequence).last_delivered, seq) };
}

/// The input an output of the flow answers (see `TAG_*`). Counting: the
/// gate's `next_answer`, which moves on by one, unless every delivered
/// input is answered already (then it is a further output for the latest).
/// A few exchanges, bounded for the verifier; one instance's outputs
/// seldom race.
#[inline(always)]
fn output_tag(sequence: *const FlowSequence, gate: Option<*mut Gate>) -> u64 {
    // SAFETY: the array slots live as long as the maps.
    let latest = unsafe { core::ptr::read_volatile(&raw const (*sequence).last_delivered) };
    // SAFETY: as above.
    let Some(gate) = gate.filter(|&g| unsafe { (*g).tagging } == TAG_COUNTED) else {
        return latest;
    };
    for _ in 0..4 {
        // SAFETY: as above.
        let next = unsafe { core::ptr::read_volatile(&raw const (*gate).next_answer) };
        if next == 0 || next > latest {
            return latest;
        }
        // SAFETY: as above; the exchange is atomic across CPUs.
        let (_, done) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                &raw mut (*gate).next_answer,
                next,
                next + 1,
            )
        };
        if done {
            return next;
        }
    }
    latest
}

/// Applies the flow's gate to input `seq`: `None` lets it on to the local
/// instance; `Some(XDP_DROP)` holds it (it is in the log, for replay) or
/// drops a duplicate.
#[inline(always)]
fn apply_gate(gate: Option<*mut Gate>, seq: u64) -> Option<u32> {
    match gate.map_or(Verdict::Deliver, |g| gate_verdict(g, seq)) {
        Verdict::Deliver => None,
        Verdict::Hold => {
            count(counter::HELD);
            Some(xdp_action::XDP_DROP)
        }
        Verdict::Duplicate => {
            count(counter::DUPLICATES);
            Some(xdp_action::XDP_DROP)
        }
    }
}

/// What a gate does with one input.
enum Verdict {
    Deliver,
    /// Kept in the log, not delivered (yet).
    Hold,
    /// The instance has it already.
    Duplicate,
}

/// The gate's verdict on input `seq`. A sequenced gate advances its
/// `next_expected` with one compare-and-exchange, so of two copies of the
/// same input (a replayed one and a live one) exactly one is delivered.
#[inline(always)]
fn gate_verdict(gate: *mut Gate, seq: u64) -> Verdict {
    // SAFETY: the array slot lives as long as the map.
    match unsafe { (*gate).mode } {
        GATE_HOLD_ALL => Verdict::Hold,
        GATE_SEQUENCED => {
            // SAFETY: as above; the exchange is atomic across CPUs.
            let (prev, taken) = unsafe {
                atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                    &raw mut (*gate).next_expected,
                    seq,
                    seq + 1,
                )
            };
            if taken {
                Verdict::Deliver
            } else if seq < prev {
                Verdict::Duplicate
            } else {
                Verdict::Hold
            }
        }
        _ => Verdict::Deliver,
    }
}

/// Strips the outer Ethernet and mirror headers (and any padding after the
/// mirrored frame) and addresses the inner frame to this host's interface.
#[inline(always)]
fn deliver(ctx: &XdpContext, padding: u32) -> Option<()> {
    let outer_dst = ptr_at::<[u8; 6]>(ctx.data(), ctx.data_end(), 0)?;
    // SAFETY: ptr_at checked the bounds.
    let outer_dst = unsafe { outer_dst.read_unaligned() };
    if padding != 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -(padding as i32)) } != 0 {
        return None;
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, MIRROR_OVERHEAD as i32) } != 0 {
        return None;
    }
    let inner_dst = ptr_at::<[u8; 6]>(ctx.data(), ctx.data_end(), 0)?;
    // SAFETY: ptr_at checked the bounds.
    unsafe { inner_dst.cast_mut().write_unaligned(outer_dst) };
    Some(())
}

/// Devmap program of `PORT_MIRROR`: turns the broadcast copy into a mirror frame.
#[xdp(map = "devmap")]
pub fn mirror_port(ctx: XdpContext) -> u32 {
    let Some(meta) = ptr_at::<CaptureMeta>(ctx.metadata(), ctx.data(), 0) else {
        count(counter::MIRROR_ERRORS);
        return xdp_action::XDP_DROP;
    };
    // SAFETY: ptr_at checked the bounds.
    let meta = unsafe { meta.read_unaligned() };
    let frame_len = (ctx.data_end() - ctx.data()) as u32;
    // SAFETY: the helper checks the headroom.
    if meta.magic & CAPTURE_META_MASK != CAPTURE_META_MAGIC
        || unsafe { bpf_xdp_adjust_head(ctx.ctx, -(MIRROR_OVERHEAD as i32)) } != 0
    {
        count(counter::MIRROR_ERRORS);
        return xdp_action::XDP_DROP;
    }
    let Some(outer) = ptr_at::<[u8; MIRROR_OVERHEAD as usize]>(ctx.data(), ctx.data_end(), 0)
    else {
        return xdp_action::XDP_DROP;
    };
    let headers = mirror_headers(&config(), &meta, frame_len);
    // SAFETY: ptr_at checked the bounds.
    unsafe { outer.cast_mut().write_unaligned(headers) };
    xdp_action::XDP_PASS
}

/// Devmap program of `PORT_DELIVER`: addresses the local copy to the service side.
#[xdp(map = "devmap")]
pub fn deliver_port(ctx: XdpContext) -> u32 {
    let Some(dst) = ptr_at::<[u8; 6]>(ctx.data(), ctx.data_end(), 0) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: ptr_at checked the bounds.
    unsafe { dst.cast_mut().write_unaligned(config().deliver_mac) };
    xdp_action::XDP_PASS
}

#[classifier]
pub fn mirror(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: reading fields of the context the kernel handed us.
    let (meta, data) = unsafe { ((*skb).data_meta as usize, (*skb).data as usize) };
    let Some(meta) = ptr_at::<CaptureMeta>(meta, data, 0) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: ptr_at checked the bounds.
    let meta = unsafe { meta.read_unaligned() };
    let config = config();
    if meta.magic & CAPTURE_META_MASK != CAPTURE_META_MAGIC || config.mirror_mode != MIRROR_CLONE {
        return TC_ACT_UNSPEC;
    }
    let Some(pending) = MIRROR_PENDING.get_ptr_mut(0) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: a per-CPU slot, used only within this call.
    unsafe { *pending = meta };
    for (target, ifindex) in [
        (META_PEER, config.mirror_ifindex),
        (META_STANDBY, config.standby_ifindex),
    ] {
        if meta.magic & target != 0 && ifindex != 0 {
            let cloned = unsafe { bpf_clone_redirect(skb, ifindex, 0) };
            count(if cloned == 0 {
                counter::MIRRORED
            } else {
                counter::MIRROR_ERRORS
            });
        }
    }
    unsafe { (*pending).magic = 0 };
    if meta.magic & META_DELIVER == 0 {
        return TC_ACT_SHOT;
    }
    TC_ACT_UNSPEC
}

#[classifier]
pub fn egress(ctx: TcContext) -> i32 {
    let config = config();
    let skb = ctx.skb.skb;
    // SAFETY: reading a field of the context the kernel handed us.
    let ifindex = unsafe { (*skb).ifindex };
    match MIRROR_PENDING.get(0) {
        Some(pending)
            if pending.magic & CAPTURE_META_MASK == CAPTURE_META_MAGIC
                && (ifindex == config.mirror_ifindex || ifindex == config.standby_ifindex) =>
        {
            // The same frame format to the peer and to the standby; only the
            // addresses differ.
            let target = if ifindex == config.mirror_ifindex {
                config
            } else {
                Config {
                    mirror_dst_mac: config.standby_dst_mac,
                    mirror_src_mac: config.standby_src_mac,
                    ..config
                }
            };
            if encapsulate(&ctx, pending, &target).is_none() {
                count(counter::MIRROR_ERRORS);
            }
        }
        _ => {
            if !capture_output(&ctx, &config) {
                count(counter::OUTPUT_MUTED);
                return TC_ACT_SHOT;
            }
        }
    }
    TC_ACT_UNSPEC
}

/// Wraps a mirror clone in the outer Ethernet and mirror headers. A VLAN tag
/// the stack moved out of the frame goes back in, so the peer logs the same
/// bytes this host did.
#[inline(always)]
fn encapsulate(ctx: &TcContext, pending: &CaptureMeta, config: &Config) -> Option<()> {
    let skb = ctx.skb.skb;
    // SAFETY: reading fields of the context the kernel handed us.
    let (len, vlan_present, vlan_tci, vlan_proto) = unsafe {
        (
            (*skb).len,
            (*skb).vlan_present,
            (*skb).vlan_tci,
            (*skb).vlan_proto,
        )
    };
    let mut macs = [0u8; 12];
    let tag_len = if vlan_present != 0 { 4 } else { 0 };
    if tag_len != 0 {
        // SAFETY: the helper bounds-checks against the packet; macs holds 12 bytes.
        if unsafe { bpf_skb_load_bytes(skb.cast(), 0, macs.as_mut_ptr().cast(), 12) } != 0 {
            return None;
        }
        if unsafe { bpf_skb_vlan_pop(skb) } != 0 {
            return None;
        }
    }
    if unsafe { bpf_skb_change_head(skb, MIRROR_OVERHEAD + tag_len, 0) } != 0 {
        return None;
    }
    let outer = mirror_headers(config, pending, len + tag_len);
    store(skb, 0, &outer)?;
    if tag_len != 0 {
        // vlan_proto is kept in network byte order.
        let tpid = (vlan_proto as u16).to_ne_bytes();
        let tci = (vlan_tci as u16).to_be_bytes();
        let mut tagged = [0u8; 16];
        tagged[..12].copy_from_slice(&macs);
        tagged[12..14].copy_from_slice(&tpid);
        tagged[14..16].copy_from_slice(&tci);
        store(skb, MIRROR_OVERHEAD, &tagged)?;
    }
    Some(())
}

#[inline(always)]
fn store<const N: usize>(
    skb: *mut aya_ebpf::bindings::__sk_buff,
    offset: u32,
    bytes: &[u8; N],
) -> Option<()> {
    // SAFETY: the helper bounds-checks against the packet.
    let ret = unsafe { bpf_skb_store_bytes(skb, offset, bytes.as_ptr().cast(), N as u32, 0) };
    (ret == 0).then_some(())
}

/// Logs an output of the local instance: a frame whose reversed 5-tuple is a
/// known flow, tagged with the input it answers (`output_tag`). Returns
/// whether the flow's output gate lets it leave.
#[inline(always)]
fn capture_output(ctx: &TcContext, config: &Config) -> bool {
    let Ok(Frame::Udp(key, _)) = parse(ctx.data(), ctx.data_end()) else {
        return true;
    };
    let input_key = FlowKey {
        src_addr: key.dst_addr,
        dst_addr: key.src_addr,
        src_port: key.dst_port,
        dst_port: key.src_port,
        ..key
    };
    // SAFETY: a hash map value is only read here.
    let Some(flow) = (unsafe { FLOWS.get(&input_key) }).copied() else {
        return true;
    };
    let Some(sequence) = SEQUENCES.get_ptr(flow.flow_id) else {
        return true;
    };
    let gate = GATES.get_ptr_mut(flow.flow_id);
    let seq = output_tag(sequence, gate);
    let frame_len = ctx.len();
    let header = RecordHeader {
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        kind: RECORD_OUTPUT,
        flow_id: flow.flow_id,
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        frame_len,
        captured_len: captured_len(frame_len, config.snap_len),
        ..Default::default()
    };
    match record::write(&OUTPUTS, &Skb(ctx.skb.skb), 0, header, || seq) {
        Some(_) => count(counter::OUTPUT_CAPTURED),
        None => count(counter::OUTPUT_RING_FULL),
    }
    let Some(gate) = gate else {
        return true;
    };
    // SAFETY: the array slot lives as long as the map; user space flips
    // these words through a memory mapping.
    let (mode, answer_from) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*gate).output),
            core::ptr::read_volatile(&raw const (*gate).answer_from),
        )
    };
    match mode {
        OUTPUT_MUTE | OUTPUT_ARMED => false,
        OUTPUT_FROM => seq >= answer_from,
        _ => true,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic path.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

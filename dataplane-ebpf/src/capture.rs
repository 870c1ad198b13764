//! Numbering and logging inputs: captured ones of known flows (`capture`)
//! and mirrored ones from the peer (`receive`), which the gates then place.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_F_BROADCAST, xdp_action},
    helpers::generated::bpf_ktime_get_ns,
    programs::XdpContext,
};
use aya_log_ebpf::warn;
use dataplane_common::{
    Config, FlowKey, FlowSequence, MAX_SEQ, MIRROR_DEVMAP, MIRROR_FLAG_REPLAY, MIRROR_OVERHEAD,
    MIRROR_VERSION, MirrorHeader, PORT_MIRROR, RECORD_FLOODED, RECORD_INPUT, RECORD_MIRRORED,
    RecordHeader, counter,
    decide::{self, Route, captured_len},
};

use crate::{
    gate::{apply_gate, arm_answer, delivered, past_cutover},
    maps::{FLOWS, GATES, INPUTS, MIRROR_PORTS, SEQUENCES, config, count},
    mirror::{deliver, hand_to_mirror},
    parse::{Frame, parse, ptr_at},
    record::{self, Xdp},
    replay::{Queued, take_queued_replay},
    word,
};

/// Numbers and logs an input of a known flow; it then passes to the stack,
/// or in `MIRROR_DEVMAP` mode is broadcast to the mirror and delivery ports.
#[inline(always)]
pub(crate) fn capture(ctx: &XdpContext, key: &FlowKey) -> u32 {
    let config = config();
    // SAFETY: reading a field of the context the kernel handed us.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let dst = ptr_at::<[u8; 6]>(ctx.data(), ctx.data_end(), 0);
    // SAFETY: ptr_at checked the bounds.
    if !dst.is_some_and(|d| decide::addressed_here(unsafe { d.read_unaligned() }, ifindex, &config))
    {
        count(counter::OTHER_HOST);
        return flooded(ctx, key, &config, ifindex);
    }
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
    let frame_len = (ctx.data_end() - ctx.data()) as u32;
    // SAFETY: the helper takes no arguments and only reads the clock.
    let timestamp_ns = unsafe { bpf_ktime_get_ns() };
    let header = RecordHeader {
        timestamp_ns,
        kind: RECORD_INPUT,
        flow_id: flow.flow_id,
        ifindex,
        frame_len,
        captured_len: captured_len(frame_len, config.snap_len),
        ..Default::default()
    };
    let next_seq = || next_number(sequence);
    let gate = GATES.get_ptr_mut(flow.flow_id);
    let Some(seq) = record::write(&INPUTS, &Xdp(ctx.ctx), 0, header, next_seq) else {
        // Unnumbered: only an open gate lets it through (a migration that
        // needs it must abort; ring_full says so).
        count(counter::RING_FULL);
        // SAFETY: the array slot lives as long as the map.
        let open = decide::unnumbered_passes(gate.map(|g| unsafe { (*g).mode }));
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
    let gated = apply_gate(gate, seq, false).is_some();
    let past = gate.is_some_and(|g| past_cutover(g, seq));
    if past {
        count(counter::FORWARDED);
    }
    let Route {
        deliver,
        mirrored_seq,
    } = decide::route_input(seq, gated, past);
    if deliver {
        delivered(sequence, gate, seq);
    }
    let local = if deliver {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    };
    let to_peer = decide::to_peer(flow.flags, &config);
    // A standby copy is made by `mirror` only (clone mode).
    let to_standby = decide::to_standby(flow.flags, &config);
    if !to_peer && !to_standby {
        return local;
    }
    let targets = decide::mirror_targets(deliver, to_peer, to_standby);
    // Past the cutover the peer is the one numbering authority: inputs go
    // to it unnumbered (0, see `Route`).
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

/// An input flooded here for another host's MAC (see `addressed_here`):
/// a hot replica's flow keeps it in the log, unnumbered, with the flow's
/// last number when it came (`RECORD_FLOODED`), and drops it (the stack
/// would); should the replica's source have stopped, a takeover replays
/// it. Anything else passes untouched.
#[inline(always)]
fn flooded(ctx: &XdpContext, key: &FlowKey, config: &Config, ifindex: u32) -> u32 {
    // SAFETY: a hash map value is only read here; user space replaces whole entries.
    let Some(flow) = (unsafe { FLOWS.get(key) }).copied() else {
        return xdp_action::XDP_PASS;
    };
    let (Some(gate), Some(sequence)) = (
        GATES.get_ptr_mut(flow.flow_id),
        SEQUENCES.get_ptr_mut(flow.flow_id),
    ) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: the array slots live as long as the maps; user space changes
    // the gate's words through a memory mapping, hence the volatile reads.
    let (mode, output, last_seq) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*gate).mode),
            core::ptr::read_volatile(&raw const (*gate).output),
            core::ptr::read_volatile(&raw const (*sequence).last_seq),
        )
    };
    if !decide::keeps_flooded(mode, output) {
        return xdp_action::XDP_PASS;
    }
    let frame_len = (ctx.data_end() - ctx.data()) as u32;
    let header = RecordHeader {
        // SAFETY: the helper takes no arguments and only reads the clock.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        kind: RECORD_FLOODED,
        flow_id: flow.flow_id,
        ifindex,
        frame_len,
        captured_len: captured_len(frame_len, config.snap_len),
        ..Default::default()
    };
    // A full log loses it as the stack would: not this host's input yet.
    match record::write(&INPUTS, &Xdp(ctx.ctx), 0, header, || last_seq) {
        Some(_) => xdp_action::XDP_DROP,
        None => xdp_action::XDP_PASS,
    }
}

/// Gives the flow's next number: the atomic add makes numbers unique and
/// gap-free across CPUs, and between the capture and receive paths.
#[inline(always)]
fn next_number(sequence: *mut FlowSequence) -> u64 {
    // SAFETY: the array slot lives as long as the map.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(&raw mut (*sequence).last_seq, 1) + 1
    }
}

/// Raises the flow's `last_seq` to `seq` unless it is higher already; a
/// few compare-and-exchange attempts, bounded for the verifier (the other
/// writers, numbering fetch-adds, only ever raise it too).
#[inline(always)]
pub(crate) fn raise(sequence: *mut FlowSequence, seq: u64) {
    // SAFETY: the array slot lives as long as the map.
    unsafe {
        word::update(&raw mut (*sequence).last_seq, |current| {
            (current < seq).then_some(seq)
        })
    };
}

/// A mirror frame: a replay this host's daemon queued, or a frame off the
/// wire. A mirror frame moves a flow's numbering (a `seq` raises
/// `last_seq`) and its gates (a `seq` 0 opens an armed output gate), so
/// only the peer may send them: off the wire they are taken on the one
/// interface they are configured to arrive on (`mirror_from_ifindex`: the
/// peer link, or a standby's link to its source). One arriving anywhere
/// else, from the field network say, passes untouched and is only counted
/// (`MIRROR_FOREIGN`): no log line, which a sender could otherwise flood.
#[inline(always)]
pub(crate) fn mirror_frame(ctx: &XdpContext) -> u32 {
    let config = config();
    match take_queued_replay(ctx) {
        Queued::Taken => return receive(ctx, true, &config),
        // This host's own trigger, with nothing to receive: refused.
        Queued::Lost => {}
        _ if !on_mirror_link(ctx, &config) => {
            count(counter::MIRROR_FOREIGN);
            return xdp_action::XDP_PASS;
        }
        Queued::No => return receive(ctx, false, &config),
        Queued::Forged => {}
    }
    count(counter::MIRROR_RECEIVED);
    count(counter::MIRROR_ERRORS);
    xdp_action::XDP_PASS
}

/// Whether the frame arrived on the interface mirror frames are taken on.
#[inline(always)]
fn on_mirror_link(ctx: &XdpContext, config: &Config) -> bool {
    let from = config.mirror_from_ifindex;
    // SAFETY: reading a field of the context the kernel handed us.
    from != 0 && unsafe { (*ctx.ctx).ingress_ifindex } == from
}

/// Logs a mirror frame from the peer and lets the flow's gate decide whether
/// the mirrored input goes on to the local instance (decapsulated) or is held
/// (dropped here, kept in the log for replay). A frame with a header this
/// build does not understand passes untouched, and the stack discards it.
/// `replayed`: the frame is a replay this host's daemon queued
/// (`take_queued_replay`), the only source of replays.
#[inline(always)]
fn receive(ctx: &XdpContext, replayed: bool, config: &Config) -> u32 {
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
            unsafe { FLOWS.get(key) }.is_some_and(|flow| flow.flow_id == flow_id)
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
    // A replay is gated without being logged, and its number is taken as
    // it is: only the daemon's own queue makes them, and the flag must say
    // where the frame came from. One off the wire claiming to be a replay
    // is refused.
    let flagged = u16::from_be(header.flags) & MIRROR_FLAG_REPLAY != 0;
    if flagged != replayed || (replayed && sent_seq == 0) {
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
        // SAFETY: reading a field of the context the kernel handed us.
        ifindex: unsafe { (*ctx.ctx).ingress_ifindex },
        frame_len,
        captured_len: captured_len(frame_len, config.snap_len),
        ..Default::default()
    };
    let number = || {
        if sent_seq != 0 {
            return sent_seq;
        }
        next_number(sequence)
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
    if let Some(action) = apply_gate(Some(gate), seq, replayed) {
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

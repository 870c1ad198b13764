//! The local instance's outputs: logged on egress, tagged with the input
//! they answer, and let out or held by the flow's output gate.

use aya_ebpf::{helpers::generated::bpf_ktime_get_ns, programs::TcContext};
use dataplane_common::{
    Config, FlowKey, FlowSequence, Gate, RECORD_OUTPUT, RecordHeader, counter,
    decide::{self, captured_len},
};

use crate::{
    maps::{FLOWS, GATES, OUTPUTS, SEQUENCES, count},
    parse::{Frame, parse},
    record::{self, Skb},
    word,
};

/// Logs an output of the local instance: a frame whose reversed 5-tuple is a
/// known flow, tagged with the input it answers (`output_tag`). Returns
/// whether the flow's output gate lets it leave.
#[inline(always)]
pub(crate) fn capture_output(ctx: &TcContext, config: &Config) -> bool {
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
    let Some(flow) = (unsafe { FLOWS.get(input_key) }).copied() else {
        return true;
    };
    let Some(sequence) = SEQUENCES.get_ptr(flow.flow_id) else {
        return true;
    };
    let gate = GATES.get_ptr_mut(flow.flow_id);
    let seq = output_tag(sequence, gate);
    let frame_len = ctx.len();
    let header = RecordHeader {
        // SAFETY: the helper takes no arguments and only reads the clock.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        kind: RECORD_OUTPUT,
        flow_id: flow.flow_id,
        // SAFETY: reading a field of the context the kernel handed us.
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
    decide::output_leaves(mode, answer_from, seq)
}

/// The input an output of the flow answers (see `TAG_*`). Counting: the
/// gate's `next_answer`, which moves on by one, unless every delivered
/// input is answered already (then it is a further output for the latest).
/// A few exchanges, bounded for the verifier; one instance's outputs
/// seldom race.
#[inline(always)]
pub(crate) fn output_tag(sequence: *const FlowSequence, gate: Option<*mut Gate>) -> u64 {
    // SAFETY: the array slots live as long as the maps.
    let latest = unsafe { core::ptr::read_volatile(&raw const (*sequence).last_delivered) };
    // SAFETY: as above.
    let Some(gate) = gate.filter(|&g| decide::counts_outputs(unsafe { (*g).tagging })) else {
        return latest;
    };
    // SAFETY: as above.
    unsafe {
        word::update(&raw mut (*gate).next_answer, |next| {
            decide::counted_tag(next, latest).map(|tag| tag + 1)
        })
    }
    .unwrap_or(latest)
}

//! The per-flow gates: the input gate (deliver, hold, drop a duplicate),
//! the cutover point K, and the output gate's arming.

use aya_ebpf::bindings::xdp_action;
use dataplane_common::{
    CUT_AT_NEXT, FlowSequence, GATE_DELIVER_FROM, Gate, counter,
    decide::{self, Verdict},
};

use crate::{maps::count, word};

/// Applies the flow's gate to input `seq` (`replayed` by the daemon, or
/// live): `None` lets it on to the local instance; `Some(XDP_DROP)` holds
/// it (it is in the log, for replay) or drops a duplicate.
#[inline(always)]
pub(crate) fn apply_gate(gate: Option<*mut Gate>, seq: u64, replayed: bool) -> Option<u32> {
    match gate.map_or(Verdict::Deliver, |g| gate_verdict(g, seq, replayed)) {
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

/// The gate's verdict on input `seq`. A sequenced gate advances its
/// `next_expected` with one compare-and-exchange, so of two copies of the
/// same input (a replayed one and a live one) exactly one is delivered,
/// and a live input never overtakes a replayed one
/// (`decide::sequenced_exchange`).
#[inline(always)]
fn gate_verdict(gate: *mut Gate, seq: u64, replayed: bool) -> Verdict {
    // SAFETY: the array slot lives as long as the map.
    let mode = unsafe { (*gate).mode };
    if let Some(verdict) = decide::mode_verdict(mode) {
        return verdict;
    }
    if mode == GATE_DELIVER_FROM {
        // The first input to reach a gate opened from 0 picks where it
        // delivers from. SAFETY: as above.
        let (prev, picked) = unsafe { word::exchange(&raw mut (*gate).next_expected, 0, seq) };
        return decide::from_verdict(seq, if picked { seq } else { prev });
    }
    // Only a replayed input's exchange depends on the word's pending bit:
    // a live input reads nothing more.
    let read = match replayed {
        // SAFETY: as above; a volatile read, since the daemon clears the
        // bit through a memory mapping.
        true => unsafe { core::ptr::read_volatile(&raw const (*gate).next_expected) },
        false => 0,
    };
    let (current, new) = decide::sequenced_exchange(seq, read, replayed);
    // SAFETY: as above.
    let (prev, taken) = unsafe { word::exchange(&raw mut (*gate).next_expected, current, new) };
    decide::sequenced_verdict(seq, prev, taken)
}

/// Whether input `seq` comes after the gate's cutover point K
/// (`deliver_until`). While user space's flip (`CUT_AT_NEXT`) waits, the
/// first input numbered after it that finds the local instance's answers
/// up to it out (`decide::cutover_candidate`) picks K = its number - 1:
/// one compare-and-exchange, so every CPU agrees on K, and no input
/// numbered between a choice of K and the flip can reach both instances.
/// (A flow's frames come in on one receive queue, whose NAPI poll runs on
/// one CPU at a time: numbering order is the order in which this runs.)
#[inline(always)]
pub(crate) fn past_cutover(gate: *mut Gate, seq: u64) -> bool {
    // SAFETY: the array slot lives as long as the map. Volatile reads: user
    // space flips this word through a memory mapping, and the egress
    // program moves `next_answer` on another CPU.
    let mut k = unsafe { core::ptr::read_volatile(&raw const (*gate).deliver_until) };
    // Only while a flip waits does an input read the output count: every
    // other input's path reads one word here, as before.
    if k == CUT_AT_NEXT {
        // SAFETY: as above.
        let (tagging, next_answer) = unsafe {
            (
                core::ptr::read_volatile(&raw const (*gate).tagging),
                core::ptr::read_volatile(&raw const (*gate).next_answer),
            )
        };
        if let Some(candidate) = decide::cutover_candidate(k, seq, tagging, next_answer) {
            // SAFETY: as above.
            let (prev, done) =
                unsafe { word::exchange(&raw mut (*gate).deliver_until, CUT_AT_NEXT, candidate) };
            k = if done { candidate } else { prev };
        }
    }
    decide::past_cutover(k, seq)
}

/// On a destination armed for the cutover (`OUTPUT_ARMED`): input `seq`
/// was forwarded past the source's cutover, so its outputs, and those of
/// every later input, leave from here. `answer_from` only ever comes down
/// to the lowest such input (frames handled on several CPUs may race), and
/// it is lowered before the output gate opens.
#[inline(always)]
pub(crate) fn arm_answer(gate: *mut Gate, seq: u64) {
    // SAFETY: the array slot lives as long as the map; user space arms it
    // through a memory mapping.
    let output = unsafe { core::ptr::read_volatile(&raw const (*gate).output) };
    if !decide::tracks_answer(output) {
        return;
    }
    // SAFETY: as above.
    unsafe {
        word::update(&raw mut (*gate).answer_from, |current| {
            decide::lowered_answer_from(current, seq)
        })
    };
    if let Some(opened) = decide::opened_output(output) {
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(&raw mut (*gate).output, opened) };
    }
}

/// Notes that input `seq` goes on to the local instance. A counting gate
/// learns its first input here (before `last_delivered` moves, which the
/// egress program reads first); later deliveries only read the word.
#[inline(always)]
pub(crate) fn delivered(sequence: *mut FlowSequence, gate: Option<*mut Gate>, seq: u64) {
    if let Some(gate) = gate {
        // SAFETY: the array slot lives as long as the map; the exchange is
        // atomic across CPUs, so only the first delivery sets the start.
        unsafe {
            if decide::counts_outputs((*gate).tagging)
                && core::ptr::read_volatile(&raw const (*gate).next_answer) == 0
            {
                word::exchange(&raw mut (*gate).next_answer, 0, seq);
            }
        }
    }
    // SAFETY: as above; a plain store, the latest delivered input wins.
    unsafe { core::ptr::write_volatile(&raw mut (*sequence).last_delivered, seq) };
}

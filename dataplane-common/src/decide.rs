//! The gates' decisions as pure functions of plain values, so that host
//! tests can check them: the kernel programs read and exchange the map words
//! (the atomics and map accesses stay there) and ask these what follows.
//!
//! Every function is `#[inline(always)]`: the kernel programs must stay one
//! function each for the verifier, as they were when this logic lived there.
use crate::{
    CUT_AT_NEXT, Config, FLOW_MIRROR, FLOW_STANDBY, GATE_DELIVER_ALL, GATE_DELIVER_FROM,
    GATE_HOLD_ALL, GATE_SEQUENCED, MAX_FRAME, META_DELIVER, META_PEER, META_STANDBY, MIRROR_CLONE,
    OUTPUT_ARMED, OUTPUT_FROM, OUTPUT_MUTE, REPLAY_PENDING, TAG_COUNTED,
};

/// What an input gate does with one input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Deliver,
    /// Kept in the log, not delivered (yet).
    Hold,
    /// The instance has it already.
    Duplicate,
}

/// The verdict of an input gate in mode `mode` (`GATE_*`), or `None` for a
/// sequenced gate or one delivering from an input: their verdicts need a
/// compare-and-exchange of `next_expected` (see `sequenced_verdict` and
/// `from_verdict`). An unknown mode delivers.
#[inline(always)]
pub fn mode_verdict(mode: u32) -> Option<Verdict> {
    match mode {
        GATE_HOLD_ALL => Some(Verdict::Hold),
        GATE_SEQUENCED | GATE_DELIVER_FROM => None,
        _ => Some(Verdict::Deliver),
    }
}

/// A gate delivering from input `from` (`GATE_DELIVER_FROM`: the first
/// input to reach it picked `from` if user space had not): its verdict on
/// input `seq`. One numbered before it was picked and reaching the gate
/// only after is dropped: it is one of the inputs the gate opened over.
#[inline(always)]
pub fn from_verdict(seq: u64, from: u64) -> Verdict {
    if seq >= from {
        Verdict::Deliver
    } else {
        Verdict::Duplicate
    }
}

/// Whether a gate in `mode` delivers every new input (open), rather than
/// holding inputs or taking them in turn.
#[inline(always)]
pub fn gate_open(mode: u32) -> bool {
    mode == GATE_DELIVER_ALL || mode == GATE_DELIVER_FROM
}

/// The input a sequenced gate whose word is `next_expected` takes next.
#[inline(always)]
pub fn expected_input(next_expected: u64) -> u64 {
    next_expected & !REPLAY_PENDING
}

/// The compare-and-exchange (current, new) of a sequenced gate's word,
/// read as `word`, that delivers input `seq`, `replayed` or live.
///
/// A replayed input is taken even while the one before it is still on its
/// way (`REPLAY_PENDING`), and leaves the word pending: the daemon clears
/// it once its injection has returned, when the replayed inputs are in the
/// socket's queue. A live input is taken only from a word that is not
/// pending. Without that, a live input let through right after the last
/// replayed one could reach the socket first, on another CPU with a
/// shorter path, and the instance would take the two out of order.
#[inline(always)]
pub fn sequenced_exchange(seq: u64, word: u64, replayed: bool) -> (u64, u64) {
    if replayed {
        (seq | (word & REPLAY_PENDING), (seq + 1) | REPLAY_PENDING)
    } else {
        (seq, seq + 1)
    }
}

/// A sequenced gate's verdict on input `seq`, from its compare-and-exchange
/// of `next_expected` (`sequenced_exchange`): `taken` if it succeeded, else
/// `prev` is the value the word held. Of two copies of one input (a
/// replayed one and a live one) only one takes the word.
#[inline(always)]
pub fn sequenced_verdict(seq: u64, prev: u64, taken: bool) -> Verdict {
    if taken {
        Verdict::Deliver
    } else if seq < expected_input(prev) {
        Verdict::Duplicate
    } else {
        Verdict::Hold
    }
}

/// The `next_expected` user space stores (before the mode) when it changes
/// an input gate to `mode`: only a gate entering `GATE_SEQUENCED` gets one.
/// A gate leaving it keeps the word as the kernel advanced it: a program
/// that read the sequenced mode just before the change exchanges the word
/// after it (`sequenced_verdict`), and a value written from a stale copy of
/// the gate (or the 0 callers pass) would make it hold the input it is
/// taking, with no replay left to deliver it.
#[inline(always)]
pub fn stored_next_expected(mode: u32, next_expected: u64) -> Option<u64> {
    (mode == GATE_SEQUENCED).then_some(next_expected)
}

/// Whether a UDP frame for destination MAC `dst`, arrived on interface
/// `ifindex`, is addressed to this host: anything but a unicast frame for
/// another MAC on the capture interface. Such a frame reaches the
/// capture interface only when a switch floods it (its owner's port went
/// down) or the port listens promiscuously; the stack drops it, so
/// numbering it would count an input the instance never gets.
#[inline(always)]
pub fn addressed_here(dst: [u8; 6], ifindex: u32, config: &Config) -> bool {
    ifindex != config.capture_ifindex || dst[0] & 1 != 0 || dst == config.capture_mac
}

/// Whether an input flooded here for another host's MAC is kept in the
/// log (`RECORD_FLOODED`) for a flow whose gate is in `mode` with its
/// outputs in `output`: a replica's (sequenced, muted), whose source may
/// have stopped. Anything else passes untouched.
#[inline(always)]
pub fn keeps_flooded(mode: u32, output: u32) -> bool {
    mode == GATE_SEQUENCED && output == OUTPUT_MUTE
}

/// Whether an input that could not be numbered (the log is full) still
/// reaches the local instance: only through an open gate (`mode` is the
/// flow's gate mode, `None` without a gate). A migration that needs it
/// must abort.
#[inline(always)]
pub fn unnumbered_passes(mode: Option<u32>) -> bool {
    mode.is_none_or(gate_open)
}

/// The cutover point K that input `seq` proposes, given the gate's
/// `deliver_until` word `k`: while user space's flip (`CUT_AT_NEXT`)
/// waits, the input's number - 1, if the local instance has answered
/// every input up to it (a counting gate, as a migration's source is:
/// `next_answer` past it). An input that finds an answer still owed
/// goes to the local instance and leaves the flip to a later one: the
/// source's answers up to K are then on their way to the CPS before any
/// input past K reaches the destination, whose answers would otherwise
/// overtake them, and none is owed when the source stops its instance.
/// Input 1 proposes none: K = 0 means no cutover, so the flip waits for
/// input 2.
#[inline(always)]
pub fn cutover_candidate(k: u64, seq: u64, tagging: u32, next_answer: u64) -> Option<u64> {
    let answered = !counts_outputs(tagging) || next_answer >= seq;
    (k == CUT_AT_NEXT && seq > 1 && answered).then(|| seq - 1)
}

/// Whether input `seq` comes after the cutover point `k` (0: no cutover;
/// `CUT_AT_NEXT`: not picked yet).
#[inline(always)]
pub fn past_cutover(k: u64, seq: u64) -> bool {
    k != 0 && k != CUT_AT_NEXT && seq > k
}

/// Where a numbered input captured here goes: to the local instance
/// (`deliver`), and with which number its mirror copy leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub deliver: bool,
    /// `seq`, or 0 past the cutover: the peer is then the one numbering
    /// authority, and inputs reaching it directly and inputs forwarded from
    /// here (the CPS's path may swing back and forth while neighbours learn
    /// the address's new owner) share its numbering.
    pub mirrored_seq: u64,
}

/// The route of captured input `seq`: the local instance gets it if its
/// gate lets it (`gated` is false) and it is not `past` the cutover.
#[inline(always)]
pub fn route_input(seq: u64, gated: bool, past: bool) -> Route {
    Route {
        deliver: !gated && !past,
        mirrored_seq: if past { 0 } else { seq },
    }
}

/// Whether a captured input of a flow with `flags` (`FLOW_*`) is copied to
/// the peer: every input of a mirrored flow, so that the peer's log is
/// complete whatever happens here.
#[inline(always)]
pub fn to_peer(flags: u32, config: &Config) -> bool {
    flags & FLOW_MIRROR != 0 && config.mirror_ifindex != 0
}

/// Whether a captured input is copied to the standby; only the clone mode
/// (the `mirror` TC program) makes a standby copy.
#[inline(always)]
pub fn to_standby(flags: u32, config: &Config) -> bool {
    flags & FLOW_STANDBY != 0 && config.standby_ifindex != 0 && config.mirror_mode == MIRROR_CLONE
}

/// The `META_*` bits the mirror programs get: where copies go and whether
/// the original is delivered.
#[inline(always)]
pub fn mirror_targets(deliver: bool, to_peer: bool, to_standby: bool) -> u32 {
    (if deliver { META_DELIVER } else { 0 })
        | (if to_peer { META_PEER } else { 0 })
        | (if to_standby { META_STANDBY } else { 0 })
}

/// Whether an input the peer forwarded past its cutover (unnumbered) moves
/// the output gate `output` (`OUTPUT_*`): an armed one, or one that opened.
#[inline(always)]
pub fn tracks_answer(output: u32) -> bool {
    output == OUTPUT_ARMED || output == OUTPUT_FROM
}

/// The new `answer_from` for such an input `seq`: it only ever comes down,
/// to the lowest such input (frames handled on several CPUs may race).
#[inline(always)]
pub fn lowered_answer_from(current: u64, seq: u64) -> Option<u64> {
    (current > seq).then_some(seq)
}

/// The output mode after such an input: an armed gate opens (`OUTPUT_FROM`,
/// from `answer_from` on); others stay.
#[inline(always)]
pub fn opened_output(output: u32) -> Option<u32> {
    (output == OUTPUT_ARMED).then_some(OUTPUT_FROM)
}

/// Whether an output tagged `seq` leaves, under the output gate's `mode`
/// (`OUTPUT_*`) and `answer_from`.
#[inline(always)]
pub fn output_leaves(mode: u32, answer_from: u64, seq: u64) -> bool {
    match mode {
        OUTPUT_MUTE | OUTPUT_ARMED => false,
        OUTPUT_FROM => seq >= answer_from,
        _ => true,
    }
}

/// Whether a gate with `tagging` (`TAG_*`) counts outputs; otherwise an
/// output answers the latest delivered input.
#[inline(always)]
pub fn counts_outputs(tagging: u32) -> bool {
    tagging == TAG_COUNTED
}

/// Counting: the input an output answers, given the gate's `next_answer`
/// and the latest delivered input: `Some(next_answer)`, which the caller
/// claims by moving `next_answer` on by one, or `None` when there is none
/// to claim (no delivery yet, or every delivered input is answered): then
/// it is a further output for the latest.
#[inline(always)]
pub fn counted_tag(next_answer: u64, latest: u64) -> Option<u64> {
    (next_answer != 0 && next_answer <= latest).then_some(next_answer)
}

/// Bytes of a `frame_len`-byte frame that go into the log, under the
/// configured `snap_len` (0, or above `MAX_FRAME`: `MAX_FRAME`).
#[inline(always)]
pub fn captured_len(frame_len: u32, snap_len: u32) -> u32 {
    let limit = if snap_len == 0 || snap_len > MAX_FRAME {
        MAX_FRAME
    } else {
        snap_len
    };
    if frame_len < limit { frame_len } else { limit }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{OUTPUT_PASS, TAG_LATEST};

    /// A sequenced gate's word, exchanged the way the kernel program does.
    fn sequenced(next_expected: &mut u64, seq: u64) -> Verdict {
        exchanged(next_expected, seq, false)
    }

    fn exchanged(next_expected: &mut u64, seq: u64, replayed: bool) -> Verdict {
        let prev = *next_expected;
        let (current, new) = sequenced_exchange(seq, prev, replayed);
        let taken = prev == current;
        if taken {
            *next_expected = new;
        }
        sequenced_verdict(seq, prev, taken)
    }

    #[test]
    fn a_live_input_waits_until_the_replayed_one_before_it_is_in_the_socket() {
        let mut next = 5;
        // A batch replays 5 and 6: the word stays pending.
        assert_eq!(exchanged(&mut next, 5, true), Verdict::Deliver);
        assert_eq!(exchanged(&mut next, 6, true), Verdict::Deliver);
        assert_eq!(next, 7 | REPLAY_PENDING);
        assert_eq!(expected_input(next), 7);
        // Live 7 reaches the gate before the injection has returned: held
        // (it is in the log, and the replay gives it next).
        assert_eq!(exchanged(&mut next, 7, false), Verdict::Hold);
        // A live copy of 6, or a late replay of 5: duplicates.
        assert_eq!(exchanged(&mut next, 6, false), Verdict::Duplicate);
        assert_eq!(exchanged(&mut next, 5, true), Verdict::Duplicate);
        // The injection returned: the daemon clears the pending bit.
        next = expected_input(next);
        assert_eq!(exchanged(&mut next, 8, false), Verdict::Hold);
        assert_eq!(exchanged(&mut next, 7, false), Verdict::Deliver);
        assert_eq!(next, 8, "a live input leaves the word as it takes it");
        // A replay of an input that is not next is held like a live one.
        assert_eq!(exchanged(&mut next, 9, true), Verdict::Hold);
        assert_eq!(next, 8);
    }

    #[test]
    fn gate_verdicts_per_mode() {
        assert_eq!(mode_verdict(GATE_DELIVER_ALL), Some(Verdict::Deliver));
        assert_eq!(mode_verdict(GATE_HOLD_ALL), Some(Verdict::Hold));
        assert_eq!(mode_verdict(GATE_SEQUENCED), None);
        assert_eq!(mode_verdict(99), Some(Verdict::Deliver));
    }

    #[test]
    fn sequenced_gate_delivers_in_order_once() {
        let mut next = 5;
        assert_eq!(sequenced(&mut next, 6), Verdict::Hold);
        assert_eq!(sequenced(&mut next, 5), Verdict::Deliver);
        // The other copy of input 5 (replayed and live).
        assert_eq!(sequenced(&mut next, 5), Verdict::Duplicate);
        assert_eq!(sequenced(&mut next, 4), Verdict::Duplicate);
        assert_eq!(sequenced(&mut next, 6), Verdict::Deliver);
        assert_eq!(next, 7);
    }

    #[test]
    fn a_mode_change_keeps_the_word_a_sequenced_verdict_in_flight_exchanges() {
        // The interleaving of the race: the program taking input 3 has read
        // the sequenced mode (`mode_verdict` is None) when user space moves
        // the gate out of it, and exchanges `next_expected` after that. Only
        // if the change left the word alone does input 3 get through; if it
        // wrote the word, input 3 is held and nobody replays it.
        for mode in [GATE_DELIVER_ALL, GATE_HOLD_ALL] {
            let mut next = 1;
            assert_eq!(sequenced(&mut next, 1), Verdict::Deliver);
            assert_eq!(sequenced(&mut next, 2), Verdict::Deliver);
            assert_eq!(mode_verdict(GATE_SEQUENCED), None);
            // Callers pass 0 when they leave the sequenced gate.
            if let Some(stored) = stored_next_expected(mode, 0) {
                next = stored;
            }
            assert_eq!(
                sequenced(&mut next, 3),
                Verdict::Deliver,
                "input 3, taken while the gate left the sequenced mode for mode {mode}"
            );
        }
        // Entering the sequenced gate sets where it starts, before the mode.
        assert_eq!(stored_next_expected(GATE_SEQUENCED, 7), Some(7));
    }

    /// `GATE_DELIVER_FROM` as the kernel runs it: the first input to reach
    /// a gate whose word is 0 takes it.
    fn from(next_expected: &mut u64, seq: u64) -> Verdict {
        assert_eq!(mode_verdict(GATE_DELIVER_FROM), None);
        if *next_expected == 0 {
            *next_expected = seq;
        }
        from_verdict(seq, *next_expected)
    }

    #[test]
    fn a_gate_opened_from_an_input_names_exactly_what_it_opened_over() {
        // Held: inputs 5 to 9 (5 was to be given back next). Input 9 was
        // numbered but is still on its way to the gate when it opens.
        // User space takes the word (0), opens, reads last_seq 9 and sets
        // the word to 10 unless an input took it first.
        let mut next = 9 + 1;
        assert_eq!(from(&mut next, 9), Verdict::Duplicate, "9 is named lost");
        assert_eq!(from(&mut next, 10), Verdict::Deliver);
        assert_eq!(from(&mut next, 11), Verdict::Deliver);
        // The other order: input 10, numbered after user space read
        // last_seq 9, reaches the gate first and picks 10 itself; user
        // space's exchange then fails and it reads 10: the same range.
        let mut next = 0;
        assert_eq!(from(&mut next, 10), Verdict::Deliver);
        assert_eq!(next, 10);
        assert_eq!(from(&mut next, 9), Verdict::Duplicate);
        // A stray input 9 first picks 9: it is delivered, and user space
        // reads 9, so that the range it names ends at 8.
        let mut next = 0;
        assert_eq!(from(&mut next, 9), Verdict::Deliver);
        assert_eq!(next, 9);
        assert!(gate_open(GATE_DELIVER_FROM) && gate_open(GATE_DELIVER_ALL));
        assert!(!gate_open(GATE_HOLD_ALL) && !gate_open(GATE_SEQUENCED));
    }

    #[test]
    fn only_frames_for_this_host_are_numbered_on_the_capture_interface() {
        let config = Config {
            capture_ifindex: 4,
            capture_mac: [2, 0, 0, 0, 0, 1],
            ..Default::default()
        };
        assert!(addressed_here([2, 0, 0, 0, 0, 1], 4, &config));
        assert!(
            !addressed_here([2, 0, 0, 0, 0, 2], 4, &config),
            "another host's"
        );
        assert!(addressed_here([0xff; 6], 4, &config), "broadcast");
        assert!(
            addressed_here([0x01, 0, 0x5e, 0, 0, 1], 4, &config),
            "multicast"
        );
        // Elsewhere (the standby link, a test run without an interface)
        // the MAC is not checked.
        assert!(addressed_here([2, 0, 0, 0, 0, 2], 5, &config));
    }

    #[test]
    fn only_a_replica_keeps_inputs_flooded_to_it() {
        assert!(keeps_flooded(GATE_SEQUENCED, OUTPUT_MUTE));
        assert!(!keeps_flooded(GATE_SEQUENCED, OUTPUT_FROM), "serving");
        assert!(!keeps_flooded(GATE_DELIVER_ALL, OUTPUT_PASS), "serving");
        assert!(
            !keeps_flooded(GATE_HOLD_ALL, OUTPUT_MUTE),
            "not restored yet"
        );
    }

    #[test]
    fn unnumbered_inputs_pass_only_an_open_gate() {
        assert!(unnumbered_passes(None));
        assert!(unnumbered_passes(Some(GATE_DELIVER_ALL)));
        assert!(unnumbered_passes(Some(GATE_DELIVER_FROM)));
        assert!(!unnumbered_passes(Some(GATE_HOLD_ALL)));
        assert!(!unnumbered_passes(Some(GATE_SEQUENCED)));
    }

    #[test]
    fn the_first_input_after_the_flip_that_finds_every_earlier_one_answered_picks_k() {
        let picks = |k, seq| cutover_candidate(k, seq, TAG_COUNTED, seq);
        assert_eq!(picks(CUT_AT_NEXT, 8), Some(7));
        // Input 1 would pick K = 0, which means no cutover: it waits.
        assert_eq!(picks(CUT_AT_NEXT, 1), None);
        assert_eq!(picks(CUT_AT_NEXT, 2), Some(1));
        // K picked already, or no cutover.
        assert_eq!(picks(7, 9), None);
        assert_eq!(picks(0, 9), None);
        // Input 7 still unanswered when 8 comes: 8 goes to the instance
        // here, and a later input picks K.
        assert_eq!(cutover_candidate(CUT_AT_NEXT, 8, TAG_COUNTED, 7), None);
        assert_eq!(cutover_candidate(CUT_AT_NEXT, 8, TAG_COUNTED, 0), None);
        assert_eq!(cutover_candidate(CUT_AT_NEXT, 9, TAG_COUNTED, 9), Some(8));
        // A gate that does not count its outputs cannot tell: the first
        // input picks.
        assert_eq!(cutover_candidate(CUT_AT_NEXT, 8, TAG_LATEST, 0), Some(7));
    }

    #[test]
    fn inputs_after_k_are_past_the_cutover() {
        assert!(!past_cutover(0, 100));
        assert!(!past_cutover(CUT_AT_NEXT, 100));
        assert!(!past_cutover(7, 7));
        assert!(past_cutover(7, 8));
        assert!(!past_cutover(CUT_AT_NEXT, 1));
    }

    #[test]
    fn inputs_past_k_are_forwarded_unnumbered() {
        let route = |gated, past| route_input(9, gated, past);
        assert_eq!(
            route(false, false),
            Route {
                deliver: true,
                mirrored_seq: 9
            }
        );
        assert_eq!(
            route(true, false),
            Route {
                deliver: false,
                mirrored_seq: 9
            }
        );
        assert_eq!(
            route(false, true),
            Route {
                deliver: false,
                mirrored_seq: 0
            }
        );
        assert_eq!(
            route(true, true),
            Route {
                deliver: false,
                mirrored_seq: 0
            }
        );
    }

    #[test]
    fn copies_go_where_the_flow_and_config_say() {
        let config = Config {
            mirror_ifindex: 3,
            standby_ifindex: 4,
            mirror_mode: MIRROR_CLONE,
            ..Default::default()
        };
        assert!(to_peer(FLOW_MIRROR, &config));
        assert!(!to_peer(FLOW_STANDBY, &config));
        assert!(!to_peer(
            FLOW_MIRROR,
            &Config {
                mirror_ifindex: 0,
                ..config
            }
        ));
        assert!(to_standby(FLOW_STANDBY, &config));
        assert!(!to_standby(FLOW_MIRROR, &config));
        let devmap = Config {
            mirror_mode: crate::MIRROR_DEVMAP,
            ..config
        };
        assert!(!to_standby(FLOW_STANDBY, &devmap));
        assert_eq!(mirror_targets(false, false, false), 0);
        assert_eq!(
            mirror_targets(true, true, true),
            META_DELIVER | META_PEER | META_STANDBY
        );
        assert_eq!(mirror_targets(false, true, false), META_PEER);
    }

    /// The output gate's words, moved the way the kernel program does when
    /// an input the peer forwarded unnumbered arrives as `seq`.
    fn forwarded(output: &mut u32, answer_from: &mut u64, seq: u64) {
        if !tracks_answer(*output) {
            return;
        }
        if let Some(lowered) = lowered_answer_from(*answer_from, seq) {
            *answer_from = lowered;
        }
        if let Some(opened) = opened_output(*output) {
            *output = opened;
        }
    }

    #[test]
    fn the_armed_output_gate_opens_at_the_first_forwarded_input() {
        let (mut output, mut answer_from) = (OUTPUT_ARMED, u64::MAX);
        assert!(!output_leaves(output, answer_from, 10));
        forwarded(&mut output, &mut answer_from, 12);
        assert_eq!((output, answer_from), (OUTPUT_FROM, 12));
        assert!(!output_leaves(output, answer_from, 11));
        assert!(output_leaves(output, answer_from, 12));
        // A lower input handled late on another CPU lowers it; a higher one
        // does not raise it.
        forwarded(&mut output, &mut answer_from, 11);
        forwarded(&mut output, &mut answer_from, 20);
        assert_eq!((output, answer_from), (OUTPUT_FROM, 11));
        assert!(output_leaves(output, answer_from, 11));
    }

    #[test]
    fn only_armed_or_open_output_gates_track_forwarded_inputs() {
        for mode in [OUTPUT_PASS, OUTPUT_MUTE] {
            let (mut output, mut answer_from) = (mode, 50);
            forwarded(&mut output, &mut answer_from, 12);
            assert_eq!((output, answer_from), (mode, 50));
        }
        assert!(output_leaves(OUTPUT_PASS, 50, 1));
        assert!(!output_leaves(OUTPUT_MUTE, 0, 100));
    }

    /// Tags of outputs made after deliveries, moved the way the kernel
    /// programs do: `Some(seq)` delivers input seq, `None` is an output.
    fn tags(tagging: u32, events: &[Option<u64>]) -> [u64; 8] {
        let (mut next_answer, mut latest) = (0, 0);
        let mut tags = [0; 8];
        let mut n = 0;
        for event in events {
            match *event {
                Some(seq) => {
                    if counts_outputs(tagging) && next_answer == 0 {
                        next_answer = seq;
                    }
                    latest = seq;
                }
                None => {
                    tags[n] = match counted_tag(next_answer, latest) {
                        Some(tag) if counts_outputs(tagging) => {
                            next_answer = tag + 1;
                            tag
                        }
                        _ => latest,
                    };
                    n += 1;
                }
            }
        }
        tags
    }

    #[test]
    fn outputs_are_tagged_by_count_or_with_the_latest_input() {
        // A burst: inputs 5 and 6 queue before the instance answers 5.
        let burst = [Some(5), Some(6), None, None, None, Some(7), None];
        assert_eq!(tags(TAG_COUNTED, &burst), [5, 6, 6, 7, 0, 0, 0, 0]);
        assert_eq!(tags(TAG_LATEST, &burst), [6, 6, 6, 7, 0, 0, 0, 0]);
        // An output before any delivery answers input 0 either way.
        assert_eq!(tags(TAG_COUNTED, &[None]), [0; 8]);
        assert_eq!(counted_tag(0, 9), None);
        assert_eq!(counted_tag(10, 9), None);
        assert_eq!(counted_tag(9, 9), Some(9));
    }

    #[test]
    fn snap_len_caps_the_logged_bytes() {
        assert_eq!(captured_len(100, 0), 100);
        assert_eq!(captured_len(100, 64), 64);
        assert_eq!(captured_len(MAX_FRAME + 1, 0), MAX_FRAME);
        assert_eq!(captured_len(MAX_FRAME + 1, MAX_FRAME + 100), MAX_FRAME);
        assert_eq!(captured_len(64, 64), 64);
    }
}

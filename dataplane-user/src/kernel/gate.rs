//! The gate window: the gates array (`BPF_F_MMAPABLE`) mapped into this
//! process, so that the cutover's flip and the gate changes around it are
//! single stores to words the kernel programs read per packet.
use std::{
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

use aya::maps::MapData;
use dataplane_common::{Gate, MAX_FLOWS, REPLAY_PENDING, decide};
use memmap2::{MmapOptions, MmapRaw};

/// The gates array's name among the pinned maps.
pub const MAP_GATES: &str = "GATES";

/// Why the gates array could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum GateWindowError {
    #[error("opening the pinned gates array {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::maps::MapError,
    },
    #[error("mapping the gates array {path}: {source}")]
    Map {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The gates array (`BPF_F_MMAPABLE`) mapped into user space: a gate word
/// changes with one store, in tens of nanoseconds, where a map update
/// syscall takes about a microsecond.
pub struct GateWindow {
    map: MmapRaw,
}

impl GateWindow {
    /// Maps the gates array of the dataplane pinned at `pin_root`.
    pub fn open(pin_root: &Path) -> Result<Self, GateWindowError> {
        let path = pin_root.join("maps").join(MAP_GATES);
        let map = match MapData::from_pin(&path) {
            Ok(map) => map,
            Err(source) => return Err(GateWindowError::Pin { path, source }),
        };
        let len = (MAX_FLOWS as usize * size_of::<Gate>()).next_multiple_of(4096);
        // The kernel keeps the map's memory alive while the mapping exists
        // (the mapping holds a reference on the map), so the map's fd may close.
        let map = MmapOptions::new()
            .len(len)
            .map_raw(map.fd().as_fd().as_raw_fd())
            .map_err(|source| GateWindowError::Map { path, source })?;
        Ok(Self { map })
    }

    fn word<T>(&self, flow_id: u32, offset: usize) -> &T {
        assert!(flow_id < MAX_FLOWS, "flow id {flow_id} out of range");
        // SAFETY: in bounds of the mapping (flow_id < MAX_FLOWS), aligned
        // (Gate is 48 bytes, the offsets multiples of the words' sizes), and
        // the kernel side reads and exchanges the words with single accesses;
        // the mapping lives as long as `self`.
        unsafe {
            &*self
                .map
                .as_mut_ptr()
                .add(flow_id as usize * size_of::<Gate>() + offset)
                .cast::<T>()
        }
    }

    /// Sets the input gate's `mode`; entering `GATE_SEQUENCED`, first its
    /// `next_expected`. The kernel reads `next_expected` only in a
    /// sequenced gate, where it alone advances it: a sequenced gate is
    /// entered from another mode, and left without touching the word
    /// (`decide::stored_next_expected` says why).
    pub fn set_input_gate(&self, flow_id: u32, mode: u32, next_expected: u64) {
        if let Some(next_expected) = decide::stored_next_expected(mode, next_expected) {
            self.word::<AtomicU64>(flow_id, dataplane_common::GATE_NEXT_EXPECTED_OFFSET)
                .store(next_expected, Ordering::SeqCst);
        }
        self.word::<AtomicU32>(flow_id, dataplane_common::GATE_MODE_OFFSET)
            .store(mode, Ordering::SeqCst);
    }

    /// The one input a sequenced gate takes next.
    pub fn next_expected(&self, flow_id: u32) -> u64 {
        decide::expected_input(self.next_expected_word(flow_id))
    }

    /// The gate's `next_expected` word as it is, `REPLAY_PENDING` and all.
    pub fn next_expected_word(&self, flow_id: u32) -> u64 {
        self.word::<AtomicU64>(flow_id, dataplane_common::GATE_NEXT_EXPECTED_OFFSET)
            .load(Ordering::SeqCst)
    }

    /// Lets live inputs through a sequenced gate again once the replayed
    /// inputs it took are in the instance's socket: clears
    /// `REPLAY_PENDING` (see `decide::sequenced_exchange`).
    pub fn replay_delivered(&self, flow_id: u32) {
        loop {
            let word = self.next_expected_word(flow_id);
            if word & REPLAY_PENDING == 0
                || self.exchange_next_expected(flow_id, word, word & !REPLAY_PENDING)
            {
                return;
            }
        }
    }

    /// Moves a sequenced gate on from input `from` to input `to`, as the
    /// kernel does when it delivers `from`: for inputs a replay cannot give
    /// (missing from the log, or too large), which the caller names. One
    /// compare-and-exchange, so an input the kernel delivered meanwhile is
    /// never passed over: `false` if `next_expected` was not `from`.
    pub fn pass_over(&self, flow_id: u32, from: u64, to: u64) -> bool {
        self.exchange_next_expected(flow_id, from, to)
    }

    /// Sets the gate's `next_expected` to `new` if it is `current` (one
    /// compare-and-exchange, as the kernel's): whether it was.
    pub fn exchange_next_expected(&self, flow_id: u32, current: u64, new: u64) -> bool {
        self.word::<AtomicU64>(flow_id, dataplane_common::GATE_NEXT_EXPECTED_OFFSET)
            .compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    fn deliver_until(&self, flow_id: u32) -> &AtomicU64 {
        self.word(flow_id, dataplane_common::GATE_DELIVER_UNTIL_OFFSET)
    }

    /// Sets the source's cutover point: inputs of `flow_id` above `k` stop
    /// reaching the local instance (0: every input does;
    /// `CUT_AT_NEXT`: the flip, see [`GateWindow::flip`]). One store.
    pub fn set_deliver_until(&self, flow_id: u32, k: u64) {
        self.deliver_until(flow_id).store(k, Ordering::SeqCst);
    }

    /// The cutover flip on the source: the next input of `flow_id` numbered
    /// here, and every later one, goes to the destination only; the kernel
    /// program picks K. One store.
    pub fn flip(&self, flow_id: u32) {
        self.set_deliver_until(flow_id, dataplane_common::CUT_AT_NEXT);
    }

    /// K once the kernel program has picked it after a flip.
    pub fn cutover_point(&self, flow_id: u32) -> Option<u64> {
        match self.deliver_until(flow_id).load(Ordering::SeqCst) {
            0 | dataplane_common::CUT_AT_NEXT => None,
            k => Some(k),
        }
    }

    /// Takes a flip back if no input has crossed it yet; `Err(K)` if one
    /// has (the cutover happened at K and stands).
    pub fn unflip(&self, flow_id: u32) -> Result<(), u64> {
        match self.deliver_until(flow_id).compare_exchange(
            dataplane_common::CUT_AT_NEXT,
            0,
            Ordering::SeqCst,
            Ordering::SeqCst,
        ) {
            Ok(_) | Err(0) => Ok(()),
            Err(k) => Err(k),
        }
    }

    /// Arms the destination's output gate for a cutover the source's
    /// kernel picks: muted until the first input forwarded past it.
    /// `answer_from` is set before the mode, which the kernel reads first.
    pub fn arm_outputs(&self, flow_id: u32) {
        self.word::<AtomicU64>(flow_id, dataplane_common::GATE_ANSWER_FROM_OFFSET)
            .store(u64::MAX, Ordering::SeqCst);
        self.word::<AtomicU32>(flow_id, dataplane_common::GATE_OUTPUT_OFFSET)
            .store(dataplane_common::OUTPUT_ARMED, Ordering::SeqCst);
    }

    /// Opens the output gate to the answers of input `from` and later
    /// (a takeover: the source answered the ones before).
    pub fn open_outputs_from(&self, flow_id: u32, from: u64) {
        self.word::<AtomicU64>(flow_id, dataplane_common::GATE_ANSWER_FROM_OFFSET)
            .store(from, Ordering::SeqCst);
        self.word::<AtomicU32>(flow_id, dataplane_common::GATE_OUTPUT_OFFSET)
            .store(dataplane_common::OUTPUT_FROM, Ordering::SeqCst);
    }

    /// Tags flow `flow_id`'s outputs by counting (`TAG_COUNTED`) from the
    /// input after the latest delivered (`delivered` reads it): a
    /// migration's source, for its serving instance. The count must never
    /// start behind the instance, or every later answer is tagged one
    /// input early; one that starts ahead (an answer still owed) puts
    /// itself right at the instance's next idle moment (see
    /// `counted_tag`). So the start is raised again after counting is on,
    /// past inputs delivered (and answered, tagged as the latest) since
    /// the first read.
    pub fn count_answers(&self, flow_id: u32, delivered: impl Fn() -> u64) {
        let next_answer =
            self.word::<AtomicU64>(flow_id, dataplane_common::GATE_NEXT_ANSWER_OFFSET);
        next_answer.store(delivered() + 1, Ordering::SeqCst);
        self.word::<AtomicU32>(flow_id, dataplane_common::GATE_TAGGING_OFFSET)
            .store(dataplane_common::TAG_COUNTED, Ordering::SeqCst);
        next_answer.fetch_max(delivered() + 1, Ordering::SeqCst);
    }

    /// Tags flow `flow_id`'s outputs with the latest delivered input again
    /// (`TAG_LATEST`; a rollback).
    pub fn tag_latest(&self, flow_id: u32) {
        self.word::<AtomicU32>(flow_id, dataplane_common::GATE_TAGGING_OFFSET)
            .store(dataplane_common::TAG_LATEST, Ordering::SeqCst);
    }

    /// Mutes the destination's outputs again (a rollback).
    pub fn mute_outputs(&self, flow_id: u32) {
        self.word::<AtomicU32>(flow_id, dataplane_common::GATE_OUTPUT_OFFSET)
            .store(dataplane_common::OUTPUT_MUTE, Ordering::SeqCst);
    }
}

//! The maps the programs share with user space (and with each other), and
//! the helpers that count events and read the host-wide settings.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, DevMap, HashMap, PerCpuArray, RingBuf},
};
use dataplane_common::{
    CaptureMeta, Config, FlowConfig, FlowKey, FlowSequence, Gate, MAX_FLOWS, MirrorTarget,
    REPLAY_BATCH, ReplaySlot, counter,
};

/// Known CPS flows, written by user space.
#[map]
pub(crate) static FLOWS: HashMap<FlowKey, FlowConfig> = HashMap::pinned(MAX_FLOWS, 0);

/// Per-flow sequence numbers, indexed by flow id.
#[map]
pub(crate) static SEQUENCES: Array<FlowSequence> = Array::pinned(MAX_FLOWS, 0);

/// Per-flow gates, indexed by flow id: whether inputs (captured here or
/// mirrored from the peer) reach the local instance or are held in the log.
/// Memory-mappable so that user space can flip a gate with one store.
#[map]
pub(crate) static GATES: Array<Gate> = Array::pinned(MAX_FLOWS, BPF_F_MMAPABLE);

/// Host-wide settings, element 0.
#[map]
pub(crate) static CONFIG: Array<Config> = Array::pinned(1, 0);

/// Per-CPU counters, indexed by `counter::*`.
#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::COUNT, 0);

/// The input log: captured and mirrored inputs. User space sets the size at load.
#[map]
pub(crate) static INPUTS: RingBuf = RingBuf::pinned(1 << 24, 0);

/// The output log: the local instance's outputs.
#[map]
pub(crate) static OUTPUTS: RingBuf = RingBuf::pinned(1 << 22, 0);

/// `MIRROR_DEVMAP` mode: the mirror interface (`PORT_MIRROR`, with the
/// `mirror_port` program) and the local-delivery interface (`PORT_DELIVER`,
/// with `deliver_port`) that an input is broadcast to.
#[map]
pub(crate) static MIRROR_PORTS: DevMap = DevMap::pinned(2, 0);

/// The capture metadata of the input being cloned on this CPU, set by `mirror`
/// around its bpf_clone_redirect and read by `egress`, which the kernel runs
/// for the clone synchronously inside that call on the same CPU.
#[map]
pub(crate) static MIRROR_PENDING: PerCpuArray<CaptureMeta> = PerCpuArray::with_max_entries(1, 0);

/// Replay frames user space queued for one replay batch (`take_queued_replay`).
#[map]
pub(crate) static REPLAY_FRAMES: Array<ReplaySlot> = Array::pinned(REPLAY_BATCH, 0);

/// Element 0: the slot of REPLAY_FRAMES the next run of a replay batch
/// takes; user space sets it to 0 before each batch.
#[map]
pub(crate) static REPLAY_NEXT: Array<u32> = Array::pinned(1, 0);

/// Element 0: the key of replay triggers, random, set at load.
#[map]
pub(crate) static REPLAY_KEY: Array<u64> = Array::pinned(1, 0);

/// Per flow id: where its mirror copies go (set per migration).
#[map]
pub(crate) static MIRROR_TO: Array<MirrorTarget> = Array::pinned(MAX_FLOWS, 0);

/// Where flow `flow_id`'s mirror copies go; none if nowhere.
#[inline(always)]
pub(crate) fn mirror_target(flow_id: u32) -> Option<MirrorTarget> {
    MIRROR_TO.get(flow_id)?.get()
}

#[inline(always)]
pub(crate) fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot; nothing else on this CPU runs while we hold it.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub(crate) fn config() -> Config {
    CONFIG.get(0).copied().unwrap_or_default()
}

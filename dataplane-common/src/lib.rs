//! Types and constants shared by the dataplane's kernel programs and user space.
//!
//! Every type here is `#[repr(C)]` without implicit padding, and its size is
//! asserted at compile time, so the kernel and user space agree byte for byte.
#![no_std]

use core::mem::size_of;

pub mod decide;

/// Number of flows the maps hold; a flow id indexes the per-flow arrays.
pub const MAX_FLOWS: u32 = 1024;

/// Largest frame the capture path copies: a 9000-byte jumbo payload plus headers.
pub const MAX_FRAME: u32 = 9216;

/// EtherType of mirror frames (IEEE 802 "local experimental EtherType 1").
pub const ETH_P_MIRROR: u16 = 0x88B5;

/// Version of the on-wire mirror header this build speaks (see docs/mirror-header.md).
pub const MIRROR_VERSION: u8 = 1;

/// A CPS flow, identified by its 5-tuple in the CPS-to-service direction.
///
/// IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`); ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FlowKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FlowKey>() == 40);

/// Flow flag: mirror this flow's inputs to the peer host.
pub const FLOW_MIRROR: u32 = 1;
/// `FlowConfig::flags`: clone every input to the standby interface too, for
/// a standby instance on this host (gundall2022 Option 2).
pub const FLOW_STANDBY: u32 = 2;

/// What user space says about a flow; the value of the flow map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FlowConfig {
    /// Index into the per-flow arrays, below [`MAX_FLOWS`]. The flows of
    /// one service share it: one numbering, one gate, one mirror target.
    pub flow_id: u32,
    /// `FLOW_*` bits.
    pub flags: u32,
}
const _: () = assert!(size_of::<FlowConfig>() == 8);

/// Per-flow sequencing state, owned by the kernel programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FlowSequence {
    /// The sequence number last given to a captured input; 0 before the first, which gets 1.
    pub last_seq: u64,
    /// Sequence number of the latest input delivered to the local instance.
    pub last_delivered: u64,
}
const _: () = assert!(size_of::<FlowSequence>() == 16);

/// Gate mode: deliver every input to the local instance.
pub const GATE_DELIVER_ALL: u32 = 0;
/// Gate mode: hold every input (logged, not delivered).
pub const GATE_HOLD_ALL: u32 = 1;
/// Gate mode: deliver input q only when q is `next_expected` (and advance it
/// atomically), hold q above it in the log, drop q below it as a duplicate.
pub const GATE_SEQUENCED: u32 = 2;
/// Gate mode: deliver every input from `next_expected` on, drop those below
/// as lost. Entered with `next_expected` 0, which the first input to reach
/// the gate exchanges for its own number, unless user space sets it
/// first: what a held gate opens to, so that the inputs it opens over are
/// known exactly (a held input still on its way to the gate stays below).
pub const GATE_DELIVER_FROM: u32 = 3;

/// Output gate: every output of the local instance leaves.
pub const OUTPUT_PASS: u32 = 0;
/// Output gate: no output leaves (logged for comparison, then dropped): a
/// replica that is not serving yet.
pub const OUTPUT_MUTE: u32 = 1;
/// Output gate: only outputs answering inputs >= `answer_from` leave: the
/// destination after the cutover at K = answer_from - 1.
pub const OUTPUT_FROM: u32 = 2;
/// Output gate: muted until the peer forwards the first input past its
/// cutover (a mirror frame with sequence 0); from that input on, as
/// `OUTPUT_FROM`. The destination armed for a cutover whose K the source's
/// kernel program picks.
pub const OUTPUT_ARMED: u32 = 3;

/// Output tagging: an output answers the latest input delivered when it
/// leaves. Right for an instance that answers each input before the next
/// arrives; the serving original until a migration, whose history user
/// space does not know.
pub const TAG_LATEST: u32 = 0;
/// Output tagging for an instance with one output per input, fed in order
/// from its first delivered input on (a restored instance behind a
/// sequenced gate, a standby from its start): the n-th output answers the
/// n-th input. Inputs that queue in its socket while it works (a burst)
/// do not move the tag of an answer still to come. A migration's source
/// counts its serving instance's outputs too, from the input after the
/// latest delivered: an answer still owed then is tagged as a further one
/// to the latest, and the count is right from the next delivery on. Inputs
/// of several flows that arrive together (a controller of several field
/// devices) would share one latest tag.
pub const TAG_COUNTED: u32 = 1;

/// `deliver_until` value that makes the next input numbered on this host
/// the first one past the cutover: the kernel program replaces it with
/// K = that input's number - 1. The flip user space stores on the source.
pub const CUT_AT_NEXT: u64 = u64::MAX;

/// Per-flow gate: whether an input, captured on this host or mirrored from
/// the peer, reaches the local instance, and whether its outputs leave.
///
/// Memory-mapped by user space: the cutover is one store into
/// `deliver_until` on the source.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Gate {
    /// `GATE_*` mode.
    pub mode: u32,
    /// `OUTPUT_*` mode.
    pub output: u32,
    /// `GATE_SEQUENCED`: the one input the instance takes next, with
    /// `REPLAY_PENDING` while a replayed input is on its way to it.
    pub next_expected: u64,
    /// 0, or K: inputs above K no longer reach the local instance; they are
    /// only logged and mirrored to the peer (the source after the cutover).
    /// `CUT_AT_NEXT` until the kernel program has picked K.
    pub deliver_until: u64,
    /// `OUTPUT_FROM`: the first input whose outputs leave (`OUTPUT_ARMED`:
    /// the lowest input forwarded past the peer's cutover so far).
    pub answer_from: u64,
    /// `TAG_*`: how the instance's outputs are tagged.
    pub tagging: u32,
    pub reserved: u32,
    /// `TAG_COUNTED`: the input the next output answers; 0 until the first
    /// delivery, which sets it to that input's number.
    pub next_answer: u64,
}
const _: () = assert!(size_of::<Gate>() == 48);
/// Byte offset of `mode` in a `Gate`, for memory-mapped mode changes.
pub const GATE_MODE_OFFSET: usize = 0;
/// Byte offset of `output` in a `Gate`, for the memory-mapped arming.
pub const GATE_OUTPUT_OFFSET: usize = 4;
/// Byte offset of `next_expected` in a `Gate`.
pub const GATE_NEXT_EXPECTED_OFFSET: usize = 8;
/// Byte offset of `deliver_until` in a `Gate`, for the memory-mapped flip.
pub const GATE_DELIVER_UNTIL_OFFSET: usize = 16;
/// Byte offset of `answer_from` in a `Gate`.
pub const GATE_ANSWER_FROM_OFFSET: usize = 24;
/// Byte offset of `tagging` in a `Gate`.
pub const GATE_TAGGING_OFFSET: usize = 32;
/// Byte offset of `next_answer` in a `Gate`.
pub const GATE_NEXT_ANSWER_OFFSET: usize = 40;
const _: () = assert!(core::mem::offset_of!(Gate, mode) == GATE_MODE_OFFSET);
const _: () = assert!(core::mem::offset_of!(Gate, output) == GATE_OUTPUT_OFFSET);
const _: () = assert!(core::mem::offset_of!(Gate, next_expected) == GATE_NEXT_EXPECTED_OFFSET);
const _: () = assert!(core::mem::offset_of!(Gate, deliver_until) == GATE_DELIVER_UNTIL_OFFSET);
const _: () = assert!(core::mem::offset_of!(Gate, answer_from) == GATE_ANSWER_FROM_OFFSET);
const _: () = assert!(core::mem::offset_of!(Gate, tagging) == GATE_TAGGING_OFFSET);
const _: () = assert!(core::mem::offset_of!(Gate, next_answer) == GATE_NEXT_ANSWER_OFFSET);

/// Host-wide settings, element 0 of the config array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Config {
    /// Most bytes of a frame copied into the log; 0 or anything above [`MAX_FRAME`] means whole frames.
    pub snap_len: u32,
    /// Interface the mirror copies leave by; 0 disables mirroring. Where
    /// each flow's copies go on it is the flow's [`MirrorTarget`].
    pub mirror_ifindex: u32,
    /// Source MAC of mirror frames (this host's mirror interface).
    pub mirror_src_mac: [u8; 6],
    pub _pad_mac: [u8; 2],
    /// How mirror copies are made: `MIRROR_CLONE` or `MIRROR_DEVMAP`.
    pub mirror_mode: u32,
    /// `MIRROR_DEVMAP` only: destination MAC of the local copy (the service side
    /// of the veth pair the local copy is redirected into).
    pub deliver_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// Ifindex of the standby interface (0: none).
    pub standby_ifindex: u32,
    /// Destination and source MAC of mirror frames to the standby.
    pub standby_dst_mac: [u8; 6],
    pub standby_src_mac: [u8; 6],
    /// Ifindex of the one interface mirror frames are taken on (the peer
    /// interface, or the link a standby's copies arrive on); 0: none.
    /// Mirror frames arriving anywhere else count as `MIRROR_FOREIGN`.
    pub mirror_from_ifindex: u32,
    /// Ifindex and MAC of the service-facing interface, where inputs are
    /// captured: a unicast frame arriving there for another MAC (a switch
    /// floods frames for a host it no longer sees, a port in promiscuous
    /// mode) is not this host's input and is never numbered.
    pub capture_ifindex: u32,
    pub capture_mac: [u8; 6],
    pub _pad_capture: [u8; 2],
}
const _: () = assert!(size_of::<Config>() == 60);

/// Where a flow's mirror copies go on the mirror interface: the host it
/// migrates to, which tells the source at `prepare` (one migration
/// network, any number of hosts). A MAC of all zero: nowhere; a copy is
/// dropped and counted as a mirror error.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct MirrorTarget {
    /// That host's MAC on the migration network.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// The flow's id on that host, which the copies carry: each host
    /// numbers its flow table on its own.
    pub flow_id: u32,
}
const _: () = assert!(size_of::<MirrorTarget>() == 12);

impl MirrorTarget {
    /// The target, unless none is set.
    pub fn get(self) -> Option<Self> {
        (self.mac != [0; 6]).then_some(self)
    }
}

/// Mirror mode: XDP passes the input, TC clones it to the mirror interface.
pub const MIRROR_CLONE: u32 = 0;
/// Mirror mode: XDP broadcasts the input through the `MIRROR_PORTS` devmap,
/// to the mirror interface and to a local-delivery interface.
pub const MIRROR_DEVMAP: u32 = 1;
/// `MIRROR_PORTS` slot of the mirror interface.
pub const PORT_MIRROR: u32 = 0;
/// `MIRROR_PORTS` slot of the local-delivery interface.
pub const PORT_DELIVER: u32 = 1;

/// Record kind: an input captured at this host's ingress.
pub const RECORD_INPUT: u32 = 1;
/// Record kind: an input received from the peer's mirror.
pub const RECORD_MIRRORED: u32 = 2;
/// Record kind: an output of the local instance; `seq` is the input it follows.
pub const RECORD_OUTPUT: u32 = 3;
/// Record kind: an input of a hot replica's flow that a switch flooded to
/// this host for another host's MAC (its source's, whose port went down):
/// not numbered; `seq` holds the flow's `last_seq` when it came. A
/// takeover replays those that came after the last mirrored input.
pub const RECORD_FLOODED: u32 = 4;

/// Header of every ring-buffer record; `captured_len` frame bytes follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RecordHeader {
    /// Input sequence number (for outputs: the latest input delivered before it).
    pub seq: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at capture on the host that numbered the input.
    pub timestamp_ns: u64,
    /// `RECORD_*` kind.
    pub kind: u32,
    pub flow_id: u32,
    /// Interface the frame was seen on.
    pub ifindex: u32,
    /// Length of the whole frame.
    pub frame_len: u32,
    /// Number of frame bytes in the record (the frame, or its first `snap_len` bytes).
    pub captured_len: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<RecordHeader>() == 40);

/// The on-wire mirror header, in network byte order, between the outer
/// Ethernet header (EtherType [`ETH_P_MIRROR`]) and the mirrored frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MirrorHeader {
    /// [`MIRROR_VERSION`].
    pub version: u8,
    /// Length of this header in bytes; a receiver skips what it does not know.
    pub header_len: u8,
    /// `MIRROR_FLAG_*` bits.
    pub flags: u16,
    pub flow_id: u32,
    pub seq: u64,
    pub timestamp_ns: u64,
    /// Length of the mirrored frame that follows.
    pub frame_len: u32,
    pub _reserved: u32,
}
const _: () = assert!(size_of::<MirrorHeader>() == 32);

/// The highest sequence number a mirror frame may carry. No flow numbers
/// 2^63 inputs (at a million a second that takes 292,000 years); a higher
/// number is a corrupt or forged frame, which would wrap the receiver's
/// numbering if it were taken.
pub const MAX_SEQ: u64 = (1 << 63) - 1;

/// Set in a sequenced gate's `next_expected` (above every `MAX_SEQ`) by a
/// replayed input it delivers, until the daemon has seen that input reach
/// the socket (its injection returned) and clears it: meanwhile a live
/// input is held, so it can never reach the instance before the replayed
/// input ahead of it (`decide::sequenced_exchange`).
pub const REPLAY_PENDING: u64 = 1 << 63;

/// Mirror flag: a replay of a logged input, injected on the receiving host;
/// gated like a live copy but not logged again. Honoured only on a frame the
/// host's own daemon queued (`REPLAY_FRAMES`); a frame from the wire that
/// carries it is refused.
pub const MIRROR_FLAG_REPLAY: u16 = 1;

/// Inputs one replay batch injects at most: one BPF_PROG_RUN (and one
/// kernel page pool) per this many replayed inputs.
pub const REPLAY_BATCH: u32 = 16;

/// The largest replay frame (mirror headers and the input) a replay batch
/// takes, plus one: a full-size Ethernet frame with its mirror
/// headers fits, within the page a live test run gives each frame.
pub const REPLAY_FRAME_MAX: u32 = 2048;

/// A replay frame queued for a replay batch.
#[repr(C)]
#[derive(Clone, Copy)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ReplaySlot {
    /// Bytes of `frame` in use: below [`REPLAY_FRAME_MAX`].
    pub len: u32,
    pub frame: [u8; REPLAY_FRAME_MAX as usize],
}

/// Mirror flag: a replay batch's trigger; its sequence field holds the
/// host's replay key, and the receive path takes a queued replay frame in
/// its place (see `REPLAY_FRAMES`).
pub const MIRROR_FLAG_QUEUED: u16 = 2;

/// Bytes a mirror frame adds in front of the mirrored frame.
pub const MIRROR_OVERHEAD: u32 = 14 + size_of::<MirrorHeader>() as u32;

/// The outer Ethernet and mirror headers, on-wire, for an input of `frame_len` bytes.
pub fn mirror_headers(
    (dst, src): ([u8; 6], [u8; 6]),
    meta: &CaptureMeta,
    frame_len: u32,
) -> [u8; MIRROR_OVERHEAD as usize] {
    let mut outer = [0u8; MIRROR_OVERHEAD as usize];
    outer[0..6].copy_from_slice(&dst);
    outer[6..12].copy_from_slice(&src);
    outer[12..14].copy_from_slice(&ETH_P_MIRROR.to_be_bytes());
    outer[14] = MIRROR_VERSION;
    outer[15] = (MIRROR_OVERHEAD - 14) as u8;
    outer[18..22].copy_from_slice(&meta.flow_id.to_be_bytes());
    outer[22..30].copy_from_slice(&meta.seq.to_be_bytes());
    outer[30..38].copy_from_slice(&meta.timestamp_ns.to_be_bytes());
    outer[38..42].copy_from_slice(&frame_len.to_be_bytes());
    outer
}

impl MirrorHeader {
    /// The header from its on-wire bytes, fields in host order.
    pub fn from_wire(b: &[u8; size_of::<MirrorHeader>()]) -> Self {
        Self {
            version: b[0],
            header_len: b[1],
            flags: u16::from_be_bytes([b[2], b[3]]),
            flow_id: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            seq: u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
            timestamp_ns: u64::from_be_bytes([
                b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23],
            ]),
            frame_len: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
            _reserved: u32::from_be_bytes([b[28], b[29], b[30], b[31]]),
        }
    }

    /// The header's on-wire bytes (fields in host order here).
    pub fn to_wire(&self) -> [u8; size_of::<MirrorHeader>()] {
        let mut b = [0u8; size_of::<MirrorHeader>()];
        b[0] = self.version;
        b[1] = self.header_len;
        b[2..4].copy_from_slice(&self.flags.to_be_bytes());
        b[4..8].copy_from_slice(&self.flow_id.to_be_bytes());
        b[8..16].copy_from_slice(&self.seq.to_be_bytes());
        b[16..24].copy_from_slice(&self.timestamp_ns.to_be_bytes());
        b[24..28].copy_from_slice(&self.frame_len.to_be_bytes());
        b[28..32].copy_from_slice(&self._reserved.to_be_bytes());
        b
    }
}

/// Why a receiver refuses a mirror frame (docs/mirror-header.md, "Rules for
/// a receiver"); the kernel passes such a frame untouched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MirrorRefusal {
    /// Shorter than the outer Ethernet and mirror headers.
    Short,
    /// The outer EtherType is not [`ETH_P_MIRROR`].
    EtherType,
    /// A `version` other than [`MIRROR_VERSION`].
    Version,
    /// A `header_len` other than this version's 32.
    HeaderLen,
    /// A `frame_len` below an Ethernet header or beyond the frame.
    FrameLen,
    /// A `seq` above [`MAX_SEQ`].
    Seq,
    /// A replay (`MIRROR_FLAG_REPLAY`) without a sequence number.
    UnnumberedReplay,
}

/// Checks a received mirror frame (outer Ethernet header, mirror header,
/// inner frame, maybe link padding) against the receiver's rules: its
/// mirror header (host order) and the inner frame without the padding.
pub fn parse_mirror_frame(frame: &[u8]) -> Result<(MirrorHeader, &[u8]), MirrorRefusal> {
    const HEADER: usize = size_of::<MirrorHeader>();
    let (Some(outer), Some(wire)) = (frame.get(..14), frame.get(14..14 + HEADER)) else {
        return Err(MirrorRefusal::Short);
    };
    if u16::from_be_bytes([outer[12], outer[13]]) != ETH_P_MIRROR {
        return Err(MirrorRefusal::EtherType);
    }
    let mut bytes = [0u8; HEADER];
    bytes.copy_from_slice(wire);
    let header = MirrorHeader::from_wire(&bytes);
    if header.version != MIRROR_VERSION {
        return Err(MirrorRefusal::Version);
    }
    if header.header_len as usize != HEADER {
        return Err(MirrorRefusal::HeaderLen);
    }
    let inner = &frame[MIRROR_OVERHEAD as usize..];
    if header.frame_len < 14 || header.frame_len as usize > inner.len() {
        return Err(MirrorRefusal::FrameLen);
    }
    if header.seq > MAX_SEQ {
        return Err(MirrorRefusal::Seq);
    }
    if header.seq == 0 && header.flags & MIRROR_FLAG_REPLAY != 0 {
        return Err(MirrorRefusal::UnnumberedReplay);
    }
    Ok((header, &inner[..header.frame_len as usize]))
}

/// What the XDP capture hands to the TC mirror program in the packet metadata.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CaptureMeta {
    /// [`CAPTURE_META_MAGIC`]: tells our metadata from another program's.
    pub magic: u32,
    pub flow_id: u32,
    pub seq: u64,
    pub timestamp_ns: u64,
}
const _: () = assert!(size_of::<CaptureMeta>() == 24);

/// Marks [`CaptureMeta`] written by the capture program.
pub const CAPTURE_META_MAGIC: u32 = 0xD47A_0000;
/// The bits of `CaptureMeta::magic` that are the magic; the others say
/// where the input goes (`META_*`).
pub const CAPTURE_META_MASK: u32 = 0xFFFF_0000;
/// The original goes on to the local instance (else it is dropped after
/// the clones: held, or past a cutover).
pub const META_DELIVER: u32 = 1;
/// A clone goes to the peer host.
pub const META_PEER: u32 = 2;
/// A clone goes to the standby interface.
pub const META_STANDBY: u32 = 4;

/// Per-CPU counter indices.
pub mod counter {
    /// Frames the ingress program saw.
    pub const SEEN: u32 = 0;
    /// Inputs of a known flow written to the log with a sequence number.
    pub const CAPTURED: u32 = 1;
    /// Inputs of a known flow that found the ring buffer full (passed, not logged).
    pub const RING_FULL: u32 = 2;
    /// Inputs cloned to the peer host.
    pub const MIRRORED: u32 = 3;
    /// Frames that could not be parsed (truncated headers, IPv4 options, fragments), passed untouched.
    pub const MALFORMED: u32 = 4;
    /// Frames that are not UDP over IP, passed untouched.
    pub const NOT_UDP: u32 = 5;
    /// UDP frames of no known flow, passed untouched.
    pub const UNMATCHED: u32 = 6;
    /// Mirror frames received from the peer.
    pub const MIRROR_RECEIVED: u32 = 7;
    /// Mirrored inputs the gate delivered to the local instance.
    pub const DELIVERED: u32 = 8;
    /// Mirrored inputs the gate held (logged, not delivered).
    pub const HELD: u32 = 9;
    /// Outputs of the local instance written to the output log.
    pub const OUTPUT_CAPTURED: u32 = 10;
    /// Outputs that found the output ring buffer full.
    pub const OUTPUT_RING_FULL: u32 = 11;
    /// Mirror clones or mirror frames that failed (redirect error, bad header, no room).
    pub const MIRROR_ERRORS: u32 = 12;
    /// Inputs a sequenced gate dropped because the instance had them already.
    pub const DUPLICATES: u32 = 13;
    /// Inputs above a cutover's K, only mirrored to the peer.
    pub const FORWARDED: u32 = 14;
    /// Outputs the output gate kept from leaving.
    pub const OUTPUT_MUTED: u32 = 15;
    /// Mirror frames that arrived on an interface mirror frames are not
    /// taken on (not `Config::mirror_from_ifindex`), passed untouched.
    pub const MIRROR_FOREIGN: u32 = 16;
    /// UDP frames that arrived on the capture interface addressed to
    /// another host's MAC, passed untouched and unnumbered.
    pub const OTHER_HOST: u32 = 17;
    /// Number of counters.
    pub const COUNT: u32 = 18;
    /// Counter names, by index, as user space reports them.
    pub const NAMES: [&str; COUNT as usize] = [
        "seen",
        "captured",
        "ring_full",
        "mirrored",
        "malformed",
        "not_udp",
        "unmatched",
        "mirror_received",
        "delivered",
        "held",
        "output_captured",
        "output_ring_full",
        "mirror_errors",
        "duplicates",
        "forwarded",
        "output_muted",
        "mirror_foreign",
        "other_host",
    ];
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // Each derives bytemuck's Pod, whose derive checks at compile time that
    // it is #[repr(C)] plain data without padding: any bytes are a value.
    // SAFETY: see above.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for FlowConfig {}
    // SAFETY: see above.
    unsafe impl aya::Pod for FlowSequence {}
    // SAFETY: see above.
    unsafe impl aya::Pod for Gate {}
    // SAFETY: see above.
    unsafe impl aya::Pod for Config {}
    // SAFETY: see above.
    unsafe impl aya::Pod for MirrorTarget {}
    // SAFETY: see above.
    unsafe impl aya::Pod for RecordHeader {}
    // SAFETY: see above.
    unsafe impl aya::Pod for ReplaySlot {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_frames_parse_back() {
        let macs = ([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1]);
        let meta = CaptureMeta {
            flow_id: 7,
            seq: 42,
            timestamp_ns: 1_000_000_007,
            ..Default::default()
        };
        let mut frame = [0u8; MIRROR_OVERHEAD as usize + 60 + 4];
        frame[..MIRROR_OVERHEAD as usize].copy_from_slice(&mirror_headers(macs, &meta, 60));
        frame[MIRROR_OVERHEAD as usize] = 0xaa;
        let (header, inner) = parse_mirror_frame(&frame).unwrap();
        assert_eq!((header.flow_id, header.seq, header.frame_len), (7, 42, 60));
        assert_eq!(header.timestamp_ns, 1_000_000_007);
        assert_eq!((inner.len(), inner[0]), (60, 0xaa));
        assert_eq!(header.to_wire(), frame[14..MIRROR_OVERHEAD as usize]);

        let short = &frame[..MIRROR_OVERHEAD as usize + 13];
        assert_eq!(parse_mirror_frame(short), Err(MirrorRefusal::FrameLen));
        assert_eq!(parse_mirror_frame(&frame[..45]), Err(MirrorRefusal::Short));
        let mut replay = frame;
        replay[16..18].copy_from_slice(&MIRROR_FLAG_REPLAY.to_be_bytes());
        replay[22..30].fill(0);
        assert_eq!(
            parse_mirror_frame(&replay),
            Err(MirrorRefusal::UnnumberedReplay)
        );
        let mut version = frame;
        version[14] = 2;
        assert_eq!(parse_mirror_frame(&version), Err(MirrorRefusal::Version));
        let mut huge = frame;
        huge[22..30].copy_from_slice(&(MAX_SEQ + 1).to_be_bytes());
        assert_eq!(parse_mirror_frame(&huge), Err(MirrorRefusal::Seq));
    }
}

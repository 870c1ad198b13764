//! Writing frames into a ring buffer as `RecordHeader` + frame bytes.
//!
//! The verifier wants a constant reservation size, so a record is reserved
//! in the smallest of a few size classes that holds the copied bytes: a
//! 64-byte control packet costs a 168-byte slot, not a jumbo frame's.
use aya_ebpf::{
    bindings::{__sk_buff, xdp_md},
    helpers::generated::{bpf_skb_load_bytes, bpf_xdp_load_bytes},
    maps::RingBuf,
};
use dataplane_common::{MAX_FRAME, RecordHeader};

/// A packet whose bytes can be copied out by offset.
pub trait FrameSource {
    /// Copies `len` bytes from `offset` to `dst`; 0 on success.
    fn load(&self, offset: u32, dst: *mut u8, len: u32) -> i64;
}

/// An XDP frame.
pub struct Xdp(pub *mut xdp_md);

impl FrameSource for Xdp {
    #[inline(always)]
    fn load(&self, offset: u32, dst: *mut u8, len: u32) -> i64 {
        // SAFETY: the helper bounds-checks against the packet; dst holds len bytes.
        unsafe { bpf_xdp_load_bytes(self.0, offset, dst.cast(), len) }
    }
}

/// A TC socket buffer.
pub struct Skb(pub *mut __sk_buff);

impl FrameSource for Skb {
    #[inline(always)]
    fn load(&self, offset: u32, dst: *mut u8, len: u32) -> i64 {
        // SAFETY: the helper bounds-checks against the packet; dst holds len bytes.
        unsafe { bpf_skb_load_bytes(self.0.cast(), offset, dst.cast(), len) }
    }
}

/// The largest size class: the power of two above [`MAX_FRAME`].
const CLASS_MAX: usize = (MAX_FRAME as usize).next_power_of_two();

#[repr(C)]
struct Record<const N: usize> {
    header: RecordHeader,
    frame: [u8; N],
}

/// Logs `header.captured_len` bytes (1 to `MAX_FRAME`) of the frame from `offset` into `ring`.
///
/// `seq` is called only once the slot is reserved, so a sequence number is
/// never handed out for an input that is not in the log. Returns the record's
/// sequence number, or `None` when the ring is full or the copy failed.
#[inline(always)]
pub fn write<S: FrameSource>(
    ring: &RingBuf,
    src: &S,
    offset: u32,
    header: RecordHeader,
    seq: impl FnOnce() -> u64,
) -> Option<u64> {
    let len = header.captured_len;
    if len < 128 {
        write_class::<S, 128>(ring, src, offset, header, seq)
    } else if len < 512 {
        write_class::<S, 512>(ring, src, offset, header, seq)
    } else if len < 2048 {
        write_class::<S, 2048>(ring, src, offset, header, seq)
    } else if len <= MAX_FRAME {
        write_class::<S, { CLASS_MAX }>(ring, src, offset, header, seq)
    } else {
        None
    }
}

#[inline(always)]
fn write_class<S: FrameSource, const N: usize>(
    ring: &RingBuf,
    src: &S,
    offset: u32,
    mut header: RecordHeader,
    seq: impl FnOnce() -> u64,
) -> Option<u64> {
    // The verifier needs 0 < len < N for the copy below. black_box keeps the
    // compiler from dropping the mask as implied by the caller's class check,
    // which it would express in a form the verifier cannot follow.
    let len = core::hint::black_box(header.captured_len) & (N as u32 - 1);
    if len == 0 {
        return None;
    }
    let mut entry = ring.reserve::<Record<N>>(0)?;
    let record = entry.as_mut_ptr();
    // SAFETY: record points at a reserved slot of size_of::<Record<N>>() bytes.
    let copied = unsafe { src.load(offset, (*record).frame.as_mut_ptr(), len) };
    if copied != 0 {
        entry.discard(0);
        return None;
    }
    header.seq = seq();
    // SAFETY: as above.
    unsafe { (*record).header = header };
    entry.submit(0);
    Some(header.seq)
}

//! Mirror frames: handing an input's number to the mirror programs,
//! wrapping clones in the mirror header, and unwrapping received ones.

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::generated::{
        bpf_skb_change_head, bpf_skb_load_bytes, bpf_skb_store_bytes, bpf_skb_vlan_pop,
        bpf_xdp_adjust_head, bpf_xdp_adjust_meta, bpf_xdp_adjust_tail,
    },
    programs::{TcContext, XdpContext},
};
use dataplane_common::{CAPTURE_META_MAGIC, CaptureMeta, MIRROR_OVERHEAD, mirror_headers};

use crate::parse::ptr_at;

/// Puts the input's number into the packet metadata, where the `mirror` TC
/// program or the `mirror_port` devmap program finds it; `targets`
/// (`META_*`) says where copies go and whether the original is delivered.
#[inline(always)]
pub(crate) fn hand_to_mirror(
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

/// Wraps a mirror clone in the outer Ethernet and mirror headers, to and
/// from `addresses` (destination, source MAC). A VLAN tag
/// the stack moved out of the frame goes back in, so the peer logs the same
/// bytes this host did.
#[inline(always)]
pub(crate) fn encapsulate(
    ctx: &TcContext,
    pending: &CaptureMeta,
    addresses: ([u8; 6], [u8; 6]),
) -> Option<()> {
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
        // SAFETY: the helper works on the socket buffer the kernel handed us;
        // the tag it removes was saved above (vlan_tci, vlan_proto).
        if unsafe { bpf_skb_vlan_pop(skb) } != 0 {
            return None;
        }
    }
    // SAFETY: the helper checks the room it makes; no packet pointer is
    // held across it (the stores below go through helpers too).
    if unsafe { bpf_skb_change_head(skb, MIRROR_OVERHEAD + tag_len, 0) } != 0 {
        return None;
    }
    let outer = mirror_headers(addresses, pending, len + tag_len);
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
pub(crate) fn store<const N: usize>(
    skb: *mut __sk_buff,
    offset: u32,
    bytes: &[u8; N],
) -> Option<()> {
    // SAFETY: the helper bounds-checks against the packet.
    let ret = unsafe { bpf_skb_store_bytes(skb, offset, bytes.as_ptr().cast(), N as u32, 0) };
    (ret == 0).then_some(())
}

/// Strips the outer Ethernet and mirror headers (and any padding after the
/// mirrored frame) and addresses the inner frame to this host's interface.
#[inline(always)]
pub(crate) fn deliver(ctx: &XdpContext, padding: u32) -> Option<()> {
    let outer_dst = ptr_at::<[u8; 6]>(ctx.data(), ctx.data_end(), 0)?;
    // SAFETY: ptr_at checked the bounds.
    let outer_dst = unsafe { outer_dst.read_unaligned() };
    // SAFETY: the helper checks the new length; `outer_dst` is a copy, and
    // packet pointers are taken again below.
    if padding != 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -(padding as i32)) } != 0 {
        return None;
    }
    // SAFETY: as above; the helper checks that the frame holds the headers.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, MIRROR_OVERHEAD as i32) } != 0 {
        return None;
    }
    let inner_dst = ptr_at::<[u8; 6]>(ctx.data(), ctx.data_end(), 0)?;
    // SAFETY: ptr_at checked the bounds.
    unsafe { inner_dst.cast_mut().write_unaligned(outer_dst) };
    Some(())
}

//! The dataplane's kernel programs.
//!
//! - `ingress` (XDP): numbers, timestamps and logs the inputs of known CPS
//!   flows, hands the number to `mirror` in the packet metadata; receives
//!   mirror frames from the peer host (on the one interface they are taken
//!   on) and replays queued by this host's daemon, logs them and gates them.
//! - `mirror` (TC ingress): clones a numbered input to the mirror interface.
//! - `egress` (TC egress): wraps those clones in the mirror header on the
//!   mirror interface, and logs the local instance's outputs.
//! - `mirror_port`, `deliver_port` (XDP devmap programs): in `MIRROR_DEVMAP`
//!   mode `ingress` broadcasts an input through `MIRROR_PORTS` instead, and
//!   these prepare the mirror copy and the local copy.
//!
//! Every frame the programs do not handle passes untouched. This file holds
//! the entry points only; each concern has its module.
#![no_std]
#![no_main]
// The BPF target's core has no atomic read-modify-write methods; the
// intrinsic compiles to BPF's atomic fetch-and-add (with SeqCst: for Relaxed,
// LLVM 22 emits the add without fetch yet reads the register as its result).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod capture;
mod gate;
mod maps;
mod mirror;
mod output;
mod parse;
mod record;
mod replay;
mod word;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    helpers::generated::{bpf_clone_redirect, bpf_xdp_adjust_head},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use capture::{capture, mirror_frame};
use dataplane_common::{
    CAPTURE_META_MAGIC, CAPTURE_META_MASK, CaptureMeta, META_DELIVER, META_PEER, META_STANDBY,
    MIRROR_CLONE, MIRROR_OVERHEAD, counter, mirror_headers,
};
use maps::{MIRROR_PENDING, config, count, mirror_target};
use mirror::encapsulate;
use output::capture_output;
use parse::{Frame, Skip, parse, ptr_at};

#[xdp]
pub fn ingress(ctx: XdpContext) -> u32 {
    count(counter::SEEN);
    match parse(ctx.data(), ctx.data_end()) {
        Ok(Frame::Udp(key, _)) => return capture(&ctx, &key),
        Ok(Frame::Mirror) => return mirror_frame(&ctx),
        Err(Skip::Malformed) => count(counter::MALFORMED),
        Err(Skip::NotUdp) => count(counter::NOT_UDP),
    }
    xdp_action::XDP_PASS
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
    let Some(target) = mirror_target(meta.flow_id) else {
        count(counter::MIRROR_ERRORS);
        return xdp_action::XDP_DROP;
    };
    if meta.magic & CAPTURE_META_MASK != CAPTURE_META_MAGIC
        // SAFETY: the helper checks the headroom; `meta` is a copy, and
        // packet pointers are taken again below.
        || unsafe { bpf_xdp_adjust_head(ctx.ctx, -(MIRROR_OVERHEAD as i32)) } != 0
    {
        count(counter::MIRROR_ERRORS);
        return xdp_action::XDP_DROP;
    }
    let Some(outer) = ptr_at::<[u8; MIRROR_OVERHEAD as usize]>(ctx.data(), ctx.data_end(), 0)
    else {
        return xdp_action::XDP_DROP;
    };
    // The copy carries the flow's id on the host it goes to.
    let meta = CaptureMeta {
        flow_id: target.flow_id,
        ..meta
    };
    let headers = mirror_headers((target.mac, config().mirror_src_mac), &meta, frame_len);
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
        if meta.magic & target == 0 || ifindex == 0 {
            continue;
        }
        // A copy to the peer whose flow names no host is dropped by
        // `egress`, which looks the host up; the failed clone counts here.
        // SAFETY: the helper clones the socket buffer the kernel handed us
        // and checks `ifindex`; the original stays ours.
        let cloned = unsafe { bpf_clone_redirect(skb, ifindex, 0) };
        count(if cloned == 0 {
            counter::MIRRORED
        } else {
            counter::MIRROR_ERRORS
        });
    }
    // SAFETY: as above; clearing it keeps `egress` from taking a later
    // frame on this CPU for a clone.
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
            // addresses differ, and the flow's id on the peer. The standby's
            // dataplane has the flows under this host's ids.
            let copy = if ifindex == config.mirror_ifindex {
                mirror_target(pending.flow_id).map(|target| {
                    let meta = CaptureMeta {
                        flow_id: target.flow_id,
                        ..*pending
                    };
                    (meta, (target.mac, config.mirror_src_mac))
                })
            } else {
                Some((*pending, (config.standby_dst_mac, config.standby_src_mac)))
            };
            let Some((meta, macs)) = copy else {
                // No host named: `mirror` counts the failed clone.
                return TC_ACT_SHOT;
            };
            if encapsulate(&ctx, &meta, macs).is_none() {
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic path.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

//! Hand-made frames: VLAN-tagged inputs, malformed or foreign frames that
//! must pass the programs untouched, and the gates' and the cutover's
//! decisions (BPF_PROG_TEST_RUN, or mirror frames over the wire). The
//! kernel here has no 802.1Q devices, so tagged frames are sent and seen
//! through AF_PACKET sockets.
use std::time::{Duration, Instant};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use dataplane_common::{
    CAPTURE_META_MAGIC, CAPTURE_META_MASK, CUT_AT_NEXT, CaptureMeta, FLOW_MIRROR, GATE_DELIVER_ALL,
    GATE_HOLD_ALL, GATE_SEQUENCED, Gate, MAX_FLOWS, MAX_SEQ, META_DELIVER, META_PEER,
    MIRROR_FLAG_QUEUED, MIRROR_FLAG_REPLAY, MIRROR_OVERHEAD, OUTPUT_ARMED, OUTPUT_FROM,
    RECORD_INPUT, RECORD_MIRRORED, counter,
};
use dataplane_tests::{
    CPS_V4, CPS_V6, Loaded, NetNs, RawSocket, SERVICE_V4, SERVICE_V6, TestHosts, sock,
};
use dataplane_user::kernel::{
    flow,
    loader::{Counters, LoadOptions, MAP_INPUTS},
};
use etherparse::{PacketBuilder, VlanId};

const CPS_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

fn udp_frame(dst_mac: [u8; 6], vlan: Option<u16>, dport: u16, payload: &[u8]) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(CPS_MAC, dst_mac);
    let mut frame = Vec::new();
    match vlan {
        Some(id) => eth
            .single_vlan(VlanId::try_new(id).unwrap())
            .ipv4(CPS_V4.octets(), SERVICE_V4.octets(), 64)
            .udp(4000, dport)
            .write(&mut frame, payload),
        None => eth
            .ipv4(CPS_V4.octets(), SERVICE_V4.octets(), 64)
            .udp(4000, dport)
            .write(&mut frame, payload),
    }
    .unwrap();
    frame
}

/// Test hosts with the dataplane loaded on `src` and the flow
/// 192.0.2.1:4000 -> 192.0.2.10:5000 added.
fn src_with_flow(tag: &str) -> (TestHosts, Loaded) {
    let hosts = TestHosts::new(tag);
    let mut src = hosts.load_src();
    src.dataplane
        .add_flow(flow::udp(sock(CPS_V4, 4000), sock(SERVICE_V4, 5000)), 0)
        .unwrap();
    (hosts, src)
}

#[test]
fn captures_vlan_tagged_inputs_with_their_tag() {
    let (hosts, src) = src_with_flow("vlan");
    let src_mac = TestHosts::mac(&hosts.src, "eth0");
    let cps = RawSocket::open(&hosts.cps, "to-src");
    let frames: Vec<Vec<u8>> = (0..200u16)
        .map(|i| {
            udp_frame(
                src_mac,
                Some(100 + i % 2),
                5000,
                format!("tagged {i}").as_bytes(),
            )
        })
        .collect();
    for f in &frames {
        cps.send(f);
    }
    let records = src.read_inputs(frames.len());
    assert_eq!(records.len(), frames.len());
    for (i, (r, f)) in records.iter().zip(&frames).enumerate() {
        assert_eq!(r.header.seq, i as u64 + 1);
        assert_eq!(r.header.kind, RECORD_INPUT);
        assert_eq!(
            &r.frame[..],
            &f[..],
            "tagged frame {i} logged whole, tag included"
        );
    }
}

#[test]
fn malformed_and_foreign_frames_pass_untouched_and_are_counted() {
    let (hosts, src) = src_with_flow("bad");
    let src_mac = TestHosts::mac(&hosts.src, "eth0");
    let cps = RawSocket::open(&hosts.cps, "to-src");
    // No frame shorter than an Ethernet header reaches the program: the
    // kernel refuses to send one on a veth, or to run XDP on one.
    let runt = &udp_frame(src_mac, None, 5000, b"x")[..13];
    let refused = cps.try_send(runt).map_err(|e| e.raw_os_error());
    assert_eq!(
        refused,
        Err(Some(libc::EINVAL)),
        "a 13-byte frame is refused"
    );
    let run = ingress_program(&src).test_run(TestRunOptions {
        data_in: Some(runt),
        ..Default::default()
    });
    assert!(run.is_err(), "XDP does not run on a 13-byte frame");
    let mut cases = parser_cases(src_mac);
    // Only the service interface checks the MAC: inputs are captured there.
    cases.push(case(
        "an input of the flow for another host's MAC (a switch flooding it)",
        udp_frame([0x02, 0, 0, 0, 0, 0x99], None, 5000, b"a matched input"),
        Counted::OtherHost,
    ));
    check_ingress(&src, (&hosts.src, "eth0"), &cps, &cases);
}

#[test]
fn malformed_and_foreign_frames_on_the_peer_link_pass_untouched_and_are_counted() {
    let hosts = TestHosts::new("badp");
    let mut dst = hosts.load_dst();
    let (flow_id, replica) = sequenced_replica(&hosts, &mut dst);
    let link = MirrorLink::open(&hosts);
    let mut cases = parser_cases(TestHosts::mac(&hosts.dst, "peer0"));
    cases.extend(mirror_cases(&link, flow_id));
    check_ingress(&dst, (&hosts.dst, "peer0"), &link.socket, &cases);
    assert_eq!(received(&replica), [] as [String; 0], "nothing delivered");
    let sequence = dst.dataplane.sequence(flow_id).unwrap();
    assert_eq!(sequence.last_seq, 0, "no refused frame moved the numbering");
    assert_eq!(dst.dataplane.gate(flow_id).unwrap().next_expected, 1);

    // Documented, not refused: seq 0 (forwarded past a cutover) is numbered
    // on from the highest number seen, logged and gated.
    link.send(flow_id, 0);
    assert_eq!(received(&replica), ["input 0"]);
    let logged = dst.read_inputs(1);
    assert_eq!(logged.len(), 1);
    assert_eq!(
        (logged[0].header.seq, logged[0].header.kind),
        (1, RECORD_MIRRORED)
    );
}

#[test]
fn mirror_frames_from_the_field_network_leave_a_sources_numbering_alone() {
    let (hosts, src) = src_with_flow("fsrc");
    let src_mac = TestHosts::mac(&hosts.src, "eth0");
    let field = RawSocket::open(&hosts.cps, "to-src");
    for seq in 1..=2 {
        field.send(&udp_frame(
            src_mac,
            None,
            5000,
            format!("input {seq}").as_bytes(),
        ));
    }
    assert_eq!(src.read_inputs(2).len(), 2);
    let before = (
        src.dataplane.sequence(0).unwrap(),
        src.dataplane.gate(0).unwrap(),
    );
    assert_eq!(before.0.last_seq, 2);
    // Mirror frames for the flow, well-formed, sent to the service NIC.
    check_ingress(
        &src,
        (&hosts.src, "eth0"),
        &field,
        &forged_cases(src_mac, 0, 3),
    );
    let after = (
        src.dataplane.sequence(0).unwrap(),
        src.dataplane.gate(0).unwrap(),
    );
    assert_eq!(after, before, "numbering and gate unchanged");
    // The next input is numbered on as if nothing had come.
    field.send(&udp_frame(src_mac, None, 5000, b"input 3"));
    let logged = src.read_inputs(1);
    assert_eq!(logged.len(), 1);
    assert_eq!(
        (logged[0].header.seq, logged[0].header.kind),
        (3, RECORD_INPUT)
    );
    assert_eq!(src.dataplane.sequence(0).unwrap().last_seq, 3);
}

#[test]
fn mirror_frames_from_the_field_network_leave_an_armed_destination_alone() {
    let hosts = TestHosts::new("fdst");
    let mut dst = hosts.load_dst();
    let (flow_id, replica, cps) = counting_replica(&hosts, &mut dst);
    dst.dataplane.gate_window().unwrap().arm_outputs(flow_id);
    let link = MirrorLink::open(&hosts);
    link.send(flow_id, 1);
    assert_eq!(received(&replica), ["input 1"]);
    assert_eq!(dst.read_inputs(1).len(), 1);
    let state = || {
        (
            dst.dataplane.sequence(flow_id).unwrap(),
            dst.dataplane.gate(flow_id).unwrap(),
        )
    };
    let before = state();
    // Sent to the service NIC, where a seq 0 would open the output gate
    // and a seq 2^63 - 1 stop the peer's later inputs.
    let dst_mac = TestHosts::mac(&hosts.dst, "eth0");
    let field = RawSocket::open(&hosts.cps, "to-dst");
    check_ingress(
        &dst,
        (&hosts.dst, "eth0"),
        &field,
        &forged_cases(dst_mac, flow_id, 2),
    );
    assert_eq!(received(&replica), [] as [String; 0], "nothing delivered");
    assert_eq!(state(), before, "numbering and gates unchanged");
    // The peer's next inputs are taken as ever: 2 numbered, then one
    // forwarded past the source's cutover, numbered 3 here, which opens
    // the output gate.
    link.send(flow_id, 2);
    link.socket.send(&link.frame(flow_id, 0, &input_frame(3)));
    assert_eq!(received(&replica), ["input 2", "input 3"]);
    let logged: Vec<u64> = dst.read_inputs(2).iter().map(|r| r.header.seq).collect();
    assert_eq!(logged, [2, 3]);
    let gate = dst.dataplane.gate(flow_id).unwrap();
    assert_eq!((gate.output, gate.answer_from), (OUTPUT_FROM, 3));
    assert_eq!(received(&cps), [] as [String; 0]);
}

#[test]
fn malformed_outputs_pass_the_egress_program_untouched_and_are_not_captured() {
    let (hosts, src) = src_with_flow("bado");
    let (src_mac, cps_mac) = (TestHosts::mac(&hosts.src, "eth0"), CPS_MAC);
    // An output of the flow: service to CPS.
    let good = udp_packet(
        (src_mac, cps_mac),
        sock(SERVICE_V4, 5000),
        sock(CPS_V4, 4000),
        b"an output",
    );
    let ip = 14;
    let cases = [
        ("Ethernet header only", eth(cps_mac, 0x0800)),
        (
            "802.1Q tag cut short",
            [eth(cps_mac, 0x8100), vec![0, 100]].concat(),
        ),
        ("QinQ-tagged output of the flow", qinq(&good)),
        ("IPv4 header cut short", good[..ip + 10].to_vec()),
        ("IPv4 header with options", with_options(&good)),
        (
            "IPv4 fragment of an output",
            edited(&good, |f| f[ip + 6] = 0x20),
        ),
        ("UDP header cut short", good[..ip + 24].to_vec()),
        ("IPv6 header cut short", eth(cps_mac, 0x86DD)),
    ];
    let sender = RawSocket::open(&hosts.src, "eth0");
    // A tap on the same interface sees what leaves it, after TC egress.
    let tap = RawSocket::open(&hosts.src, "eth0");
    for (kind, frame) in cases
        .iter()
        .chain([&("a well-formed output", good.clone())])
    {
        let before = src.dataplane.counters().unwrap();
        sender.send(frame);
        let deadline = Instant::now() + Duration::from_secs(2);
        while tap.recv().as_ref() != Some(frame) {
            assert!(Instant::now() < deadline, "{kind}: left src unchanged");
        }
        let after = src.dataplane.counters().unwrap();
        let captured: &[u32] = if *kind == "a well-formed output" {
            &[counter::OUTPUT_CAPTURED]
        } else {
            &[]
        };
        assert_moved(kind, &before, &after, captured);
    }
    let outputs = src.read_log(dataplane_user::kernel::loader::MAP_OUTPUTS, 2);
    assert_eq!(outputs.len(), 1, "only the well-formed output was logged");
    assert_eq!(&outputs[0].frame[..], &good[..]);
}

/// XDP_PASS.
const XDP_PASS: u32 = 2;

/// Counters a frame of the tables moves only as its `Counted` says
/// (`seen` and `not_udp` also count the hosts' own traffic: neighbour
/// discovery).
const WATCHED: [u32; 16] = [
    counter::CAPTURED,
    counter::RING_FULL,
    counter::MIRRORED,
    counter::MALFORMED,
    counter::UNMATCHED,
    counter::MIRROR_RECEIVED,
    counter::DELIVERED,
    counter::HELD,
    counter::OUTPUT_CAPTURED,
    counter::OUTPUT_RING_FULL,
    counter::MIRROR_ERRORS,
    counter::DUPLICATES,
    counter::FORWARDED,
    counter::OUTPUT_MUTED,
    counter::MIRROR_FOREIGN,
    counter::OTHER_HOST,
];

/// What the ingress program counts a frame it leaves alone as.
#[derive(Clone, Copy, Debug)]
enum Counted {
    Malformed,
    NotUdp,
    Unmatched,
    /// A refused mirror frame.
    MirrorError,
    /// A mirror frame on an interface mirror frames are not taken on.
    Foreign,
    /// A unicast frame for another host's MAC (flooded by a switch).
    OtherHost,
}

impl Counted {
    /// The counters that rise by one per frame.
    fn counters(self) -> &'static [u32] {
        match self {
            Counted::Malformed => &[counter::MALFORMED],
            Counted::NotUdp => &[counter::NOT_UDP],
            Counted::Unmatched => &[counter::UNMATCHED],
            Counted::MirrorError => &[counter::MIRROR_RECEIVED, counter::MIRROR_ERRORS],
            Counted::Foreign => &[counter::MIRROR_FOREIGN],
            Counted::OtherHost => &[counter::OTHER_HOST],
        }
    }
}

/// A named kind of frame the ingress program must pass untouched.
struct Case {
    kind: &'static str,
    frame: Vec<u8>,
    counted: Counted,
}

fn case(kind: &'static str, frame: Vec<u8>, counted: Counted) -> Case {
    Case {
        kind,
        frame,
        counted,
    }
}

fn ingress_program(host: &Loaded) -> Xdp {
    let pin = host.dataplane.pin_root().join("programs").join("ingress");
    Xdp::from_pin(pin, aya_obj::programs::XdpAttachType::Interface).unwrap()
}

/// Each case, first through BPF_PROG_TEST_RUN of `host`'s ingress program
/// as if it had arrived on `on` (a namespace and its interface), which must
/// pass it (XDP_PASS) with its bytes as they were, then sent over the wire
/// to that interface by `sender`: each time it is counted as `counted` and
/// moves no other counter. Nothing is logged.
fn check_ingress(host: &Loaded, on: (&NetNs, &str), sender: &RawSocket, cases: &[Case]) {
    let program = ingress_program(host);
    let ifindex = TestHosts::ifindex(on.0, on.1);
    for case in cases {
        let before = host.dataplane.counters().unwrap();
        let mut out = vec![0u8; case.frame.len() + 256];
        // `struct xdp_md`: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex. The kernel looks the interface
        // up in the calling thread's namespace.
        let ctx: Vec<u8> = [0, case.frame.len() as u32, 0, ifindex, 0, 0]
            .iter()
            .flat_map(|word| word.to_ne_bytes())
            .collect();
        let run =
            on.0.run(|| {
                program.test_run(TestRunOptions {
                    data_in: Some(&case.frame),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    ..Default::default()
                })
            })
            .unwrap_or_else(|e| panic!("{}: test run: {e}", case.kind));
        assert_eq!(run.return_value, XDP_PASS, "{}: passed", case.kind);
        let out = &out[..run.data_size_out as usize];
        assert_eq!(out, &case.frame[..], "{}: untouched", case.kind);
        wait_counted(host, &before, case, 1);
        sender.send(&case.frame);
        wait_counted(host, &before, case, 2);
    }
    let mut log = host.dataplane.open_log(MAP_INPUTS).unwrap();
    assert!(log.next().is_none(), "nothing was logged");
}

/// Waits (up to 2 s) until `case` has been counted `times` since `before`.
fn wait_counted(host: &Loaded, before: &Counters, case: &Case, times: u64) {
    let expected = case.counted.counters();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let now = host.dataplane.counters().unwrap();
        let delta = |c: u32| now.get(c) - before.get(c);
        let done = expected.iter().all(|&c| delta(c) >= times);
        for c in WATCHED {
            let allowed = if expected.contains(&c) { times } else { 0 };
            assert!(
                delta(c) <= allowed,
                "{}: counter {} rose by {} ({times} sends)",
                case.kind,
                counter::NAMES[c as usize],
                delta(c)
            );
        }
        if done {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: not counted as {:?} ({times} sends)",
            case.kind,
            case.counted
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `frame` changed by `edit`.
fn edited(frame: &[u8], edit: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
    let mut f = frame.to_vec();
    edit(&mut f);
    f
}

/// A UDP frame between `macs` (source, destination) from `from` to `to`.
fn udp_packet(
    macs: ([u8; 6], [u8; 6]),
    from: std::net::SocketAddr,
    to: std::net::SocketAddr,
    payload: &[u8],
) -> Vec<u8> {
    use std::net::IpAddr::{V4, V6};
    let eth = PacketBuilder::ethernet2(macs.0, macs.1);
    let ip = match (from.ip(), to.ip()) {
        (V4(a), V4(b)) => eth.ipv4(a.octets(), b.octets(), 64),
        (V6(a), V6(b)) => eth.ipv6(a.octets(), b.octets(), 64),
        _ => panic!("{from} and {to} are of different families"),
    };
    let mut frame = Vec::new();
    ip.udp(from.port(), to.port())
        .write(&mut frame, payload)
        .unwrap();
    frame
}

/// An Ethernet header to `dst` with `ether_type`, and nothing after it.
fn eth(dst: [u8; 6], ether_type: u16) -> Vec<u8> {
    [&dst[..], &CPS_MAC, &ether_type.to_be_bytes()].concat()
}

/// `frame` with two VLAN tags (802.1ad, then 802.1Q) after its MACs.
fn qinq(frame: &[u8]) -> Vec<u8> {
    [
        &frame[..12],
        &[0x88, 0xA8, 0, 100, 0x81, 0x00, 0, 200],
        &frame[12..],
    ]
    .concat()
}

/// IPv4 `frame` with IHL 6: a 4-byte NOP option between the IPv4 and UDP headers.
fn with_options(frame: &[u8]) -> Vec<u8> {
    let ip = 14;
    let mut f = frame[..ip + 20].to_vec();
    f[ip] = 0x46;
    f.extend_from_slice(&[1, 1, 1, 1]);
    f.extend_from_slice(&frame[ip + 20..]);
    f
}

/// Frames every parser of the ingress program (Ethernet, VLAN tags, IPv4,
/// IPv6, UDP) must pass untouched, addressed to `dst`.
fn parser_cases(dst: [u8; 6]) -> Vec<Case> {
    use Counted::*;
    let v4 = udp_frame(dst, None, 5000, b"a matched input");
    let tagged = udp_frame(dst, Some(100), 5000, b"a matched input");
    let v6 = udp_packet(
        (CPS_MAC, dst),
        sock(CPS_V6, 4000),
        sock(SERVICE_V6, 5000),
        b"a matched input",
    );
    let ip = 14;
    vec![
        case("Ethernet header only, IPv4", eth(dst, 0x0800), Malformed),
        case("Ethernet header only, IPv6", eth(dst, 0x86DD), Malformed),
        case("Ethernet header only, 802.1Q", eth(dst, 0x8100), Malformed),
        case("Ethernet header only, other type", eth(dst, 0x88B6), NotUdp),
        case(
            "802.1Q tag cut short",
            [eth(dst, 0x8100), vec![0, 100]].concat(),
            Malformed,
        ),
        case(
            "802.1ad (QinQ) tag cut short",
            [eth(dst, 0x88A8), vec![0, 100]].concat(),
            Malformed,
        ),
        case(
            "QinQ, inner tag cut short",
            qinq(&v4)[..18].to_vec(),
            NotUdp,
        ),
        case(
            "QinQ-tagged UDP of the flow (one tag is parsed)",
            qinq(&v4),
            NotUdp,
        ),
        case(
            "802.1Q tag, IPv4 header cut short",
            tagged[..ip + 4 + 10].to_vec(),
            Malformed,
        ),
        case("IPv4 header cut short", v4[..ip + 10].to_vec(), Malformed),
        case(
            "IPv4 type, version 6",
            edited(&v4, |f| f[ip] = 0x65),
            Malformed,
        ),
        case(
            "IPv4 header length 16",
            edited(&v4, |f| f[ip] = 0x44),
            Malformed,
        ),
        case("IPv4 with options", with_options(&v4), Malformed),
        case(
            "IPv4 first fragment",
            edited(&v4, |f| f[ip + 6] = 0x20),
            Malformed,
        ),
        case(
            "IPv4 later fragment",
            edited(&v4, |f| f[ip + 7] = 0x10),
            Malformed,
        ),
        case("UDP header cut short", v4[..ip + 24].to_vec(), Malformed),
        case("IPv4, not UDP", edited(&v4, |f| f[ip + 9] = 1), NotUdp),
        case("IPv6 header cut short", v6[..ip + 30].to_vec(), Malformed),
        case(
            "IPv6 type, version 4",
            edited(&v6, |f| f[ip] = 0x40),
            Malformed,
        ),
        case(
            "IPv6 fragment header",
            edited(&v6, |f| f[ip + 6] = 44),
            Malformed,
        ),
        case(
            "IPv6 UDP header cut short",
            v6[..ip + 44].to_vec(),
            Malformed,
        ),
        case("IPv6, not UDP", edited(&v6, |f| f[ip + 6] = 6), NotUdp),
        case(
            "UDP of no known flow",
            udp_frame(dst, None, 5999, b"no such flow"),
            Unmatched,
        ),
    ]
}

/// Mirror frames the receiver must refuse (docs/mirror-header.md), for a
/// host that has flow `flow_id` behind a gate expecting input 1.
fn mirror_cases(link: &MirrorLink, flow_id: u32) -> Vec<Case> {
    use Counted::*;
    let o = MIRROR_OVERHEAD as usize;
    let good = link.frame(flow_id, 1, &input_frame(1));
    // `good` with `bytes` written at `at`.
    let set =
        |at: usize, bytes: &[u8]| edited(&good, |f| f[at..at + bytes.len()].copy_from_slice(bytes));
    let inner_len = (good.len() - o) as u32;
    let cut_inner = input_frame(1)[..24].to_vec();
    let unnumbered_replay = edited(&link.frame(flow_id, 0, &input_frame(0)), |f| {
        f[16..18].copy_from_slice(&MIRROR_FLAG_REPLAY.to_be_bytes())
    });
    vec![
        case(
            "mirror frame cut inside the mirror header",
            good[..14 + 20].to_vec(),
            MirrorError,
        ),
        case(
            "mirror headers without the inner frame",
            good[..o].to_vec(),
            MirrorError,
        ),
        case(
            "unknown mirror version",
            edited(&good, |f| f[14] = 2),
            MirrorError,
        ),
        case(
            "mirror header_len 40",
            edited(&good, |f| f[15] = 40),
            MirrorError,
        ),
        case(
            "frame_len below an Ethernet header",
            set(38, &13u32.to_be_bytes()),
            MirrorError,
        ),
        case(
            "frame_len beyond the frame",
            set(38, &(inner_len + 1).to_be_bytes()),
            MirrorError,
        ),
        case(
            "flow id beyond the maps",
            set(18, &MAX_FLOWS.to_be_bytes()),
            MirrorError,
        ),
        case(
            "flow id this host does not have",
            set(18, &(flow_id + 1).to_be_bytes()),
            MirrorError,
        ),
        case(
            "inner frame of another flow",
            link.frame(flow_id, 1, &udp_frame(CPS_MAC, None, 5999, b"input 1")),
            MirrorError,
        ),
        case(
            "inner frame cut inside its IPv4 header",
            link.frame(flow_id, 1, &cut_inner),
            MirrorError,
        ),
        case(
            "frame_len cutting the inner UDP header",
            set(38, &38u32.to_be_bytes()),
            MirrorError,
        ),
        case(
            "a mirror frame inside a mirror frame",
            link.frame(flow_id, 1, &good),
            MirrorError,
        ),
        case("replay without a number", unnumbered_replay, MirrorError),
        // Only this host's own replay queue makes replays: the flag from
        // the wire would have the input gated without being logged.
        case(
            "replay of input 1 from the wire",
            set(16, &MIRROR_FLAG_REPLAY.to_be_bytes()),
            MirrorError,
        ),
        // The key is random per load: a guess from the wire is refused,
        // and takes no replay frame queued on this host.
        case(
            "replay batch trigger with a guessed key",
            set(16, &MIRROR_FLAG_QUEUED.to_be_bytes()),
            MirrorError,
        ),
        case(
            "seq above 2^63 - 1",
            set(22, &(MAX_SEQ + 1).to_be_bytes()),
            MirrorError,
        ),
        case(
            "seq 2^64 - 1",
            set(22, &u64::MAX.to_be_bytes()),
            MirrorError,
        ),
        case(
            "VLAN-tagged mirror frame (not taken as one)",
            [&good[..12], &[0x81, 0, 0, 100], &good[12..]].concat(),
            NotUdp,
        ),
    ]
}

/// Well-formed mirror frames for `flow_id` (an input of it inside), whose
/// next input is `next`, as a device on the field network could send them
/// to `dst`: a mirror frame there is foreign, whatever it says.
fn forged_cases(dst: [u8; 6], flow_id: u32, next: u64) -> Vec<Case> {
    let forged = |seq: u64, flags: u16| {
        let meta = CaptureMeta {
            flow_id,
            seq,
            ..Default::default()
        };
        let inner = input_frame(seq);
        let mut frame = dataplane_common::mirror_headers((dst, CPS_MAC), &meta, inner.len() as u32);
        frame[16..18].copy_from_slice(&flags.to_be_bytes());
        [frame.as_slice(), &inner].concat()
    };
    let foreign = |kind, frame| case(kind, frame, Counted::Foreign);
    vec![
        foreign("seq 2^63 - 1", forged(MAX_SEQ, 0)),
        foreign("seq 0 (forwarded past a cutover)", forged(0, 0)),
        foreign("the flow's next input", forged(next, 0)),
        foreign(
            "a replay of the next input",
            forged(next, MIRROR_FLAG_REPLAY),
        ),
        foreign(
            "a replay batch trigger with a guessed key",
            forged(0x1234_5678, MIRROR_FLAG_QUEUED),
        ),
    ]
}

#[test]
fn mirrors_vlan_tagged_inputs_with_their_tag() {
    let hosts = TestHosts::new("vmir");
    let mut src = hosts.load_src();
    let mut dst = hosts.load_dst();
    let key = flow::udp(sock(CPS_V4, 4000), sock(SERVICE_V4, 5000));
    src.add_mirrored_flow(key, &hosts.dst);
    dst.dataplane.add_flow(key, 0).unwrap();
    let src_mac = TestHosts::mac(&hosts.src, "eth0");
    let cps = RawSocket::open(&hosts.cps, "to-src");
    let frames: Vec<Vec<u8>> = (0..100u16)
        .map(|i| udp_frame(src_mac, Some(100), 5000, format!("tagged {i}").as_bytes()))
        .collect();
    for f in &frames {
        cps.send(f);
    }
    let records = dst.read_inputs(frames.len());
    assert_eq!(records.len(), frames.len(), "every tagged input mirrored");
    for (i, (r, f)) in records.iter().zip(&frames).enumerate() {
        assert_eq!(r.header.seq, i as u64 + 1);
        assert_eq!(
            &r.frame[..],
            &f[..],
            "tagged input {i} mirrored with its tag, byte for byte"
        );
    }
}

#[test]
fn a_sequenced_gate_delivers_each_input_once_and_in_order() {
    let hosts = TestHosts::new("seq");
    let mut dst = hosts.load_dst();
    let (flow_id, replica) = sequenced_replica(&hosts, &mut dst);
    // Mirror frames as src would send them, with numbers out of order and a duplicate.
    let link = MirrorLink::open(&hosts);
    let send = |seq: u64| link.send(flow_id, seq);
    for seq in [1, 3, 2, 2, 4] {
        send(seq);
    }
    let mut got = received(&replica);
    assert_eq!(
        got,
        ["input 1", "input 2"],
        "delivered in order; 3 and 4 wait for replay"
    );
    let counters = dst.dataplane.counters().unwrap();
    assert_eq!(counters.get(counter::HELD), 2, "3 and 4 held in the log");
    assert_eq!(counters.get(counter::DUPLICATES), 1, "the second 2 dropped");
    assert_eq!(dst.dataplane.gate(flow_id).unwrap().next_expected, 3);

    // Replaying the held inputs (as the replay engine will) completes the sequence.
    for seq in [3, 4, 4] {
        send(seq);
    }
    got.extend(received(&replica));
    assert_eq!(got, ["input 1", "input 2", "input 3", "input 4"]);
    assert_eq!(
        dst.dataplane.counters().unwrap().get(counter::DUPLICATES),
        2
    );
    assert_eq!(dst.dataplane.gate(flow_id).unwrap().next_expected, 5);
}

#[test]
fn replayed_inputs_and_the_live_mirror_meet_exactly_once_in_order() {
    use dataplane_user::kernel::injector::Injector;

    let hosts = TestHosts::new("rpl");
    let mut dst = hosts.load_dst();
    let (flow_id, replica) = sequenced_replica(&hosts, &mut dst);
    // The live mirror is ahead: inputs 3 and 4 arrive before the restored
    // instance has had 1 and 2, and wait in the log.
    let link = MirrorLink::open(&hosts);
    let live = |seq: u64| link.send(flow_id, seq);
    live(3);
    live(4);
    let held = dst.read_inputs(2);
    assert_eq!(
        held.iter().map(|r| r.header.seq).collect::<Vec<_>>(),
        [3, 4]
    );

    // Replay: 1 and 2 (from the source's log), then the held 3 and 4 (one
    // batch each), then a late live copy of 4.
    let mut injector = hosts
        .dst
        .run(|| Injector::open(dst.dataplane.pin_root(), "peer0"))
        .unwrap();
    let from_source = [logged_input(flow_id, 1), logged_input(flow_id, 2)];
    for batch in [&from_source[..], &held[..]] {
        hosts.dst.run(|| injector.inject(batch)).unwrap();
    }
    live(4);
    let got = received(&replica);
    assert_eq!(
        got,
        ["input 1", "input 2", "input 3", "input 4"],
        "each input once, in order"
    );
    let counters = dst.dataplane.counters().unwrap();
    assert_eq!(counters.get(counter::DUPLICATES), 1, "the late live 4");
    assert_eq!(dst.dataplane.gate(flow_id).unwrap().next_expected, 5);
    // Replays are not logged again: the log holds 3, 4 and the late live 4 only.
    assert_eq!(dst.read_inputs(1)[0].header.seq, 4);
    let mut log = dst
        .dataplane
        .open_log(dataplane_user::kernel::loader::MAP_INPUTS)
        .unwrap();
    assert!(log.next().is_none(), "nothing else was logged");

    // A batch of what was delivered already: each refused once, none delivered.
    hosts.dst.run(|| injector.inject(&held)).unwrap();
    assert!(received(&replica).is_empty());
    let counters = dst.dataplane.counters().unwrap();
    assert_eq!(
        counters.get(counter::DUPLICATES),
        3,
        "the late live 4, 3, 4"
    );
    // A frame replay cannot take is named, and nothing of its batch goes.
    let mut jumbo = logged_input(flow_id, 5);
    jumbo.frame = vec![0u8; 4000].into();
    let refused = hosts
        .dst
        .run(|| injector.inject(&[logged_input(flow_id, 5), jumbo]));
    assert!(
        matches!(
            refused,
            Err(dataplane_user::kernel::injector::ReplayError::Unreplayable(
                dataplane_user::kernel::injector::Unreplayable::TooLarge { seq: 5, len: 4000 }
            ))
        ),
        "{refused:?}"
    );
    assert!(received(&replica).is_empty());
    assert_eq!(dst.dataplane.gate(flow_id).unwrap().next_expected, 5);
}

#[test]
fn a_live_input_waits_while_a_replayed_input_is_on_its_way() {
    use dataplane_common::REPLAY_PENDING;
    use dataplane_user::kernel::injector::Injector;

    let hosts = TestHosts::new("pnd");
    let mut dst = hosts.load_dst();
    let (flow_id, replica) = sequenced_replica(&hosts, &mut dst);
    let link = MirrorLink::open(&hosts);
    let mut injector = hosts
        .dst
        .run(|| Injector::open(dst.dataplane.pin_root(), "peer0"))
        .unwrap();
    let window = dst.dataplane.gate_window().unwrap();
    // A returned injection leaves the word clear: live inputs may follow.
    hosts
        .dst
        .run(|| injector.inject(&[logged_input(flow_id, 1)]))
        .unwrap();
    assert_eq!(window.next_expected_word(flow_id), 2);
    // The word as the kernel leaves it while the injection of input 1 has
    // not returned: live input 2 must not overtake it, so it is held.
    assert!(window.exchange_next_expected(flow_id, 2, 2 | REPLAY_PENDING));
    assert_eq!(window.next_expected(flow_id), 2);
    link.send(flow_id, 2);
    let held = dst.read_inputs(1);
    assert_eq!(held[0].header.seq, 2);
    assert_eq!(
        dst.dataplane.counters().unwrap().get(counter::HELD),
        1,
        "live 2, while a replay was pending"
    );
    window.replay_delivered(flow_id);
    assert_eq!(window.next_expected_word(flow_id), 2);
    hosts.dst.run(|| injector.inject(&held)).unwrap();
    link.send(flow_id, 3);
    assert_eq!(
        received(&replica),
        ["input 1", "input 2", "input 3"],
        "the held input replayed, then a live one through the gate"
    );
    assert_eq!(window.next_expected_word(flow_id), 4);
}

#[test]
fn a_counting_replica_tags_each_output_with_the_input_it_answers() {
    let hosts = TestHosts::new("tag");
    let mut dst = hosts.load_dst();
    let (flow_id, replica, cps) = counting_replica(&hosts, &mut dst);
    // Outputs leave from input 3 on: a cutover at K = 2.
    let gate = dataplane_common::Gate {
        output: dataplane_common::OUTPUT_FROM,
        answer_from: 3,
        ..dst.dataplane.gate(flow_id).unwrap()
    };
    dst.dataplane.set_gate(flow_id, gate).unwrap();
    // A burst: all three inputs are in the replica's socket before it
    // answers the first, so each answer leaves after input 3 was delivered.
    let link = MirrorLink::open(&hosts);
    for seq in 1..=3 {
        link.send(flow_id, seq);
    }
    let inputs = received(&replica);
    assert_eq!(inputs, ["input 1", "input 2", "input 3"]);
    let answer = |text: &str| {
        replica
            .send_to(text.as_bytes(), sock(CPS_V4, 4000))
            .unwrap()
    };
    for input in &inputs {
        answer(&format!("answer to {input}"));
    }
    // A second output with every input answered belongs to the last one.
    answer("more on input 3");
    let outputs = dst.read_log(dataplane_user::kernel::loader::MAP_OUTPUTS, 4);
    let tagged: Vec<(u64, bool)> = outputs
        .iter()
        .map(|r| {
            let payload = String::from_utf8_lossy(&r.frame);
            let input = r.header.seq;
            (input, payload.ends_with(&format!("input {input}")))
        })
        .collect();
    assert_eq!(
        tagged,
        [(1, true), (2, true), (3, true), (3, true)],
        "each output tagged with the input it answers"
    );
    assert_eq!(
        received(&cps),
        ["answer to input 3", "more on input 3"],
        "only the outputs for inputs >= 3 left"
    );
    assert_eq!(
        dst.dataplane.counters().unwrap().get(counter::OUTPUT_MUTED),
        2
    );
}

fn input_frame(seq: u64) -> Vec<u8> {
    udp_frame(CPS_MAC, None, 5000, format!("input {seq}").as_bytes())
}

/// Input `seq` of `flow_id` as a log record holds it.
fn logged_input(flow_id: u32, seq: u64) -> dataplane_user::kernel::logs::Record {
    let frame = input_frame(seq);
    dataplane_user::kernel::logs::Record {
        header: dataplane_common::RecordHeader {
            seq,
            flow_id,
            kind: dataplane_common::RECORD_MIRRORED,
            frame_len: frame.len() as u32,
            captured_len: frame.len() as u32,
            ..Default::default()
        },
        frame: frame.into(),
    }
}

/// What `socket` receives until it has been quiet for its read timeout.
fn received(socket: &std::net::UdpSocket) -> Vec<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while let Ok(n) = socket.recv(&mut buf) {
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    got
}

/// A flow on `dst` behind a sequenced gate expecting input 1, and the replica's socket.
fn sequenced_replica(hosts: &TestHosts, dst: &mut Loaded) -> (u32, std::net::UdpSocket) {
    let flow_id = dst
        .dataplane
        .add_flow(flow::udp(sock(CPS_V4, 4000), sock(SERVICE_V4, 5000)), 0)
        .unwrap();
    let gate = dataplane_common::Gate {
        mode: dataplane_common::GATE_SEQUENCED,
        next_expected: 1,
        ..Default::default()
    };
    dst.dataplane.set_gate(flow_id, gate).unwrap();
    let replica = hosts
        .dst
        .run(|| std::net::UdpSocket::bind(sock(SERVICE_V4, 5000)))
        .unwrap();
    replica
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    (flow_id, replica)
}

/// A counting replica on `dst`: [`sequenced_replica`] with its outputs
/// tagged by count, and the CPS's socket that its outputs reach.
fn counting_replica(
    hosts: &TestHosts,
    dst: &mut Loaded,
) -> (u32, std::net::UdpSocket, std::net::UdpSocket) {
    let (flow_id, replica) = sequenced_replica(hosts, dst);
    let gate = dataplane_common::Gate {
        tagging: dataplane_common::TAG_COUNTED,
        ..dst.dataplane.gate(flow_id).unwrap()
    };
    dst.dataplane.set_gate(flow_id, gate).unwrap();
    let cps = hosts
        .cps
        .run(|| std::net::UdpSocket::bind(sock(CPS_V4, 4000)))
        .unwrap();
    cps.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    (flow_id, replica, cps)
}

/// Mirror frames sent by hand to dst's peer0, as src's dataplane would: from
/// the migration switch's port to dst, so that frames a Linux bridge would
/// not forward (a VLAN tag cut short) arrive too.
struct MirrorLink {
    socket: RawSocket,
    /// Destination and source MAC.
    macs: ([u8; 6], [u8; 6]),
}

impl MirrorLink {
    fn open(hosts: &TestHosts) -> Self {
        Self {
            socket: RawSocket::open(&hosts.migration, "to-dst"),
            macs: (
                TestHosts::mac(&hosts.dst, "peer0"),
                TestHosts::mac(&hosts.src, "peer0"),
            ),
        }
    }

    /// Sends input `seq` of `flow_id` as a mirror frame.
    fn send(&self, flow_id: u32, seq: u64) {
        self.socket
            .send(&self.frame(flow_id, seq, &input_frame(seq)));
    }

    /// `inner` as input `seq` of `flow_id` in a mirror frame.
    fn frame(&self, flow_id: u32, seq: u64, inner: &[u8]) -> Vec<u8> {
        let meta = dataplane_common::CaptureMeta {
            flow_id,
            seq,
            ..Default::default()
        };
        let headers = dataplane_common::mirror_headers(self.macs, &meta, inner.len() as u32);
        [headers.as_slice(), inner].concat()
    }
}

// The gates' and the cutover's decisions, made by the real programs: each
// input through BPF_PROG_TEST_RUN of `ingress` (its verdict, and the
// capture metadata it leaves for the mirror programs), or mirror frames and
// outputs over the wire where the local stack must take part. The same
// decisions as pure functions are unit-tested in `dataplane_common::decide`.

/// XDP_DROP.
const XDP_DROP: u32 = 1;

/// Runs `frame` once through `program` (BPF_PROG_TEST_RUN): the verdict, and
/// the capture metadata the run left for the mirror programs, if any. The
/// kernel copies `data_out` from the start of the metadata, so that comes
/// ahead of the frame's bytes, which must be unchanged.
fn run_ingress(program: &Xdp, frame: &[u8]) -> (u32, Option<CaptureMeta>) {
    let mut out = vec![0u8; frame.len() + 256];
    let run = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .expect("test run");
    let out = &out[..run.data_size_out as usize];
    let (meta, rest) = out.split_at(out.len() - frame.len());
    assert_eq!(rest, frame, "the frame's bytes are unchanged");
    let meta = match meta.len() {
        0 => None,
        24 => {
            let u32_at = |at: usize| u32::from_ne_bytes(meta[at..at + 4].try_into().unwrap());
            let u64_at = |at: usize| u64::from_ne_bytes(meta[at..at + 8].try_into().unwrap());
            Some(CaptureMeta {
                magic: u32_at(0),
                flow_id: u32_at(4),
                seq: u64_at(8),
                timestamp_ns: u64_at(16),
            })
        }
        n => panic!("{n} bytes of metadata"),
    };
    (run.return_value, meta)
}

/// Checks that from `before` to `after` each watched counter rose by the
/// times `moved` names it, and the others not at all.
fn assert_moved(what: &str, before: &Counters, after: &Counters, moved: &[u32]) {
    for c in WATCHED {
        let expected = moved.iter().filter(|&&m| m == c).count() as u64;
        assert_eq!(
            after.get(c) - before.get(c),
            expected,
            "{what}: counter {}",
            counter::NAMES[c as usize]
        );
    }
}

/// Input `seq` of the flow from the CPS's port `port` to the service, as
/// the CPS sends it to `src`.
fn input_from(port: u16, seq: u64) -> Vec<u8> {
    udp_packet(
        (CPS_MAC, [0x02, 0, 0, 0, 0, 0x10]),
        sock(CPS_V4, port),
        sock(SERVICE_V4, 5000),
        format!("input {seq}").as_bytes(),
    )
}

/// Adds to `host` the flow from the CPS's port `port` to the service, with `flags`.
fn add_flow_from(host: &mut Loaded, port: u16, flags: u32) -> u32 {
    let key = flow::udp(sock(CPS_V4, port), sock(SERVICE_V4, 5000));
    host.dataplane.add_flow(key, flags).unwrap()
}

/// A cutover on the source: `before` inputs, the flip, `after` inputs. With
/// `unflip` the flip is taken back before any input crosses it.
struct Flip {
    kind: &'static str,
    before: u64,
    after: u64,
    unflip: bool,
    /// The K the kernel must pick, if any.
    k: Option<u64>,
}

#[test]
fn the_kernel_picks_k_after_the_flip_and_forwards_inputs_past_it_unnumbered() {
    let hosts = TestHosts::new("cut");
    let mut src = hosts.load_src();
    let program = ingress_program(&src);
    let window = src.dataplane.gate_window().unwrap();
    // Each scenario on a flow of its own, numbered from 1, every input's
    // route checked: a K off by one, a K picked by the wrong input, a flip
    // lost or an input past K that keeps its number fails a row.
    let table = [
        Flip {
            kind: "flip after input 3",
            before: 3,
            after: 3,
            unflip: false,
            k: Some(3),
        },
        // The seq > 1 edge: K = 0 means no cutover, so input 1 cannot pick
        // it. It is delivered here as before, and input 2 picks K = 1.
        Flip {
            kind: "flip before input 1",
            before: 0,
            after: 3,
            unflip: false,
            k: Some(1),
        },
        // The smallest K, picked by the first input after the flip.
        Flip {
            kind: "flip after input 1",
            before: 1,
            after: 2,
            unflip: false,
            k: Some(1),
        },
        Flip {
            kind: "flip taken back before an input crossed it",
            before: 2,
            after: 2,
            unflip: true,
            k: None,
        },
    ];
    let mut flows = Vec::new();
    for (i, case) in table.iter().enumerate() {
        let port = 4001 + i as u16;
        let flow_id = add_flow_from(&mut src, port, FLOW_MIRROR);
        let inputs = case.before + case.after;
        flows.push((flow_id, inputs));
        for seq in 1..=inputs {
            if seq == case.before + 1 {
                window.flip(flow_id);
                if case.unflip {
                    assert_eq!(window.unflip(flow_id), Ok(()), "{}", case.kind);
                }
            }
            let what = format!("{}: input {seq}", case.kind);
            let past = case.k.is_some_and(|k| seq > k);
            let before = src.dataplane.counters().unwrap();
            let (verdict, meta) = run_ingress(&program, &input_from(port, seq));
            // Clone mode: XDP passes every mirrored input on to `mirror`,
            // which clones it to the peer and drops the original unless
            // the metadata says META_DELIVER.
            assert_eq!(verdict, XDP_PASS, "{what}: verdict");
            let meta = meta.unwrap_or_else(|| panic!("{what}: no metadata for the mirror"));
            assert_eq!(meta.magic & CAPTURE_META_MASK, CAPTURE_META_MAGIC);
            // Past K: to the peer only, and unnumbered (the peer numbers it).
            let (seq_sent, targets) = if past {
                (0, META_PEER)
            } else {
                (seq, META_PEER | META_DELIVER)
            };
            assert_eq!(
                (meta.flow_id, meta.seq, meta.magic & !CAPTURE_META_MASK),
                (flow_id, seq_sent, targets),
                "{what}: (flow, number sent to the peer, META_* targets)"
            );
            let moved: &[u32] = if past {
                &[counter::CAPTURED, counter::FORWARDED]
            } else {
                &[counter::CAPTURED]
            };
            assert_moved(&what, &before, &src.dataplane.counters().unwrap(), moved);
            let deliver_until = match case.k {
                _ if seq <= case.before || case.unflip => 0,
                Some(k) if seq > k => k,
                _ => CUT_AT_NEXT,
            };
            assert_eq!(
                src.dataplane.gate(flow_id).unwrap().deliver_until,
                deliver_until,
                "{what}: deliver_until after it"
            );
        }
        // Once an input has crossed the flip, the cutover stands.
        if let Some(k) = case.k {
            assert_eq!(window.cutover_point(flow_id), Some(k), "{}", case.kind);
            assert_eq!(window.unflip(flow_id), Err(k), "{}", case.kind);
        }
    }
    // The source's own log numbers every input, past K too.
    let total = flows.iter().map(|&(_, n)| n as usize).sum();
    let records = src.read_inputs(total);
    for (flow_id, inputs) in flows {
        let logged: Vec<u64> = records
            .iter()
            .filter(|r| r.header.flow_id == flow_id)
            .map(|r| r.header.seq)
            .collect();
        assert_eq!(logged, (1..=inputs).collect::<Vec<_>>(), "flow {flow_id}");
    }
}

#[test]
fn an_armed_output_gate_opens_at_the_first_input_forwarded_past_k() {
    let hosts = TestHosts::new("arm");
    let mut dst = hosts.load_dst();
    // A destination as the cutover finds it: the restored instance behind a
    // sequenced gate, its outputs counted, the output gate armed.
    let (flow_id, replica, cps) = counting_replica(&hosts, &mut dst);
    dst.dataplane.gate_window().unwrap().arm_outputs(flow_id);
    let link = MirrorLink::open(&hosts);
    // The replica answers each input it got; what reached the CPS.
    let answer_all = || {
        for input in received(&replica) {
            replica
                .send_to(format!("answer to {input}").as_bytes(), sock(CPS_V4, 4000))
                .unwrap();
        }
        received(&cps)
    };
    let output_gate = || {
        let gate = dst.dataplane.gate(flow_id).unwrap();
        (gate.output, gate.answer_from)
    };
    // Inputs 1 and 2 come numbered, from before the source's cutover: the
    // source answers them, so the replica's answers stay muted, and
    // numbered mirror frames do not open the gate.
    for seq in 1..=2 {
        link.send(flow_id, seq);
    }
    assert_eq!(answer_all(), [] as [String; 0], "answers to 1 and 2 muted");
    assert_eq!(output_gate(), (OUTPUT_ARMED, u64::MAX));
    // The source forwards inputs past K unnumbered (seq 0); this host
    // numbers them on, 3 and 4. The first opens the gate from its own
    // number; the next does not move that.
    let forward = |seq: u64| link.socket.send(&link.frame(flow_id, 0, &input_frame(seq)));
    forward(3);
    assert_eq!(answer_all(), ["answer to input 3"], "the gate opened at 3");
    assert_eq!(output_gate(), (OUTPUT_FROM, 3));
    forward(4);
    assert_eq!(answer_all(), ["answer to input 4"]);
    assert_eq!(output_gate(), (OUTPUT_FROM, 3));
    let counters = dst.dataplane.counters().unwrap();
    assert_eq!(counters.get(counter::OUTPUT_MUTED), 2);
    let tags: Vec<u64> = dst
        .read_log(dataplane_user::kernel::loader::MAP_OUTPUTS, 4)
        .iter()
        .map(|r| r.header.seq)
        .collect();
    assert_eq!(tags, [1, 2, 3, 4], "every answer logged with its input");
}

#[test]
fn a_full_input_log_lets_unnumbered_inputs_through_an_open_gate_only_and_counts_each() {
    let hosts = TestHosts::new("full");
    // A one-page input log: it holds about 23 records of these frames.
    let mut src = Loaded::new(
        &hosts.src,
        &LoadOptions {
            input_ring_bytes: 4096,
            ..hosts.src_options()
        },
    );
    let program = ingress_program(&src);
    let add_flow = |src: &mut Loaded, port: u16, flags: u32, gate: Gate| {
        let flow_id = add_flow_from(src, port, flags);
        src.dataplane.set_gate(flow_id, gate).unwrap();
        flow_id
    };
    let gate = |mode| Gate {
        mode,
        next_expected: 1,
        ..Default::default()
    };
    // Fill the log, and see that it is full: an input found no room.
    add_flow(&mut src, 4000, 0, gate(GATE_DELIVER_ALL));
    let before = src.dataplane.counters().unwrap();
    program
        .test_run(TestRunOptions {
            data_in: Some(&input_from(4000, 1)),
            repeat: 64,
            ..Default::default()
        })
        .unwrap();
    let after = src.dataplane.counters().unwrap();
    let (captured, full) = (counter::CAPTURED, counter::RING_FULL);
    assert!(
        after.get(full) > before.get(full),
        "64 inputs filled the log ({} captured)",
        after.get(captured) - before.get(captured)
    );
    // An input that found the log full has no number: a gate that is not
    // open cannot place it (a sequenced gate waiting for "input 1" must not
    // take it for 1), and it is not mirrored. Each is counted as ring_full,
    // open gate or not: the source refuses to flip on that count.
    let table = [
        ("a deliver gate", 0, gate(GATE_DELIVER_ALL), XDP_PASS),
        (
            "a deliver gate, mirrored",
            FLOW_MIRROR,
            gate(GATE_DELIVER_ALL),
            XDP_PASS,
        ),
        ("a hold gate", 0, gate(GATE_HOLD_ALL), XDP_DROP),
        (
            "a hold gate, mirrored",
            FLOW_MIRROR,
            gate(GATE_HOLD_ALL),
            XDP_DROP,
        ),
        (
            "a sequenced gate expecting 1",
            0,
            gate(GATE_SEQUENCED),
            XDP_DROP,
        ),
    ];
    for (i, &(kind, flags, gate, expected)) in table.iter().enumerate() {
        let port = 4001 + i as u16;
        let flow_id = add_flow(&mut src, port, flags, gate);
        let before = src.dataplane.counters().unwrap();
        let (verdict, meta) = run_ingress(&program, &input_from(port, 1));
        assert_eq!(verdict, expected, "{kind}: verdict");
        assert_eq!(meta, None, "{kind}: nothing handed to the mirror");
        assert_moved(kind, &before, &src.dataplane.counters().unwrap(), &[full]);
        let sequence = src.dataplane.sequence(flow_id).unwrap();
        assert_eq!(sequence.last_seq, 0, "{kind}: no number taken");
        assert_eq!(src.dataplane.gate(flow_id).unwrap(), gate, "{kind}: gate");
    }
}

#[test]
fn leaving_a_sequenced_gate_keeps_the_word_an_input_in_flight_exchanges() {
    let hosts = TestHosts::new("mode");
    let mut src = hosts.load_src();
    let program = ingress_program(&src);
    for (i, mode) in [GATE_DELIVER_ALL, GATE_HOLD_ALL].into_iter().enumerate() {
        let port = 4001 + i as u16;
        let flow_id = add_flow_from(&mut src, port, 0);
        // A leave-running source giving its instance the held inputs back:
        // sequenced from 1; the kernel takes 1 and 2 and advances the word.
        src.dataplane
            .set_input_gate(flow_id, GATE_SEQUENCED, 1)
            .unwrap();
        for seq in 1..=2 {
            let (verdict, _) = run_ingress(&program, &input_from(port, seq));
            assert_eq!(verdict, XDP_PASS, "mode {mode}: input {seq}");
        }
        let advanced = src.dataplane.gate(flow_id).unwrap();
        assert_eq!(advanced.next_expected, 3);
        // The race: the program taking input 3 has read the sequenced mode
        // when user space changes the gate (as the source does, passing 0),
        // and exchanges `next_expected` after that. The test cannot pause a
        // program between the two, so it runs input 3 on what the program
        // would then find: the words as the change left them, the mode as
        // it had read it. The race fix (the change stores the mode word
        // only) delivers input 3; a change that rewrote the gate holds it,
        // with nobody left to replay it.
        src.dataplane.set_input_gate(flow_id, mode, 0).unwrap();
        let changed = src.dataplane.gate(flow_id).unwrap();
        let in_flight = Gate {
            mode: GATE_SEQUENCED,
            ..changed
        };
        src.dataplane.set_gate(flow_id, in_flight).unwrap();
        let before = src.dataplane.counters().unwrap();
        let (verdict, _) = run_ingress(&program, &input_from(port, 3));
        assert_eq!(
            verdict, XDP_PASS,
            "mode {mode}: input 3 held; the change left next_expected at {}",
            changed.next_expected
        );
        assert_eq!(src.dataplane.gate(flow_id).unwrap().next_expected, 4);
        assert_moved(
            "input 3",
            &before,
            &src.dataplane.counters().unwrap(),
            &[counter::CAPTURED],
        );
        assert_eq!(
            changed,
            Gate { mode, ..advanced },
            "only the mode word changed"
        );
    }
}

//! Hand-made frames: VLAN-tagged inputs, and malformed or foreign frames
//! that must pass the programs untouched. The kernel here has no 802.1Q
//! devices, so tagged frames are sent and seen through AF_PACKET sockets.
use std::time::{Duration, Instant};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use dataplane_common::{
    MAX_FLOWS, MAX_SEQ, MIRROR_FLAG_QUEUED, MIRROR_FLAG_REPLAY, MIRROR_OVERHEAD, RECORD_INPUT,
    RECORD_MIRRORED, counter,
};
use dataplane_tests::{CPS_V4, CPS_V6, Loaded, RawSocket, SERVICE_V4, SERVICE_V6, TestHosts, sock};
use dataplane_user::kernel::{
    flow,
    loader::{Counters, MAP_INPUTS},
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
    check_ingress(&src, &cps, &parser_cases(src_mac));
}

#[test]
fn malformed_and_foreign_frames_on_the_peer_link_pass_untouched_and_are_counted() {
    let hosts = TestHosts::new("badp");
    let mut dst = hosts.load_dst();
    let (flow_id, replica) = sequenced_replica(&hosts, &mut dst);
    let link = MirrorLink::open(&hosts);
    let mut cases = parser_cases(TestHosts::mac(&hosts.dst, "peer0"));
    cases.extend(mirror_cases(&link, flow_id));
    check_ingress(&dst, &link.socket, &cases);
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
        let captured = u64::from(*kind == "a well-formed output");
        for c in WATCHED {
            let expected = if c == counter::OUTPUT_CAPTURED {
                captured
            } else {
                0
            };
            assert_eq!(
                after.get(c) - before.get(c),
                expected,
                "{kind}: counter {}",
                counter::NAMES[c as usize]
            );
        }
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
const WATCHED: [u32; 14] = [
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
];

/// What the ingress program counts a frame it leaves alone as.
#[derive(Clone, Copy, Debug)]
enum Counted {
    Malformed,
    NotUdp,
    Unmatched,
    /// A refused mirror frame.
    MirrorError,
}

impl Counted {
    /// The counters that rise by one per frame.
    fn counters(self) -> &'static [u32] {
        match self {
            Counted::Malformed => &[counter::MALFORMED],
            Counted::NotUdp => &[counter::NOT_UDP],
            Counted::Unmatched => &[counter::UNMATCHED],
            Counted::MirrorError => &[counter::MIRROR_RECEIVED, counter::MIRROR_ERRORS],
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

/// Each case, first through BPF_PROG_TEST_RUN of `host`'s ingress program,
/// which must pass it (XDP_PASS) with its bytes as they were, then sent
/// over the wire by `sender`: each time it is counted as `counted` and
/// moves no other counter. Nothing is logged.
fn check_ingress(host: &Loaded, sender: &RawSocket, cases: &[Case]) {
    let program = ingress_program(host);
    for case in cases {
        let before = host.dataplane.counters().unwrap();
        let mut out = vec![0u8; case.frame.len() + 256];
        let run = program
            .test_run(TestRunOptions {
                data_in: Some(&case.frame),
                data_out: Some(&mut out),
                ..Default::default()
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

#[test]
fn mirrors_vlan_tagged_inputs_with_their_tag() {
    let hosts = TestHosts::new("vmir");
    let mut src = hosts.load_src();
    let mut dst = hosts.load_dst();
    let key = flow::udp(sock(CPS_V4, 4000), sock(SERVICE_V4, 5000));
    src.dataplane
        .add_flow(key, dataplane_common::FLOW_MIRROR)
        .unwrap();
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
            Err(dataplane_user::kernel::injector::ReplayError::TooLarge { seq: 5, len: 4000 })
        ),
        "{refused:?}"
    );
    assert!(received(&replica).is_empty());
    assert_eq!(dst.dataplane.gate(flow_id).unwrap().next_expected, 5);
}

#[test]
fn a_counting_replica_tags_each_output_with_the_input_it_answers() {
    let hosts = TestHosts::new("tag");
    let mut dst = hosts.load_dst();
    let (flow_id, replica) = sequenced_replica(&hosts, &mut dst);
    // Counted tags, and outputs leave from input 3 on: a cutover at K = 2.
    let gate = dataplane_common::Gate {
        tagging: dataplane_common::TAG_COUNTED,
        output: dataplane_common::OUTPUT_FROM,
        answer_from: 3,
        ..dst.dataplane.gate(flow_id).unwrap()
    };
    dst.dataplane.set_gate(flow_id, gate).unwrap();
    let cps = hosts
        .cps
        .run(|| std::net::UdpSocket::bind(sock(CPS_V4, 4000)))
        .unwrap();
    cps.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
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

/// Mirror frames sent by hand from src's peer0 to dst's, as src's dataplane would.
struct MirrorLink {
    socket: RawSocket,
    config: dataplane_common::Config,
}

impl MirrorLink {
    fn open(hosts: &TestHosts) -> Self {
        let config = dataplane_common::Config {
            mirror_dst_mac: TestHosts::mac(&hosts.dst, "peer0"),
            mirror_src_mac: TestHosts::mac(&hosts.src, "peer0"),
            ..Default::default()
        };
        Self {
            socket: RawSocket::open(&hosts.src, "peer0"),
            config,
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
        let headers = dataplane_common::mirror_headers(&self.config, &meta, inner.len() as u32);
        [headers.as_slice(), inner].concat()
    }
}

//! Hand-made frames: VLAN-tagged inputs, and malformed or foreign frames
//! that must pass the programs untouched. The kernel here has no 802.1Q
//! devices, so tagged frames are sent and seen through AF_PACKET sockets.
use std::time::{Duration, Instant};

use dataplane_common::{RECORD_INPUT, counter};
use dataplane_tests::{CPS_V4, Loaded, RawSocket, SERVICE_V4, TestHosts, sock};
use dataplane_user::flow;
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

#[test]
fn captures_vlan_tagged_inputs_with_their_tag() {
    let hosts = TestHosts::new("vlan");
    let mut src = hosts.load_src();
    src.dataplane
        .add_flow(flow::udp(sock(CPS_V4, 4000), sock(SERVICE_V4, 5000)), 0)
        .unwrap();
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
    let hosts = TestHosts::new("bad");
    let mut src = hosts.load_src();
    src.dataplane
        .add_flow(flow::udp(sock(CPS_V4, 4000), sock(SERVICE_V4, 5000)), 0)
        .unwrap();
    let src_mac = TestHosts::mac(&hosts.src, "eth0");
    let good = udp_frame(src_mac, None, 5000, b"a matched input");
    let ip = 14;

    let truncated_ip = good[..ip + 10].to_vec();
    let truncated_udp = {
        let mut f = good[..ip + 24].to_vec();
        f[ip + 2..ip + 4].copy_from_slice(&24u16.to_be_bytes());
        f
    };
    let with_options = {
        // IHL 6: a 4-byte NOP option between the IPv4 and UDP headers.
        let mut f = good[..ip + 20].to_vec();
        f[ip] = 0x46;
        f.extend_from_slice(&[1, 1, 1, 1]);
        f.extend_from_slice(&good[ip + 20..]);
        f
    };
    let fragment = {
        let mut f = good.clone();
        f[ip + 6] = 0x20; // more fragments
        f
    };
    let v6_fragment = {
        let mut f = vec![0u8; 14 + 40 + 8 + 8];
        f[..6].copy_from_slice(&src_mac);
        f[6..12].copy_from_slice(&CPS_MAC);
        f[12..14].copy_from_slice(&0x86DDu16.to_be_bytes());
        f[14] = 0x60;
        f[14 + 4..14 + 6].copy_from_slice(&16u16.to_be_bytes());
        f[14 + 6] = 44; // next header: fragment
        f[14 + 7] = 64;
        f
    };
    let malformed = [
        truncated_ip,
        truncated_udp,
        with_options,
        fragment,
        v6_fragment,
    ];
    let not_udp = {
        let mut f = vec![0u8; 60];
        f[..6].copy_from_slice(&src_mac);
        f[6..12].copy_from_slice(&CPS_MAC);
        f[12..14].copy_from_slice(&0x88B6u16.to_be_bytes()); // local experimental 2
        f
    };
    let unmatched = udp_frame(src_mac, None, 5999, b"no such flow");

    let tap = RawSocket::open(&hosts.src, "eth0");
    let cps = RawSocket::open(&hosts.cps, "to-src");
    let before = src.dataplane.counters().unwrap();
    let sent: Vec<&Vec<u8>> = malformed.iter().chain([&not_udp, &unmatched]).collect();
    for f in &sent {
        cps.send(f);
    }
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while seen.len() < sent.len() * 4 && Instant::now() < deadline {
        if let Some(f) = tap.recv() {
            seen.push(f);
        }
    }
    for (i, f) in sent.iter().enumerate() {
        assert!(
            seen.iter().any(|s| s == *f),
            "frame {i} reached src's stack unchanged"
        );
    }
    let after = src.dataplane.counters().unwrap();
    let delta = |c| after.get(c) - before.get(c);
    assert_eq!(delta(counter::MALFORMED), malformed.len() as u64);
    assert!(delta(counter::NOT_UDP) >= 1);
    assert_eq!(delta(counter::UNMATCHED), 1);
    assert_eq!(delta(counter::CAPTURED), 0);
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
    use dataplane_user::replay::Injector;

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

    // Replay: 1 and 2 (from the source's log), then the held 3 and 4, then a late live copy of 4.
    let injector = hosts
        .dst
        .run(|| Injector::open(dst.dataplane.pin_root(), "peer0"))
        .unwrap();
    for record in [logged_input(flow_id, 1), logged_input(flow_id, 2)]
        .iter()
        .chain(&held)
    {
        hosts.dst.run(|| injector.inject(record)).unwrap();
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
        .open_log(dataplane_user::loader::MAP_INPUTS)
        .unwrap();
    assert!(log.next().is_none(), "nothing else was logged");
}

#[test]
fn the_destination_daemon_replays_inputs_sent_over_the_peer_link_in_order() {
    use dataplane_common::{GATE_SEQUENCED, Gate};
    use dataplane_tests::DaemonProcess;
    use dataplane_user::{Dataplane, Record, peer};

    let hosts = TestHosts::new("prp");
    let config = format!(
        "interface = \"eth0\"\npeer_interface = \"peer0\"\npin_root = \"{}\"\n\
         input_ring_mib = 8\noutput_ring_mib = 1\npeer_listen = \"198.51.100.2:7070\"\n",
        hosts.pin_root("dst").display()
    );
    let dst = DaemonProcess::start(&hosts.dst, "prp", &config);
    let added = dst
        .client()
        .call(
            "flow.add",
            serde_json::json!({"cps": "192.0.2.1:4000", "service": "192.0.2.10:5000"}),
        )
        .unwrap();
    let flow_id = added["id"].as_u64().unwrap() as u32;
    let gate = Gate {
        mode: GATE_SEQUENCED,
        next_expected: 1,
        ..Default::default()
    };
    Dataplane::open(&hosts.pin_root("dst"))
        .unwrap()
        .set_gate(flow_id, gate)
        .unwrap();
    let replica = hosts
        .dst
        .run(|| std::net::UdpSocket::bind(sock(SERVICE_V4, 5000)))
        .unwrap();
    nix::sys::socket::setsockopt(
        &replica,
        nix::sys::socket::sockopt::RcvBufForce,
        &(16 << 20),
    )
    .unwrap();
    replica
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();

    // The source's log after the checkpoint position: inputs 1..=2000.
    let records: Vec<Record> = (1..=2000).map(|seq| logged_input(flow_id, seq)).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let replayed = hosts
        .src
        .run(|| {
            runtime.block_on(async {
                let (mut link, _) = peer::connect("198.51.100.2:7070".parse().unwrap()).await?;
                peer::replay::send(&mut link, &records).await
            })
        })
        .unwrap();
    assert_eq!(replayed.inputs, 2000);
    println!(
        "replayed {} inputs at {:.0}/s",
        replayed.inputs,
        replayed.rate()
    );
    let got = received(&replica);
    let expected: Vec<String> = (1..=2000).map(|seq| format!("input {seq}")).collect();
    assert_eq!(got.len(), 2000, "every replayed input reached the instance");
    assert!(got == expected, "in sequence order");
    assert_eq!(
        Dataplane::open(&hosts.pin_root("dst"))
            .unwrap()
            .gate(flow_id)
            .unwrap()
            .next_expected,
        2001
    );
}

/// The frame of input `seq`: UDP from the CPS to the service, "input SEQ".
fn input_frame(seq: u64) -> Vec<u8> {
    udp_frame(CPS_MAC, None, 5000, format!("input {seq}").as_bytes())
}

/// Input `seq` of `flow_id` as a log record holds it.
fn logged_input(flow_id: u32, seq: u64) -> dataplane_user::Record {
    let frame = input_frame(seq);
    dataplane_user::Record {
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
        let meta = dataplane_common::CaptureMeta {
            flow_id,
            seq,
            ..Default::default()
        };
        let inner = input_frame(seq);
        let headers = dataplane_common::mirror_headers(&self.config, &meta, inner.len() as u32);
        self.socket.send(&[headers.as_slice(), &inner].concat());
    }
}

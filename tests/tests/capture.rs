//! The kernel capture and mirror path on real veth devices in test hosts.
use std::{
    net::{SocketAddr, UdpSocket},
    thread,
    time::Duration,
};

use dataplane_common::{
    FLOW_STANDBY, GATE_HOLD_ALL, RECORD_INPUT, RECORD_MIRRORED, RECORD_OUTPUT, counter,
};
use dataplane_tests::{
    CPS_V4, CPS_V6, Loaded, SERVICE_V4, SERVICE_V6, TestHosts, sock, udp_payload,
};
use dataplane_user::kernel::{
    flow,
    loader::{LoadOptions, MAP_INPUTS, MAP_OUTPUTS},
    logs::Record,
};

/// The payload of input `i`: its number and filler, so byte-equality means something.
fn payload(i: u64) -> Vec<u8> {
    let mut p = format!("input {i:08} ").into_bytes();
    p.extend((0..24).map(|b| (i as u8).wrapping_mul(31).wrapping_add(b)));
    p
}

/// Sends `count` inputs from `cps` to `service` inside the cps host, paced so
/// the service's socket keeps up, and returns what was sent.
fn send_inputs(
    hosts: &TestHosts,
    cps: SocketAddr,
    service: SocketAddr,
    count: u64,
) -> Vec<Vec<u8>> {
    let socket = hosts
        .cps
        .run(|| UdpSocket::bind(cps))
        .expect("bind the CPS socket");
    let sent: Vec<Vec<u8>> = (1..=count).map(payload).collect();
    for (i, p) in sent.iter().enumerate() {
        socket.send_to(p, service).expect("send an input");
        if i % 100 == 99 {
            thread::sleep(Duration::from_millis(1));
        }
    }
    sent
}

/// A service socket in `host` receiving up to `count` datagrams on a thread.
fn receive_on(
    host: &dataplane_tests::NetNs,
    service: SocketAddr,
    count: usize,
) -> thread::JoinHandle<Vec<Vec<u8>>> {
    let socket = host
        .run(|| UdpSocket::bind(service))
        .expect("bind the service socket");
    // Room for every input, so a reader thread starved on a busy machine loses none.
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBufForce, &(16 << 20))
        .expect("SO_RCVBUFFORCE (needs root)");
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while got.len() < count {
            match socket.recv(&mut buf) {
                Ok(n) => got.push(buf[..n].to_vec()),
                Err(_) => break,
            }
        }
        got
    })
}

/// Checks that the service got exactly `sent`, in order, naming the first difference.
fn assert_delivered(got: &[Vec<u8>], sent: &[Vec<u8>], who: &str) {
    let first_difference = got.iter().zip(sent).position(|(g, s)| g != s);
    assert_eq!(
        first_difference, None,
        "{who}: an input changed or out of order"
    );
    assert_eq!(got.len(), sent.len(), "{who}: inputs delivered");
}

/// Checks that `records` are inputs 1..=sent.len() of `kind`, in order, with the sent payloads.
fn assert_log_matches(records: &[Record], kind: u32, sent: &[Vec<u8>]) {
    assert_eq!(records.len(), sent.len(), "records in the log");
    for (i, (record, payload)) in records.iter().zip(sent).enumerate() {
        assert_eq!(
            record.header.seq,
            i as u64 + 1,
            "sequence numbers are contiguous from 1"
        );
        assert_eq!(record.header.kind, kind);
        assert_eq!(record.header.captured_len as usize, record.frame.len());
        assert_eq!(
            record.header.frame_len as usize,
            record.frame.len(),
            "whole frames by default"
        );
        assert_eq!(
            &udp_payload(&record.frame),
            payload,
            "input {} is logged byte for byte",
            i + 1
        );
    }
}

#[test]
fn captures_10000_inputs_with_contiguous_numbers_and_exact_bytes() {
    let hosts = TestHosts::new("cap");
    let mut src = hosts.load_src();
    let (cps, service) = (sock(CPS_V4, 4000), sock(SERVICE_V4, 5000));
    src.dataplane.add_flow(flow::udp(cps, service), 0).unwrap();
    let service_rx = receive_on(&hosts.src, service, 10_000);
    let sent = send_inputs(&hosts, cps, service, 10_000);

    let records = src.read_inputs(sent.len());
    assert_log_matches(&records, RECORD_INPUT, &sent);
    assert!(
        records
            .windows(2)
            .all(|w| w[0].header.timestamp_ns <= w[1].header.timestamp_ns)
    );
    assert_delivered(&service_rx.join().unwrap(), &sent, "the service");
    let counters = src.dataplane.counters().unwrap();
    assert_eq!(counters.get(counter::CAPTURED), 10_000);
    assert_eq!(counters.get(counter::RING_FULL), 0);
    assert_eq!(src.dataplane.sequence(0).unwrap().last_seq, 10_000);
}

#[test]
fn captures_ipv6_inputs() {
    let hosts = TestHosts::new("v6");
    let mut src = hosts.load_src();
    let (cps, service) = (sock(CPS_V6, 4000), sock(SERVICE_V6, 5000));
    src.dataplane.add_flow(flow::udp(cps, service), 0).unwrap();
    let service_rx = receive_on(&hosts.src, service, 1000);
    let sent = send_inputs(&hosts, cps, service, 1000);
    assert_log_matches(&src.read_inputs(sent.len()), RECORD_INPUT, &sent);
    assert_delivered(&service_rx.join().unwrap(), &sent, "the service");
}

#[test]
fn mirrors_inputs_to_the_peer_with_their_numbers_and_bytes() {
    let hosts = TestHosts::new("mir");
    let mut src = hosts.load_src();
    let mut dst = hosts.load_dst();
    let (cps, service) = (sock(CPS_V4, 4000), sock(SERVICE_V4, 5000));
    let key = flow::udp(cps, service);
    src.add_mirrored_flow(key, &hosts.dst);
    let dst_flow = dst.dataplane.add_flow(key, 0).unwrap();
    let src_rx = receive_on(&hosts.src, service, 10_000);
    let dst_rx = receive_on(&hosts.dst, service, 10_000);
    let sent = send_inputs(&hosts, cps, service, 10_000);

    let src_log = src.read_inputs(sent.len());
    let dst_log = dst.read_inputs(sent.len());
    assert_log_matches(&src_log, RECORD_INPUT, &sent);
    assert_log_matches(&dst_log, RECORD_MIRRORED, &sent);
    for (s, d) in src_log.iter().zip(&dst_log) {
        assert_eq!(
            s.frame, d.frame,
            "input {} is mirrored byte for byte",
            s.header.seq
        );
        assert_eq!(
            s.header.timestamp_ns, d.header.timestamp_ns,
            "the capture time travels along"
        );
    }
    assert_delivered(&src_rx.join().unwrap(), &sent, "the primary");
    assert_delivered(&dst_rx.join().unwrap(), &sent, "deliver-all: the replica");
    let (sc, dc) = (
        src.dataplane.counters().unwrap(),
        dst.dataplane.counters().unwrap(),
    );
    assert_eq!(sc.get(counter::MIRRORED), 10_000);
    assert_eq!(sc.get(counter::MIRROR_ERRORS), 0);
    assert_eq!(dc.get(counter::MIRROR_RECEIVED), 10_000);
    assert_eq!(dc.get(counter::DELIVERED), 10_000);
    assert_eq!(
        dst.dataplane.sequence(dst_flow).unwrap().last_delivered,
        10_000
    );

    // Hold-all: logged at dst, not delivered.
    let hold = dataplane_common::Gate {
        mode: GATE_HOLD_ALL,
        ..Default::default()
    };
    dst.dataplane.set_gate(dst_flow, hold).unwrap();
    let dst_rx = receive_on(&hosts.dst, service, 1);
    let held = send_inputs(&hosts, cps, service, 100);
    let held_log = dst.read_inputs(held.len());
    assert_eq!(held_log.len(), 100);
    assert_eq!(held_log.first().unwrap().header.seq, 10_001);
    assert_eq!(held_log.last().unwrap().header.seq, 10_100);
    assert!(
        dst_rx.join().unwrap().is_empty(),
        "hold-all delivers nothing"
    );
    assert_eq!(dst.dataplane.counters().unwrap().get(counter::HELD), 100);
}

/// ... and under the id the flow has there: each host numbers its own
/// flow table.
#[test]
fn a_flow_mirrors_only_to_the_host_it_names_and_nowhere_without_one() {
    let hosts = TestHosts::new("mto");
    let mut src = hosts.load_src();
    let mut dst = hosts.load_dst();
    let (cps, service) = (sock(CPS_V4, 4000), sock(SERVICE_V4, 5000));
    let key = flow::udp(cps, service);
    // The flag alone, with no host named: the copies go nowhere, counted.
    src.dataplane
        .add_flow(key, dataplane_common::FLOW_MIRROR)
        .unwrap();
    // On dst the flow is its second: id 0 is another's.
    let other = flow::udp(cps, sock(SERVICE_V4, 5001));
    assert_eq!(dst.dataplane.add_flow(other, 0).unwrap(), 0);
    let dst_id = dst.dataplane.add_flow(key, 0).unwrap();
    let mirrored = |src: &Loaded, dst: &Loaded| {
        let (sc, dc) = (
            src.dataplane.counters().unwrap(),
            dst.dataplane.counters().unwrap(),
        );
        [
            sc.get(counter::MIRRORED),
            sc.get(counter::MIRROR_ERRORS),
            dc.get(counter::MIRROR_RECEIVED),
        ]
    };
    let src_rx = receive_on(&hosts.src, service, 100);
    let sent = send_inputs(&hosts, cps, service, 100);
    assert_delivered(&src_rx.join().unwrap(), &sent, "the primary");
    assert_eq!(mirrored(&src, &dst), [0, 100, 0], "nowhere to go");
    // Named: every copy reaches that host, logged there under its id.
    let target = dataplane_common::MirrorTarget {
        mac: TestHosts::mac(&hosts.dst, "peer0"),
        flow_id: dst_id,
        ..Default::default()
    };
    src.dataplane.mirror_flow(&key, Some(target)).unwrap();
    assert_eq!(src.dataplane.mirror_target(0).unwrap(), Some(target));
    send_inputs(&hosts, cps, service, 100);
    let logged = dst.read_inputs(100);
    assert_eq!(logged.len(), 100);
    assert!(logged.iter().all(|r| r.header.flow_id == dst_id));
    assert_eq!(mirrored(&src, &dst), [100, 100, 100]);
    // Stopped: no copy, no error.
    src.dataplane.mirror_flow(&key, None).unwrap();
    assert_eq!(src.dataplane.mirror_target(0).unwrap(), None);
    send_inputs(&hosts, cps, service, 100);
    assert_eq!(mirrored(&src, &dst), [100, 100, 100]);
}

#[test]
fn devmap_mode_mirrors_and_delivers_through_a_veth() {
    let hosts = TestHosts::new("dev");
    let options = LoadOptions {
        mirror_mode: hosts.add_delivery_veth(),
        ..hosts.src_options()
    };
    let mut src = Loaded::new(&hosts.src, &options);
    let mut dst = hosts.load_dst();
    let (cps, service) = (sock(CPS_V4, 4000), sock(SERVICE_V4, 5000));
    let key = flow::udp(cps, service);
    src.add_mirrored_flow(key, &hosts.dst);
    dst.dataplane.add_flow(key, 0).unwrap();
    let src_rx = receive_on(&hosts.src, service, 2000);
    let dst_rx = receive_on(&hosts.dst, service, 2000);
    let sent = send_inputs(&hosts, cps, service, 2000);

    assert_log_matches(&src.read_inputs(sent.len()), RECORD_INPUT, &sent);
    assert_log_matches(&dst.read_inputs(sent.len()), RECORD_MIRRORED, &sent);
    assert_delivered(&src_rx.join().unwrap(), &sent, "the primary, through svc1");
    assert_delivered(&dst_rx.join().unwrap(), &sent, "the replica");
    let counters = src.dataplane.counters().unwrap();
    assert_eq!(counters.get(counter::MIRRORED), 2000);
    assert_eq!(counters.get(counter::MIRROR_ERRORS), 0);
}

#[test]
fn a_standby_takes_mirror_copies_only_on_the_link_it_is_told_they_arrive_on() {
    let hosts = TestHosts::new("stb");
    let standby_ns = hosts.add_standby();
    let options = LoadOptions {
        standby: Some(("stby0".into(), TestHosts::mac(&standby_ns, "eth0"))),
        ..hosts.src_options()
    };
    let mut src = Loaded::new(&hosts.src, &options);
    let (cps, service) = (sock(CPS_V4, 4000), sock(SERVICE_V4, 5000));
    let key = flow::udp(cps, service);
    src.dataplane.add_flow(key, FLOW_STANDBY).unwrap();
    // A standby's dataplane has no peer interface: its copies arrive on its
    // service interface, which only `mirror_from` makes a mirror link.
    for (mirror_from, first) in [(None, 1), (Some("eth0".to_string()), 101)] {
        let options = LoadOptions {
            mirror_from: mirror_from.clone(),
            ..hosts.standby_options()
        };
        let mut standby = Loaded::new(&standby_ns, &options);
        standby.dataplane.add_flow(key, 0).unwrap();
        let sent = send_inputs(&hosts, cps, service, 100);
        if mirror_from.is_some() {
            let records = standby.read_inputs(sent.len());
            let seqs: Vec<u64> = records.iter().map(|r| r.header.seq).collect();
            assert_eq!(seqs, (first..first + 100).collect::<Vec<_>>());
            assert!(records.iter().all(|r| r.header.kind == RECORD_MIRRORED));
            continue;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while standby
            .dataplane
            .counters()
            .unwrap()
            .get(counter::MIRROR_FOREIGN)
            < 100
        {
            assert!(
                std::time::Instant::now() < deadline,
                "copies counted foreign"
            );
            thread::sleep(Duration::from_millis(10));
        }
        let counters = standby.dataplane.counters().unwrap();
        assert_eq!(counters.get(counter::MIRROR_RECEIVED), 0);
        assert_eq!(standby.dataplane.sequence(0).unwrap().last_seq, 0);
        let mut log = standby.dataplane.open_log(MAP_INPUTS).unwrap();
        assert!(log.next().is_none(), "nothing logged");
    }
    assert_eq!(
        src.dataplane.counters().unwrap().get(counter::MIRRORED),
        200
    );
}

/// A UDP socket in `host` bound to `addr` with SO_REUSEPORT, so that several
/// sockets can send on one 5-tuple.
fn reuseport_socket(host: &dataplane_tests::NetNs, addr: SocketAddr) -> UdpSocket {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, setsockopt, socket, sockopt,
    };
    host.run(|| {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::empty(),
            None,
        )
        .expect("socket");
        setsockopt(&fd, sockopt::ReusePort, &true).expect("SO_REUSEPORT");
        let SocketAddr::V4(v4) = addr else {
            panic!("IPv4 only")
        };
        bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(v4)).expect("bind");
        UdpSocket::from(fd)
    })
}

#[test]
fn numbers_stay_contiguous_when_one_flow_arrives_on_both_cpus() {
    let hosts = TestHosts::new("cpus");
    let mut src = hosts.load_src();
    let (cps, service) = (sock(CPS_V4, 4000), sock(SERVICE_V4, 5000));
    src.dataplane.add_flow(flow::udp(cps, service), 0).unwrap();
    let service_rx = receive_on(&hosts.src, service, 10_000);
    let senders: Vec<UdpSocket> = (0..2).map(|_| reuseport_socket(&hosts.cps, cps)).collect();
    // A veth delivers on the sending CPU: one sender pinned to each CPU makes
    // the XDP program number one flow on both CPUs at once.
    thread::scope(|scope| {
        for (cpu, socket) in senders.iter().enumerate() {
            scope.spawn(move || {
                let mut set = nix::sched::CpuSet::new();
                set.set(cpu).unwrap();
                let pinned = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
                assert!(
                    pinned.is_ok(),
                    "pin a sender to CPU {cpu} (this test needs 2 CPUs)"
                );
                for i in 0..5_000u64 {
                    socket
                        .send_to(&payload(cpu as u64 * 100_000 + i), service)
                        .unwrap();
                    if i % 50 == 49 {
                        thread::sleep(Duration::from_micros(500));
                    }
                }
            });
        }
    });
    let per_cpu = src.dataplane.counter_per_cpu(counter::CAPTURED).unwrap();
    assert!(
        per_cpu.iter().filter(|&&n| n > 0).count() >= 2,
        "captured on both CPUs: {per_cpu:?}"
    );
    let records = src.read_inputs(10_000);
    let seqs: Vec<u64> = records.iter().map(|r| r.header.seq).collect();
    assert_eq!(
        seqs,
        (1..=10_000).collect::<Vec<_>>(),
        "every number once, none skipped"
    );
    let mut logged: Vec<Vec<u8>> = records.iter().map(|r| udp_payload(&r.frame)).collect();
    let mut sent: Vec<Vec<u8>> = (0..2u64)
        .flat_map(|cpu| (0..5_000).map(move |i| payload(cpu * 100_000 + i)))
        .collect();
    logged.sort();
    sent.sort();
    assert_eq!(logged, sent, "each input logged once");
    assert_eq!(service_rx.join().unwrap().len(), 10_000);
}

#[test]
fn snap_length_limits_the_logged_bytes() {
    let hosts = TestHosts::new("snap");
    let options = LoadOptions {
        snap_len: 42,
        ..hosts.src_options()
    };
    let mut src = Loaded::new(&hosts.src, &options);
    let (cps, service) = (sock(CPS_V4, 4000), sock(SERVICE_V4, 5000));
    src.dataplane.add_flow(flow::udp(cps, service), 0).unwrap();
    let sent = send_inputs(&hosts, cps, service, 100);
    let records = src.read_inputs(sent.len());
    assert_eq!(records.len(), 100);
    for (r, p) in records.iter().zip(&sent) {
        assert_eq!(
            r.header.captured_len, 42,
            "Ethernet, IPv4 and UDP headers only"
        );
        assert_eq!(r.frame.len(), 42);
        assert_eq!(
            r.header.frame_len as usize,
            42 + p.len(),
            "the whole frame's length"
        );
    }
}

#[test]
fn logs_outputs_with_the_input_they_answer() {
    let hosts = TestHosts::new("out");
    let mut src = hosts.load_src();
    let (cps, service) = (sock(CPS_V4, 4000), sock(SERVICE_V4, 5000));
    src.dataplane.add_flow(flow::udp(cps, service), 0).unwrap();
    let server = hosts.src.run(|| UdpSocket::bind(service)).unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let echo = thread::spawn(move || {
        let mut buf = [0u8; 256];
        for _ in 0..100 {
            let (n, from) = server.recv_from(&mut buf).expect("an input");
            let reply = [b"re:".as_slice(), &buf[..n]].concat();
            server.send_to(&reply, from).unwrap();
        }
    });
    let client = hosts.cps.run(|| UdpSocket::bind(cps)).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 256];
    for i in 1..=100 {
        client.send_to(&payload(i), service).unwrap();
        client.recv(&mut buf).expect("the service answers");
    }
    echo.join().unwrap();
    let outputs = src.read_log(MAP_OUTPUTS, 100);
    assert_eq!(outputs.len(), 100);
    for (i, r) in outputs.iter().enumerate() {
        let input = i as u64 + 1;
        assert_eq!(r.header.kind, RECORD_OUTPUT);
        assert_eq!(r.header.seq, input, "output {input} follows input {input}");
        let expected = [b"re:".as_slice(), &payload(input)].concat();
        assert_eq!(udp_payload(&r.frame), expected);
    }
    assert_eq!(
        src.dataplane
            .counters()
            .unwrap()
            .get(counter::OUTPUT_CAPTURED),
        100
    );
}

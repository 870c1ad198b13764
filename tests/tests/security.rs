//! The daemon's two doors, as a hostile or careless client meets them: the
//! control socket (who may connect, request size, rate and connection
//! limits, malformed requests) and the peer link (sealed between listed keys).
//! Real daemon processes on the test hosts.
use std::{
    ffi::CString,
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    os::unix::{ffi::OsStrExt, fs::MetadataExt, net::UnixStream},
    path::Path,
    time::{Duration, Instant},
};

use dataplane_tests::{
    DST_PEER, DaemonProcess, MigrationSetup, SRC_PEER, TestHosts, dataplane_bin,
};
use dataplane_user::{
    control::{
        RpcError,
        client::ClientError,
        code,
        server::{MAX_LINE, MAX_SKIP},
    },
    migration::protocol::Step,
    peer,
    peer::{Peer, PeerError, Trust, frame},
};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

const STATUS: &[u8] = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"status\"}\n";

fn config(hosts: &TestHosts, host: &str, extra: &str) -> String {
    format!(
        "interface = \"eth0\"\npeer_interface = \"peer0\"\npin_root = \"{}\"\n\
         input_ring_mib = 8\noutput_ring_mib = 1\n{extra}",
        hosts.pin_root(host).display()
    )
}

fn rpc_error(result: Result<Value, ClientError>) -> RpcError {
    match result {
        Err(ClientError::Rpc(e)) => e,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

fn connect(socket: &Path) -> (UnixStream, BufReader<UnixStream>) {
    let stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let reader = BufReader::new(stream.try_clone().unwrap());
    (stream, reader)
}

fn reply(reader: &mut BufReader<UnixStream>) -> Value {
    let mut line = String::new();
    reader.read_line(&mut line).expect("a reply line");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
}

fn error_code(reply: &Value) -> i64 {
    reply["error"]["code"].as_i64().unwrap_or(0)
}

/// Waits until the daemon's log contains `what`.
fn wait_log(daemon: &DaemonProcess, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = daemon.log();
        if log.contains(what) {
            return log;
        }
        assert!(Instant::now() < deadline, "no {what:?} in the log:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn oversized_and_malformed_requests_get_errors_and_the_daemon_keeps_serving() {
    let hosts = TestHosts::new("sbad");
    let daemon = DaemonProcess::start(&hosts.src, "sbad", &config(&hosts, "src", ""));
    let (mut stream, mut reader) = connect(&daemon.socket);

    // Exactly MAX_LINE bytes is a request; one more is not, and the next
    // request on the same connection is answered.
    let head = br#"{"jsonrpc":"2.0","id":1,"method":"status","pad":""#;
    let mut exact = head.to_vec();
    exact.resize(MAX_LINE - 2, b'p');
    exact.extend_from_slice(b"\"}");
    assert_eq!(exact.len(), MAX_LINE);
    stream.write_all(&exact).unwrap();
    stream.write_all(b"\n").unwrap();
    assert!(reply(&mut reader)["result"]["version"].is_string());
    let mut over = exact.clone();
    over.insert(head.len(), b'p');
    stream.write_all(&over).unwrap();
    stream.write_all(b"\n").unwrap();
    let too_long = reply(&mut reader);
    assert_eq!(error_code(&too_long), code::INVALID_REQUEST, "{too_long}");
    assert!(
        too_long["error"]["message"]
            .as_str()
            .unwrap()
            .contains("65536"),
        "{too_long}"
    );
    stream.write_all(STATUS).unwrap();
    assert!(reply(&mut reader)["result"]["version"].is_string());

    // Garbage, invalid JSON, and well-formed requests of the wrong shapes.
    let deep = "[".repeat(10_000);
    let cases: &[(&[u8], i64)] = &[
        (b"\xff\xfe\x00\x01garbage", code::PARSE_ERROR),
        (b"{", code::PARSE_ERROR),
        (deep.as_bytes(), code::PARSE_ERROR),
        (br#"{"jsonrpc":"2.0","id":1e999,"method":"status"}"#, code::PARSE_ERROR),
        (b"[]", code::INVALID_REQUEST),
        (b"null", code::INVALID_REQUEST),
        (b"42", code::INVALID_REQUEST),
        (br#"{"jsonrpc":"2.0","id":2}"#, code::INVALID_REQUEST),
        (br#"{"jsonrpc":"2.0","id":3,"method":5}"#, code::INVALID_REQUEST),
        (br#"{"jsonrpc":2,"id":4,"method":"status"}"#, code::INVALID_REQUEST),
        (br#"{"jsonrpc":"2.0","id":5,"method":"flow.add","params":[1,2]}"#, code::INVALID_PARAMS),
        (
            br#"{"jsonrpc":"2.0","id":6,"method":"flow.add","params":{"cps":"192.0.2.1:4000","service":"192.0.2.10:5000","mirror":"yes"}}"#,
            code::INVALID_PARAMS,
        ),
        (
            br#"{"jsonrpc":"2.0","id":7,"method":"service.register","params":{"name":"x","pid":-1,"flows":[]}}"#,
            code::INVALID_PARAMS,
        ),
        (
            br#"{"jsonrpc":"2.0","id":8,"method":"flow.add","params":{"cps":"../../etc/passwd","service":"x"}}"#,
            code::INVALID_PARAMS,
        ),
        (br#"{"jsonrpc":"2.0","id":9,"method":"peer.ping","params":{"address":"x"}}"#, code::INVALID_PARAMS),
        (br#"{"jsonrpc":"2.0","id":10,"method":"../status"}"#, code::METHOD_NOT_FOUND),
    ];
    for (line, _) in cases {
        stream.write_all(line).unwrap();
        stream.write_all(b"\n").unwrap();
    }
    for (line, expected) in cases {
        let got = reply(&mut reader);
        assert_eq!(
            error_code(&got),
            *expected,
            "{}: {got}",
            String::from_utf8_lossy(&line[..line.len().min(60)])
        );
    }
    stream.write_all(STATUS).unwrap();
    assert!(reply(&mut reader)["result"]["version"].is_string());

    // A line with no end: an error, then the connection is closed before
    // the daemon has read all of it.
    let (mut endless, mut endless_reader) = connect(&daemon.socket);
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 64 << 10];
        let mut sent = 0;
        while sent < 2 * MAX_SKIP {
            if endless.write_all(&chunk).is_err() {
                return sent;
            }
            sent += chunk.len();
        }
        sent
    });
    let got = reply(&mut endless_reader);
    assert_eq!(error_code(&got), code::INVALID_REQUEST, "{got}");
    // Closed: an end of file, or a reset (the daemon left data unread).
    let mut rest = Vec::new();
    match endless_reader.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty()),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
    let sent = writer.join().unwrap();
    assert!(sent < 2 * MAX_SKIP, "the daemon kept reading: {sent} bytes");

    // Still serving, on a new connection and the old one.
    let mut c = daemon.client();
    assert!(c.call("status", json!({})).is_ok());
    stream.write_all(STATUS).unwrap();
    assert!(reply(&mut reader)["result"]["version"].is_string());
}

#[test]
fn a_flood_is_rate_limited_and_the_daemon_keeps_serving() {
    let hosts = TestHosts::new("sflood");
    // The defaults: 100 requests a second, bursts of 200.
    let daemon = DaemonProcess::start(&hosts.src, "sflood", &config(&hosts, "src", ""));
    let (mut stream, mut reader) = connect(&daemon.socket);
    const FLOOD: u64 = 1000;
    let start = Instant::now();
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut all = Vec::new();
            for id in 1..=FLOOD {
                all.extend_from_slice(
                    format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"status\"}}\n")
                        .as_bytes(),
                );
            }
            stream.write_all(&all).unwrap();
        })
    };
    let replies: Vec<Value> = (0..FLOOD).map(|_| reply(&mut reader)).collect();
    let elapsed = start.elapsed();
    writer.join().unwrap();
    let ids: Vec<u64> = replies.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(
        ids,
        (1..=FLOOD).collect::<Vec<_>>(),
        "every request answered, in order"
    );
    let answered = replies.iter().filter(|r| r["result"].is_object()).count() as u64;
    let limited: Vec<&Value> = replies
        .iter()
        .filter(|r| error_code(r) == code::RATE_LIMITED)
        .collect();
    assert_eq!(
        answered + limited.len() as u64,
        FLOOD,
        "only results and rate-limit errors"
    );
    assert!(
        replies[..200].iter().all(|r| r["result"].is_object()),
        "a burst of 200 passes"
    );
    let most = 200 + (100.0 * elapsed.as_secs_f64()).ceil() as u64 + 1;
    assert!(
        answered <= most,
        "{answered} answered in {elapsed:?}: over the rate"
    );
    let message = limited[0]["error"]["message"].as_str().unwrap();
    assert!(message.contains("rate limited"), "{message}");

    // Other connections are not limited by this one's flood.
    assert!(daemon.client().call("status", json!({})).is_ok());
    // And this one recovers after a pause.
    std::thread::sleep(Duration::from_millis(1100));
    stream.write_all(STATUS).unwrap();
    assert!(reply(&mut reader)["result"].is_object());
    let log = wait_log(&daemon, "rate limited");
    assert!(log.contains("uid=0"), "the log names the caller:\n{log}");
}

#[test]
fn connections_over_the_limit_are_refused_with_a_reason() {
    let hosts = TestHosts::new("sconn");
    let cfg = config(&hosts, "src", "socket_max_connections = 4\n");
    let daemon = DaemonProcess::start(&hosts.src, "sconn", &cfg);
    // The connections DaemonProcess::start probed with may still hold
    // places for a moment: take each place once it is free.
    let place = || {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut c = daemon.client();
            match c.call("status", json!({})) {
                Ok(_) => return c,
                Err(e) => assert!(Instant::now() < deadline, "{e}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut open: Vec<_> = (0..4).map(|_| place()).collect();
    let (_stream, mut reader) = connect(&daemon.socket);
    let refused = reply(&mut reader);
    assert_eq!(error_code(&refused), code::BUSY, "{refused}");
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).expect("closed");
    assert!(rest.is_empty());

    // Closing one frees its place.
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (mut stream, mut reader) = connect(&daemon.socket);
        // A connection still refused is closed at once: the request may
        // then meet a closed socket, and the reply read is the refusal.
        let _ = stream.write_all(STATUS);
        let got = reply(&mut reader);
        if got["result"].is_object() {
            break;
        }
        assert_eq!(error_code(&got), code::BUSY, "{got}");
        assert!(Instant::now() < deadline, "no place freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_log(&daemon, "refused a control connection");
}

/// Forks a child that takes `uid` and `gid` (no other groups), connects to
/// `socket` and sends `request`: its exit code is 0 if it got a result, 13
/// if connecting was refused with EACCES, 2 for another reply, 1 otherwise.
fn request_as(socket: &Path, uid: u32, gid: u32, request: &[u8]) -> i32 {
    // Everything the child needs is made before the fork: it only makes
    // system calls.
    let path = CString::new(socket.as_os_str().as_bytes()).unwrap();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid start.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_bytes_with_nul();
    assert!(bytes.len() <= addr.sun_path.len());
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let mut buf = [0u8; 4096];
    let result = b"\"result\"";
    // SAFETY: the child only calls async-signal-safe functions and _exit.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        // SAFETY: the same; the calls below are libc's, on valid pointers.
        nix::unistd::ForkResult::Child => unsafe {
            let code = (|| {
                libc::alarm(10);
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                    || libc::getuid() != uid
                {
                    return 1;
                }
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                if libc::connect(fd, (&raw const addr).cast(), len) != 0 {
                    return if *libc::__errno_location() == libc::EACCES {
                        13
                    } else {
                        1
                    };
                }
                if libc::write(fd, request.as_ptr().cast(), request.len()) != request.len() as isize
                {
                    return 1;
                }
                let mut got = 0usize;
                while got < buf.len() {
                    let n = libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got);
                    if n <= 0 {
                        break;
                    }
                    got += n as usize;
                    if buf[..got].contains(&b'\n') {
                        break;
                    }
                }
                if buf[..got].windows(result.len()).any(|w| w == result) {
                    0
                } else {
                    2
                }
            })();
            libc::_exit(code)
        },
        nix::unistd::ForkResult::Parent { child } => {
            match nix::sys::wait::waitpid(child, None).expect("wait for the child") {
                nix::sys::wait::WaitStatus::Exited(_, code) => code,
                other => panic!("the child did not exit: {other:?}"),
            }
        }
    }
}

#[test]
fn only_root_and_the_socket_group_may_connect_and_callers_are_logged() {
    let hosts = TestHosts::new("sperm");
    // Debian's base system has the group "nogroup" (65534) and the user "nobody" (65534).
    let group = nix::unistd::Group::from_name("nogroup")
        .unwrap()
        .expect("the group nogroup")
        .gid
        .as_raw();
    let cfg = config(&hosts, "src", "socket_group = \"nogroup\"\n");
    let daemon = DaemonProcess::start(&hosts.src, "sperm", &cfg);
    let meta = std::fs::metadata(&daemon.socket).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, group));
    let dir = std::fs::metadata(daemon.socket.parent().unwrap()).unwrap();
    assert_eq!(
        dir.mode() & 0o005,
        0o005,
        "others may reach the socket file: its mode decides"
    );

    let nobody = 65534;
    assert_eq!(
        request_as(&daemon.socket, nobody, 65533, STATUS),
        13,
        "a user outside the group is refused at connect"
    );
    let add = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"flow.add\",\
        \"params\":{\"cps\":\"192.0.2.1:4000\",\"service\":\"192.0.2.10:5000\"}}\n";
    assert_eq!(
        request_as(&daemon.socket, nobody, group, add),
        0,
        "a member of socket_group may connect and change state"
    );
    // The state-changing request is logged with the caller's credentials.
    let log = wait_log(&daemon, "uid=65534");
    let line = log
        .lines()
        .find(|l| l.contains("uid=65534"))
        .unwrap()
        .to_string();
    assert!(
        line.contains("flow.add")
            && line.contains(&format!("gid={group}"))
            && line.contains("pid="),
        "{line}"
    );
    // Read-only requests are not logged; root's state changes are.
    let mut c = daemon.client();
    c.call("flow.list", json!({})).unwrap();
    c.call(
        "flow.remove",
        json!({"cps": "192.0.2.1:4000", "service": "192.0.2.10:5000"}),
    )
    .unwrap();
    let log = wait_log(&daemon, "flow.remove");
    assert!(!log.contains("method=flow.list"), "{log}");
    let line = log.lines().find(|l| l.contains("flow.remove")).unwrap();
    assert!(line.contains("uid=0") && line.contains("gid=0"), "{line}");
}

/// The value of `key` in the systemd unit `unit`, if it is set.
fn unit_setting(unit: &str, key: &str) -> Option<String> {
    let prefix = format!("{key}=");
    unit.lines()
        .find_map(|line| line.trim().strip_prefix(&prefix).map(str::to_string))
}

#[test]
fn a_socket_group_member_reaches_the_socket_in_the_runtime_directory_the_unit_makes() {
    // The runtime directory as systemd makes it for the shipped unit: its
    // RuntimeDirectory under /run (here under a directory of the test's),
    // with RuntimeDirectoryMode, owned by the unit's User= and Group=
    // (root without them). The daemon's default socket is in it.
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../dist/dataplane.service"
    ))
    .unwrap();
    let name = unit_setting(&unit, "RuntimeDirectory").expect("the unit makes a runtime directory");
    assert_eq!(
        Path::new(dataplane_user::config::DEFAULT_SOCKET).parent(),
        Some(Path::new("/run").join(&name).as_path()),
        "the default socket is in the unit's runtime directory"
    );
    // systemd's default mode, when the unit sets none.
    let mode = unit_setting(&unit, "RuntimeDirectoryMode").unwrap_or("0755".into());
    let mode = u32::from_str_radix(&mode, 8).expect("an octal mode");
    assert_eq!(
        (unit_setting(&unit, "User"), unit_setting(&unit, "Group")),
        (None, None),
        "the unit runs as root: its runtime directory is root's"
    );
    let run = std::env::temp_dir().join(format!("dataplane-run-{}", std::process::id()));
    let runtime = run.join(&name);
    std::fs::create_dir_all(&runtime).unwrap();
    std::fs::set_permissions(&runtime, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    nix::unistd::chown(&runtime, Some(0.into()), Some(0.into())).unwrap();

    let hosts = TestHosts::new("unit");
    let cfg = config(&hosts, "src", "socket_group = \"nogroup\"\n");
    let daemon = DaemonProcess::start_with_socket(
        &hosts.src,
        "unit",
        &cfg,
        Some(runtime.join("dataplane.sock")),
    );
    let group = nix::unistd::Group::from_name("nogroup")
        .unwrap()
        .expect("the group nogroup")
        .gid
        .as_raw();
    let nobody = 65534;
    let member = request_as(&daemon.socket, nobody, group, STATUS);
    let stranger = request_as(&daemon.socket, nobody, 65533, STATUS);
    drop(daemon);
    let _ = std::fs::remove_dir_all(&run);
    assert_eq!(
        member, 0,
        "a member of socket_group connects through the runtime directory (mode {mode:o})"
    );
    assert_eq!(stranger, 13, "a user outside the group is refused");
}

/// A peer-link frame: length, type, payload.
fn peer_frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
    out.push(kind);
    out.extend_from_slice(payload);
    out
}

/// Every frame the other end sends until it closes (or 10 s pass).
fn frames_until_closed(stream: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut all = Vec::new();
    let _ = stream.read_to_end(&mut all);
    let mut frames = Vec::new();
    let mut rest = &all[..];
    while rest.len() >= 5 {
        let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        let end = (4 + len).min(rest.len());
        frames.push((rest[4], rest[5..end].to_vec()));
        rest = &rest[end..];
    }
    frames
}

fn refusal(frames: &[(u8, Vec<u8>)]) -> String {
    match frames.last() {
        Some((kind, reason)) if *kind == frame::REFUSE => String::from_utf8_lossy(reason).into(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The test hosts' daemons as a migration has them: src lists dst, dst
/// listens and lists src, each by its key; `dst_extra` goes into dst's
/// configuration, and `dst_lists` is whom it lists as src.
fn linked_daemons(
    hosts: &TestHosts,
    tag: &str,
    dst_lists: &str,
    dst_extra: &str,
) -> (DaemonProcess, DaemonProcess) {
    let src = DaemonProcess::start(
        &hosts.src,
        &format!("{tag}-src"),
        &config(
            hosts,
            "src",
            &hosts.peer_config("src", &[("dst", DST_PEER)]),
        ),
    );
    let dst = start_dst(hosts, tag, dst_lists, dst_extra);
    (src, dst)
}

fn start_dst(hosts: &TestHosts, tag: &str, lists: &str, extra: &str) -> DaemonProcess {
    let peers = if extra.contains("peer_insecure") {
        format!("peers = [{{ name = \"src\", address = \"{SRC_PEER}\" }}]\n")
    } else {
        hosts.peer_config("dst", &[(lists, SRC_PEER)])
    };
    let listen = format!("peer_listen = \"{DST_PEER}\"\n{peers}{extra}");
    DaemonProcess::start(
        &hosts.dst,
        &format!("{tag}-dst"),
        &config(hosts, "dst", &listen),
    )
}

#[test]
fn daemons_link_sealed_with_listed_keys_only() {
    let hosts = TestHosts::new("skey");
    let (src, dst) = linked_daemons(&hosts, "skey", "src", "");
    let mut c = src.client();
    let ping = c.call("peer.ping", json!({"address": DST_PEER})).unwrap();
    assert_eq!(ping["version"], peer::VERSION);
    for (daemon, host) in [(&src, "src"), (&dst, "dst")] {
        let status = daemon.client().call("status", json!({})).unwrap();
        let key = hosts.identity(host).1.public().to_string();
        assert_eq!(status["peer_key"], key.as_str());
    }
    let log = wait_log(&dst, "peer link up");
    let line = log.lines().find(|l| l.contains("peer link up")).unwrap();
    assert!(
        line.contains("sealed=true") && line.contains("peer=src"),
        "{line}"
    );
    let key_mode = std::fs::metadata(hosts.identity("src").0).unwrap().mode() & 0o777;
    assert_eq!(key_mode, 0o600);

    // Only listed peers are destinations: a socket-group member cannot send
    // a service, or a ping, anywhere else.
    let flow = json!({"cps": "192.0.2.1:4000", "service": "192.0.2.10:5000"});
    c.call("flow.add", flow.clone()).unwrap();
    let service = json!({"name": "plc", "pid": std::process::id(), "netns": hosts.src.path(),
        "flows": [flow]});
    c.call("service.register", service).unwrap();
    for elsewhere in ["198.51.100.2:7071", "192.0.2.1:7070"] {
        let refused = rpc_error(c.call(
            "migration.start",
            json!({"service": "plc", "to": elsewhere}),
        ));
        assert_eq!(refused.code, code::INVALID_PARAMS, "{refused}");
        assert!(refused.message.contains("not a listed peer"), "{refused}");
        let refused = rpc_error(c.call("peer.ping", json!({"address": elsewhere})));
        assert!(refused.message.contains("not a listed peer"), "{refused}");
    }
    let status = c.call("status", json!({})).unwrap();
    assert_eq!(status["migrations"], json!([]), "nothing started");

    // dst lists another key as src: refused both ways, and both say why.
    dst.stop(Signal::SIGTERM);
    let dst = start_dst(&hosts, "skey", "mallory", "");
    let src_key = hosts.identity("src").1.public().to_string();
    let refused = rpc_error(c.call("peer.ping", json!({"address": DST_PEER})));
    assert_eq!(refused.code, code::PEER, "{refused}");
    assert!(
        refused.message.contains("not among") && refused.message.contains(&src_key),
        "{refused}"
    );
    let log = wait_log(&dst, "refused a peer link");
    let line = log
        .lines()
        .find(|l| l.contains("refused a peer link"))
        .unwrap();
    assert!(
        line.contains("198.51.100.1") && line.contains(&src_key),
        "{line}"
    );

    // A migration to it fails in prepare, and its report says why.
    let id = c
        .call("migration.start", json!({"service": "plc", "to": DST_PEER}))
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    let report = loop {
        let report = c.call("migration.status", json!({"id": id})).unwrap();
        if report["state"] != "running" {
            break report;
        }
        assert!(Instant::now() < deadline, "still running: {report}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(report["state"], "failed");
    let error = report["error"].as_str().unwrap();
    assert!(
        error.starts_with("prepare:") && error.contains("not among"),
        "{error}"
    );
    assert_eq!(
        dst.client().call("flow.list", json!({})).unwrap(),
        json!([]),
        "dst adopted nothing"
    );

    // A host that answers at dst's address without dst's key is refused
    // by the connector.
    let rt = runtime();
    let imposter = Trust::sealed(
        hosts.identity("src").1,
        vec![Peer {
            name: "dst".into(),
            address: DST_PEER.parse().unwrap(),
            key: Some(hosts.identity("somebody-else").1.public()),
        }],
    );
    let refused = hosts
        .src
        .run(|| rt.block_on(peer::connect(&imposter, DST_PEER.parse().unwrap())));
    match refused {
        Err(PeerError::Auth(reason)) => assert!(reason.contains("not the key"), "{reason}"),
        other => panic!(
            "expected an authentication failure, got {:?}",
            other.map(|_| ())
        ),
    }

    // A sealed daemon and an insecure one refuse each other, saying so.
    dst.stop(Signal::SIGTERM);
    let dst = start_dst(&hosts, "skey", "src", "peer_insecure = true\n");
    wait_log(&dst, "peer_insecure: peer links cross in clear");
    let refused = rpc_error(c.call("peer.ping", json!({"address": DST_PEER})));
    assert!(refused.message.contains("peer_insecure"), "{refused}");
    let status = dst.client().call("status", json!({})).unwrap();
    assert_eq!(status["peer_key"], Value::Null);
}

#[test]
fn a_listening_daemon_without_peers_refuses_to_start() {
    let dir = std::env::temp_dir().join(format!("dataplane-nopeers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dataplane.toml");
    std::fs::write(
        &path,
        "interface = \"eth0\"\npeer_listen = \"127.0.0.1:7070\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(dataplane_bin())
        .args(["daemon", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("peer_listen needs the hosts it admits listed"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn nothing_a_peer_without_a_listed_key_sends_is_acted_on() {
    let hosts = TestHosts::new("sjunk");
    let dst = start_dst(&hosts, "sjunk", "src", "");
    let prepare = json!({"step": "prepare", "migration": "evil", "service": "evil",
        "deadline_ms": 10_000,
        "flows": [{"cps": "192.0.2.1:4000", "service": "192.0.2.10:5000"}]});
    let prepare = peer_frame(frame::MIGRATE, prepare.to_string().as_bytes());
    let hello = |sealed: bool| {
        let hello = json!({"magic": peer::MAGIC, "version": peer::VERSION, "host": "mallory",
            "sealed": sealed});
        peer_frame(frame::HELLO, hello.to_string().as_bytes())
    };
    type Answer<'a> = &'a dyn Fn(&[(u8, Vec<u8>)]) -> Vec<Vec<u8>>;
    // Sends `bytes`; with `then`, reads the welcome and sends what `then`
    // makes of it; every frame the daemon sent until it closed.
    let talk = |bytes: &[Vec<u8>], then: Option<Answer>| {
        hosts.src.run(|| {
            let mut stream = TcpStream::connect(DST_PEER).unwrap();
            for b in bytes {
                stream.write_all(b).unwrap();
            }
            let Some(then) = then else {
                return frames_until_closed(&mut stream);
            };
            let welcome = [read_frame(&mut stream)];
            for b in then(&welcome) {
                let _ = stream.write_all(&b);
            }
            let mut frames = welcome.to_vec();
            frames.extend(frames_until_closed(&mut stream));
            frames
        })
    };

    // Asking for a link in clear: refused at the hello, the step behind it ignored.
    let frames = talk(&[hello(false), prepare.clone()], None);
    assert!(refusal(&frames).contains("peer_insecure"), "{frames:?}");

    // Skipping the handshake: a ping, then the step.
    let skip = |welcome: &[(u8, Vec<u8>)]| {
        assert_eq!(welcome[0].0, frame::WELCOME);
        vec![peer_frame(frame::PING, &[]), prepare.clone()]
    };
    let frames = talk(&[hello(true)], Some(&skip as Answer));
    assert!(!frames.iter().any(|(k, _)| *k == frame::PONG), "{frames:?}");
    assert!(refusal(&frames).contains("in the handshake"), "{frames:?}");

    // A first handshake message is any 32 bytes; a forged third is refused.
    let forge = |_: &[(u8, Vec<u8>)]| {
        vec![
            peer_frame(frame::NOISE, &[7; 32]),
            peer_frame(frame::NOISE, &[9; 64]),
            prepare.clone(),
        ]
    };
    let frames = talk(&[hello(true)], Some(&forge as Answer));
    assert!(
        frames
            .iter()
            .any(|(k, m)| *k == frame::NOISE && m.len() == 96),
        "{frames:?}"
    );
    assert!(refusal(&frames).contains("handshake:"), "{frames:?}");

    // The step alone, and junk.
    let frames = talk(std::slice::from_ref(&prepare), None);
    assert!(refusal(&frames).contains("before a hello"), "{frames:?}");
    let mut junk: Vec<u8> = (0u32..512)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    junk[..4].copy_from_slice(&40u32.to_be_bytes());
    for _ in 0..20 {
        let frames = talk(std::slice::from_ref(&junk), None);
        assert!(
            !frames.is_empty() && frames.last().unwrap().0 == frame::REFUSE,
            "{frames:?}"
        );
    }
    // A client that sends nothing is dropped after the handshake timeout.
    let start = Instant::now();
    let frames = talk(&[], None);
    let waited = start.elapsed();
    assert!(refusal(&frames).contains("no handshake"), "{frames:?}");
    assert!(
        waited < peer::HANDSHAKE_TIMEOUT + Duration::from_secs(3),
        "{waited:?}"
    );

    // A well-formed handshake with a key dst does not list.
    let rt = runtime();
    let mallory = hosts.trust("mallory", &[("dst", DST_PEER)]);
    let refused = hosts
        .src
        .run(|| rt.block_on(peer::connect(&mallory, DST_PEER.parse().unwrap())));
    match refused {
        Err(PeerError::Refused(reason)) => assert!(reason.contains("not among"), "{reason}"),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }

    assert_eq!(
        dst.client().call("flow.list", json!({})).unwrap(),
        json!([]),
        "nothing was acted on"
    );
    let log = dst.log();
    assert!(
        log.lines()
            .filter(|l| l.contains("refused a peer link") && l.contains("198.51.100.1"))
            .count()
            >= 25,
        "every refusal is logged with the address:\n{log}"
    );
    assert!(!log.contains("preparing a migration"), "{log}");

    // The daemon still serves its listed peer; what it sends is acted on.
    let src = hosts.trust("src", &[("dst", DST_PEER)]);
    let (prepared, flows) = hosts
        .src
        .run(|| {
            rt.block_on(async {
                let (mut link, _) = peer::connect(&src, DST_PEER.parse().unwrap()).await?;
                peer::ping(&mut link).await?;
                let prepared = step(&mut link, prepare_step("m1", CPS, SERVICE, 10_000)).await;
                let flows = dst.client().call("flow.list", json!({})).unwrap();
                let _ = step(&mut link, json!({"step": "abort"})).await;
                Ok::<_, PeerError>((prepared, flows))
            })
        })
        .unwrap();
    let prepared = prepared.expect("the listed peer's prepare");
    assert_eq!(
        (&flows[0]["id"], &flows[0]["service"]),
        (&prepared["flow_ids"][0], &json!(SERVICE)),
        "the listed peer's prepare adopted the flow: {flows}"
    );
}

/// One whole frame from `stream` (5 s at most).
fn read_frame(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).unwrap();
    let mut payload = vec![0; u32::from_be_bytes(head[..4].try_into().unwrap()) as usize - 1];
    stream.read_exact(&mut payload).unwrap();
    (head[4], payload)
}

/// A relay between a connector and dst that keeps every byte either way and
/// may flip one bit of what goes to dst: the first of the byte at `flip`.
struct Relay {
    address: String,
    /// Every byte from the connector, and from dst.
    seen: std::sync::Arc<std::sync::Mutex<(Vec<u8>, Vec<u8>)>>,
}

impl Relay {
    /// Listens on `address` in src; relays one connection to dst's peer link.
    fn start(hosts: &TestHosts, address: &str, flip: Option<usize>) -> Self {
        use std::sync::{Arc, Mutex};
        let listener = hosts
            .src
            .run(|| std::net::TcpListener::bind(address))
            .unwrap();
        let upstream = hosts.src.run(|| TcpStream::connect(DST_PEER)).unwrap();
        let seen = Arc::new(Mutex::new((Vec::new(), Vec::new())));
        let relay = Self {
            address: address.into(),
            seen: seen.clone(),
        };
        std::thread::spawn(move || {
            let Ok((client, _)) = listener.accept() else {
                return;
            };
            let pipe = |mut from: TcpStream, mut to: TcpStream, up: bool| {
                let seen = seen.clone();
                std::thread::spawn(move || {
                    from.set_read_timeout(Some(Duration::from_secs(20)))
                        .unwrap();
                    let mut buf = [0; 65536];
                    let mut offset = 0;
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let mut chunk = buf[..n].to_vec();
                        let mut seen = seen.lock().unwrap();
                        if up {
                            seen.0.extend_from_slice(&chunk);
                            if let Some(at) = flip.filter(|at| (offset..offset + n).contains(at)) {
                                chunk[at - offset] ^= 1;
                            }
                        } else {
                            seen.1.extend_from_slice(&chunk);
                        }
                        drop(seen);
                        offset += n;
                        if to.write_all(&chunk).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                })
            };
            let a = pipe(
                client.try_clone().unwrap(),
                upstream.try_clone().unwrap(),
                true,
            );
            let b = pipe(upstream, client, false);
            let _ = (a.join(), b.join());
        });
        relay
    }
}

#[test]
fn a_relay_in_the_middle_reads_nothing_and_can_change_or_replay_nothing() {
    let hosts = TestHosts::new("srelay");
    let dst = start_dst(&hosts, "srelay", "src", "");
    let rt = runtime();
    let via = |relay: &Relay| {
        Trust::sealed(
            hosts.identity("src").1,
            vec![Peer {
                name: "dst".into(),
                address: relay.address.parse().unwrap(),
                key: Some(hosts.identity("dst").1.public()),
            }],
        )
    };
    let secret = "m-7f3e-only-the-two-ends-know";

    // Relayed as is: the link works end to end, and the relay saw only
    // ciphertext after the hellos.
    let relay = Relay::start(&hosts, "198.51.100.1:7101", None);
    let trust = via(&relay);
    let prepared = hosts.src.run(|| {
        rt.block_on(async {
            let (mut link, _) = peer::connect(&trust, relay.address.parse().unwrap()).await?;
            assert!(link.is_sealed());
            let prepared = step(&mut link, prepare_step(secret, CPS, SERVICE, 10_000)).await?;
            step(&mut link, json!({"step": "abort"})).await?;
            Ok::<_, PeerError>(prepared)
        })
    });
    assert!(prepared.is_ok(), "{prepared:?}");
    let handshake = relay.seen.lock().unwrap().clone();
    for (way, bytes) in [("to dst", &handshake.0), ("from dst", &handshake.1)] {
        assert!(!bytes.is_empty(), "{way}");
        let text = String::from_utf8_lossy(bytes);
        for clear in [secret, "prepare", "192.0.2.10"] {
            assert!(!text.contains(clear), "{clear:?} crossed {way} in clear");
        }
    }
    assert_eq!(
        dst.client().call("flow.list", json!({})).unwrap(),
        json!([])
    );

    // One bit changed after the handshake (the hello frame, the first Noise
    // message of 32 bytes, the third of 64): dst drops the link, acts on
    // nothing.
    let hello = serde_json::to_vec(&peer::Hello::ours(true)).unwrap().len();
    let sealed_from = (5 + hello) + (5 + 32) + (5 + 64);
    let relay = Relay::start(&hosts, "198.51.100.1:7102", Some(sealed_from + 10));
    let trust = via(&relay);
    let tampered = hosts.src.run(|| {
        rt.block_on(async {
            let (mut link, _) = peer::connect(&trust, relay.address.parse().unwrap()).await?;
            step(&mut link, prepare_step("tampered", CPS, SERVICE, 10_000)).await
        })
    });
    assert!(tampered.is_err(), "{tampered:?}");
    let log = wait_log(&dst, "did not open");
    assert!(!log.contains("tampered"), "{log}");

    // The captured connector bytes replayed on a new connection: a fresh
    // session, which the old handshake's last message cannot finish.
    let replayed = hosts.src.run(|| {
        let mut stream = TcpStream::connect(DST_PEER).unwrap();
        let _ = stream.write_all(&handshake.0);
        frames_until_closed(&mut stream)
    });
    assert!(refusal(&replayed).contains("handshake:"), "{replayed:?}");
    assert_eq!(
        dst.client().call("flow.list", json!({})).unwrap(),
        json!([]),
        "neither the tampered nor the replayed link adopted a flow"
    );
}

#[test]
fn the_migration_setup_daemons_link_sealed() {
    let setup = MigrationSetup::new("smig", &[], false);
    let ping = setup
        .src
        .client()
        .call("peer.ping", json!({"address": DST_PEER}))
        .unwrap();
    assert!(ping["rtt_us"].is_u64());
    for daemon in [&setup.src, &setup.dst] {
        let status = daemon.client().call("status", json!({})).unwrap();
        assert!(status["peer_key"].is_string(), "{status}");
    }
    assert!(wait_log(&setup.dst, "peer link up").contains("sealed=true"));
}

/// A peer link to the daemon at `DST_PEER` with `key`, opened as a source
/// daemon opens one: the one place these tests connect with a key.
/// A link to dst's daemon as src, the peer dst lists.
async fn listed_link(hosts: &TestHosts) -> Result<peer::Link, PeerError> {
    let trust = hosts.trust("src", &[("dst", DST_PEER)]);
    Ok(peer::connect(&trust, DST_PEER.parse().unwrap()).await?.0)
}

/// Sends one migration step, given as its JSON; the destination's answer.
async fn step(link: &mut peer::Link, step: Value) -> Result<Value, PeerError> {
    let step: Step = serde_json::from_value(step).unwrap();
    peer::migrate_step(link, &step).await
}

/// `prepare` of migration `id` for the flow `cps` -> `service`. The
/// service's name is "markov".
fn prepare_step(id: &str, cps: &str, service: &str, deadline_ms: u64) -> Value {
    json!({"step": "prepare", "migration": id, "service": "markov", "deadline_ms": deadline_ms,
        "flows": [{"cps": cps, "service": service}]})
}

/// The migrated flow of these tests, and its id.
const CPS: &str = "192.0.2.1:4000";
const SERVICE: &str = "192.0.2.10:5000";
/// A service of the destination's own, on its eth0 address.
const LOCAL_CPS: &str = "192.0.2.1:4001";
const LOCAL_SERVICE: &str = "192.0.2.20:6000";

/// Every step after `prepare`, each valid in its own turn for a migration
/// whose flow the destination numbered `flow_id`.
fn later_steps(flow_id: u64) -> [Value; 7] {
    [
        json!({"step": "restore", "positions": [{"flow_id": flow_id, "last_delivered": 0}]}),
        json!({"step": "outputs", "after": 0, "count": 10, "timeout_ms": 100}),
        json!({"step": "arm", "flows": [flow_id]}),
        json!({"step": "announce"}),
        json!({"step": "finish"}),
        json!({"step": "feed", "after": 0, "inputs": [{"seq": 1, "timestamp_ns": 0,
            "frame": "00"}]}),
        json!({"step": "abort"}),
    ]
}

/// The error a refused step answered with.
fn refused<T: std::fmt::Debug>(outcome: Result<T, PeerError>) -> String {
    match outcome {
        Err(PeerError::StepFailed(why) | PeerError::Refused(why)) => why,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// What a peer's refused steps must leave as it was on the destination.
#[derive(Debug, PartialEq)]
struct Seen {
    /// Each flow's id and ends (its numbering moves with traffic).
    flows: Vec<Value>,
    addresses: Vec<String>,
    /// Files under images_dir (journals included).
    files: Vec<String>,
}

fn seen(hosts: &TestHosts, daemon: &DaemonProcess, images: &Path) -> Seen {
    fn walk(dir: &Path, into: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            match entry.file_type().unwrap().is_dir() {
                true => walk(&entry.path(), into),
                false => into.push(entry.path().display().to_string()),
            }
        }
    }
    let mut files = Vec::new();
    walk(images, &mut files);
    files.sort();
    let flows = daemon.client().call("flow.list", json!({})).unwrap();
    Seen {
        flows: flows
            .as_array()
            .unwrap()
            .iter()
            .map(|f| json!([f["id"], f["cps"], f["service"], f["mirror"]]))
            .collect(),
        addresses: global_addresses(hosts),
        files,
    }
}

/// The destination's addresses of global scope: "DEVICE ADDRESS/PREFIX"
/// (link states and link-local addresses come and go on fresh hosts).
fn global_addresses(hosts: &TestHosts) -> Vec<String> {
    let all = hosts
        .dst
        .exec("ip", &["-o", "addr", "show", "scope", "global"]);
    all.lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            format!("{} {}", fields[1], fields[3])
        })
        .collect()
}

/// A directory of `files` image files of `size` bytes each, to send.
fn fake_images(name: &str, files: usize, size: usize) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dataplane-sec-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..files {
        std::fs::write(dir.join(format!("pages-{i}.img")), vec![7u8; size]).unwrap();
    }
    dir
}

/// A destination daemon with the key, its images under a directory of the
/// test's own, and `extra` configuration: the daemon and that directory.
fn listening_destination(
    hosts: &TestHosts,
    tag: &str,
    extra: &str,
) -> (DaemonProcess, std::path::PathBuf) {
    let images = std::env::temp_dir().join(format!("dataplane-sec-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&images);
    let cfg = config(
        hosts,
        "dst",
        &format!(
            "peer_listen = \"{DST_PEER}\"\n{}images_dir = \"{}\"\n{extra}",
            hosts.peer_config("dst", &[("src", SRC_PEER)]),
            images.display()
        ),
    );
    (DaemonProcess::start(&hosts.dst, tag, &cfg), images)
}

/// Adds the destination's own service flow and numbers `n` inputs on it
/// from the CPS; its id.
fn local_flow_with_inputs(hosts: &TestHosts, daemon: &DaemonProcess, n: u64) -> u64 {
    let added = daemon
        .client()
        .call(
            "flow.add",
            json!({"cps": LOCAL_CPS, "service": LOCAL_SERVICE}),
        )
        .unwrap();
    feed_local(hosts, n);
    let deadline = Instant::now() + Duration::from_secs(5);
    while daemon.client().call("flow.list", json!({})).unwrap()[0]["last_seq"] != n {
        assert!(
            Instant::now() < deadline,
            "the local flow's inputs numbered"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    added["id"].as_u64().unwrap()
}

/// Sends `n` inputs to the destination's own service; the answers it got
/// within a second.
fn feed_local(hosts: &TestHosts, n: u64) -> usize {
    let socket = hosts
        .cps
        .run(|| std::net::UdpSocket::bind(LOCAL_CPS))
        .unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    for i in 1..=n {
        socket
            .send_to(i.to_string().as_bytes(), LOCAL_SERVICE)
            .unwrap();
    }
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut answers = 0;
    while answers < n as usize && Instant::now() < deadline {
        answers += usize::from(socket.recv(&mut buf).is_ok());
    }
    answers
}

#[test]
fn a_listed_peer_gets_steps_only_in_order_and_what_it_sends_out_of_turn_changes_nothing() {
    let hosts = TestHosts::new("sorder");
    let (dst, images) = listening_destination(
        &hosts,
        "sorder",
        "images_max_mib = 1\nimages_max_files = 3\n",
    );
    let local_id = local_flow_with_inputs(&hosts, &dst, 5);
    let before = seen(&hosts, &dst, &images);
    let one_file = fake_images("one", 1, 10);
    let four_files = fake_images("four", 4, 10);
    let two_mib = fake_images("big", 1, 2 << 20);
    let rt = runtime();
    hosts.src.run(|| {
        rt.block_on(async {
            let mut link = listed_link(&hosts).await.unwrap();
            // Nothing prepared: every step but prepare is refused, and images too.
            for later in later_steps(0) {
                let why = refused(step(&mut link, later.clone()).await);
                assert!(
                    why.ends_with(
                        "out of order: no migration is prepared on this link; expected prepare \
                         or attach"
                    ),
                    "{later}: {why}"
                );
            }
            // A hot replica this host does not keep cannot be attached to.
            let attach = json!({"step": "attach", "migration": "m9", "service": "plc",
                "last_seq": 0});
            let why = refused(step(&mut link, attach).await);
            assert_eq!(
                why,
                "no hot replica m9 is kept here to attach to (it was rolled back, or never in \
                 sync)"
            );
            let why = refused(peer::transfer::send(&mut link, "m1", &one_file).await);
            assert!(why.starts_with("images out of order"), "{why}");

            // A flow this host has: refused at prepare, nothing adopted.
            let why = refused(
                step(
                    &mut link,
                    prepare_step("m0", LOCAL_CPS, LOCAL_SERVICE, 10_000),
                )
                .await,
            );
            assert!(
                why.contains(&format!("(id {local_id}) is on this host already")),
                "{why}"
            );
            // Nor a service this host runs under the same name (it is
            // registered here once handed over), or one that is no plain
            // name; nor a deadline out of range, or an id naming
            // images_dir's own entries.
            let here = json!({"name": "here", "pid": std::process::id(),
                "flows": [{"cps": LOCAL_CPS, "service": LOCAL_SERVICE}]});
            dst.client().call("service.register", here).unwrap();
            let named = |name: &str| {
                let mut prepare = prepare_step("m0", CPS, SERVICE, 10_000);
                prepare["service"] = json!(name);
                prepare
            };
            for (bad, because) in [
                (
                    named("here"),
                    "a service named here is registered on this host already",
                ),
                (named("../x"), "service name \"../x\": a plain name"),
                (
                    prepare_step("m0", CPS, SERVICE, 0),
                    "deadline_ms must be 1 to 600000",
                ),
                (
                    prepare_step("journal", CPS, SERVICE, 10_000),
                    "names an entry of images_dir",
                ),
            ] {
                let why = refused(step(&mut link, bad).await);
                assert!(why.contains(because), "{why}");
            }
            assert_eq!(seen(&hosts, &dst, &images), before);

            // Prepared: steps out of order, and a second prepare, are refused.
            let flow_id = step(&mut link, prepare_step("m1", CPS, SERVICE, 10_000))
                .await
                .unwrap()["flow_ids"][0]
                .as_u64()
                .expect("the flow's id");
            let prepared = seen(&hosts, &dst, &images);
            let refusals = later_steps(flow_id)
                .into_iter()
                .take(6)
                .chain([prepare_step("m1", CPS, SERVICE, 10_000)]);
            for out_of_turn in refusals {
                let why = refused(step(&mut link, out_of_turn.clone()).await);
                assert!(
                    why.ends_with("the migration is prepared; expected images or abort"),
                    "{out_of_turn}: {why}"
                );
            }
            // The announce took no address, nothing else moved either.
            assert_eq!(seen(&hosts, &dst, &images), prepared);
            // Images of another migration: refused, none kept.
            let why = refused(peer::transfer::send(&mut link, "m2", &one_file).await);
            assert!(
                why.contains("images of migration m2, but migration m1 is prepared"),
                "{why}"
            );
            assert_eq!(seen(&hosts, &dst, &images), prepared);

            // Its own images over the file quota: refused, the partial
            // directory removed; then only the rollback is taken.
            let why = refused(peer::transfer::send(&mut link, "m1", &four_files).await);
            assert!(why.contains("more than 3 files"), "{why}");
            assert_eq!(seen(&hosts, &dst, &images), prepared);
            let restore = later_steps(flow_id)[0].clone();
            let why = refused(step(&mut link, restore).await);
            assert!(why.ends_with("expected abort"), "{why}");
            step(&mut link, json!({"step": "abort"})).await.unwrap();
            assert_eq!(seen(&hosts, &dst, &images), before);

            // The link serves on: over the byte quota in the next migration.
            peer::ping(&mut link).await.unwrap();
            step(&mut link, prepare_step("m3", CPS, SERVICE, 10_000))
                .await
                .unwrap();
            let why = refused(peer::transfer::send(&mut link, "m3", &two_mib).await);
            assert!(why.contains("more than 1 MiB"), "{why}");
            step(&mut link, json!({"step": "abort"})).await.unwrap();
        })
    });
    assert_eq!(seen(&hosts, &dst, &images), before, "nothing changed");
    assert!(dst.log().contains("out of order"));
    // Still serving: a ping on another link.
    hosts.src.run(|| {
        rt.block_on(async {
            let mut link = listed_link(&hosts).await.unwrap();
            peer::ping(&mut link).await.unwrap();
        })
    });
    for dir in [&one_file, &four_files, &two_mib, &images] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn a_prepared_migration_without_a_step_rolls_back_after_at_least_the_sources_deadline() {
    let hosts = TestHosts::new("sidle");
    // The host's idle limit (1 s) is below the source's deadline: the
    // deadline and the margin decide.
    let (dst, images) = listening_destination(&hosts, "sidle", "migration_idle_s = 1\n");
    let before = seen(&hosts, &dst, &images);
    let rt = runtime();
    let (waited, refusal) = hosts.src.run(|| {
        rt.block_on(async {
            let mut link = listed_link(&hosts).await.unwrap();
            step(&mut link, prepare_step("m1", CPS, SERVICE, 1500))
                .await
                .unwrap();
            assert_ne!(seen(&hosts, &dst, &images), before, "prepared");
            let start = Instant::now();
            let quiet = tokio::time::timeout(Duration::from_secs(10), link.recv(peer::MAX_FRAME));
            let refusal = quiet.await.expect("refused within 10 s").unwrap();
            (start.elapsed(), refusal)
        })
    });
    assert_eq!(refusal.0, frame::REFUSE);
    let why = String::from_utf8_lossy(&refusal.1);
    assert!(why.contains("migration m1: no step for 3.5 s"), "{why}");
    assert!(
        waited >= Duration::from_millis(1500 + 2000 - 100),
        "rolled back after {waited:?}, before the source's deadline and the margin"
    );
    assert_eq!(seen(&hosts, &dst, &images), before, "everything freed");
    let _ = std::fs::remove_dir_all(&images);
}

#[test]
fn outputs_carry_the_migrations_own_flow_and_never_another_services() {
    use dataplane_tests::{ChainService, chain_state};
    let hosts = TestHosts::new("souts");
    let (dst, images) = listening_destination(&hosts, "souts", "");
    // A service of the destination's own, answering its CPS.
    let local: std::net::SocketAddr = LOCAL_SERVICE.parse().unwrap();
    let _local = ChainService::spawn(&hosts.dst, "markov-controller", &[LOCAL_SERVICE], local);
    let local_id = local_flow_with_inputs(&hosts, &dst, 5);
    // The migrated service, dumped on the source as its daemon would.
    let migrated = ChainService::start(&hosts.src, SERVICE.parse().unwrap());
    let dump = fake_images("dump", 0, 0);
    let request = migrated.dump_request(dump.clone(), true);
    dataplane_user::criu::Criu::default()
        .dump(&request, false, &mut |_| true)
        .unwrap();
    let before = seen(&hosts, &dst, &images);
    let rt = runtime();
    hosts.src.run(|| {
        rt.block_on(async {
            let mut link = listed_link(&hosts).await.unwrap();
            let flow_id = step(&mut link, prepare_step("m1", CPS, SERVICE, 10_000))
                .await
                .unwrap()["flow_ids"][0]
                .as_u64()
                .expect("the flow's id");
            assert_ne!(flow_id, local_id, "the local flow's id is its own");
            // No outputs before the instance is restored.
            assert_eq!(feed_local(&hosts, 5), 5, "the local service answers");
            let outputs = later_steps(flow_id)[1].clone();
            let why = refused(step(&mut link, outputs.clone()).await);
            assert!(why.ends_with("expected images or abort"), "{why}");
            peer::transfer::send(&mut link, "m1", &dump).await.unwrap();
            // The images once only.
            let why = refused(peer::transfer::send(&mut link, "m1", &dump).await);
            assert!(
                why.ends_with("the migration's images are here; expected restore or abort"),
                "{why}"
            );
            let restore = later_steps(flow_id)[0].clone();
            let restored = step(&mut link, restore.clone()).await.unwrap();
            assert!(restored["pid"].as_u64().unwrap() > 0, "{restored}");
            // The local service's outputs are in this host's output log now,
            // beside the restored instance's (none: it has no inputs).
            assert_eq!(feed_local(&hosts, 5), 5, "the local service answers");
            let theirs = json!({"step": "outputs", "after": 0, "count": 10, "timeout_ms": 500});
            let answered = step(&mut link, theirs).await.unwrap();
            assert_eq!(answered, json!([]), "no output of another service");
            // Inputs are fed only to a replica adopted here (from the
            // instance a handover's source kept); this one is not.
            let feed = later_steps(flow_id)[5].clone();
            let why = refused(step(&mut link, feed).await);
            assert_eq!(why, "feed: no replica adopted here waits for these inputs");
            // Restored: a second restore or prepare, and steps past the
            // comparison, are refused.
            let prepared = seen(&hosts, &dst, &images);
            let refusals = [
                restore,
                prepare_step("m1", CPS, SERVICE, 10_000),
                json!({"step": "announce"}),
                json!({"step": "finish"}),
            ];
            for out_of_turn in refusals {
                let why = refused(step(&mut link, out_of_turn.clone()).await);
                assert!(
                    why.ends_with(
                        "the migration's instance is restored; expected outputs or watch or feed \
                         or arm or abort"
                    ),
                    "{out_of_turn}: {why}"
                );
            }
            assert_eq!(seen(&hosts, &dst, &images), prepared, "no address taken");
            // An arm that leaves the flow muted fails the migration: then
            // only the rollback is taken, no announce.
            let why = refused(step(&mut link, json!({"step": "arm", "flows": []})).await);
            assert!(why.contains("arm names every flow"), "{why}");
            let why = refused(step(&mut link, json!({"step": "announce"})).await);
            assert!(
                why.ends_with("a step of the migration failed; expected abort"),
                "{why}"
            );
            assert_eq!(seen(&hosts, &dst, &images), prepared, "no address taken");
            step(&mut link, json!({"step": "abort"})).await.unwrap();
        })
    });
    assert_eq!(seen(&hosts, &dst, &images), before, "rolled back");
    assert_eq!(
        chain_state(&hosts.dst, SERVICE.parse().unwrap()),
        None,
        "the restored instance is gone"
    );
    assert_eq!(feed_local(&hosts, 5), 5, "the local service still answers");
    drop(migrated);
    for dir in [&dump, &images] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

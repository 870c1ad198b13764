//! A CPS simulator: the field device of a control loop. It sends input
//! "SEQ" to the controller every period T_U (default 1 ms) on an absolute
//! schedule, timestamps every output with microsecond resolution, and
//! judges them: each cycle must be answered exactly once, in order, and
//! (for the Markov controller) by a controller that has taken exactly SEQ
//! inputs whose hash chain is that of cycles 1..=SEQ.
//!
//! Prints its verdict as one JSON object on stdout; `--trace FILE` writes
//! "SEQ SENT_US ANSWERED_US" per cycle (0: never answered).
//!
//! `--to` and `--bind` may be given several times: flow i goes from the
//! i-th `--bind` to the i-th `--to`, each cycle sends one input on every
//! flow, and the verdict is one JSON object a line, one per flow (the trace
//! is the first flow's). One process drives many flows: one per flow would
//! put a busy sender per flow on the machine's cores.
//!
//! `--burst N`: each SIGUSR1 makes the next N inputs go out at 20 kHz (one
//! every 50 µs) instead of one per period; the periodic schedule then
//! goes on from the burst's end; SIGUSR2 ends the burst under way and
//! drops those asked for and not begun. Tests time bursts to land on a
//! migration's seams.
//!
//! `--large B`: each SIGUSR1 makes the next input B bytes long (its number,
//! a space and dots), for a test that needs an input larger than a replay
//! takes; the verdict lists those cycles (`large`).
//!
//! `--senders K` splits the flows among K sender threads (flow i to sender
//! i mod K), each on its own schedule and pinned to one of the CPUs it may
//! use, as K field devices: one thread cannot send 16 inputs every 100 µs
//! on a loaded machine.
//!
//! `--skips`: the controller may have skipped cycles that went unanswered
//! (a failover: inputs sent to a host that had stopped reach no
//! instance). Each output must then come from a controller that took
//! every answered cycle before it, and any of the unanswered ones: the
//! subset of those that makes its step count and hash chain.
//!
//! Usage: cps-sim (--to ADDR:PORT --bind ADDR:PORT)... [--period-us 1000]
//!        [--count N] [--grace-ms 300] [--trace FILE] [--no-check] [--burst N]
//!        [--senders K] [--large B] [--skips]
use std::{
    net::UdpSocket,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use dataplane_tests::{chain, gaps_between};

struct Args {
    to: Vec<String>,
    bind: Vec<String>,
    period: Duration,
    count: u64,
    grace: Duration,
    trace: Option<String>,
    check: bool,
    burst: u64,
    /// Sender threads, each driving every K-th flow.
    senders: usize,
    /// Bytes of an input SIGUSR1 asks for (0: SIGUSR1 is not for this).
    large: usize,
    /// Unanswered cycles may be missing from the controller's chain.
    skips: bool,
}

/// When the last input went out, µs (0: not yet): the listeners stop a
/// grace period later.
static SENT_ALL_US: AtomicU64 = AtomicU64::new(0);

/// Bursts asked for by SIGUSR1 and not sent yet.
static BURSTS: AtomicU32 = AtomicU32::new(0);

extern "C" fn ask_for_burst(_: nix::libc::c_int) {
    BURSTS.fetch_add(1, Ordering::SeqCst);
}

/// Large inputs asked for by SIGUSR1 (with `--large`) and not sent yet.
static LARGE: AtomicU32 = AtomicU32::new(0);

extern "C" fn ask_for_large(_: nix::libc::c_int) {
    LARGE.fetch_add(1, Ordering::SeqCst);
}

/// The cycles sent large (`--large` has one sender).
static SENT_LARGE: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// Cycle `seq`'s input: its number, padded to `large` bytes if given.
fn input(seq: usize, large: Option<usize>) -> Vec<u8> {
    let mut input = seq.to_string().into_bytes();
    if let Some(bytes) = large {
        input.push(b' ');
        input.resize(bytes.max(input.len()), b'.');
    }
    input
}

/// Set by SIGUSR2: no more burst inputs until the next SIGUSR1.
static END_BURSTS: AtomicBool = AtomicBool::new(false);

extern "C" fn end_bursts(_: nix::libc::c_int) {
    END_BURSTS.store(true, Ordering::SeqCst);
}

/// Installs `handler` (one atomic operation, async-signal-safe) for `signal`.
fn on_signal(signal: nix::sys::signal::Signal, handler: extern "C" fn(nix::libc::c_int)) {
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(handler),
        nix::sys::signal::SaFlags::SA_RESTART,
        nix::sys::signal::SigSet::empty(),
    );
    // SAFETY: both handlers only do an atomic operation.
    unsafe { nix::sys::signal::sigaction(signal, &action) }
        .unwrap_or_else(|e| panic!("install the {signal} handler: {e}"));
}

/// Spacing of the inputs of a burst: 20 kHz.
const BURST_SPACING: Duration = Duration::from_micros(50);

fn args() -> Args {
    let mut a = Args {
        to: Vec::new(),
        bind: Vec::new(),
        period: Duration::from_micros(1000),
        count: 1000,
        grace: Duration::from_millis(300),
        trace: None,
        check: true,
        burst: 0,
        senders: 1,
        large: 0,
        skips: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--to" => a.to.push(value()),
            "--bind" => a.bind.push(value()),
            "--period-us" => a.period = Duration::from_micros(value().parse().expect("µs")),
            "--count" => a.count = value().parse().expect("a count"),
            "--grace-ms" => a.grace = Duration::from_millis(value().parse().expect("ms")),
            "--trace" => a.trace = Some(value()),
            "--no-check" => a.check = false,
            "--burst" => a.burst = value().parse().expect("a count"),
            "--senders" => a.senders = value().parse().expect("a count"),
            "--large" => a.large = value().parse().expect("bytes"),
            "--skips" => a.skips = true,
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        !a.to.is_empty() && a.to.len() == a.bind.len(),
        "usage: cps-sim --to ADDR:PORT --bind ADDR:PORT [--period-us N] [--count N]"
    );
    // A burst is one sender's: signals cannot say whose.
    assert!(
        a.senders >= 1 && (a.burst == 0 && a.large == 0 || a.senders == 1),
        "--senders must be at least 1, and 1 with --burst or --large"
    );
    assert!(
        a.burst == 0 || a.large == 0,
        "SIGUSR1 asks for a burst or a large input, not both"
    );
    a
}

/// Bytes of receive buffer per socket: room for a burst's answers.
const RECEIVE_BUFFER: usize = 16 << 20;

fn main() {
    let args = args();
    let sockets: Vec<UdpSocket> = args
        .to
        .iter()
        .zip(&args.bind)
        .map(|(to, bind)| {
            let socket = UdpSocket::bind(bind).expect("bind");
            socket.connect(to).expect("connect");
            // A field device reads every output. The default receive buffer
            // (about 200 datagrams) overflowed when a burst's answers came
            // back together while this process's receiver waited for the
            // CPU: outputs the controller had sent were dropped here and
            // counted as missed, though the dataplane lost none.
            use nix::sys::socket::{setsockopt, sockopt};
            if setsockopt(&socket, sockopt::RcvBufForce, &RECEIVE_BUFFER).is_err() {
                let _ = setsockopt(&socket, sockopt::RcvBuf, &RECEIVE_BUFFER);
            }
            socket
        })
        .collect();
    let start = Instant::now();
    let grace = args.grace;
    // Outputs of each flow as they arrive: (time µs, payload), until
    // `grace` after the last input, however late a loaded machine sent it.
    let listeners: Vec<_> = sockets
        .iter()
        .map(|socket| {
            let receiver = socket.try_clone().expect("clone the socket");
            receiver
                .set_read_timeout(Some(Duration::from_millis(10)))
                .unwrap();
            std::thread::spawn(move || {
                let mut outputs = Vec::new();
                let mut buf = [0u8; 2048];
                loop {
                    let done = SENT_ALL_US.load(Ordering::SeqCst);
                    if done != 0 && start.elapsed() >= Duration::from_micros(done) + grace {
                        return outputs;
                    }
                    if let Ok(n) = receiver.recv(&mut buf) {
                        outputs.push((
                            start.elapsed().as_micros() as u64,
                            String::from_utf8_lossy(&buf[..n]).into_owned(),
                        ));
                    }
                }
            })
        })
        .collect();
    if args.burst > 0 {
        on_signal(nix::sys::signal::Signal::SIGUSR1, ask_for_burst);
        on_signal(nix::sys::signal::Signal::SIGUSR2, end_bursts);
    }
    if args.large > 0 {
        on_signal(nix::sys::signal::Signal::SIGUSR1, ask_for_large);
    }
    // Each sender drives every K-th flow on its own schedule, as separate
    // field devices would; one sender is one device driving them all.
    let senders = args.senders.min(sockets.len());
    let cpus = allowed_cpus();
    let sent_us: Vec<Vec<u64>> = std::thread::scope(|scope| {
        let groups: Vec<_> = (0..senders)
            .map(|k| {
                let group: Vec<&UdpSocket> = sockets.iter().skip(k).step_by(senders).collect();
                let (args, cpu) = (&args, cpus[k % cpus.len()]);
                scope.spawn(move || {
                    // A veth hands each frame to the sending CPU's backlog:
                    // a sender that moved between CPUs could have its
                    // frames overtake each other there, which no wire does.
                    if senders > 1 {
                        let mut set = nix::sched::CpuSet::new();
                        set.set(cpu).expect("a CPU of this machine");
                        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                            .expect("pin a sender");
                    }
                    send(args, &group, start)
                })
            })
            .collect();
        groups
            .into_iter()
            .map(|g| g.join().expect("a sender"))
            .collect()
    });
    let send_us = (start.elapsed().as_micros() as u64).max(1);
    SENT_ALL_US.store(send_us, Ordering::SeqCst);
    for (i, listener) in listeners.into_iter().enumerate() {
        let outputs = listener.join().expect("the listener");
        let trace = args.trace.as_deref().filter(|_| i == 0);
        let sent_us = &sent_us[i % senders];
        println!("{}", verdict(&args, sent_us, send_us, &outputs, trace));
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("affinity");
    (0..nix::sched::CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect()
}

/// Sends `args.count` inputs on each of `sockets`, one cycle every period
/// (or burst spacing) from `start`; when each cycle went out, µs.
fn send(args: &Args, sockets: &[&UdpSocket], start: Instant) -> Vec<u64> {
    let count = args.count;
    // Spin at most a sixth of the period: a short period would otherwise
    // be all spinning, a core taken from the dataplane it measures.
    let margin = (args.period / 6).min(Duration::from_micros(150));
    let mut sent_us = Vec::with_capacity(count as usize);
    let (mut due, mut burst_left) = (Duration::ZERO, 0u64);
    for _ in 1..=count {
        if END_BURSTS.swap(false, Ordering::SeqCst) {
            BURSTS.store(0, Ordering::SeqCst);
            if burst_left > 0 {
                burst_left = 0;
                due += args.period - BURST_SPACING;
            }
        }
        if burst_left == 0 && BURSTS.load(Ordering::SeqCst) > 0 {
            BURSTS.fetch_sub(1, Ordering::SeqCst);
            burst_left = args.burst;
            due = due.min(start.elapsed());
        }
        // Sleep most of the way, then wait awake: sub-10 µs send jitter.
        while let Some(left) = due.checked_sub(start.elapsed()) {
            if left > margin + Duration::from_micros(50) {
                std::thread::sleep(left - margin);
            } else if left.is_zero() {
                break;
            } else {
                // Yield, not spin: at SCHED_FIFO on the controllers' CPU a
                // spinning burst would keep them from running at all.
                std::thread::yield_now();
            }
        }
        let seq = sent_us.len() + 1;
        let large = LARGE
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if large {
            SENT_LARGE.lock().unwrap().push(seq);
        }
        let payload = input(seq, large.then_some(args.large));
        sent_us.push(start.elapsed().as_micros() as u64);
        for socket in sockets {
            let _ = socket.send(&payload);
        }
        if burst_left > 0 {
            burst_left -= 1;
            due += BURST_SPACING;
        } else {
            due += args.period;
        }
    }
    sent_us
}

/// Gaps between consecutive answered cycles beyond `period_us`, sorted,
/// and the cycle whose output ended the longest (0: none).
/// `answered[seq]`: when cycle seq was answered, µs (0: never).
fn extra_gaps(answered: &[u64], period_us: u64) -> (Vec<i64>, u64) {
    let gaps = gaps_between(
        (1..answered.len()).map(|seq| (seq as u64, answered[seq])),
        period_us,
    );
    let longest_at = gaps.iter().max_by_key(|g| g.1).map_or(0, |g| g.0);
    let mut extra: Vec<i64> = gaps.iter().map(|g| g.1).collect();
    extra.sort_unstable();
    (extra, longest_at)
}

/// Most unanswered cycles between two answered ones that `--skips`
/// tries every subset of.
const MAX_SKIPPED: usize = 16;

/// The outputs (`texts`, by cycle; none: unanswered) that no controller
/// could have given which took every answered cycle before, and any
/// subset of the unanswered ones between: `input` gives each cycle's
/// input. Once one is wrong the chain is unknown, and so are all later.
fn chain_with_skips<'a>(
    texts: &[Option<&'a str>],
    input: impl Fn(usize) -> Vec<u8>,
) -> Vec<&'a str> {
    let (mut hash, mut steps, mut known) = (0u64, 0usize, true);
    let mut unanswered = Vec::new();
    let mut wrong = Vec::new();
    for (seq, text) in texts.iter().enumerate().skip(1) {
        let Some(text) = text else {
            unanswered.push(seq);
            continue;
        };
        let fields: Vec<&str> = text.split_whitespace().collect();
        let claims = |h: u64, n: usize| {
            fields.get(1) == Some(&n.to_string().as_str())
                && fields.get(3) == Some(&format!("{h:016x}").as_str())
        };
        let took = known && unanswered.len() <= MAX_SKIPPED;
        let found = took.then(|| {
            (0u32..1 << unanswered.len()).find_map(|mask| {
                let taken = unanswered
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0);
                let (mut h, mut n) = (hash, steps);
                for (_, &s) in taken {
                    (h, n) = (chain(h, &input(s)), n + 1);
                }
                let (h, n) = (chain(h, &input(seq)), n + 1);
                claims(h, n).then_some((h, n))
            })
        });
        match found.flatten() {
            Some((h, n)) => (hash, steps) = (h, n),
            None => {
                known = false;
                wrong.push(*text);
            }
        }
        unanswered.clear();
    }
    wrong
}

/// Judges one flow's outputs (and writes its trace); the verdict as JSON.
/// `send_us`: when the last input went out.
fn verdict(
    args: &Args,
    sent_us: &[u64],
    send_us: u64,
    outputs: &[(u64, String)],
    trace: Option<&str>,
) -> String {
    let count = sent_us.len();
    let mut answered = vec![0u64; count + 1];
    let (mut duplicates, mut out_of_order, mut wrong, mut last) = (0u64, 0u64, 0u64, 0u64);
    let large = SENT_LARGE.lock().unwrap().clone();
    let mut hashes = vec![0u64; count + 1];
    for seq in 1..=count {
        let bytes = large.contains(&seq).then_some(args.large);
        hashes[seq] = chain(hashes[seq - 1], &input(seq, bytes));
    }
    let (mut first_wrong, mut first_duplicate, mut first_out_of_order) = (None, None, None);
    let mut texts: Vec<Option<&str>> = vec![None; count + 1];
    for (at, text) in outputs {
        let fields: Vec<&str> = text.split_whitespace().collect();
        let Some(seq) = fields.first().and_then(|s| s.parse::<usize>().ok()) else {
            wrong += 1;
            continue;
        };
        if seq == 0 || seq > count {
            wrong += 1;
            continue;
        }
        if answered[seq] != 0 {
            duplicates += 1;
            first_duplicate.get_or_insert_with(
                || serde_json::json!({"output": text, "at_us": at, "first_at_us": answered[seq]}),
            );
            continue;
        }
        answered[seq] = *at;
        texts[seq] = Some(text);
        if (seq as u64) < last {
            out_of_order += 1;
            first_out_of_order.get_or_insert_with(
                || serde_json::json!({"cycle": seq, "after": last, "at_us": at}),
            );
        }
        last = last.max(seq as u64);
        // The controller took exactly inputs 1..=seq, once each, in order.
        let step_ok = fields.get(1) == Some(&seq.to_string().as_str());
        let hash_ok = fields.get(3) == Some(&format!("{:016x}", hashes[seq]).as_str());
        if args.check && !args.skips && !(step_ok && hash_ok) {
            wrong += 1;
            first_wrong.get_or_insert_with(|| text.clone());
        }
    }
    if args.check && args.skips {
        for text in chain_with_skips(&texts, |seq| {
            input(seq, large.contains(&seq).then_some(args.large))
        }) {
            wrong += 1;
            first_wrong.get_or_insert_with(|| text.to_string());
        }
    }
    let missed = answered[1..].iter().filter(|&&t| t == 0).count();
    let first_missed = (1..=count).find(|&seq| answered[seq] == 0);
    let period = args.period.as_micros() as i64;
    let (extra, longest_at) = extra_gaps(&answered, period as u64);
    let pct = |p: f64| -> i64 {
        if extra.is_empty() {
            0
        } else {
            extra[((extra.len() - 1) as f64 * p).round() as usize]
        }
    };
    // Latency from each input to its output.
    let mut latency: Vec<u64> = (1..=count)
        .filter(|&s| answered[s] != 0)
        .map(|s| answered[s].saturating_sub(sent_us[s - 1]))
        .collect();
    latency.sort_unstable();
    let lat = |p: f64| {
        latency
            .get(((latency.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    if let Some(path) = trace {
        let trace: String = (1..=count)
            .map(|s| format!("{s} {} {}\n", sent_us[s - 1], answered[s]))
            .collect();
        std::fs::write(path, trace).expect("write the trace");
    }
    serde_json::json!({
        "sent": count,
        "answered": count - missed,
        "missed": missed,
        "duplicates": duplicates,
        "out_of_order": out_of_order,
        "wrong": wrong,
        "first_wrong": first_wrong,
        "first_duplicate": first_duplicate,
        "first_out_of_order": first_out_of_order,
        "first_missed": first_missed,
        "period_us": period,
        "send_us": send_us,
        "extra_gap_us": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0), "at_cycle": longest_at},
        "latency_us": {"p50": lat(0.5), "p99": lat(0.99), "max": lat(1.0)},
        "large": large,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_cycles_must_be_unanswered_ones() {
        let input = |seq: usize| seq.to_string().into_bytes();
        // A controller that took 1, 2, 4, 5 (3 went to a host that stopped).
        let took = [1, 2, 4, 5];
        let mut texts = vec![None; 6];
        let (mut hash, mut n) = (0, 0);
        for seq in took {
            (hash, n) = (chain(hash, &input(seq)), n + 1);
            texts[seq] = Some(format!("{seq} {n} state {hash:016x}"));
        }
        // 3 was unanswered: it may be skipped.
        assert!(chain_with_skips(&view(&texts), input).is_empty());
        // Had 3 been answered, skipping it is wrong, and so is what follows.
        let mut answered = texts.clone();
        answered[3] = Some("3 3 state 0000000000000000".into());
        assert_eq!(chain_with_skips(&view(&answered), input).len(), 3);
        // An output that claims a chain no subset makes is wrong.
        let mut forged = texts;
        forged[5] = Some("5 4 state 0000000000000001".into());
        assert_eq!(
            chain_with_skips(&view(&forged), input),
            ["5 4 state 0000000000000001"]
        );
    }

    fn view(texts: &[Option<String>]) -> Vec<Option<&str>> {
        texts.iter().map(|t| t.as_deref()).collect()
    }

    /// The longest gap is named by its cycle's number. Cycles 2 to 4 are
    /// missed here, and the longest gap (5 ms beyond the period) ends at
    /// cycle 7, the fourth answered: a position among answered cycles would
    /// say 4, a cycle never answered.
    #[test]
    fn the_longest_gap_is_at_its_cycle_number_when_cycles_were_missed() {
        let answered = [0, 1_000, 0, 0, 0, 5_000, 6_000, 12_000, 13_000];
        let (extra, at) = extra_gaps(&answered, 1000);
        assert_eq!(at, 7);
        assert_eq!(extra, [0, 0, 3000, 5000]);
        assert_eq!(extra_gaps(&[0, 1_000, 0], 1000), (vec![], 0));
    }
}

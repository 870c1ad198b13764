//! The reference control process of gundall2022 Sec. VII-B: a Markov chain
//! over 7 states s0..s6 that takes one step per input and answers every
//! input with one output.
//!
//! Eq. 2 of the paper as printed has rows summing to 1.5 and 1.1; its text
//! says the transitions possible from a state are equally likely, so the
//! chain uses Eq. 2's non-zero pattern with equal probabilities. The random
//! draws come from a seeded xorshift64* generator that is part of the
//! process state, so the outputs are a function of the inputs alone, and a
//! checkpointed copy that gets the same inputs gives the same outputs.
//!
//! Input: a datagram "SEQ ..." (the CPS's cycle number first). Output:
//! "SEQ STEP STATE HASH": the cycle answered, the number of inputs taken
//! so far, the chain's state, and a hash chain of every input (FNV-1a).
//! A datagram "?" asks for "STEP HASH" without taking a step.
//!
//! With `--per-device`, one controller serves several field devices on
//! its one socket, each a flow of its own: the chain steps on every input,
//! in the order the socket gives them, and each output is
//! "SEQ STEP STATE HASH ALL_STEPS ALL_HASH": STEP and HASH count and chain
//! the inputs of the device answered (which it can check), ALL_STEPS and
//! ALL_HASH those of every device, interleaved as the controller took
//! them. Two instances answer alike only if they took the devices' inputs
//! in the same order. "?" asks for "ALL_STEPS ALL_HASH".
//!
//! Usage: markov-controller ADDR:PORT [--seed N] [--wall-clock]
//!        [--state-mib M] [--dirty-pages P] [--per-device]
//! (--wall-clock adds the time of day to each output: a non-deterministic
//! service, which must never be found to converge. --state-mib gives the
//! process M MiB of resident state, and --dirty-pages makes each input
//! rewrite P pages of it, deterministically: the memory workload of the
//! checkpoint benchmarks, like calagna2023's, with a dirty rate of P pages
//! per control period.)
use std::net::UdpSocket;

use dataplane_tests::chain;

/// Eq. 2's possible transitions from each state.
const NEXT: [&[u8]; 7] = [
    &[0, 1],
    &[1, 2, 3],
    &[1, 2, 3, 4],
    &[1, 3, 4],
    &[3, 4, 5, 6],
    &[1, 5, 6],
    &[1, 5, 6],
];

fn main() {
    // CRIU dumps a process tree only without fds from another mount
    // namespace and with its session leader inside its PID namespace.
    // SAFETY: close_range and setsid have no memory-safety preconditions.
    unsafe {
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        libc::setsid();
    }
    let mut args = std::env::args().skip(1);
    let addr = args
        .next()
        .expect("usage: markov-controller ADDR:PORT [--seed N] [--wall-clock]");
    let (mut rng, mut wall_clock, mut per_device) = (0x9E37_79B9_7F4A_7C15u64, false, false);
    let (mut state_mib, mut dirty_pages) = (0usize, 0usize);
    while let Some(arg) = args.next() {
        let mut number = || args.next().and_then(|s| s.parse().ok());
        match arg.as_str() {
            "--seed" => rng = number().expect("--seed N") as u64,
            "--state-mib" => state_mib = number().expect("--state-mib M"),
            "--dirty-pages" => dirty_pages = number().expect("--dirty-pages P"),
            "--wall-clock" => wall_clock = true,
            "--per-device" => per_device = true,
            other => panic!("unknown argument {other}"),
        }
    }
    const PAGE: usize = 4096;
    // Every page written once, so all of it is resident and in the image.
    let mut memory: Vec<u8> = (0..state_mib << 20).map(|i| (i / PAGE) as u8).collect();
    let pages = memory.len() / PAGE;
    let mut next_page = 0;
    let socket = UdpSocket::bind(&addr).expect("bind");
    // Room for a burst (20 kHz in the tests) while the machine keeps the
    // controller off its CPU for a few milliseconds: the default buffer
    // holds about 200 datagrams, 10 ms of such a burst. As root, past
    // rmem_max; elsewhere the default stays.
    let bytes: libc::c_int = 4 << 20;
    // SAFETY: setsockopt on a socket this process owns, with an int option.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const bytes).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    let (mut state, mut step, mut hash) = (0u8, 0u64, 0u64);
    // Per device (the sender's address): its inputs' count and chain.
    let mut devices: std::collections::HashMap<std::net::SocketAddr, (u64, u64)> =
        std::collections::HashMap::new();
    let mut buf = [0u8; 2048];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let input = &buf[..n];
        if input == b"?" {
            let _ = socket.send_to(format!("{step} {hash:016x}").as_bytes(), from);
            continue;
        }
        // xorshift64*
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        let draw = rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        let next = NEXT[state as usize];
        state = next[(draw % next.len() as u64) as usize];
        step += 1;
        hash = chain(hash, input);
        for _ in 0..dirty_pages.min(pages) {
            memory[next_page * PAGE] = memory[next_page * PAGE].wrapping_add(state);
            next_page = (next_page + 1) % pages;
        }
        let cycle = std::str::from_utf8(input)
            .ok()
            .and_then(|t| t.split_whitespace().next())
            .unwrap_or("-");
        let mut output = match per_device {
            false => format!("{cycle} {step} {state} {hash:016x}"),
            true => {
                let device = devices.entry(from).or_default();
                *device = (device.0 + 1, chain(device.1, input));
                let (device_step, device_hash) = *device;
                format!("{cycle} {device_step} {state} {device_hash:016x} {step} {hash:016x}")
            }
        };
        if wall_clock {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            output.push_str(&format!(" {}", now.as_nanos()));
        }
        let _ = socket.send_to(output.as_bytes(), from);
    }
}

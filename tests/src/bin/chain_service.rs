//! A stateful UDP service for checkpoint tests: its state is a hash chain of
//! every input it has received (FNV-1a over the previous hash and the input)
//! and their count. A datagram "?" asks for the state; the answer is
//! "COUNT HASH" in decimal and hex. Usage: chain-service ADDR:PORT
use std::net::UdpSocket;

use dataplane_tests::chain;

fn main() {
    // CRIU cannot dump an fd inherited from elsewhere (say, another mount
    // namespace's file): keep only stdin, stdout and stderr.
    // SAFETY: close_range has no memory-safety preconditions.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    // CRIU dumps a PID namespace whose session leader is inside it: lead our own.
    // SAFETY: setsid has no memory-safety preconditions.
    unsafe { libc::setsid() };
    let addr = std::env::args()
        .nth(1)
        .expect("usage: chain-service ADDR:PORT");
    let socket = UdpSocket::bind(&addr).expect("bind");
    let (mut count, mut hash) = (0u64, 0u64);
    let mut buf = [0u8; 65536];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        if &buf[..n] == b"?" {
            let _ = socket.send_to(format!("{count} {hash:016x}").as_bytes(), from);
        } else {
            count += 1;
            hash = chain(hash, &buf[..n]);
        }
    }
}

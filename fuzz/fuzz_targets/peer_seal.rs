//! The sealed peer link's records (`peer::seal::Seal`), between two ends of
//! a real Noise session made in memory. The first byte picks the case:
//! - even: the input is bytes from someone without the session's keys,
//!   fed in one go; no frame may come out of them;
//! - odd: the input describes frames (type, 2-byte length, payload) that
//!   one end seals, a byte of the records to flip (2 bytes, past the end:
//!   none) and the sizes the receiver is fed in; every frame that comes
//!   out is the next one sent, all of them if nothing was flipped.
#![no_main]

use std::sync::OnceLock;

use dataplane_user::peer::{Identity, MAX_FRAME, seal::Seal};
use libfuzzer_sys::fuzz_target;

/// Two hosts' identities, made once: a session's keys are fresh anyway.
fn identities() -> &'static (Identity, Identity) {
    static IDENTITIES: OnceLock<(Identity, Identity)> = OnceLock::new();
    IDENTITIES.get_or_init(|| {
        (
            Identity::generate().expect("random"),
            Identity::generate().expect("random"),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let (a, b) = identities();
    let (mut sender, mut receiver) = Seal::pair(a, b);
    if mode % 2 == 0 {
        receiver.feed(data);
        assert!(
            !matches!(receiver.next_frame(MAX_FRAME), Ok(Some(_))),
            "a frame from bytes sealed by no one"
        );
        return;
    }
    let Some((flip, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let (frames, feeds) = frames(rest);
    let mut wire = Vec::new();
    for (kind, payload) in &frames {
        sender.seal(*kind, payload, &mut wire).expect("under MAX_FRAME");
    }
    let flip = u16::from_be_bytes(*flip) as usize;
    let flipped = flip < wire.len();
    if flipped {
        wire[flip] ^= 1;
    }
    let mut got = Vec::new();
    let mut rest = &wire[..];
    let mut sizes = feeds.iter().map(|&s| s as usize + 1).cycle();
    'feeding: while !rest.is_empty() {
        let n = sizes.next().unwrap_or(rest.len()).min(rest.len());
        receiver.feed(&rest[..n]);
        rest = &rest[n..];
        loop {
            match receiver.next_frame(MAX_FRAME) {
                Ok(Some(frame)) => got.push(frame),
                Ok(None) => break,
                Err(_) => {
                    assert!(flipped, "a clean record did not open");
                    break 'feeding;
                }
            }
        }
    }
    assert!(got.len() <= frames.len());
    assert_eq!(got[..], frames[..got.len()], "a frame that was not sent");
    if !flipped {
        assert_eq!(got.len(), frames.len(), "a sent frame did not come out");
    }
});

/// Frames from the input (type, length, that many payload bytes), then what
/// is left as feed sizes.
fn frames(mut data: &[u8]) -> (Vec<(u8, Vec<u8>)>, &[u8]) {
    let mut frames = Vec::new();
    while let Some((&[kind, hi, lo], rest)) = data.split_first_chunk::<3>() {
        let len = u16::from_be_bytes([hi, lo]) as usize;
        let Some((payload, rest)) = rest.split_at_checked(len) else {
            break;
        };
        frames.push((kind, payload.to_vec()));
        data = rest;
    }
    (frames, data)
}

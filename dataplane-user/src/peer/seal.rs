//! A sealed link's records: the frames of an established link, encrypted
//! and authenticated with the keys of its Noise handshake.
//!
//! A frame (`u32` length, type, payload, as in clear) is cut into records
//! of at most [`MAX_RECORD_CLEAR`] bytes; each crosses as a `u16` big-endian
//! length and one Noise transport message (ChaCha20-Poly1305 under the
//! session's key, its nonce the record's number). A record that fails to
//! open (altered, reordered, replayed, or sealed under another session's
//! key) ends the link: nothing after it is read. No I/O here: [`Seal`]
//! turns frames into bytes and bytes into frames, so the codec is tested and
//! fuzzed without sockets.
use super::{Identity, PeerError};

/// Noise pattern and primitives: XX (each end proves its static key),
/// X25519, ChaCha20-Poly1305, BLAKE2s.
pub(super) const NOISE_PARAMS: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
/// Largest Noise message.
const MAX_RECORD: usize = 65535;
/// Bytes of the tag each record carries.
const TAG: usize = 16;
/// Most bytes of frame a record carries.
pub const MAX_RECORD_CLEAR: usize = MAX_RECORD - TAG;

/// One end of a sealed link.
pub struct Seal {
    transport: snow::TransportState,
    /// Bytes received and not yet opened: at most one record and a read.
    sealed: Vec<u8>,
    /// Frame bytes opened and not yet taken.
    clear: Vec<u8>,
}

impl Seal {
    pub(super) fn new(transport: snow::TransportState) -> Self {
        Self {
            transport,
            sealed: Vec::new(),
            clear: Vec::new(),
        }
    }

    /// Two ends of a sealed link, handshaken in memory (tests, fuzzing):
    /// (initiator, responder).
    pub fn pair(initiator: &Identity, responder: &Identity) -> (Self, Self) {
        let mut i = noise(initiator, &[]).build_initiator().expect("builds");
        let mut r = noise(responder, &[]).build_responder().expect("builds");
        let (mut message, mut payload) = ([0; 256], [0; 256]);
        for turn in 0..3 {
            let (from, to) = if turn % 2 == 0 {
                (&mut i, &mut r)
            } else {
                (&mut r, &mut i)
            };
            let n = from.write_message(&[], &mut message).expect("handshake");
            to.read_message(&message[..n], &mut payload)
                .expect("handshake");
        }
        let open = |h: snow::HandshakeState| Self::new(h.into_transport_mode().expect("done"));
        (open(i), open(r))
    }

    /// The records that carry one frame, appended to `out`.
    pub fn seal(&mut self, kind: u8, payload: &[u8], out: &mut Vec<u8>) -> Result<(), PeerError> {
        let len = super::frame_len(payload)?;
        let mut clear = Vec::with_capacity(5 + payload.len());
        clear.extend_from_slice(&len.to_be_bytes());
        clear.push(kind);
        clear.extend_from_slice(payload);
        for piece in clear.chunks(MAX_RECORD_CLEAR) {
            let start = out.len();
            out.resize(start + 2 + piece.len() + TAG, 0);
            let n = self
                .transport
                .write_message(piece, &mut out[start + 2..])
                .map_err(|e| PeerError::Auth(format!("sealing a record: {e}")))?;
            out[start..start + 2].copy_from_slice(&(n as u16).to_be_bytes());
            out.truncate(start + 2 + n);
        }
        Ok(())
    }

    /// Takes bytes read from the link.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.sealed.extend_from_slice(bytes);
    }

    /// The next whole frame of at most `limit` bytes from what was fed, if
    /// there is one yet. An error (a record that does not open, a frame over
    /// `limit`) ends the link.
    pub fn next_frame(&mut self, limit: u32) -> Result<Option<(u8, Vec<u8>)>, PeerError> {
        loop {
            if let Some(len) = self
                .clear
                .first_chunk::<4>()
                .map(|b| u32::from_be_bytes(*b))
            {
                if len == 0 || len > limit {
                    return Err(PeerError::TooLong(len, limit));
                }
                let end = 4 + len as usize;
                if self.clear.len() >= end {
                    let payload = self.clear[5..end].to_vec();
                    let kind = self.clear[4];
                    self.clear.drain(..end);
                    return Ok(Some((kind, payload)));
                }
            }
            if !self.open_record()? {
                return Ok(None);
            }
        }
    }

    /// Opens the first record fed, if it is all there: whether it was.
    fn open_record(&mut self) -> Result<bool, PeerError> {
        let Some(len) = self
            .sealed
            .first_chunk::<2>()
            .map(|b| u16::from_be_bytes(*b))
        else {
            return Ok(false);
        };
        let end = 2 + len as usize;
        if self.sealed.len() < end {
            return Ok(false);
        }
        let start = self.clear.len();
        self.clear.resize(start + len as usize, 0);
        let opened = self
            .transport
            .read_message(&self.sealed[2..end], &mut self.clear[start..]);
        let n = opened.map_err(|_| {
            PeerError::Auth(
                "a record did not open: altered, out of order, or not from the peer \
                 this link was made with"
                    .into(),
            )
        })?;
        self.clear.truncate(start + n);
        self.sealed.drain(..end);
        Ok(true)
    }
}

/// A Noise handshake's builder with this host's static key and the
/// link's `prologue` (what both ends said in clear before it, which the
/// handshake then authenticates).
pub(super) fn noise<'a>(identity: &'a Identity, prologue: &'a [u8]) -> snow::Builder<'a> {
    snow::Builder::new(NOISE_PARAMS.parse().expect("valid Noise parameters"))
        .local_private_key(identity.private())
        .and_then(|b| b.prologue(prologue))
        .expect("a 32-byte key and a prologue")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Seal, Seal) {
        let (a, b) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        Seal::pair(&a, &b)
    }

    #[test]
    fn frames_cross_whole_in_any_chunking_and_stay_secret() {
        let (mut a, mut b) = pair();
        let big: Vec<u8> = (0..3 * MAX_RECORD_CLEAR + 7).map(|i| i as u8).collect();
        let mut wire = Vec::new();
        a.seal(6, b"hello", &mut wire).unwrap();
        a.seal(8, &big, &mut wire).unwrap();
        a.seal(4, &[], &mut wire).unwrap();
        assert!(
            !wire.windows(5).any(|w| w == b"hello"),
            "the payload crosses in clear"
        );
        let mut got = Vec::new();
        for piece in wire.chunks(1000) {
            b.feed(piece);
            while let Some(frame) = b.next_frame(16 << 20).unwrap() {
                got.push(frame);
            }
        }
        assert_eq!(got, [(6, b"hello".to_vec()), (8, big), (4, vec![])]);
        // And back the other way.
        let mut wire = Vec::new();
        b.seal(5, b"pong", &mut wire).unwrap();
        a.feed(&wire);
        assert_eq!(a.next_frame(64).unwrap(), Some((5, b"pong".to_vec())));
    }

    #[test]
    fn an_altered_replayed_or_foreign_record_ends_the_link() {
        let (mut a, mut b) = pair();
        let mut wire = Vec::new();
        a.seal(14, b"step", &mut wire).unwrap();
        let mut altered = wire.clone();
        altered[9] ^= 1;
        b.feed(&altered);
        assert!(matches!(b.next_frame(64), Err(PeerError::Auth(_))));

        let (mut a, mut b) = pair();
        let mut first = Vec::new();
        a.seal(14, b"step", &mut first).unwrap();
        b.feed(&first);
        assert!(b.next_frame(64).unwrap().is_some());
        b.feed(&first);
        assert!(b.next_frame(64).is_err(), "a replayed record opens");

        let (mut other, _) = pair();
        let (_, mut b) = pair();
        let mut foreign = Vec::new();
        other.seal(14, b"step", &mut foreign).unwrap();
        b.feed(&foreign);
        assert!(b.next_frame(64).is_err(), "another session's record opens");
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_before_it_is_read_whole() {
        let (mut a, mut b) = pair();
        let mut wire = Vec::new();
        a.seal(8, &vec![0; 100_000], &mut wire).unwrap();
        b.feed(&wire[..2 + MAX_RECORD]);
        assert!(matches!(
            b.next_frame(4096),
            Err(PeerError::TooLong(100_001, 4096))
        ));
    }
}

//! Output comparison and convergence: the source compares the two
//! instances' outputs until N in a row match.
//!
//! Outputs of the source and destination instances are matched by the input
//! that caused them (the sequence number the egress program tags them with)
//! and compared: byte for byte, or with a tolerance eta on declared numeric
//! fields (gundall2022 Eq. 1: |y_src - y_dst| <= eta), every other byte
//! still equal. A handover needs N consecutive matches (govindaraj2019).
use std::{collections::BTreeMap, net::SocketAddr};

use serde::{Deserialize, Serialize};

/// A numeric field of an output's UDP payload, big-endian.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    /// Byte offset in the UDP payload.
    pub offset: usize,
    #[serde(rename = "type")]
    pub kind: FieldKind,
    /// Largest accepted difference. Integer fields are compared exactly, as
    /// integers: their difference is an integer, so a fractional eta
    /// accepts what its integer part does.
    pub eta: f64,
}

/// How a field is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldKind {
    U16,
    U32,
    U64,
    I16,
    I32,
    I64,
    F32,
    F64,
}

/// A field's value as read: integers exactly (an f64 holds every integer
/// only up to 2^53, so two 64-bit values above it could read equal).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    Int(i128),
    Float(f64),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Self::Int(v) => v.fmt(f),
            Self::Float(v) => v.fmt(f),
        }
    }
}

impl FieldKind {
    fn len(self) -> usize {
        match self {
            Self::U16 | Self::I16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 => 8,
        }
    }

    /// The value in `b`, which holds at least `len()` bytes.
    fn read(self, b: &[u8]) -> Value {
        let int = Value::Int;
        match self {
            Self::U16 => int(u16::from_be_bytes([b[0], b[1]]).into()),
            Self::I16 => int(i16::from_be_bytes([b[0], b[1]]).into()),
            Self::U32 => int(u32::from_be_bytes(b[..4].try_into().unwrap()).into()),
            Self::I32 => int(i32::from_be_bytes(b[..4].try_into().unwrap()).into()),
            Self::U64 => int(u64::from_be_bytes(b[..8].try_into().unwrap()).into()),
            Self::I64 => int(i64::from_be_bytes(b[..8].try_into().unwrap()).into()),
            Self::F32 => Value::Float(f32::from_be_bytes(b[..4].try_into().unwrap()).into()),
            Self::F64 => Value::Float(f64::from_be_bytes(b[..8].try_into().unwrap())),
        }
    }
}

/// Whether `a` and `b`, read as one kind, differ by at most `eta`.
fn within(a: Value, b: Value, eta: f64) -> bool {
    match (a, b) {
        // |a - b| <= eta holds exactly when it holds for eta's integer part;
        // `as` saturates, so an infinite eta accepts everything.
        (Value::Int(a), Value::Int(b)) => eta >= 0.0 && a.abs_diff(b) <= eta.floor() as u128,
        // NaN on either side never matches.
        (Value::Float(a), Value::Float(b)) => (a - b).abs() <= eta,
        _ => unreachable!("both sides are read as the same kind"),
    }
}

/// An output's device as a mismatch names it.
fn device(to: &Option<SocketAddr>) -> String {
    to.map_or("no UDP address".into(), |to| to.to_string())
}

/// Why two outputs do not match.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Mismatch {
    #[error("to {} and to {}", device(src), device(dst))]
    Device {
        src: Option<SocketAddr>,
        dst: Option<SocketAddr>,
    },
    #[error("lengths {src} and {dst}")]
    Length { src: usize, dst: usize },
    #[error("field at {offset} ({kind:?}) beyond the {len}-byte output")]
    FieldBeyond {
        offset: usize,
        kind: FieldKind,
        len: usize,
    },
    #[error("field at {offset}: {src} and {dst} differ by more than eta {eta}")]
    Field {
        offset: usize,
        src: Value,
        dst: Value,
        eta: f64,
    },
    #[error("byte {offset}: {src:#04x} and {dst:#04x}")]
    Byte { offset: usize, src: u8, dst: u8 },
}

/// A declared field no output could hold, or an eta that accepts nothing.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum InvalidField {
    #[error("a field at {0} lies beyond any UDP payload ({MAX_PAYLOAD} bytes)")]
    Offset(usize),
    #[error("the field at {offset} has eta {eta}: it must be 0 or more")]
    Eta { offset: usize, eta: f64 },
}

/// The largest UDP payload (IPv6 without jumbograms).
const MAX_PAYLOAD: usize = 65_527;

/// How two outputs are compared: byte-equal when no fields are declared.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Comparator {
    #[serde(default)]
    pub fields: Vec<Field>,
}

impl Comparator {
    /// Refuses fields no output could hold, and etas that accept nothing.
    pub fn check(&self) -> Result<(), InvalidField> {
        for f in &self.fields {
            if f.offset.saturating_add(f.kind.len()) > MAX_PAYLOAD {
                return Err(InvalidField::Offset(f.offset));
            }
            if f.eta.is_nan() || f.eta < 0.0 {
                return Err(InvalidField::Eta {
                    offset: f.offset,
                    eta: f.eta,
                });
            }
        }
        Ok(())
    }

    /// Why payloads `src` and `dst` differ, if they do.
    pub fn compare(&self, src: &[u8], dst: &[u8]) -> Result<(), Mismatch> {
        if src.len() != dst.len() {
            return Err(Mismatch::Length {
                src: src.len(),
                dst: dst.len(),
            });
        }
        let mut covered = vec![false; src.len()];
        for f in &self.fields {
            // Checked: a request's offset may be anything (`check` refuses
            // what no output holds; this must not panic either way).
            let end = f.offset.saturating_add(f.kind.len());
            if end > src.len() {
                return Err(Mismatch::FieldBeyond {
                    offset: f.offset,
                    kind: f.kind,
                    len: src.len(),
                });
            }
            let (a, b) = (
                f.kind.read(&src[f.offset..end]),
                f.kind.read(&dst[f.offset..end]),
            );
            if !within(a, b, f.eta) {
                return Err(Mismatch::Field {
                    offset: f.offset,
                    src: a,
                    dst: b,
                    eta: f.eta,
                });
            }
            covered[f.offset..end].fill(true);
        }
        match (0..src.len()).find(|&i| !covered[i] && src[i] != dst[i]) {
            Some(i) => Err(Mismatch::Byte {
                offset: i,
                src: src[i],
                dst: dst[i],
            }),
            None => Ok(()),
        }
    }
}

/// Counts consecutive matches towards the N a handover needs.
#[derive(Debug)]
pub struct Convergence {
    needed: u32,
    run: u32,
    compared: u64,
    /// The last input whose answers were compared.
    last_seq: u64,
    /// The latest mismatch: (input sequence, reason).
    pub last_mismatch: Option<(u64, Mismatch)>,
}

impl Convergence {
    /// Convergence after `needed` consecutive matches.
    pub fn new(needed: u32) -> Self {
        Self {
            needed,
            run: 0,
            compared: 0,
            last_seq: 0,
            last_mismatch: None,
        }
    }

    /// Records the comparison of the outputs answering input `seq`; returns
    /// whether the instances have now converged.
    pub fn record(&mut self, seq: u64, outcome: Result<(), Mismatch>) -> bool {
        self.compared += 1;
        self.last_seq = seq;
        match outcome {
            Ok(()) => self.run += 1,
            Err(reason) => {
                self.run = 0;
                self.last_mismatch = Some((seq, reason));
            }
        }
        self.converged()
    }

    pub fn converged(&self) -> bool {
        self.run >= self.needed
    }

    /// Output pairs compared so far.
    pub fn compared(&self) -> u64 {
        self.compared
    }

    /// The last input whose answers were compared (0: none yet).
    pub fn compared_up_to(&self) -> u64 {
        self.last_seq
    }
}

/// An output as convergence compares it: where it goes (the device, for
/// a service with several flows) and its UDP payload; a frame that is not
/// UDP goes nowhere known and is compared whole.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub to: Option<SocketAddr>,
    pub payload: Vec<u8>,
}

impl Answer {
    /// The answer an output frame (Ethernet, as the log holds it) carries.
    pub fn of(frame: &[u8]) -> Self {
        use etherparse::{NetSlice, SlicedPacket, TransportSlice};
        let Ok(SlicedPacket {
            net: Some(net),
            transport: Some(TransportSlice::Udp(udp)),
            ..
        }) = SlicedPacket::from_ethernet(frame)
        else {
            return Self {
                to: None,
                payload: frame.to_vec(),
            };
        };
        let address: std::net::IpAddr = match net {
            NetSlice::Ipv4(ip) => ip.header().destination_addr().into(),
            NetSlice::Ipv6(ip) => ip.header().destination_addr().into(),
            _ => {
                return Self {
                    to: None,
                    payload: udp.payload().to_vec(),
                };
            }
        };
        Self {
            to: Some(SocketAddr::new(address, udp.destination_port())),
            payload: udp.payload().to_vec(),
        }
    }

    /// Why `self` (the source's) and `theirs` differ, if they do: another
    /// device, or payloads `comparator` tells apart.
    fn compare(&self, theirs: &Answer, comparator: &Comparator) -> Result<(), Mismatch> {
        if self.to != theirs.to {
            return Err(Mismatch::Device {
                src: self.to,
                dst: theirs.to,
            });
        }
        comparator.compare(&self.payload, &theirs.payload)
    }
}

/// Pairs the two instances' outputs by the input they answer, as they
/// come: the destination's from its `Outputs` answers, the source's from
/// its output log, which a loaded source reads later than the destination
/// answers. Each input is compared once, when both sides have answered it.
#[derive(Debug)]
pub struct Pairing {
    /// The destination's outputs the source's log has not reached yet.
    theirs: BTreeMap<u64, Vec<Answer>>,
    /// The source's outputs not compared yet.
    ours: BTreeMap<u64, Vec<Answer>>,
    /// Ask the destination for outputs answering inputs after this one.
    after: u64,
    /// The latest input the source's log shows an answer to.
    reached: u64,
}

impl Pairing {
    /// Outputs of replayed inputs up to `replay_end` may share a tag (the
    /// replay outruns the instance); live ones from a little later do not,
    /// so pairing starts after it.
    pub fn after_replay(replay_end: u64) -> Self {
        Self {
            theirs: BTreeMap::new(),
            ours: BTreeMap::new(),
            after: replay_end + 1,
            reached: 0,
        }
    }

    /// The input after which the destination's next outputs are asked for.
    pub fn after(&self) -> u64 {
        self.after
    }

    /// The latest input the source's log shows an answer to.
    pub fn reached(&self) -> u64 {
        self.reached
    }

    /// A destination output answering input `seq`.
    pub fn theirs(&mut self, seq: u64, answer: Answer) {
        self.after = self.after.max(seq);
        self.theirs.entry(seq).or_default().push(answer);
    }

    /// A source output answering input `seq`.
    pub fn ours(&mut self, seq: u64, answer: Answer) {
        self.ours.entry(seq).or_default().push(answer);
    }

    /// The latest input the destination answered that is not compared yet.
    pub fn waiting_for(&self) -> Option<u64> {
        self.theirs.keys().next_back().copied()
    }

    /// Whether the source has answered `seq` or a later input.
    pub fn ours_reached(&self, seq: u64) -> bool {
        self.ours.keys().next_back().is_some_and(|&s| s >= seq)
    }

    /// Compares every input both sides have answered, in order, into
    /// `convergence`, stopping when it converges (a migration hands over
    /// then; once converged, as a hot replica stays, it compares every
    /// input both have answered). An input answered
    /// more than once on either side is skipped: a shared tag means the
    /// instance had several inputs queued. The source's answers to inputs
    /// the destination has not answered yet stay for later rounds.
    pub fn compare(&mut self, comparator: &Comparator, convergence: &mut Convergence) {
        self.reached = self
            .reached
            .max(self.ours.keys().next_back().copied().unwrap_or(0));
        while let Some(entry) = self
            .theirs
            .first_entry()
            .filter(|e| *e.key() <= self.reached)
        {
            let (seq, theirs) = entry.remove_entry();
            let ours = self.ours.remove(&seq);
            let before = convergence.converged();
            if let (Some([ours]), [theirs]) = (ours.as_deref(), &theirs[..])
                && convergence.record(seq, ours.compare(theirs, comparator))
                && !before
            {
                break;
            }
        }
        let done = self.theirs.keys().next().map_or(self.after, |&seq| seq - 1);
        self.ours.retain(|&seq, _| seq > done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_equal_by_default() {
        let c = Comparator::default();
        assert!(c.compare(b"state 3", b"state 3").is_ok());
        assert_eq!(
            c.compare(b"state 3", b"state 4").unwrap_err().to_string(),
            "byte 6: 0x33 and 0x34"
        );
        assert!(c.compare(b"ab", b"abc").is_err());
    }

    #[test]
    fn declared_fields_within_eta_match_and_the_rest_stays_exact() {
        let c = Comparator {
            fields: vec![Field {
                offset: 2,
                kind: FieldKind::F32,
                eta: 0.5,
            }],
        };
        let out = |tag: u8, y: f32| {
            let mut v = vec![tag, 0];
            v.extend_from_slice(&y.to_be_bytes());
            v
        };
        assert!(c.compare(&out(1, 10.0), &out(1, 10.4)).is_ok());
        assert!(
            c.compare(&out(1, 10.0), &out(1, 10.5)).is_ok(),
            "eta inclusive"
        );
        assert!(c.compare(&out(1, 10.0), &out(1, 10.6)).is_err());
        assert!(c.compare(&out(1, 10.0), &out(2, 10.0)).is_err());
        assert!(c.compare(&out(1, f32::NAN), &out(1, f32::NAN)).is_err());
        let beyond = Comparator {
            fields: vec![Field {
                offset: 4,
                kind: FieldKind::U64,
                eta: 0.0,
            }],
        };
        assert!(beyond.compare(&out(1, 1.0), &out(1, 1.0)).is_err());
    }

    #[test]
    fn fields_no_output_holds_are_refused_and_never_panic() {
        // An offset comes from a request: the largest one must neither
        // overflow the comparison (a panic would leave the migration
        // running with no rollback) nor pass the request's check.
        let at = |offset, eta| Comparator {
            fields: vec![Field {
                offset,
                kind: FieldKind::U64,
                eta,
            }],
        };
        assert_eq!(
            at(usize::MAX, 0.0).check(),
            Err(InvalidField::Offset(usize::MAX))
        );
        assert!(matches!(
            at(usize::MAX, 0.0).compare(&[0; 8], &[0; 8]),
            Err(Mismatch::FieldBeyond { .. })
        ));
        assert_eq!(at(65_520, 0.0).check(), Err(InvalidField::Offset(65_520)));
        assert_eq!(at(65_519, 0.0).check(), Ok(()));
        assert!(matches!(at(0, -1.0).check(), Err(InvalidField::Eta { .. })));
        assert!(matches!(
            at(0, f64::NAN).check(),
            Err(InvalidField::Eta { .. })
        ));
    }

    /// 64-bit fields at and beyond 2^53, where an f64 no longer holds every
    /// integer: 2^53 and 2^53 + 1 read as the same f64, so a comparison in
    /// floating point would take them as equal at eta 0. Each pair here
    /// differs by 1 (or spans the whole range), so only an exact integer
    /// comparison gives these answers.
    #[test]
    fn integer_fields_compare_exactly_beyond_2_pow_53() {
        let field = |kind, eta| Comparator {
            fields: vec![Field {
                offset: 0,
                kind,
                eta,
            }],
        };
        let u = |v: u64| v.to_be_bytes();
        let i = |v: i64| v.to_be_bytes();
        let big = 1u64 << 53;
        let exact = field(FieldKind::U64, 0.0);
        assert!(exact.compare(&u(big), &u(big)).is_ok());
        assert_eq!(
            exact.compare(&u(big), &u(big + 1)).unwrap_err().to_string(),
            "field at 0: 9007199254740992 and 9007199254740993 differ by more than eta 0"
        );
        assert!(exact.compare(&u(u64::MAX - 1), &u(u64::MAX)).is_err());
        assert!(
            field(FieldKind::U64, 1.0)
                .compare(&u(big), &u(big + 1))
                .is_ok()
        );
        assert!(
            field(FieldKind::U64, 1.0)
                .compare(&u(big), &u(big + 2))
                .is_err()
        );
        // A fractional eta accepts what its integer part does.
        let one_and_a_half = field(FieldKind::U64, 1.5);
        assert!(
            one_and_a_half
                .compare(&u(u64::MAX), &u(u64::MAX - 1))
                .is_ok()
        );
        assert!(
            one_and_a_half
                .compare(&u(u64::MAX), &u(u64::MAX - 2))
                .is_err()
        );
        let signed = field(FieldKind::I64, 0.0);
        assert!(signed.compare(&i(-(1 << 53) - 1), &i(-(1 << 53))).is_err());
        assert!(signed.compare(&i(i64::MIN), &i(i64::MAX)).is_err());
        // The whole range apart, without overflow.
        assert!(
            field(FieldKind::I64, f64::INFINITY)
                .compare(&i(i64::MIN), &i(i64::MAX))
                .is_ok()
        );
        // A negative or NaN eta accepts nothing, as for floats.
        assert!(field(FieldKind::U64, -1.0).compare(&u(7), &u(7)).is_err());
        assert!(
            field(FieldKind::U64, f64::NAN)
                .compare(&u(7), &u(7))
                .is_err()
        );
    }

    #[test]
    fn n_consecutive_matches_converge_and_a_mismatch_starts_over() {
        let mut c = Convergence::new(3);
        assert!(!c.record(1, Ok(())));
        assert!(!c.record(2, Ok(())));
        let mismatch = Mismatch::Byte {
            offset: 0,
            src: 1,
            dst: 2,
        };
        assert!(!c.record(3, Err(mismatch.clone())));
        assert_eq!(c.last_mismatch, Some((3, mismatch)));
        assert!(!c.record(4, Ok(())));
        assert!(!c.record(5, Ok(())));
        assert!(c.record(6, Ok(())));
        assert_eq!(c.compared(), 6);
    }

    fn out(text: &str) -> Answer {
        Answer {
            to: Some("192.0.2.1:4000".parse().unwrap()),
            payload: text.as_bytes().to_vec(),
        }
    }

    /// What an output frame is compared by: the device it goes to and its
    /// UDP payload; a frame that is not UDP, whole.
    #[test]
    fn an_answer_is_where_an_output_goes_and_what_it_says() {
        let mut frame = Vec::new();
        etherparse::PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([192, 0, 2, 10], [192, 0, 2, 1], 64)
            .udp(5000, 4001)
            .write(&mut frame, b"7 7 3 ab")
            .unwrap();
        let answer = Answer::of(&frame);
        assert_eq!(answer.to, Some("192.0.2.1:4001".parse().unwrap()));
        assert_eq!(answer.payload, b"7 7 3 ab");
        let not_udp = Answer::of(&[0xffu8; 20]);
        assert_eq!((not_udp.to, not_udp.payload.len()), (None, 20));
    }

    /// Outputs that say the same to different devices do not match.
    #[test]
    fn the_same_answer_to_another_device_is_a_mismatch() {
        let mut elsewhere = out("y1");
        elsewhere.to = Some("192.0.2.1:4002".parse().unwrap());
        let mismatch = out("y1").compare(&elsewhere, &Comparator::default());
        assert_eq!(
            mismatch.unwrap_err().to_string(),
            "to 192.0.2.1:4000 and to 192.0.2.1:4002"
        );
        assert!(
            out("y1")
                .compare(&out("y1"), &Comparator::default())
                .is_ok()
        );
    }

    /// The destination answers first; the source's log is behind: nothing
    /// is compared until the source has answered, and then in order.
    #[test]
    fn pairing_waits_for_the_source_log() {
        let (comparator, mut convergence) = (Comparator::default(), Convergence::new(3));
        let mut pairing = Pairing::after_replay(10);
        assert_eq!(pairing.after(), 11);
        for seq in 12..=14 {
            pairing.theirs(seq, out(&format!("y{seq}")));
        }
        assert_eq!((pairing.after(), pairing.waiting_for()), (14, Some(14)));
        pairing.ours(12, out("y12"));
        pairing.compare(&comparator, &mut convergence);
        assert_eq!((convergence.compared(), pairing.reached()), (1, 12));
        assert!(!pairing.ours_reached(13));
        pairing.ours(13, out("y13"));
        pairing.ours(14, out("y14"));
        pairing.ours(15, out("y15"));
        pairing.compare(&comparator, &mut convergence);
        assert!(convergence.converged());
        assert_eq!(convergence.compared(), 3);
        // The source's answer to 15 waits for the destination's.
        pairing.theirs(15, out("wrong"));
        let mut more = Convergence::new(1);
        pairing.compare(&comparator, &mut more);
        assert_eq!(more.last_mismatch.map(|(seq, _)| seq), Some(15));
    }

    /// An input answered twice on either side (a shared tag: the instance
    /// had several inputs queued) is not compared; the next one is.
    #[test]
    fn pairing_skips_inputs_answered_twice() {
        let (comparator, mut convergence) = (Comparator::default(), Convergence::new(2));
        let mut pairing = Pairing::after_replay(0);
        pairing.theirs(1, out("a"));
        pairing.theirs(1, out("b"));
        pairing.ours(1, out("a"));
        pairing.theirs(2, out("c"));
        pairing.ours(2, out("c"));
        pairing.ours(2, out("x"));
        pairing.theirs(3, out("d"));
        pairing.ours(3, out("d"));
        pairing.compare(&comparator, &mut convergence);
        assert_eq!(convergence.compared(), 1, "only input 3 is compared");
        assert!(!convergence.converged());
        assert_eq!(pairing.waiting_for(), None);
    }
}

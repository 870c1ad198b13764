//! Output comparison and convergence: the source compares the two
//! instances' outputs until N in a row match.
//!
//! Outputs of the source and destination instances are matched by the input
//! that caused them (the sequence number the egress program tags them with)
//! and compared: byte for byte, or with a tolerance eta on declared numeric
//! fields (gundall2022 Eq. 1: |y_src - y_dst| <= eta), every other byte
//! still equal. A handover needs N consecutive matches (govindaraj2019).
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use crate::migration::{
    protocol::{Output, Step},
    report::MigrationError,
    source::{Migration, Source, step},
};

/// A numeric field of an output's UDP payload, big-endian.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    /// Byte offset in the UDP payload.
    pub offset: usize,
    #[serde(rename = "type")]
    pub kind: FieldKind,
    /// Largest accepted difference.
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

impl FieldKind {
    fn len(self) -> usize {
        match self {
            Self::U16 | Self::I16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 => 8,
        }
    }

    fn read(self, b: &[u8]) -> f64 {
        let a = |n: usize| -> [u8; 8] {
            let mut x = [0; 8];
            x[..n].copy_from_slice(&b[..n]);
            x
        };
        match self {
            Self::U16 => u16::from_be_bytes([b[0], b[1]]) as f64,
            Self::I16 => i16::from_be_bytes([b[0], b[1]]) as f64,
            Self::U32 => u32::from_be_bytes(b[..4].try_into().unwrap()) as f64,
            Self::I32 => i32::from_be_bytes(b[..4].try_into().unwrap()) as f64,
            Self::F32 => f32::from_be_bytes(b[..4].try_into().unwrap()) as f64,
            Self::U64 => u64::from_be_bytes(a(8)) as f64,
            Self::I64 => i64::from_be_bytes(a(8)) as f64,
            Self::F64 => f64::from_be_bytes(a(8)),
        }
    }
}

/// How two outputs are compared: byte-equal when no fields are declared.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Comparator {
    #[serde(default)]
    pub fields: Vec<Field>,
}

impl Comparator {
    /// Why payloads `src` and `dst` differ, if they do.
    pub fn compare(&self, src: &[u8], dst: &[u8]) -> Result<(), String> {
        if src.len() != dst.len() {
            return Err(format!("lengths {} and {}", src.len(), dst.len()));
        }
        let mut covered = vec![false; src.len()];
        for f in &self.fields {
            let end = f.offset + f.kind.len();
            if end > src.len() {
                return Err(format!(
                    "field at {} ({:?}) beyond the {}-byte output",
                    f.offset,
                    f.kind,
                    src.len()
                ));
            }
            let (a, b) = (
                f.kind.read(&src[f.offset..end]),
                f.kind.read(&dst[f.offset..end]),
            );
            // NaN on either side never matches.
            let within = matches!(
                (a - b).abs().partial_cmp(&f.eta),
                Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)
            );
            if !within {
                return Err(format!(
                    "field at {}: {a} and {b} differ by more than eta {}",
                    f.offset, f.eta
                ));
            }
            covered[f.offset..end].fill(true);
        }
        match (0..src.len()).find(|&i| !covered[i] && src[i] != dst[i]) {
            Some(i) => Err(format!("byte {i}: {:#04x} and {:#04x}", src[i], dst[i])),
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
    /// The latest mismatch: (input sequence, reason).
    pub last_mismatch: Option<(u64, String)>,
}

impl Convergence {
    /// Convergence after `needed` consecutive matches.
    pub fn new(needed: u32) -> Self {
        Self {
            needed,
            run: 0,
            compared: 0,
            last_mismatch: None,
        }
    }

    /// Records the comparison of the outputs answering input `seq`; returns
    /// whether the instances have now converged.
    pub fn record(&mut self, seq: u64, outcome: Result<(), String>) -> bool {
        self.compared += 1;
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
}

/// The UDP payload of an Ethernet frame; the whole frame if it is not UDP
/// (then it is compared whole).
pub fn udp_payload(frame: &[u8]) -> &[u8] {
    match etherparse::SlicedPacket::from_ethernet(frame) {
        Ok(etherparse::SlicedPacket {
            transport: Some(etherparse::TransportSlice::Udp(udp)),
            ..
        }) => udp.payload(),
        _ => frame,
    }
}

impl Migration {
    /// Compares the two instances' outputs, input by input, until
    /// `converge` in a row match; the deadline aborts.
    pub(super) async fn converge(
        &mut self,
        source: &mut Source,
        link: &mut TcpStream,
        replay_end: u64,
    ) -> Result<(), MigrationError> {
        let t = self.begin("converge")?;
        let deadline = Instant::now() + Duration::from_millis(self.request.deadline_ms);
        let mut convergence = Convergence::new(self.request.converge);
        // Outputs of replayed inputs may share a tag (the replay outruns the
        // instance); live ones from a little later do not.
        let mut after = replay_end + 1;
        // The destination's outputs the source's log has not reached yet: a
        // loaded source reads its log later than the destination answers.
        let mut waiting: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
        // The latest input the source's log shows an answer to.
        let mut reached = 0;
        while !convergence.converged() {
            // An overflow, not the mismatches it then causes, is the cause.
            source.check_log().map_err(|e| self.fail(e))?;
            if Instant::now() > deadline {
                let last = convergence
                    .last_mismatch
                    .as_ref()
                    .map(|(seq, why)| format!("; last mismatch: outputs for input {seq}: {why}"))
                    .unwrap_or_default();
                return Err(self.fail(format!(
                    "no {} matching outputs in a row within {} ms ({} compared; the \
                     destination answered up to input {after}, the source's log holds \
                     answers up to {reached}){last}",
                    self.request.converge,
                    self.request.deadline_ms,
                    convergence.compared()
                )));
            }
            let theirs: Vec<Output> = step(
                link,
                &Step::Outputs {
                    after,
                    count: self.request.converge as usize,
                    timeout_ms: 200,
                },
            )
            .await
            .map_err(|e| self.fail(e))?;
            for output in theirs.into_iter().filter(|o| o.flow_id == source.flow_id) {
                after = after.max(output.seq);
                waiting.entry(output.seq).or_default().push(output.payload);
            }
            let Some(&last) = waiting.keys().next_back() else {
                continue;
            };
            // The source instance answers those inputs about as soon.
            source
                .collect_outputs(last, Duration::from_millis(200))
                .await;
            // Compare up to the latest input the source has answered.
            reached = reached.max(source.seen.keys().next_back().copied().unwrap_or(0));
            while let Some(entry) = waiting.first_entry().filter(|e| *e.key() <= reached) {
                let (seq, theirs) = entry.remove_entry();
                let ours = source.seen.remove(&seq);
                // Compare only inputs answered once on both sides: a shared
                // tag means the instance had several inputs queued.
                if let (Some([ours]), [theirs]) = (ours.as_deref(), &theirs[..]) {
                    let outcome = self.request.compare.compare(ours, theirs);
                    if convergence.record(seq, outcome) {
                        break;
                    }
                }
            }
            // The source's answers to inputs the destination has not
            // answered yet stay for the next rounds.
            let done = waiting.keys().next().map_or(after, |&seq| seq - 1);
            source.seen.retain(|&seq, _| seq > done);
            if source.outputs.lost() > 0 {
                return Err(self.fail("the output log reader fell behind"));
            }
        }
        self.report.compared = convergence.compared();
        self.end(t);
        Ok(())
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
            c.compare(b"state 3", b"state 4").unwrap_err(),
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
    fn n_consecutive_matches_converge_and_a_mismatch_starts_over() {
        let mut c = Convergence::new(3);
        assert!(!c.record(1, Ok(())));
        assert!(!c.record(2, Ok(())));
        assert!(!c.record(3, Err("byte 0".into())));
        assert_eq!(c.last_mismatch, Some((3, "byte 0".into())));
        assert!(!c.record(4, Ok(())));
        assert!(!c.record(5, Ok(())));
        assert!(c.record(6, Ok(())));
        assert_eq!(c.compared(), 6);
    }
}

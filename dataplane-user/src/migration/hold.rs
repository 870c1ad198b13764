//! The exact checkpoint position (docs/design.md requirement 2).
//!
//! CRIU does not save a UDP socket's receive queue, so an input that waits
//! there at dump time is in neither the image nor the instance that resumes.
//! Before the final dump the dataplane holds the service's inputs (logged,
//! not delivered), the service drains its socket, and then every input up to
//! the flow's `last_delivered` is inside the image and none after it is.
//! An instance that keeps running gets the held inputs back by replay.
//!
//! Nothing held is skipped silently: an input the replay cannot give
//! (missing from the log, or too large for a replay frame) is passed over,
//! every later one still given, and each is named in the error; the gate
//! opens only then ([`open`] names any held input it opens over). A hold
//! keeps at most its [`Budget`] of time, inputs and bytes.
use std::{
    collections::{BTreeMap, HashSet, VecDeque},
    fmt,
    ops::RangeInclusive,
    path::Path,
    time::{Duration, Instant},
};

use dataplane_common::{
    GATE_DELIVER_ALL, GATE_DELIVER_FROM, GATE_HOLD_ALL, GATE_SEQUENCED, decide::gate_open,
};
use serde::{Deserialize, Serialize};

use crate::kernel::{
    injector::{Injector, ReplayError, Unreplayable},
    loader::{Dataplane, LoadError},
    logs::{Record, Records},
};

/// Inputs already past the XDP hook when the gate closes finish their way
/// into the socket within one softirq run; this is ample for that.
const SETTLE: Duration = Duration::from_millis(1);

/// Replay checks the instance's socket queue before each batch of inputs
/// (`Injector::BATCH`, 16 pages of buffer) and waits while it holds more
/// than REPLAY_QUEUE_LIMIT bytes.
const REPLAY_QUEUE_LIMIT: u64 = 64 << 10;

/// How long replay waits for a numbered input to show up in the log before
/// it passes over it as missing.
const REPLAY_WAIT: Duration = Duration::from_secs(2);

/// How many passed-over inputs an error lists one by one.
const LISTED: usize = 8;

/// Errors of taking the checkpoint position and giving the held inputs back.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Dataplane(#[from] LoadError),
    #[error("reading process {pid}'s sockets: {source}")]
    Sockets { pid: u32, source: std::io::Error },
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error(
        "{0}; an input like it held for the checkpoint could not be given back, so nothing was \
         held"
    )]
    BeforeHold(Unreplayable),
    #[error(transparent)]
    PassedOver(#[from] PassedOver),
}

/// A flow's position: every input up to `last_delivered` reached the service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlowPosition {
    pub flow_id: u32,
    pub last_delivered: u64,
}

/// How much a hold may keep. Past any of these it ends at once (a dump
/// under way is stopped), every held input is given back, and the
/// migration fails naming the budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Budget {
    /// How long the instance's inputs may be held, its drain and dump
    /// included, in ms: the outage a leave-running migration may cost.
    pub ms: u64,
    /// Inputs held: each takes the replay about 37 µs to give back.
    pub inputs: u64,
    /// Bytes of held inputs, which the daemon keeps in memory until they
    /// are given back.
    pub bytes: u64,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            ms: 2_000,
            inputs: 100_000,
            bytes: 64 << 20,
        }
    }
}

impl Budget {
    /// Whether each limit allows a hold at all.
    pub fn is_valid(&self) -> bool {
        self.ms > 0 && self.inputs > 0 && self.bytes > 0
    }
}

/// A hold that went over its [`Budget`]: which limit, and how far it got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OverBudget {
    #[error("the hold went over its budget: held {held} ms, hold.ms is {budget}")]
    Ms { held: u64, budget: u64 },
    #[error("the hold went over its budget: {held} inputs held, hold.inputs is {budget}")]
    Inputs { held: u64, budget: u64 },
    #[error("the hold went over its budget: {held} bytes of inputs held, hold.bytes is {budget}")]
    Bytes { held: u64, budget: u64 },
}

/// Why a hold ended before its checkpoint was taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HoldEnd {
    #[error("{0}; the hold ended there, and every held input was given back in order")]
    OverBudget(OverBudget),
    /// A held input the replay cannot give back: holding on only delays
    /// the others.
    #[error("{0}, held for the checkpoint")]
    Unreplayable(Unreplayable),
}

/// "input 5", or "inputs 5 to 9".
pub fn name_inputs(range: &RangeInclusive<u64>) -> String {
    match (*range.start(), *range.end()) {
        (a, b) if a == b => format!("input {a}"),
        (a, b) => format!("inputs {a} to {b}"),
    }
}

/// Holds the inputs of `flow_id` (logged, not delivered) and returns its
/// position once inputs past the gate have settled. On error the gate is
/// open again.
pub fn hold(dataplane: &mut Dataplane, flow_id: u32) -> Result<FlowPosition, LoadError> {
    dataplane.set_input_gate(flow_id, GATE_HOLD_ALL, 0)?;
    std::thread::sleep(SETTLE);
    let position = dataplane.sequence(flow_id).map(|s| FlowPosition {
        flow_id,
        last_delivered: s.last_delivered,
    });
    if position.is_err() {
        let _ = dataplane.set_input_gate(flow_id, GATE_DELIVER_ALL, 0);
    }
    position
}

/// Waits until process `pid` has read its UDP sockets empty, or `stop`
/// (asked every 100 µs) ends the hold; whether it drained.
pub fn drain(pid: u32, stop: &mut dyn FnMut() -> bool) -> Result<bool, CheckpointError> {
    let queues = SocketQueues::of(pid)?;
    loop {
        if queues.bytes()? == 0 {
            return Ok(true);
        }
        if stop() {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Opens a sequenced gate that has given every held input back to
/// deliver every input: an input racing the change is delivered under
/// either mode, and nothing is lost.
pub fn release(dataplane: &mut Dataplane, flow_id: u32) -> Result<(), LoadError> {
    dataplane.set_input_gate(flow_id, GATE_DELIVER_ALL, 0)
}

/// Opens a held (or sequenced) gate over the inputs it holds, which the
/// instance then never gets (a hold given up, a daemon that died holding),
/// to deliver every later input: exactly those inputs, named.
///
/// Exactly, although inputs race the opening: taking the gate's word
/// stops a sequenced gate (an input exchanging it meanwhile is held), and
/// the gate then delivers from the input after the last one numbered, or
/// from the first to reach it if that comes first (`GATE_DELIVER_FROM`).
/// An input numbered before and still on its way is dropped, and named:
/// a gate that has given every input back opens with [`release`].
pub fn open(
    dataplane: &mut Dataplane,
    flow_id: u32,
) -> Result<Option<RangeInclusive<u64>>, LoadError> {
    let mode = dataplane.gate(flow_id)?.mode;
    if gate_open(mode) {
        return Ok(None);
    }
    let window = dataplane.gate_window()?;
    let taken = loop {
        let word = window.next_expected_word(flow_id);
        if window.exchange_next_expected(flow_id, word, 0) {
            break dataplane_common::decide::expected_input(word);
        }
    };
    let first = match mode {
        GATE_SEQUENCED => taken,
        // A held gate delivered nothing past its position.
        _ => dataplane.sequence(flow_id)?.last_delivered + 1,
    };
    window.set_input_gate(flow_id, GATE_DELIVER_FROM, 0);
    let last = dataplane.sequence(flow_id)?.last_seq;
    let from = match window.exchange_next_expected(flow_id, 0, last + 1) {
        true => last + 1,
        // An input reached the gate first: it delivers from that one.
        false => window.next_expected(flow_id),
    };
    Ok((first < from).then(|| first..=from - 1))
}

/// The inputs of a flow that a hold keeps, as the daemon collects them from
/// its log during the hold: counted against the [`Budget`], checked for
/// replay, and then (as [`Records`]) handed to [`resume`], followed by what
/// the log brings later.
pub struct Held<'a, R> {
    log: &'a mut R,
    position: FlowPosition,
    since: Instant,
    budget: Budget,
    kept: VecDeque<Record>,
    bytes: u64,
    end: Option<HoldEnd>,
}

impl<'a, R: Records> Held<'a, R> {
    /// The inputs held since `since` past `position`, read from `log`.
    pub fn new(log: &'a mut R, position: FlowPosition, since: Instant, budget: Budget) -> Self {
        Self {
            log,
            position,
            since,
            budget,
            kept: VecDeque::new(),
            bytes: 0,
            end: None,
        }
    }

    /// Collects what the log has staged and says whether the hold must end
    /// now (see [`Held::end`]); `dataplane` numbers the flow.
    pub fn watch(&mut self, dataplane: &Dataplane) -> bool {
        let FlowPosition {
            flow_id,
            last_delivered,
        } = self.position;
        while let Some(record) = self.log.try_next() {
            if record.header.flow_id != flow_id || record.header.seq <= last_delivered {
                continue;
            }
            if let Err(e) = Unreplayable::check(&record) {
                self.end.get_or_insert(HoldEnd::Unreplayable(e));
            }
            self.bytes += record.frame.len() as u64;
            self.kept.push_back(record);
        }
        let inputs = dataplane
            .sequence(flow_id)
            .map_or(0, |s| s.last_seq.saturating_sub(last_delivered));
        let ms = self.since.elapsed().as_millis() as u64;
        let budget = self.budget;
        let over = if ms >= budget.ms {
            Some(OverBudget::Ms {
                held: ms,
                budget: budget.ms,
            })
        } else if inputs > budget.inputs {
            Some(OverBudget::Inputs {
                held: inputs,
                budget: budget.inputs,
            })
        } else if self.bytes > budget.bytes {
            Some(OverBudget::Bytes {
                held: self.bytes,
                budget: budget.bytes,
            })
        } else {
            None
        };
        if let Some(over) = over {
            self.end.get_or_insert(HoldEnd::OverBudget(over));
        }
        self.end.is_some()
    }

    /// Why the hold had to end early, if it did.
    pub fn end(&self) -> Option<&HoldEnd> {
        self.end.as_ref()
    }
}

impl<R: Records + Send> Records for Held<'_, R> {
    fn try_next(&mut self) -> Option<Record> {
        self.kept.pop_front().or_else(|| self.log.try_next())
    }
    async fn next(&mut self) -> Option<Record> {
        match self.kept.pop_front() {
            Some(record) => Some(record),
            None => self.log.next().await,
        }
    }
}

/// Takes what `log` has staged of `flow_id` (inputs not held: delivered
/// already) and fails on one a replay could not give: one like it held for
/// the checkpoint would be lost to the instance.
pub fn check_before_hold(log: &mut impl Records, flow_id: u32) -> Result<(), CheckpointError> {
    while let Some(record) = log.try_next() {
        if record.header.flow_id == flow_id {
            Unreplayable::check(&record).map_err(CheckpointError::BeforeHold)?;
        }
    }
    Ok(())
}

/// Process `pid`'s UDP sockets, found once (its fds do not change while a
/// checkpoint holds or replays its inputs), to read their queues often.
pub struct SocketQueues {
    pid: u32,
    inodes: HashSet<String>,
}

impl SocketQueues {
    pub fn of(pid: u32) -> Result<Self, CheckpointError> {
        let err = |source| CheckpointError::Sockets { pid, source };
        let mut inodes = HashSet::new();
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).map_err(err)? {
            let Ok(target) = std::fs::read_link(fd.map_err(err)?.path()) else {
                continue;
            };
            if let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
            {
                inodes.insert(inode.to_string());
            }
        }
        Ok(Self { pid, inodes })
    }

    /// Bytes waiting in their receive queues.
    pub fn bytes(&self) -> Result<u64, CheckpointError> {
        let mut bytes = 0;
        for table in ["udp", "udp6"] {
            let path = format!("/proc/{}/net/{table}", self.pid);
            let text = std::fs::read_to_string(Path::new(&path)).map_err(|source| {
                CheckpointError::Sockets {
                    pid: self.pid,
                    source,
                }
            })?;
            bytes += queued_bytes(&text, &self.inodes);
        }
        Ok(bytes)
    }
}

/// Sums `rx_queue` over the rows of a /proc/net/udp table whose inode is in `inodes`.
fn queued_bytes(table: &str, inodes: &HashSet<String>) -> u64 {
    table
        .lines()
        .skip(1)
        .filter_map(|row| {
            let fields: Vec<&str> = row.split_whitespace().collect();
            // sl local rem st tx_queue:rx_queue tr:when retrnsmt uid timeout inode ...
            let inode = fields.get(9)?;
            if !inodes.contains(*inode) {
                return None;
            }
            let (_, rx) = fields.get(4)?.split_once(':')?;
            u64::from_str_radix(rx, 16).ok()
        })
        .sum()
}

/// Hands a held flow back to an instance (process `pid`) that kept running
/// through its checkpoint (leave-running mode), or to one restored from it.
/// The gate turns sequenced at S+1, and the held inputs S+1.. (and any live
/// input held while they are injected) are replayed from the log in order,
/// until every numbered input has been delivered; from then on live inputs
/// pass the gate directly, each once.
///
/// An input the replay cannot give (missing from the log after
/// `REPLAY_WAIT`, or too large) is passed over, and every input after it
/// still given: the gate never opens over held inputs. Those passed over
/// are named in [`CheckpointError::PassedOver`] once the rest are through.
/// Returns how many inputs were replayed.
pub async fn resume(
    dataplane: &mut Dataplane,
    position: FlowPosition,
    pid: u32,
    injector: &mut Injector,
    log: &mut impl Records,
) -> Result<u64, CheckpointError> {
    let flow_id = position.flow_id;
    let window = dataplane.gate_window()?;
    window.set_input_gate(flow_id, GATE_SEQUENCED, position.last_delivered + 1);
    let queues = SocketQueues::of(pid)?;
    let mut pending: BTreeMap<u64, Record> = BTreeMap::new();
    let (mut replayed, mut passed) = (0, PassedOver::default());
    // The input waited for, until when, and the last input numbered when
    // the wait began: only those had the whole wait to show up.
    let mut waiting: Option<(u64, Instant, u64)> = None;
    loop {
        let next = window.next_expected(flow_id);
        while let Some(record) = log.try_next() {
            if record.header.flow_id == flow_id && record.header.seq >= next {
                pending.insert(record.header.seq, record);
            }
        }
        // Up to the last input numbered here, or past it the last at hand:
        // the serving host feeds a replica it adopts inputs numbered there
        // before its mirror copies began (see `Target::feed`).
        let staged = pending.last_key_value().map_or(0, |(&seq, _)| seq);
        let last = dataplane.sequence(flow_id)?.last_seq.max(staged);
        if next > last {
            return match passed.is_empty() {
                true => Ok(replayed),
                false => Err(passed.into()),
            };
        }
        // Delivered since they were staged (live copies on a destination).
        while let Some(entry) = pending.first_entry()
            && *entry.key() < next
        {
            entry.remove();
        }
        // The inputs from `next` on that are at hand and replayable, in order.
        let mut batch = Vec::new();
        while batch.len() < Injector::BATCH {
            let seq = next + batch.len() as u64;
            match pending.get(&seq).map(Unreplayable::check) {
                Some(Ok(())) => batch.extend(pending.remove(&seq)),
                _ => break,
            }
        }
        if !batch.is_empty() {
            // An injected frame costs the socket a page of buffer: pace
            // the replay by the instance's queue, or the socket drops.
            while queues.bytes()? > REPLAY_QUEUE_LIMIT {
                tokio::time::sleep(Duration::from_micros(100)).await;
            }
            injector.inject(&batch)?;
            replayed += batch.len() as u64;
            continue;
        }
        if let Some(Err(why)) = pending.get(&next).map(Unreplayable::check) {
            if window.pass_over(flow_id, next, next + 1) {
                passed.unreplayable.push(why);
            }
            continue;
        }
        let (_, until, last_then) = match waiting {
            Some(w) if w.0 == next => w,
            _ => *waiting.insert((next, Instant::now() + REPLAY_WAIT, last)),
        };
        let left = until.saturating_duration_since(Instant::now());
        if !left.is_zero() {
            match tokio::time::timeout(left, log.next()).await {
                Ok(Some(record)) => {
                    if record.header.flow_id == flow_id && record.header.seq >= next {
                        pending.insert(record.header.seq, record);
                    }
                }
                // The log ended: nothing more will come.
                Ok(None) => waiting = Some((next, Instant::now(), last_then)),
                Err(_) => {}
            }
            continue;
        }
        // Not in the log: pass over it, up to the next input at hand.
        let end = pending
            .keys()
            .next()
            .map_or(last_then, |&seq| seq - 1)
            .min(last_then);
        if window.pass_over(flow_id, next, end + 1) {
            passed.missing.push(next..=end);
        }
        waiting = None;
    }
}

/// Inputs a replay passed over because it could not give them, each
/// named; it gave every other input, in order.
#[derive(Debug, Default, PartialEq, Eq, thiserror::Error)]
pub struct PassedOver {
    /// Logged, but not replayable whole.
    pub unreplayable: Vec<Unreplayable>,
    /// Numbered, but not in the log.
    pub missing: Vec<RangeInclusive<u64>>,
}

impl PassedOver {
    pub fn is_empty(&self) -> bool {
        self.unreplayable.is_empty() && self.missing.is_empty()
    }
}

impl fmt::Display for PassedOver {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let missing = self
            .missing
            .iter()
            .map(|range| match range.start() == range.end() {
                true => format!("{} is not in the log", name_inputs(range)),
                false => format!("{} are not in the log", name_inputs(range)),
            });
        let all: Vec<String> = self
            .unreplayable
            .iter()
            .map(ToString::to_string)
            .chain(missing)
            .collect();
        write!(
            f,
            "the instance did not get these inputs, and got every other one in order: {}",
            all[..all.len().min(LISTED)].join("; ")
        )?;
        if all.len() > LISTED {
            write!(f, "; and {} more", all.len() - LISTED)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logged(seq: u64, len: usize, captured: usize) -> Record {
        Record {
            header: dataplane_common::RecordHeader {
                seq,
                frame_len: len as u32,
                captured_len: captured as u32,
                ..Default::default()
            },
            frame: vec![0; captured].into(),
        }
    }

    #[test]
    fn an_input_is_replayable_only_whole_and_within_the_replay_frame() {
        use crate::kernel::injector::MAX_REPLAY_INPUT;
        let max = MAX_REPLAY_INPUT;
        assert_eq!(max, 2001, "a full-size frame and a VLAN tag");
        assert_eq!(Unreplayable::check(&logged(1, max, max)), Ok(()));
        assert_eq!(
            Unreplayable::check(&logged(2, max + 1, max + 1)),
            Err(Unreplayable::TooLarge {
                seq: 2,
                len: max + 1
            })
        );
        // Cut by snap_len: the log does not hold the whole input.
        assert_eq!(
            Unreplayable::check(&logged(3, 1000, 128)),
            Err(Unreplayable::Cut {
                seq: 3,
                len: 1000,
                captured: 128
            })
        );
    }

    #[test]
    fn inputs_passed_over_are_each_named() {
        let passed = PassedOver {
            unreplayable: vec![Unreplayable::TooLarge { seq: 7, len: 2042 }],
            missing: vec![9..=9, 11..=14],
        };
        assert_eq!(
            passed.to_string(),
            "the instance did not get these inputs, and got every other one in order: input 7 \
             is a 2042-byte frame: a replay takes frames of up to 2001 bytes; input 9 is not in \
             the log; inputs 11 to 14 are not in the log"
        );
        let many = PassedOver {
            missing: (1..=10).map(|s| s * 2..=s * 2).collect(),
            ..Default::default()
        };
        assert!(
            many.to_string()
                .ends_with("input 16 is not in the log; and 2 more")
        );
    }

    #[test]
    fn sums_the_receive_queues_of_the_processs_sockets() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
            12: 0A0200C0:1388 00000000:0000 07 00000000:00000300 00:00000000 00000000     0        0 4242 2 0000000000000000 0\n\
            13: 0100007F:0035 00000000:0000 07 00000000:00000100 00:00000000 00000000     0        0 9999 2 0000000000000000 0\n";
        let ours: HashSet<String> = ["4242".to_string()].into();
        assert_eq!(queued_bytes(table, &ours), 0x300);
        assert_eq!(queued_bytes(table, &HashSet::new()), 0);
    }
}

//! The exact checkpoint position (docs/design.md requirement 2).
//!
//! CRIU does not save a UDP socket's receive queue, so an input that waits
//! there at dump time is in neither the image nor the instance that resumes.
//! Before the final dump the dataplane holds the service's inputs (logged,
//! not delivered), the service drains its socket, and then every input up to
//! the flow's `last_delivered` is inside the image and none after it is.
//! An instance that keeps running gets the held inputs back by replay.
use std::{
    collections::{BTreeMap, HashSet},
    path::Path,
    time::{Duration, Instant},
};

use dataplane_common::{GATE_DELIVER_ALL, GATE_HOLD_ALL, GATE_SEQUENCED};

use crate::kernel::{
    injector::{Injector, ReplayError},
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

/// How long replay waits for a numbered input to show up in the log.
const REPLAY_WAIT: Duration = Duration::from_secs(2);

/// Errors of taking the checkpoint position.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Dataplane(#[from] LoadError),
    #[error("reading process {pid}'s sockets: {source}")]
    Sockets { pid: u32, source: std::io::Error },
    #[error("process {pid} did not drain its socket queue within {waited:?} ({bytes} bytes left)")]
    NotDrained {
        pid: u32,
        waited: Duration,
        bytes: u64,
    },
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error("flow {flow_id}: input {seq} is numbered but not in the log (the log overflowed?)")]
    Missing { flow_id: u32, seq: u64 },
}

/// A flow's position: every input up to `last_delivered` reached the service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlowPosition {
    pub flow_id: u32,
    pub last_delivered: u64,
}

/// Holds the inputs of `flow_ids` and waits until process `pid` has read
/// its UDP sockets empty; returns each flow's position. On error the gates
/// are open again.
pub fn hold_and_drain(
    dataplane: &mut Dataplane,
    flow_ids: &[u32],
    pid: u32,
    timeout: Duration,
) -> Result<Vec<FlowPosition>, CheckpointError> {
    let start = Instant::now();
    set_gates(dataplane, flow_ids, GATE_HOLD_ALL)?;
    let drained = (|| {
        let queues = SocketQueues::of(pid)?;
        std::thread::sleep(SETTLE);
        loop {
            let bytes = queues.bytes()?;
            if bytes == 0 {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(CheckpointError::NotDrained {
                    pid,
                    waited: start.elapsed(),
                    bytes,
                });
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    })();
    let positions = drained.and_then(|()| {
        flow_ids
            .iter()
            .map(|&flow_id| {
                let last_delivered = dataplane.sequence(flow_id)?.last_delivered;
                Ok(FlowPosition {
                    flow_id,
                    last_delivered,
                })
            })
            .collect()
    });
    if positions.is_err() {
        let _ = release(dataplane, flow_ids);
    }
    positions
}

/// Opens the gates of `flow_ids` again.
pub fn release(dataplane: &mut Dataplane, flow_ids: &[u32]) -> Result<(), LoadError> {
    set_gates(dataplane, flow_ids, GATE_DELIVER_ALL)
}

fn set_gates(dataplane: &mut Dataplane, flow_ids: &[u32], mode: u32) -> Result<(), LoadError> {
    flow_ids
        .iter()
        .try_for_each(|&id| dataplane.set_input_gate(id, mode, 0))
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
/// through its checkpoint (leave-running mode). The gate turns sequenced at S+1, and the
/// held inputs S+1.. (and any live input held while they are injected) are
/// replayed from the log in order, until every numbered input has been
/// delivered; from then on live inputs pass the gate directly, each once.
/// Returns how many inputs were replayed.
pub async fn resume(
    dataplane: &mut Dataplane,
    position: FlowPosition,
    pid: u32,
    injector: &mut Injector,
    log: &mut impl Records,
) -> Result<u64, CheckpointError> {
    let flow_id = position.flow_id;
    dataplane.set_input_gate(flow_id, GATE_SEQUENCED, position.last_delivered + 1)?;
    let queues = SocketQueues::of(pid)?;
    let mut pending: BTreeMap<u64, Record> = BTreeMap::new();
    let mut replayed = 0;
    loop {
        let next = dataplane.gate(flow_id)?.next_expected;
        if next > dataplane.sequence(flow_id)?.last_seq {
            return Ok(replayed);
        }
        while let Some(record) = log.try_next() {
            if record.header.flow_id == flow_id && record.header.seq >= next {
                pending.insert(record.header.seq, record);
            }
        }
        // The inputs from `next` on that are at hand, in order.
        let batch: Vec<Record> = (next..)
            .map_while(|seq| pending.remove(&seq))
            .take(Injector::BATCH)
            .collect();
        match batch.len() {
            1.. => {
                // An injected frame costs the socket a page of buffer: pace
                // the replay by the instance's queue, or the socket drops.
                while queues.bytes()? > REPLAY_QUEUE_LIMIT {
                    tokio::time::sleep(Duration::from_micros(100)).await;
                }
                injector.inject(&batch)?;
                replayed += batch.len() as u64;
            }
            0 => {
                let record = tokio::time::timeout(REPLAY_WAIT, log.next())
                    .await
                    .ok()
                    .flatten()
                    .ok_or(CheckpointError::Missing { flow_id, seq: next })?;
                if record.header.flow_id == flow_id && record.header.seq >= next {
                    pending.insert(record.header.seq, record);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

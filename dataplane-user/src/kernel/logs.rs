//! Ring-buffer consumers: kernel log records into `bytes::Bytes`, staged
//! through a `ringbuf` SPSC queue between the reader task and its consumer.
//!
//! When the queue is full the reader stops draining the kernel ring rather
//! than drop a record: back-pressure reaches the kernel, whose `ring_full`
//! counter then says an input could not be logged.
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use aya::maps::{MapData, RingBuf};
use bytes::Bytes;
use dataplane_common::RecordHeader;
use ringbuf::{
    HeapCons, HeapProd, HeapRb,
    traits::{Consumer, Observer, Producer, Split},
};
use tokio::{
    io::unix::AsyncFd,
    sync::{Notify, mpsc},
    task::JoinHandle,
};

/// One log record: its header and the captured frame bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub header: RecordHeader,
    pub frame: Bytes,
}

/// A ring-buffer item that is not a well-formed record.
#[derive(Debug, thiserror::Error)]
#[error("malformed log record: {0}")]
pub struct RecordError(&'static str);

impl Record {
    /// Parses a raw ring-buffer item.
    pub fn parse(item: &[u8]) -> Result<Self, RecordError> {
        const HEADER: usize = size_of::<RecordHeader>();
        if item.len() < HEADER {
            return Err(RecordError("shorter than its header"));
        }
        let header: RecordHeader = bytemuck::pod_read_unaligned(&item[..HEADER]);
        let end = HEADER + header.captured_len as usize;
        if end > item.len() || header.captured_len > header.frame_len {
            return Err(RecordError("captured length beyond the record"));
        }
        Ok(Self {
            header,
            frame: Bytes::copy_from_slice(&item[HEADER..end]),
        })
    }
}

/// The consuming end of a log: records in the order the kernel committed them.
pub struct LogReader {
    queue: HeapCons<Record>,
    ready: Arc<Notify>,
    space: Arc<Notify>,
    reader: JoinHandle<()>,
}

impl LogReader {
    /// Starts draining `ring` on the current tokio runtime, staging up to
    /// `capacity` records.
    pub fn spawn(ring: RingBuf<MapData>, capacity: usize) -> std::io::Result<Self> {
        // SAFETY: the RingBuf owns its map fd and keeps it open and unchanged
        // for as long as it lives, which is as long as the AsyncFd.
        let ring = unsafe { AsyncFd::register(ring) }?;
        let (producer, queue) = HeapRb::new(capacity).split();
        let ready = Arc::new(Notify::new());
        let space = Arc::new(Notify::new());
        let reader = tokio::spawn(drain(ring, producer, ready.clone(), space.clone()));
        Ok(Self {
            queue,
            ready,
            space,
            reader,
        })
    }

    /// The next record, waiting for one if none is staged.
    pub async fn next(&mut self) -> Record {
        let ready = self.ready.clone();
        loop {
            let ready = ready.notified();
            if let Some(record) = self.try_next() {
                return record;
            }
            ready.await;
        }
    }

    /// The next staged record, if any.
    pub fn try_next(&mut self) -> Option<Record> {
        let record = self.queue.try_pop();
        if record.is_some() {
            self.space.notify_one();
        }
        record
    }
}

impl Drop for LogReader {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A source of log records in the order the kernel committed them: a
/// [`LogReader`] itself, or a [`Subscription`] to a daemon's [`Tap`].
pub trait Records {
    /// The next record already staged, if any.
    fn try_next(&mut self) -> Option<Record>;
    /// The next record; `None` once the source has ended.
    fn next(&mut self) -> impl std::future::Future<Output = Option<Record>> + Send;
}

impl Records for LogReader {
    fn try_next(&mut self) -> Option<Record> {
        LogReader::try_next(self)
    }
    async fn next(&mut self) -> Option<Record> {
        Some(LogReader::next(self).await)
    }
}

/// A daemon's standing reader of one log: it drains the kernel ring all the
/// time (an undrained ring fills, and then inputs go unnumbered), and hands
/// each record to the subscriber whose flows it is of: a running migration.
/// Migrations of different flows run at once, each with its own records.
pub struct Tap {
    subscribers: Mutex<Vec<Subscriber>>,
    /// Subscribers to the inputs flooded to a hot replica's flows
    /// (`RECORD_FLOODED`), which no other subscriber sees.
    flooded: Mutex<Vec<Subscriber>>,
}

/// One migration's claim on a [`Tap`]: its flows, where their records go,
/// and how many it did not take in time.
struct Subscriber {
    flows: Vec<u32>,
    sender: mpsc::Sender<Record>,
    /// Records it did not take in time: a replay that needs them cannot be
    /// exact, and the migration must abort.
    lost: Arc<AtomicU64>,
}

/// Why a tap cannot be subscribed to.
#[derive(Debug, thiserror::Error)]
#[error("flow {0} is in another migration")]
pub struct TapBusy(pub u32);

impl Tap {
    /// Starts draining `reader` (a [`LogReader`]) on the current tokio runtime.
    pub fn spawn(mut reader: impl Records + Send + 'static) -> Arc<Self> {
        let tap = Arc::new(Self {
            subscribers: Mutex::new(Vec::new()),
            flooded: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&tap);
        tokio::spawn(async move {
            loop {
                // A busy log always has a record staged: without this the
                // task would never yield, and keep the other logs' tasks
                // (and the migration) off its worker.
                tokio::task::coop::consume_budget().await;
                let Some(record) = reader.next().await else {
                    return;
                };
                let Some(tap) = weak.upgrade() else { return };
                let subscribers = match record.header.kind {
                    dataplane_common::RECORD_FLOODED => tap.flooded.lock().unwrap(),
                    _ => tap.subscribers.lock().unwrap(),
                };
                let flow_id = record.header.flow_id;
                if let Some(s) = subscribers.iter().find(|s| s.flows.contains(&flow_id))
                    && s.sender.try_send(record).is_err()
                {
                    s.lost.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        tap
    }

    /// The records of `flows` from now on, staged up to `capacity`, until
    /// the subscription is dropped; refused for a flow another
    /// subscription has.
    pub fn subscribe(
        self: &Arc<Self>,
        flows: &[u32],
        capacity: usize,
    ) -> Result<Subscription, TapBusy> {
        Self::join(&self.subscribers, flows, capacity)
    }

    /// The inputs flooded to `flows` (`RECORD_FLOODED`) from now on, as
    /// [`Tap::subscribe`] gives the others.
    pub fn subscribe_flooded(
        self: &Arc<Self>,
        flows: &[u32],
        capacity: usize,
    ) -> Result<Subscription, TapBusy> {
        Self::join(&self.flooded, flows, capacity)
    }

    fn join(
        subscribers: &Mutex<Vec<Subscriber>>,
        flows: &[u32],
        capacity: usize,
    ) -> Result<Subscription, TapBusy> {
        let mut subscribers = subscribers.lock().unwrap();
        subscribers.retain(|s| !s.sender.is_closed());
        if let Some(&taken) = flows
            .iter()
            .find(|f| subscribers.iter().any(|s| s.flows.contains(f)))
        {
            return Err(TapBusy(taken));
        }
        let (sender, receiver) = mpsc::channel(capacity);
        let lost = Arc::new(AtomicU64::new(0));
        subscribers.push(Subscriber {
            flows: flows.to_vec(),
            sender,
            lost: lost.clone(),
        });
        Ok(Subscription { receiver, lost })
    }
}

/// Records of a [`Tap`] for one migration: its flows'.
pub struct Subscription {
    receiver: mpsc::Receiver<Record>,
    lost: Arc<AtomicU64>,
}

impl Subscription {
    /// Records that were committed but not staged because this subscriber
    /// fell behind.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

/// Watches a host's input log during a migration for inputs it failed:
/// the kernel found the ring full (a captured input then goes on neither
/// logged nor mirrored, a mirrored one is neither logged nor kept for the
/// replay), or this daemon's reader fell behind. A migration must not hand
/// over then: the migrated instance would miss those inputs.
pub struct LogGuard {
    /// The kernel's `ring_full` count when the migration began.
    ring_full: u64,
}

impl LogGuard {
    /// Starts watching `dataplane`'s input log: earlier overflows do not count.
    pub fn new(dataplane: &crate::kernel::loader::Dataplane) -> Result<Self, LogError> {
        Ok(Self {
            ring_full: ring_full(dataplane)?,
        })
    }

    /// An error naming the failure if the log failed an input since [`LogGuard::new`].
    pub fn check(
        &self,
        dataplane: &crate::kernel::loader::Dataplane,
        reader: &Subscription,
    ) -> Result<(), LogError> {
        let full = ring_full(dataplane)? - self.ring_full;
        if full > 0 {
            return Err(LogError::Overflowed(full));
        }
        if reader.lost() > 0 {
            return Err(LogError::ReaderBehind(reader.lost()));
        }
        Ok(())
    }
}

/// How the input log failed a migration.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(
        "the input log overflowed: {0} inputs found it full (ring_full) and were not logged; \
         the migrated instance would miss them (a larger input_ring_mib helps)"
    )]
    Overflowed(u64),
    #[error("this daemon's input log reader fell behind and lost {0} records")]
    ReaderBehind(u64),
    #[error(transparent)]
    Kernel(#[from] crate::kernel::loader::LoadError),
}

fn ring_full(dataplane: &crate::kernel::loader::Dataplane) -> Result<u64, LogError> {
    Ok(dataplane
        .counters()?
        .get(dataplane_common::counter::RING_FULL))
}

impl Records for Subscription {
    fn try_next(&mut self) -> Option<Record> {
        self.receiver.try_recv().ok()
    }
    async fn next(&mut self) -> Option<Record> {
        self.receiver.recv().await
    }
}

async fn drain(
    mut ring: AsyncFd<RingBuf<MapData>>,
    mut queue: HeapProd<Record>,
    ready: Arc<Notify>,
    space: Arc<Notify>,
) {
    loop {
        let Ok(mut guard) = ring.readable_mut().await else {
            tracing::error!("log ring buffer fd failed; stopping its reader");
            return;
        };
        let mut pending = true;
        while pending {
            if queue.is_full() {
                ready.notify_one();
                space.notified().await;
                continue;
            }
            match guard.get_inner_mut().next() {
                Some(item) => match Record::parse(&item) {
                    Ok(record) => {
                        // Cannot fail: the queue was not full and this task is its only producer.
                        let _ = queue.try_push(record);
                        // The consumer waits only on an empty queue.
                        if queue.occupied_len() == 1 {
                            ready.notify_one();
                        }
                    }
                    Err(e) => tracing::warn!("{e}"),
                },
                None => pending = false,
            }
            // A ring filled faster than one worker drains it is never empty:
            // yield now and then, as the tap does.
            if pending {
                tokio::task::coop::consume_budget().await;
            }
        }
        guard.clear_ready();
        ready.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records as a test sends them.
    struct Sent(mpsc::UnboundedReceiver<Record>);

    impl Records for Sent {
        fn try_next(&mut self) -> Option<Record> {
            self.0.try_recv().ok()
        }
        async fn next(&mut self) -> Option<Record> {
            self.0.recv().await
        }
    }

    fn record(flow_id: u32, seq: u64) -> Record {
        Record {
            header: RecordHeader {
                seq,
                flow_id,
                ..Default::default()
            },
            frame: Bytes::new(),
        }
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_keeps_what_it_took_and_is_told_the_rest() {
        // A migration reading the output log too slowly must learn that it
        // missed records (it then fails rather than compare a partial
        // stream); the tap itself never stops draining the kernel's ring.
        let (send, sent) = mpsc::unbounded_channel();
        let tap = Tap::spawn(Sent(sent));
        let mut slow = tap.subscribe(&[0], 4).unwrap();
        assert!(
            matches!(tap.subscribe(&[1, 0], 4), Err(TapBusy(0))),
            "one subscriber per flow"
        );
        for seq in 1..=10 {
            send.send(record(0, seq)).unwrap();
        }
        let all_lost = async {
            while slow.lost() < 6 {
                tokio::task::yield_now().await;
            }
        };
        let waited = tokio::time::timeout(std::time::Duration::from_secs(5), all_lost).await;
        assert!(waited.is_ok(), "lost {} of 6", slow.lost());
        assert_eq!(slow.lost(), 6);
        let kept: Vec<u64> = std::iter::from_fn(|| slow.try_next().map(|r| r.header.seq)).collect();
        assert_eq!(kept, [1, 2, 3, 4]);
        // The next migration of the flow starts with nothing lost.
        drop(slow);
        let next = tap.subscribe(&[0], 4).unwrap();
        assert_eq!(next.lost(), 0);
    }

    #[tokio::test]
    async fn each_subscriber_gets_the_records_of_its_own_flows_only() {
        let (send, sent) = mpsc::unbounded_channel();
        let tap = Tap::spawn(Sent(sent));
        let mut one = tap.subscribe(&[1, 3], 16).unwrap();
        let mut two = tap.subscribe(&[2], 16).unwrap();
        for (flow_id, seq) in [(1, 1), (2, 1), (3, 1), (4, 1), (1, 2), (2, 2)] {
            send.send(record(flow_id, seq)).unwrap();
        }
        async fn take(s: &mut Subscription, n: usize) -> Vec<(u32, u64)> {
            let mut got = Vec::new();
            while got.len() < n {
                let r = s.next().await.expect("the tap runs");
                got.push((r.header.flow_id, r.header.seq));
            }
            got
        }
        let timeout = std::time::Duration::from_secs(5);
        let ones = tokio::time::timeout(timeout, take(&mut one, 3)).await;
        assert_eq!(ones.unwrap(), [(1, 1), (3, 1), (1, 2)]);
        let twos = tokio::time::timeout(timeout, take(&mut two, 2)).await;
        assert_eq!(twos.unwrap(), [(2, 1), (2, 2)]);
        tokio::task::yield_now().await;
        assert_eq!((one.try_next(), two.try_next()), (None, None));
        assert_eq!((one.lost(), two.lost()), (0, 0));
    }

    fn raw(header: RecordHeader, frame: &[u8]) -> Vec<u8> {
        let mut v = bytemuck::bytes_of(&header).to_vec();
        v.extend_from_slice(frame);
        v
    }

    #[test]
    fn parses_records_and_rejects_short_ones() {
        let header = RecordHeader {
            seq: 7,
            frame_len: 4,
            captured_len: 3,
            ..Default::default()
        };
        // The kernel's slot is larger than the captured bytes.
        let record = Record::parse(&raw(header, &[1, 2, 3, 0, 0])).unwrap();
        assert_eq!(record.header.seq, 7);
        assert_eq!(&record.frame[..], &[1, 2, 3]);
        assert!(Record::parse(&raw(header, &[1, 2])).is_err());
        assert!(Record::parse(&[0u8; 10]).is_err());
        let beyond = RecordHeader {
            frame_len: 2,
            captured_len: 3,
            ..Default::default()
        };
        assert!(Record::parse(&raw(beyond, &[1, 2, 3])).is_err());
    }
}

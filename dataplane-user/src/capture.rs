//! Ring-buffer consumers: kernel log records into `bytes::Bytes`, staged
//! through a `ringbuf` SPSC queue between the reader task and its consumer.
//!
//! When the queue is full the reader stops draining the kernel ring rather
//! than drop a record: back-pressure reaches the kernel, whose `ring_full`
//! counter then says an input could not be logged.
use std::sync::Arc;

use aya::maps::{MapData, RingBuf};
use bytes::Bytes;
use dataplane_common::RecordHeader;
use ringbuf::{
    HeapCons, HeapProd, HeapRb,
    traits::{Consumer, Observer, Producer, Split},
};
use tokio::{io::unix::AsyncFd, sync::Notify, task::JoinHandle};

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
        // SAFETY: RecordHeader is plain old data and the slice holds HEADER bytes.
        let header: RecordHeader = unsafe { item.as_ptr().cast::<RecordHeader>().read_unaligned() };
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
                    }
                    Err(e) => tracing::warn!("{e}"),
                },
                None => pending = false,
            }
        }
        guard.clear_ready();
        ready.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(header: RecordHeader, frame: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; size_of::<RecordHeader>()];
        // SAFETY: v holds a RecordHeader's bytes.
        unsafe {
            v.as_mut_ptr()
                .cast::<RecordHeader>()
                .write_unaligned(header)
        };
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

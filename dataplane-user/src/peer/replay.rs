//! Logged inputs over the peer link: the source sends the inputs after the
//! checkpoint position, in order; the destination injects each through its
//! gate (see [`crate::replay::Injector`]) as it arrives.
use std::time::{Duration, Instant};

use dataplane_common::RecordHeader;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use super::{MAX_FRAME, PeerError, frame, read_frame, write_frame};
use crate::{capture::Record, replay::Injector};

const HEADER: usize = size_of::<RecordHeader>();

/// What a replay moved, as the destination counted it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replayed {
    pub inputs: u64,
    /// From the first input's arrival to the last one's injection.
    pub elapsed_us: u64,
}

impl Replayed {
    /// Inputs injected per second.
    pub fn rate(&self) -> f64 {
        self.inputs as f64 / Duration::from_micros(self.elapsed_us.max(1)).as_secs_f64()
    }
}

/// Sends `records` (in sequence order) and waits for the destination's count.
pub async fn send<'a>(
    stream: &mut TcpStream,
    records: impl IntoIterator<Item = &'a Record>,
) -> Result<Replayed, PeerError> {
    let mut buf = Vec::new();
    for record in records {
        buf.clear();
        // SAFETY: RecordHeader is #[repr(C)] plain integers.
        buf.extend_from_slice(unsafe {
            std::slice::from_raw_parts((&raw const record.header).cast::<u8>(), HEADER)
        });
        buf.extend_from_slice(&record.frame);
        write_frame(stream, frame::REPLAY, &buf).await?;
    }
    write_frame(stream, frame::REPLAY_END, &[]).await?;
    match read_frame(stream, MAX_FRAME).await? {
        (frame::REPLAY_OK, payload) => serde_json::from_slice(&payload)
            .map_err(|e| PeerError::Garbage(format!("replay receipt: {e}"))),
        (frame::REFUSE, reason) => Err(PeerError::Refused(
            String::from_utf8_lossy(&reason).into_owned(),
        )),
        (other, _) => Err(PeerError::Garbage(format!(
            "frame type {other} instead of a replay receipt"
        ))),
    }
}

/// Injects the replay that starts with the REPLAY frame `first`, until
/// REPLAY_END, in batches of the records that arrived one after another.
pub async fn receive(
    stream: &mut TcpStream,
    first: Vec<u8>,
    injector: &mut Injector,
) -> Result<Replayed, PeerError> {
    let start = Instant::now();
    let mut inputs = 0;
    let mut batch = Vec::with_capacity(Injector::BATCH);
    let mut payload = Some(first);
    loop {
        if let Some(payload) = payload.take() {
            batch.push(record(payload)?);
        }
        let next = read_frame(stream, MAX_FRAME).await?;
        let end = match next {
            (frame::REPLAY, next) => {
                payload = Some(next);
                false
            }
            (frame::REPLAY_END, _) => true,
            (other, _) => {
                return Err(PeerError::Garbage(format!(
                    "frame type {other} in a replay"
                )));
            }
        };
        if end || batch.len() == Injector::BATCH {
            injector
                .inject(&batch)
                .map_err(|e| PeerError::Garbage(e.to_string()))?;
            inputs += batch.len() as u64;
            batch.clear();
        }
        if end {
            return Ok(Replayed {
                inputs,
                elapsed_us: start.elapsed().as_micros() as u64,
            });
        }
    }
}

/// A REPLAY frame's record.
fn record(mut payload: Vec<u8>) -> Result<Record, PeerError> {
    if payload.len() < HEADER {
        return Err(PeerError::Garbage(
            "replay record shorter than its header".into(),
        ));
    }
    // SAFETY: RecordHeader is plain data and the payload holds HEADER bytes.
    let header = unsafe { payload.as_ptr().cast::<RecordHeader>().read_unaligned() };
    Ok(Record {
        header,
        frame: payload.split_off(HEADER).into(),
    })
}

//! The cutover on the source: one store flips the gate window, and the
//! source's kernel program picks K at the first input numbered after the
//! flip that finds every earlier one answered here (inputs up to K are
//! answered here, later ones by the destination, whose armed output gate
//! opens at the first input forwarded past K). No K is agreed ahead, so
//! no input can slip between an agreement and the flip, however fast
//! inputs come; and the source's answers up to K are out before the
//! destination gets an input to answer.
use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use crate::kernel::gate::GateWindow;

/// A cutover that happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handover {
    /// The last input the source's instance answers.
    pub k: u64,
    /// The flip's own duration (one store), ns, at least 1.
    pub flip_ns: u64,
}

/// No input picked K between the flip and the limit (or an abort): the
/// flip was taken back and the source still serves.
#[derive(Debug, thiserror::Error)]
pub enum NoCutover {
    #[error("no input arrived within {} ms of the flip", .0.as_millis())]
    NoInput(Duration),
    #[error(
        "each of the {inputs} inputs that came within {} ms of the flip found the instance \
         here still owing an answer to an earlier one, which the destination's answers would \
         have overtaken",
        .limit.as_millis()
    )]
    Owed { inputs: u64, limit: Duration },
}

/// Flips `flow_id` and waits for the kernel to pick K, for at most `limit`
/// or until `abort` is set; then takes the flip back unless an input
/// crossed it meanwhile (the cutover then stands). `numbered` gives the
/// flow's last input number.
pub async fn flip_and_wait(
    window: &GateWindow,
    flow_id: u32,
    numbered: impl Fn() -> u64,
    limit: Duration,
    abort: &AtomicBool,
) -> Result<Handover, NoCutover> {
    // Touch the word first: the flip is timed without the page fault.
    window.set_deliver_until(flow_id, 0);
    let before = numbered();
    let flip = Instant::now();
    window.flip(flow_id);
    let flip_ns = (flip.elapsed().as_nanos() as u64).max(1);
    // The handover happens when the next input arrives. Until then the
    // path must stay as it is: an input reaching the destination directly
    // would be answered by neither instance.
    let waited = Instant::now();
    loop {
        if let Some(k) = window.cutover_point(flow_id) {
            return Ok(Handover { k, flip_ns });
        }
        if waited.elapsed() > limit || abort.load(Ordering::Relaxed) {
            return match window.unflip(flow_id) {
                Ok(()) => Err(match numbered().saturating_sub(before) {
                    0 => NoCutover::NoInput(limit),
                    inputs => NoCutover::Owed { inputs, limit },
                }),
                Err(k) => Ok(Handover { k, flip_ns }),
            };
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

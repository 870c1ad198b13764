//! Helpers shared by the fuzz targets.
use std::{
    pin::pin,
    task::{Context, Poll, Waker},
};

/// Runs a future over in-memory I/O (`&[u8]`, `Vec<u8>`), which never waits,
/// to completion in one poll.
pub fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("in-memory I/O waited"),
    }
}

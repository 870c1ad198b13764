//! An established peer link: frames over TCP, plain or sealed.
use tokio::net::TcpStream;

use super::{PeerError, read_frame, write_frame};

/// One peer link once its handshake is done: every frame after the
/// handshake goes through [`Link::send`] and [`Link::recv`].
#[derive(Debug)]
pub struct Link {
    stream: TcpStream,
}

impl Link {
    /// A link whose frames cross in clear: `peer_insecure`, and tests of
    /// the frames themselves.
    pub fn plain(stream: TcpStream) -> Self {
        Self { stream }
    }

    /// Sends one frame.
    pub async fn send(&mut self, kind: u8, payload: &[u8]) -> Result<(), PeerError> {
        write_frame(&mut self.stream, kind, payload).await
    }

    /// Receives one frame of at most `limit` bytes: (type, payload).
    pub async fn recv(&mut self, limit: u32) -> Result<(u8, Vec<u8>), PeerError> {
        read_frame(&mut self.stream, limit).await
    }
}

//! An established peer link: frames over TCP, sealed (the default) or in
//! clear (`peer_insecure`).
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{PeerError, read_frame, seal::Seal, write_frame};

/// One peer link once its handshake is done: every frame after the
/// handshake goes through [`Link::send`] and [`Link::recv`].
pub struct Link {
    stream: TcpStream,
    /// None: frames cross in clear.
    seal: Option<Box<Seal>>,
    /// What a sealed link reads into.
    buffer: Vec<u8>,
}

/// Bytes [`Link::recv`] reads from the socket at a time.
const READ_BYTES: usize = 64 << 10;

impl Link {
    /// A link whose frames cross in clear: `peer_insecure`, and tests of
    /// the frames themselves.
    pub fn plain(stream: TcpStream) -> Self {
        Self {
            stream,
            seal: None,
            buffer: Vec::new(),
        }
    }

    /// Seals every frame from here on (the handshake is done).
    pub(super) fn seal(&mut self, seal: Seal) {
        self.seal = Some(Box::new(seal));
        self.buffer = vec![0; READ_BYTES];
    }

    /// Whether frames cross sealed.
    pub fn is_sealed(&self) -> bool {
        self.seal.is_some()
    }

    /// Sends one frame.
    pub async fn send(&mut self, kind: u8, payload: &[u8]) -> Result<(), PeerError> {
        let Some(seal) = self.seal.as_mut() else {
            return write_frame(&mut self.stream, kind, payload).await;
        };
        let mut records = Vec::with_capacity(payload.len() + payload.len() / 32 + 64);
        seal.seal(kind, payload, &mut records)?;
        self.stream.write_all(&records).await?;
        Ok(())
    }

    /// Receives one frame of at most `limit` bytes: (type, payload).
    pub async fn recv(&mut self, limit: u32) -> Result<(u8, Vec<u8>), PeerError> {
        let Some(seal) = self.seal.as_mut() else {
            return read_frame(&mut self.stream, limit).await;
        };
        loop {
            if let Some(frame) = seal.next_frame(limit)? {
                return Ok(frame);
            }
            let n = self.stream.read(&mut self.buffer).await?;
            if n == 0 {
                return Err(PeerError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            seal.feed(&self.buffer[..n]);
        }
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("peer", &self.stream.peer_addr().ok())
            .field("sealed", &self.is_sealed())
            .finish()
    }
}

//! Checkpoint images over the peer link: every file of an images directory,
//! in chunks, each file checked against its SHA-256 on arrival. The sender
//! hashes a chunk as it sends it and sends the digest after the file's
//! last chunk, so hashing overlaps the transfer instead of preceding it. The
//! receiver writes into `<root>/<migration>.partial` and renames it to
//! `<root>/<migration>` only when every file arrived intact, so a directory
//! without the suffix is always a complete image set.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{MAX_FRAME, PeerError, frame, read_frame, write_frame};

/// Bytes of file data a DATA frame carries.
const CHUNK: usize = 1 << 20;

#[derive(Serialize, Deserialize)]
struct Begin {
    migration: String,
}

/// A FILE frame's payload: the file that DATA frames follow with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHeader {
    /// A [`plain_name`].
    pub name: String,
    pub size: u64,
}

/// A FILE_END frame's payload: the digest of the file's DATA.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEnd {
    /// Hex SHA-256 of the file's bytes.
    pub sha256: String,
}

/// What a transfer moved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Received {
    pub migration: String,
    pub files: u64,
    /// The data volume D: image bytes moved.
    pub bytes: u64,
}

/// A finished transfer, as the sender saw it.
#[derive(Clone, Debug)]
pub struct Sent {
    pub received: Received,
    pub elapsed: Duration,
}

fn images_error(message: impl Into<String>) -> PeerError {
    PeerError::Images(message.into())
}

/// A migration id or file name: letters, digits, `.`, `_`, `-`; never a path.
pub fn plain_name(name: &str) -> Result<&str, PeerError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(name)
    } else {
        Err(images_error(format!("{name:?} is not a plain name")))
    }
}

/// The migration id of an IMAGES frame's payload, a [`plain_name`].
pub fn parse_begin(payload: &[u8]) -> Result<String, PeerError> {
    let Begin { migration } =
        serde_json::from_slice(payload).map_err(|e| images_error(format!("begin: {e}")))?;
    plain_name(&migration)?;
    Ok(migration)
}

/// A FILE frame's payload, its name a [`plain_name`].
pub fn parse_file_header(payload: &[u8]) -> Result<FileHeader, PeerError> {
    let header: FileHeader =
        serde_json::from_slice(payload).map_err(|e| images_error(format!("file header: {e}")))?;
    plain_name(&header.name)?;
    Ok(header)
}

/// Sends every regular file of `dir` as the images of `migration`, on an
/// established link, and waits for the receiver's verdict.
pub async fn send(stream: &mut TcpStream, migration: &str, dir: &Path) -> Result<Sent, PeerError> {
    send_counting(stream, migration, dir, &mut |_| {}).await
}

/// As [`send`], telling `sent` the bytes of file data sent so far after
/// every chunk (for a progress display).
pub async fn send_counting(
    stream: &mut TcpStream,
    migration: &str,
    dir: &Path,
    sent: &mut (dyn FnMut(u64) + Send),
) -> Result<Sent, PeerError> {
    let start = Instant::now();
    let mut bytes = 0;
    plain_name(migration)?;
    let begin = serde_json::to_vec(&Begin {
        migration: migration.into(),
    })
    .expect("serializes");
    write_frame(stream, frame::IMAGES, &begin).await?;
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    let mut chunk = vec![0; CHUNK];
    for name in names {
        let mut file = tokio::fs::File::open(dir.join(&name)).await?;
        let header = FileHeader {
            name: plain_name(&name)?.to_string(),
            size: file.metadata().await?.len(),
        };
        write_frame(
            stream,
            frame::FILE,
            &serde_json::to_vec(&header).expect("serializes"),
        )
        .await?;
        let mut hash = Sha256::new();
        loop {
            let n = file.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            write_frame(stream, frame::DATA, &chunk[..n]).await?;
            hash.update(&chunk[..n]);
            bytes += n as u64;
            sent(bytes);
        }
        let end = FileEnd {
            sha256: hex(&hash.finalize()),
        };
        write_frame(
            stream,
            frame::FILE_END,
            &serde_json::to_vec(&end).expect("serializes"),
        )
        .await?;
    }
    write_frame(stream, frame::IMAGES_END, &[]).await?;
    match read_frame(stream, MAX_FRAME).await? {
        (frame::IMAGES_OK, payload) => Ok(Sent {
            received: serde_json::from_slice(&payload)
                .map_err(|e| images_error(format!("receipt: {e}")))?,
            elapsed: start.elapsed(),
        }),
        (frame::REFUSE, reason) => Err(PeerError::Refused(
            String::from_utf8_lossy(&reason).into_owned(),
        )),
        (other, _) => Err(images_error(format!(
            "frame type {other} instead of a receipt"
        ))),
    }
}

/// Receives the transfer that an IMAGES frame with `begin` started.
pub async fn receive(
    stream: &mut TcpStream,
    begin: &[u8],
    root: &Path,
) -> Result<Received, PeerError> {
    let migration = parse_begin(begin)?;
    let partial = root.join(format!("{migration}.partial"));
    let outcome = receive_into(stream, &partial).await;
    match outcome {
        Ok((files, bytes)) => {
            let done = root.join(&migration);
            let _ = tokio::fs::remove_dir_all(&done).await;
            tokio::fs::rename(&partial, &done).await?;
            Ok(Received {
                migration,
                files,
                bytes,
            })
        }
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&partial).await;
            Err(e)
        }
    }
}

/// Receives the files into `dir`. An error before the end of the transfer
/// first reads the rest of it, so the sender finishes writing and reads the
/// refusal rather than a reset connection (a broken link ends that at once).
async fn receive_into(stream: &mut TcpStream, dir: &PathBuf) -> Result<(u64, u64), PeerError> {
    let mut ended = false;
    let outcome = receive_files(stream, dir, &mut ended).await;
    if outcome.is_err() && !ended {
        while let Ok((kind, _)) = read_frame(stream, MAX_FRAME).await {
            if kind == frame::IMAGES_END {
                break;
            }
        }
    }
    outcome
}

async fn receive_files(
    stream: &mut TcpStream,
    dir: &PathBuf,
    ended: &mut bool,
) -> Result<(u64, u64), PeerError> {
    let _ = tokio::fs::remove_dir_all(dir).await;
    tokio::fs::create_dir_all(dir).await?;
    let (mut files, mut bytes) = (0u64, 0u64);
    let mut current: Option<(FileHeader, tokio::fs::File, Sha256, u64)> = None;
    loop {
        let (kind, payload) = read_frame(stream, MAX_FRAME).await?;
        *ended = kind == frame::IMAGES_END;
        match kind {
            frame::FILE | frame::IMAGES_END => {
                if let Some((header, ..)) = current {
                    return Err(images_error(format!("{}: no digest", header.name)));
                }
                if kind == frame::IMAGES_END {
                    return Ok((files, bytes));
                }
                let header = parse_file_header(&payload)?;
                let file = tokio::fs::File::create(dir.join(&header.name)).await?;
                current = Some((header, file, Sha256::new(), 0));
            }
            frame::DATA => {
                let Some((header, file, hash, got)) = current.as_mut() else {
                    return Err(images_error("data before a file header"));
                };
                *got += payload.len() as u64;
                if *got > header.size {
                    return Err(images_error(format!(
                        "{}: more data than announced",
                        header.name
                    )));
                }
                hash.update(&payload);
                file.write_all(&payload).await?;
                bytes += payload.len() as u64;
            }
            frame::FILE_END => {
                let Some((header, mut file, hash, got)) = current.take() else {
                    return Err(images_error("a digest before a file header"));
                };
                let end: FileEnd = serde_json::from_slice(&payload)
                    .map_err(|e| images_error(format!("file end: {e}")))?;
                file.flush().await?;
                if got != header.size || hex(&hash.finalize()) != end.sha256 {
                    return Err(images_error(format!(
                        "{}: checksum mismatch ({got} of {} bytes arrived)",
                        header.name, header.size
                    )));
                }
                files += 1;
            }
            other => {
                return Err(images_error(format!(
                    "unexpected frame type {other} in a transfer"
                )));
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_pass() {
        for ok in ["pages-1.img", "m-42", "stats-dump", "core-1.img"] {
            assert!(plain_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../etc",
            "a/b",
            "/abs",
            "x y",
            &"x".repeat(129),
        ] {
            assert!(plain_name(bad).is_err(), "{bad:?}");
        }
    }
}

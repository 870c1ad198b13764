//! Checkpoint images over the peer link: every file of an images directory
//! and of its subdirectories one level down (the pre-dump rounds `pre-N`,
//! with the `parent` links CRIU chains them by), in chunks, each file
//! checked against its SHA-256 on arrival. The sender
//! hashes a chunk as it sends it and sends the digest after the file's
//! last chunk, so hashing overlaps the transfer instead of preceding it. The
//! receiver writes into `<root>/<migration>.partial` and renames it to
//! `<root>/<migration>` only when every file arrived intact, so a directory
//! without the suffix is always a complete image set. It writes no more
//! than its [`Quota`]: a transfer over it is refused and its partial
//! directory removed.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::peer::{Link, MAX_FRAME, PeerError, frame};

/// Bytes of file data a DATA frame carries.
const CHUNK: usize = 1 << 20;

#[derive(Serialize, Deserialize)]
struct Begin {
    migration: String,
}

/// A FILE frame's payload: the file that DATA frames follow with, or a
/// symbolic link (no DATA).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHeader {
    /// An [`image_path`].
    pub name: String,
    pub size: u64,
    /// A link's target, an [`image_link`]: CRIU's `parent` links between
    /// pre-dump rounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
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

/// The most one transfer may write: files (links included) and bytes of
/// file data. The destination's are `images_max_files` and
/// `images_max_mib` in its configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    pub files: u64,
    pub bytes: u64,
}

impl Quota {
    /// No limit: for tools that move images they made themselves.
    pub const UNLIMITED: Self = Self {
        files: u64::MAX,
        bytes: u64::MAX,
    };

    /// An error once `files` or `bytes` is over the quota.
    fn check(self, files: u64, bytes: u64) -> Result<(), PeerError> {
        if files > self.files {
            return Err(images_error(format!(
                "more than {} files: over the quota (images_max_files)",
                self.files
            )));
        }
        if bytes > self.bytes {
            return Err(images_error(format!(
                "more than {} MiB: over the quota (images_max_mib)",
                self.bytes >> 20
            )));
        }
        Ok(())
    }
}

fn images_error(message: impl Into<String>) -> PeerError {
    PeerError::Images(message.into())
}

/// A migration id or file name: letters, digits, `.`, `_`, `-`; never a path.
pub fn plain_name(name: &str) -> Result<&str, PeerError> {
    if crate::service::is_plain_name(name) {
        Ok(name)
    } else {
        Err(images_error(format!("{name:?} is not a plain name")))
    }
}

/// A file's place in an images directory: a [`plain_name`], or one in a
/// subdirectory with a plain name (`pre-0/pages-1.img`).
pub fn image_path(path: &str) -> Result<&str, PeerError> {
    let parts: Vec<&str> = path.split('/').collect();
    if parts.len() > 2 {
        return Err(images_error(format!("{path:?} is nested too deep")));
    }
    parts.iter().try_for_each(|p| plain_name(p).map(drop))?;
    Ok(path)
}

/// A link's target, relative to the link at `path`, that stays inside the
/// images directory: plain names, after at most as many leading `..` as
/// the link is deep (`pre-1` at the top, `../pre-0` inside `pre-1`).
pub fn image_link<'a>(path: &str, target: &'a str) -> Result<&'a str, PeerError> {
    let depth = path.matches('/').count();
    let parts: Vec<&str> = target.split('/').collect();
    let ups = parts.iter().take_while(|p| **p == "..").count();
    let ok =
        ups <= depth && ups < parts.len() && parts[ups..].iter().all(|p| plain_name(p).is_ok());
    if ok {
        Ok(target)
    } else {
        Err(images_error(format!(
            "{path}: link to {target:?} leaves the images"
        )))
    }
}

/// The migration id of an IMAGES frame's payload, a [`plain_name`].
pub fn parse_begin(payload: &[u8]) -> Result<String, PeerError> {
    let Begin { migration } =
        serde_json::from_slice(payload).map_err(|e| images_error(format!("begin: {e}")))?;
    plain_name(&migration)?;
    Ok(migration)
}

impl FileHeader {
    /// The header if its name is an [`image_path`] and its link target (if
    /// it is one) an [`image_link`] with no data: what a receiver takes,
    /// and so all a sender sends.
    fn checked(self) -> Result<Self, PeerError> {
        image_path(&self.name)?;
        if let Some(target) = &self.link {
            image_link(&self.name, target)?;
            if self.size != 0 {
                return Err(images_error(format!("{}: a link with data", self.name)));
            }
        }
        Ok(self)
    }
}

/// A FILE frame's payload, [`FileHeader::checked`].
pub fn parse_file_header(payload: &[u8]) -> Result<FileHeader, PeerError> {
    serde_json::from_slice::<FileHeader>(payload)
        .map_err(|e| images_error(format!("file header: {e}")))?
        .checked()
}

/// What an images directory holds, in the order it is sent: its files
/// and links, then each subdirectory's, by name.
fn image_entries(dir: &Path) -> Result<Vec<(String, Option<String>)>, PeerError> {
    let mut entries = Vec::new();
    let mut subdirs = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    names.sort_by_key(|e| e.file_name());
    for entry in names {
        let name = entry.file_name().into_string().map_err(|n| {
            images_error(format!(
                "{}: a file name that is not UTF-8: {n:?}",
                dir.display()
            ))
        })?;
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            let target = std::fs::read_link(entry.path())?;
            entries.push((name, Some(target.to_string_lossy().into_owned())));
        } else if kind.is_dir() {
            subdirs.push(name);
        } else if kind.is_file() {
            entries.push((name, None));
        }
    }
    for sub in subdirs {
        for (name, link) in image_entries(&dir.join(&sub))? {
            entries.push((format!("{sub}/{name}"), link));
        }
    }
    Ok(entries)
}

/// Sends the files and links of `dir` (and of its subdirectories, one
/// level down) as the images of `migration`, on an established link, and
/// waits for the receiver's verdict.
pub async fn send(link: &mut Link, migration: &str, dir: &Path) -> Result<Sent, PeerError> {
    send_counting(link, migration, dir, &mut |_| {}).await
}

/// As [`send`], telling `sent` the bytes of file data sent so far after
/// every chunk (for a progress display).
pub async fn send_counting(
    link: &mut Link,
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
    link.send(frame::IMAGES, &begin).await?;
    let mut chunk = vec![0; CHUNK];
    for (name, target) in image_entries(dir)? {
        let mut file = match &target {
            Some(_) => None,
            None => Some(tokio::fs::File::open(dir.join(&name)).await?),
        };
        let size = match &file {
            Some(file) => file.metadata().await?.len(),
            None => 0,
        };
        let header = FileHeader {
            name,
            size,
            link: target,
        }
        .checked()?;
        link.send(
            frame::FILE,
            &serde_json::to_vec(&header).expect("serializes"),
        )
        .await?;
        let mut hash = Sha256::new();
        while let Some(file) = file.as_mut() {
            let n = file.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            link.send(frame::DATA, &chunk[..n]).await?;
            hash.update(&chunk[..n]);
            bytes += n as u64;
            sent(bytes);
        }
        let end = FileEnd {
            sha256: hex::encode(hash.finalize()),
        };
        link.send(
            frame::FILE_END,
            &serde_json::to_vec(&end).expect("serializes"),
        )
        .await?;
    }
    link.send(frame::IMAGES_END, &[]).await?;
    match link.recv(MAX_FRAME).await? {
        (frame::IMAGES_OK, payload) => Ok(Sent {
            received: serde_json::from_slice(&payload)
                .map_err(|e| images_error(format!("receipt: {e}")))?,
            elapsed: start.elapsed(),
        }),
        (frame::REFUSE, reason) => Err(super::refused(&reason)),
        (other, _) => Err(images_error(format!(
            "frame type {other} instead of a receipt"
        ))),
    }
}

/// Receives the images of `migration` (a [`plain_name`], from the IMAGES
/// frame that started the transfer, see [`parse_begin`]) into
/// `<root>/<migration>`, writing no more than `quota` allows.
pub async fn receive(
    link: &mut Link,
    migration: &str,
    root: &Path,
    quota: Quota,
) -> Result<Received, PeerError> {
    plain_name(migration)?;
    let partial = root.join(format!("{migration}.partial"));
    let outcome = receive_into(link, &partial, quota).await;
    match outcome {
        Ok((files, bytes)) => {
            let done = root.join(migration);
            let _ = tokio::fs::remove_dir_all(&done).await;
            tokio::fs::rename(&partial, &done).await?;
            Ok(Received {
                migration: migration.to_string(),
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

/// Reads the rest of a transfer (to its IMAGES_END) without keeping any
/// of it: a refused transfer's sender then finishes writing and reads the
/// refusal rather than a reset connection.
pub async fn skip(link: &mut Link) -> Result<(), PeerError> {
    while link.recv(MAX_FRAME).await?.0 != frame::IMAGES_END {}
    Ok(())
}

/// Receives the files into `dir`. An error before the end of the transfer
/// first reads the rest of it ([`skip`]; a broken link ends that at once).
async fn receive_into(
    link: &mut Link,
    dir: &PathBuf,
    quota: Quota,
) -> Result<(u64, u64), PeerError> {
    let mut ended = false;
    let outcome = receive_files(link, dir, quota, &mut ended).await;
    if outcome.is_err() && !ended {
        let _ = skip(link).await;
    }
    outcome
}

async fn receive_files(
    link: &mut Link,
    dir: &PathBuf,
    quota: Quota,
    ended: &mut bool,
) -> Result<(u64, u64), PeerError> {
    let _ = tokio::fs::remove_dir_all(dir).await;
    tokio::fs::create_dir_all(dir).await?;
    let (mut files, mut bytes) = (0u64, 0u64);
    // File data announced so far: a FILE over the quota is refused before
    // any of it is written (DATA never exceeds its announced size).
    let (mut entries, mut announced) = (0u64, 0u64);
    // The file being received (none for a link), its hash and bytes so far.
    let mut current: Option<(FileHeader, Option<tokio::fs::File>, Sha256, u64)> = None;
    loop {
        let (kind, payload) = link.recv(MAX_FRAME).await?;
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
                entries += 1;
                announced = announced.saturating_add(header.size);
                quota.check(entries, announced)?;
                let path = dir.join(&header.name);
                if let Some(parent) = path.parent() {
                    tokio::fs::create_dir_all(parent).await?;
                }
                let file = match &header.link {
                    Some(target) => {
                        tokio::fs::symlink(target, &path).await?;
                        None
                    }
                    None => Some(tokio::fs::File::create(&path).await?),
                };
                current = Some((header, file, Sha256::new(), 0));
            }
            frame::DATA => {
                let Some((header, Some(file), hash, got)) = current.as_mut() else {
                    return Err(images_error("data outside a file"));
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
                let Some((header, file, hash, got)) = current.take() else {
                    return Err(images_error("a digest before a file header"));
                };
                let end: FileEnd = serde_json::from_slice(&payload)
                    .map_err(|e| images_error(format!("file end: {e}")))?;
                if let Some(mut file) = file {
                    file.flush().await?;
                }
                if got != header.size || hex::encode(hash.finalize()) != end.sha256 {
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

    /// A pre-dump chain as CRIU leaves it: the final images with a
    /// `parent` link to the last round, rounds in `pre-N` linked back.
    #[tokio::test]
    async fn a_pre_dump_chain_arrives_whole_with_its_links() {
        let root = std::env::temp_dir().join(format!("transfer-chain-{}", std::process::id()));
        let (images, received) = (root.join("sent"), root.join("received"));
        let _ = std::fs::remove_dir_all(&root);
        for dir in ["pre-0", "pre-1"] {
            std::fs::create_dir_all(images.join(dir)).unwrap();
            std::fs::write(images.join(dir).join("pages-1.img"), dir.repeat(1000)).unwrap();
        }
        std::fs::write(images.join("pages-1.img"), vec![7u8; 3 << 20]).unwrap();
        std::fs::write(images.join("core-1.img"), b"core").unwrap();
        std::os::unix::fs::symlink("pre-1", images.join("parent")).unwrap();
        std::os::unix::fs::symlink("../pre-0", images.join("pre-1/parent")).unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sender = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (receiver, _) = listener.accept().await.unwrap();
        let (mut sender, mut receiver) = (Link::plain(sender), Link::plain(receiver));
        let mut counted = 0;
        let receive = async {
            let (kind, begin) = receiver.recv(MAX_FRAME).await.unwrap();
            assert_eq!(kind, frame::IMAGES);
            let migration = parse_begin(&begin).unwrap();
            let got = super::receive(&mut receiver, &migration, &received, Quota::UNLIMITED).await;
            let verdict = serde_json::to_vec(got.as_ref().unwrap()).unwrap();
            receiver.send(frame::IMAGES_OK, &verdict).await.unwrap();
            got.unwrap()
        };
        let mut count = |b| counted = b;
        let send = send_counting(&mut sender, "m1", &images, &mut count);
        let (sent, got) = tokio::join!(send, receive);
        let sent = sent.unwrap();
        assert_eq!(sent.received, got);
        let data = (3 << 20) + 4 + 2 * 5000;
        assert_eq!((got.files, got.bytes, counted), (6, data, data));
        let done = received.join("m1");
        for file in [
            "pages-1.img",
            "core-1.img",
            "pre-0/pages-1.img",
            "pre-1/pages-1.img",
        ] {
            assert_eq!(
                std::fs::read(done.join(file)).unwrap(),
                std::fs::read(images.join(file)).unwrap(),
                "{file}"
            );
        }
        for (link, target) in [("parent", "pre-1"), ("pre-1/parent", "../pre-0")] {
            assert_eq!(
                std::fs::read_link(done.join(link)).unwrap(),
                Path::new(target),
                "{link}"
            );
        }
        // The links resolve inside the received images.
        assert_eq!(
            std::fs::read(done.join("parent/parent/pages-1.img")).unwrap(),
            "pre-0".repeat(1000).as_bytes()
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    /// A pair of linked ends on loopback: (sender, receiver).
    async fn linked() -> (Link, Link) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sender = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (receiver, _) = listener.accept().await.unwrap();
        (Link::plain(sender), Link::plain(receiver))
    }

    #[tokio::test]
    async fn a_transfer_over_the_quota_is_refused_and_leaves_nothing() {
        let root = std::env::temp_dir().join(format!("transfer-quota-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let images = root.join("sent");
        std::fs::create_dir_all(&images).unwrap();
        for (name, size) in [("a.img", 1000), ("b.img", 1000), ("c.img", 3000)] {
            std::fs::write(images.join(name), vec![1u8; size]).unwrap();
        }
        let received = root.join("received");
        std::fs::create_dir_all(&received).unwrap();
        let quotas = [
            (
                Quota {
                    files: 2,
                    bytes: 1 << 20,
                },
                "more than 2 files",
            ),
            (
                Quota {
                    files: 10,
                    bytes: 4999,
                },
                "over the quota (images_max_mib)",
            ),
        ];
        for (quota, why) in quotas {
            let (mut sender, mut receiver) = linked().await;
            let receive = async {
                let (_, begin) = receiver.recv(MAX_FRAME).await.unwrap();
                let migration = parse_begin(&begin).unwrap();
                let got = super::receive(&mut receiver, &migration, &received, quota).await;
                let reason = got.unwrap_err().to_string();
                receiver
                    .send(frame::REFUSE, reason.as_bytes())
                    .await
                    .unwrap();
                // The rest of the transfer was read: the link still serves.
                assert_eq!(receiver.recv(MAX_FRAME).await.unwrap().0, frame::PING);
            };
            let send = async {
                let refused = send(&mut sender, "m1", &images).await.unwrap_err();
                sender.send(frame::PING, &[]).await.unwrap();
                refused
            };
            let (refused, ()) = tokio::join!(send, receive);
            assert!(refused.to_string().contains(why), "{refused}");
            let left: Vec<_> = std::fs::read_dir(&received).unwrap().collect();
            assert!(left.is_empty(), "nothing is left: {left:?}");
        }
        // Exactly at the quota passes.
        let (mut sender, mut receiver) = linked().await;
        let exact = Quota {
            files: 3,
            bytes: 5000,
        };
        let receive = async {
            let (_, begin) = receiver.recv(MAX_FRAME).await.unwrap();
            let migration = parse_begin(&begin).unwrap();
            let got = super::receive(&mut receiver, &migration, &received, exact).await;
            let verdict = serde_json::to_vec(got.as_ref().unwrap()).unwrap();
            receiver.send(frame::IMAGES_OK, &verdict).await.unwrap();
        };
        let (sent, ()) = tokio::join!(send(&mut sender, "m1", &images), receive);
        assert_eq!(sent.unwrap().received.bytes, 5000);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn image_paths_go_one_plain_level_deep_and_links_stay_inside() {
        for ok in ["pages-1.img", "pre-0/pages-1.img"] {
            assert!(image_path(ok).is_ok(), "{ok}");
        }
        for bad in ["a/b/c", "../x", "pre-0/..", "/abs", "pre-0/", "a//b"] {
            assert!(image_path(bad).is_err(), "{bad:?}");
        }
        // CRIU's parent links: the final dump's, and a later round's.
        assert!(image_link("parent", "pre-1").is_ok());
        assert!(image_link("pre-1/parent", "../pre-0").is_ok());
        for (path, target) in [
            ("parent", "../pre-0"),
            ("pre-1/parent", "../../x"),
            ("parent", "/etc"),
            ("parent", ".."),
            ("pre-1/parent", ".."),
            ("parent", "pre-0/../.."),
            ("parent", ""),
        ] {
            assert!(image_link(path, target).is_err(), "{path} -> {target:?}");
        }
    }
}

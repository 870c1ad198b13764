//! The host: network devices and addresses, the service's tasks, files
//! that must survive a crash whole.
pub mod container;
pub mod launch;
pub mod netdev;
pub mod podman;
pub mod runc;
pub mod tasks;

use std::{io, path::Path};

/// Writes `bytes` to `path` (creating its directory, 0700 under the
/// daemon's umask) so that a daemon killed, or a host that loses power,
/// mid-write leaves the old file or the new one, never a torn one: written
/// aside, synced, renamed, and the rename synced.
pub fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let partial = path.with_extension("partial");
    let mut file = std::fs::File::create(&partial)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&partial, path)?;
    std::fs::File::open(dir)?.sync_all()
}

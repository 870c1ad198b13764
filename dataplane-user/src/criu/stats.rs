//! CRIU's statistics images (`stats-dump`, `stats-restore`): frozen time,
//! memory dump time, pages written and skipped.
use std::path::Path;

use prost::Message;

/// Every CRIU service image starts with this magic, then the image's own.
const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
const STATS_MAGIC: u32 = 0x5709_3306;

/// `dump_stats_entry`; times in microseconds.
#[derive(Clone, PartialEq, Message)]
pub struct DumpStats {
    #[prost(uint32, required, tag = "1")]
    pub freezing_time: u32,
    #[prost(uint32, required, tag = "2")]
    pub frozen_time: u32,
    #[prost(uint32, required, tag = "3")]
    pub memdump_time: u32,
    #[prost(uint32, required, tag = "4")]
    pub memwrite_time: u32,
    #[prost(uint64, required, tag = "5")]
    pub pages_scanned: u64,
    #[prost(uint64, required, tag = "6")]
    pub pages_skipped_parent: u64,
    #[prost(uint64, required, tag = "7")]
    pub pages_written: u64,
    #[prost(uint64, required, tag = "9")]
    pub pages_lazy: u64,
}

/// `restore_stats_entry`; times in microseconds.
#[derive(Clone, PartialEq, Message)]
pub struct RestoreStats {
    #[prost(uint64, required, tag = "1")]
    pub pages_compared: u64,
    #[prost(uint64, required, tag = "2")]
    pub pages_skipped_cow: u64,
    #[prost(uint32, required, tag = "3")]
    pub forking_time: u32,
    #[prost(uint32, required, tag = "4")]
    pub restore_time: u32,
    #[prost(uint64, optional, tag = "5")]
    pub pages_restored: Option<u64>,
}

/// `stats_entry`.
#[derive(Clone, PartialEq, Message)]
struct StatsEntry {
    #[prost(message, optional, tag = "1")]
    dump: Option<DumpStats>,
    #[prost(message, optional, tag = "2")]
    restore: Option<RestoreStats>,
}

/// A stats image that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} is not a CRIU stats image")]
    Format(String),
}

fn read(path: &Path) -> Result<StatsEntry, StatsError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| StatsError::Read {
        path: name.clone(),
        source,
    })?;
    let word = |i: usize| {
        bytes
            .get(i * 4..i * 4 + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    if word(0) != Some(IMG_SERVICE_MAGIC) || word(1) != Some(STATS_MAGIC) {
        return Err(StatsError::Format(name));
    }
    let len = word(2).ok_or_else(|| StatsError::Format(name.clone()))? as usize;
    let body = bytes
        .get(12..12 + len)
        .ok_or_else(|| StatsError::Format(name.clone()))?;
    StatsEntry::decode(body).map_err(|_| StatsError::Format(name))
}

/// The statistics of the dump (or pre-dump) whose images are in `dir`.
pub fn dump(dir: &Path) -> Result<DumpStats, StatsError> {
    read(&dir.join("stats-dump"))?
        .dump
        .ok_or_else(|| StatsError::Format(dir.join("stats-dump").display().to_string()))
}

/// The statistics of the restore from `dir`.
pub fn restore(dir: &Path) -> Result<RestoreStats, StatsError> {
    read(&dir.join("stats-restore"))?
        .restore
        .ok_or_else(|| StatsError::Format(dir.join("stats-restore").display().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_stats_image_and_refuses_others() {
        let dir = std::env::temp_dir().join(format!("dataplane-stats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let entry = StatsEntry {
            dump: Some(DumpStats {
                frozen_time: 1234,
                pages_written: 56,
                ..Default::default()
            }),
            restore: None,
        };
        let body = entry.encode_to_vec();
        let mut image = Vec::new();
        for word in [IMG_SERVICE_MAGIC, STATS_MAGIC, body.len() as u32] {
            image.extend_from_slice(&word.to_le_bytes());
        }
        image.extend_from_slice(&body);
        std::fs::write(dir.join("stats-dump"), &image).unwrap();
        let stats = dump(&dir).unwrap();
        assert_eq!((stats.frozen_time, stats.pages_written), (1234, 56));
        std::fs::write(dir.join("stats-dump"), b"garbage!").unwrap();
        assert!(matches!(dump(&dir), Err(StatsError::Format(_))));
        assert!(matches!(restore(&dir), Err(StatsError::Read { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

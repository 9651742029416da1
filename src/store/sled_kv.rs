//! sled backend: one tree, batches applied atomically, `flush` for durability.

use std::path::Path;

use super::{Kv, Op, Pair, StoreError};

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// A sled database.
#[derive(Debug)]
pub struct SledKv {
    db: sled::Db,
}

impl SledKv {
    /// Open (or create) the database directory.
    /// sled holds an exclusive file lock, released a moment after the previous
    /// `Db` (its flusher thread) is gone; waiting up to 10 s for it covers a restart
    /// (or a reopen in the same process) racing the old instance's exit, also on a
    /// loaded machine (3 s was too short for the store suite beside parallel builds).
    pub fn open(path: &Path) -> Result<SledKv, StoreError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match sled::Config::new()
                .path(path)
                .mode(sled::Mode::HighThroughput)
                .open()
            {
                Ok(db) => return Ok(SledKv { db }),
                Err(sled::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(err(e)),
            }
        }
    }
}

impl Kv for SledKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(key).map_err(err)?.map(|v| v.to_vec()))
    }

    fn range(&self, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Pair>, StoreError> {
        self.db
            .range(from..to)
            .take(limit)
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(err))
            .collect()
    }

    fn range_rev(&self, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Pair>, StoreError> {
        self.db
            .range(from..to)
            .rev()
            .take(limit)
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(err))
            .collect()
    }

    fn apply_all(&self, ops: &mut dyn Iterator<Item = &Op>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for op in ops {
            match op {
                Op::Put(k, v) => batch.insert(k.as_slice(), v.as_slice()),
                Op::Delete(k) => batch.remove(k.as_slice()),
            }
        }
        self.db.apply_batch(batch).map_err(err)?;
        self.db.flush().map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn store_suite_on_sled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        // The suite reopens the store at once: sled's flusher thread may hold
        // the file lock a moment after the last handle is dropped (a rare
        // "could not acquire lock" here), so an open is tried for up to 5 s.
        let open = || -> std::sync::Arc<dyn super::super::Kv> {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                match super::SledKv::open(&path) {
                    Ok(kv) => return std::sync::Arc::new(kv),
                    Err(e) if std::time::Instant::now() < deadline => {
                        eprintln!("sled open failed, retrying: {e}");
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    Err(e) => panic!("sled open: {e}"),
                }
            }
        };
        super::super::tests::suite(open).await;
    }
}

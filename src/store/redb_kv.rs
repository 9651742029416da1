//! redb backend: one table, one write transaction per batch with immediate durability.

use std::path::Path;

use redb::{Database, Durability, ReadableDatabase, TableDefinition};

use super::{Kv, Op, Pair, StoreError};

const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// A redb database file.
#[derive(Debug)]
pub struct RedbKv {
    db: Database,
}

impl RedbKv {
    /// Open (or create) the database file; `path` may be a directory, in which case
    /// the file `data.redb` inside it is used.
    pub fn open(path: &Path) -> Result<RedbKv, StoreError> {
        RedbKv::open_with_cache(path, 1 << 30)
    }

    /// [`RedbKv::open`] with a page cache of `cache_bytes`.
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<RedbKv, StoreError> {
        let file = if path.is_dir() || path.extension().is_none() {
            std::fs::create_dir_all(path).map_err(err)?;
            path.join("data.redb")
        } else {
            path.to_owned()
        };
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(file)
            .map_err(err)?;
        RedbKv::init(db)
    }

    /// A database in memory (tests, and tools that keep nothing).
    pub fn in_memory() -> Result<RedbKv, StoreError> {
        RedbKv::init(
            Database::builder()
                .create_with_backend(redb::backends::InMemoryBackend::new())
                .map_err(err)?,
        )
    }

    fn init(db: Database) -> Result<RedbKv, StoreError> {
        let tx = db.begin_write().map_err(err)?;
        tx.open_table(TABLE).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(RedbKv { db })
    }
}

impl Kv for RedbKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(TABLE).map_err(err)?;
        Ok(t.get(key).map_err(err)?.map(|v| v.value().to_vec()))
    }

    fn get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(TABLE).map_err(err)?;
        keys.iter()
            .map(|k| {
                Ok(t.get(k.as_slice())
                    .map_err(err)?
                    .map(|v| v.value().to_vec()))
            })
            .collect()
    }

    fn range(&self, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Pair>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(TABLE).map_err(err)?;
        let mut out = Vec::new();
        for r in t.range(from..to).map_err(err)?.take(limit) {
            let (k, v) = r.map_err(err)?;
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn range_rev(&self, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Pair>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(TABLE).map_err(err)?;
        let mut out = Vec::new();
        for r in t.range(from..to).map_err(err)?.rev().take(limit) {
            let (k, v) = r.map_err(err)?;
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn apply_all(&self, ops: &mut dyn Iterator<Item = &Op>) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().map_err(err)?;
        tx.set_durability(Durability::Immediate).map_err(err)?;
        {
            let mut t = tx.open_table(TABLE).map_err(err)?;
            for op in ops {
                match op {
                    Op::Put(k, v) => {
                        t.insert(k.as_slice(), v.as_slice()).map_err(err)?;
                    }
                    Op::Delete(k) => {
                        t.remove(k.as_slice()).map_err(err)?;
                    }
                }
            }
        }
        tx.commit().map_err(err)
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn store_suite_on_redb() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        super::super::tests::suite(|| std::sync::Arc::new(super::RedbKv::open(&path).unwrap()))
            .await;
    }
}

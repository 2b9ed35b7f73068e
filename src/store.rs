//! The run store: one SQLite file (WAL, busy timeout) holding experiments, runs, their params,
//! stages with their leases, stage attempts, metrics and artifacts.
//!
//! Concurrency: every write is a short transaction, so several `onestep run` processes can
//! share a store; a stage is executed only by the holder of its lease, which expires when the
//! holder stops renewing it (or at once when the holder was a process of this host that died).

use crate::error::{Error, Result};
use crate::util::now;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Schema migrations; `PRAGMA user_version` is the number applied.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE experiments (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    spec_path TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    experiment_id INTEGER NOT NULL REFERENCES experiments(id),
    variant TEXT NOT NULL,
    seed INTEGER NOT NULL,
    spec_hash TEXT NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'finished', 'failed', 'interrupted')),
    created_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    git_commit TEXT,
    git_dirty INTEGER,
    host TEXT,
    pid INTEGER,
    device TEXT,
    error TEXT,
    UNIQUE (experiment_id, variant, seed, spec_hash)
);
CREATE TABLE params (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (run_id, key)
);
CREATE TABLE stages (
    hash TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    params TEXT NOT NULL,
    code_version INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'finished', 'failed', 'interrupted')),
    started_at REAL,
    ended_at REAL,
    lease_holder TEXT,
    lease_expires REAL,
    error TEXT
);
CREATE TABLE run_stages (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    position INTEGER NOT NULL,
    stage_name TEXT NOT NULL,
    stage_hash TEXT NOT NULL REFERENCES stages(hash),
    PRIMARY KEY (run_id, stage_name)
);
CREATE TABLE stage_attempts (
    id INTEGER PRIMARY KEY,
    stage_hash TEXT NOT NULL REFERENCES stages(hash),
    run_id INTEGER REFERENCES runs(id),
    holder TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL,
    resumed_from INTEGER,
    outcome TEXT,
    error TEXT
);
CREATE TABLE metrics (
    id INTEGER PRIMARY KEY,
    stage_hash TEXT NOT NULL,
    run_id INTEGER,
    key TEXT NOT NULL,
    step INTEGER NOT NULL,
    value REAL NOT NULL,
    wall_time REAL NOT NULL,
    UNIQUE (stage_hash, key, step)
);
CREATE TABLE artifacts (
    id INTEGER PRIMARY KEY,
    stage_hash TEXT NOT NULL,
    run_id INTEGER,
    path TEXT NOT NULL,
    kind TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (stage_hash, path)
);
CREATE INDEX runs_by_experiment ON runs(experiment_id);
CREATE INDEX run_stages_by_hash ON run_stages(stage_hash);
"#];

pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

pub struct Store {
    conn: Connection,
    path: PathBuf,
    journal: Journal,
}

/// How a store keeps its journal. WAL (the default) lets several processes of one machine share
/// the file; it needs shared memory, so it does not work on network file systems. A shard of a
/// cluster sweep has one writer and may live on such a file system: it uses SQLite's rollback
/// journal instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Journal {
    Wal,
    Rollback,
}

/// The result of asking for a stage's lease.
#[derive(Debug, PartialEq)]
pub enum Lease {
    Acquired,
    Finished,
    HeldBy(String),
}

#[derive(Debug, Clone)]
pub struct RunRow {
    pub id: i64,
    pub experiment: String,
    pub variant: String,
    pub seed: i64,
    pub spec_hash: String,
    pub status: String,
    pub started_at: Option<f64>,
    pub ended_at: Option<f64>,
    pub git_commit: Option<String>,
    pub git_dirty: Option<bool>,
    pub host: Option<String>,
    pub device: Option<String>,
    pub error: Option<String>,
}

/// Identity of a runner process, as written into leases: `host:pid:nonce`.
pub fn holder_id() -> String {
    format!(
        "{}:{}:{:x}",
        crate::util::hostname(),
        std::process::id(),
        (now() * 1e6) as u64
    )
}

/// Whether a lease holder may still be working: other hosts are trusted until expiry; on this
/// host a dead process releases its leases at once.
pub fn holder_alive(holder: &str) -> bool {
    let mut parts = holder.split(':');
    let (Some(host), Some(pid)) = (
        parts.next(),
        parts.next().and_then(|p| p.parse::<u32>().ok()),
    ) else {
        return true;
    };
    host != crate::util::hostname() || crate::util::pid_alive(pid)
}

impl Store {
    /// Open (creating if needed) and migrate the store.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, Journal::Wal)
    }

    /// Open (creating if needed) and migrate a store with the given journal mode.
    pub fn open_with(path: &Path, journal: Journal) -> Result<Self> {
        if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
        let conn = Connection::open(path).map_err(|e| Error::Store {
            path: path.into(),
            source: e,
        })?;
        let mut s = Store {
            conn,
            path: path.into(),
            journal,
        };
        s.setup()?;
        Ok(s)
    }

    /// Open an existing store read-mostly (for queries); a missing file is an error.
    pub fn open_existing(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Other(format!(
                "{}: no run store here (run `onestep run SPEC` first, or pass --store)",
                path.display()
            )));
        }
        Self::open(path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn journal(&self) -> Journal {
        self.journal
    }

    fn e(&self, source: rusqlite::Error) -> Error {
        Error::Store {
            path: self.path.clone(),
            source,
        }
    }

    /// Run a query and map every row; the query methods below all go through here.
    fn rows<T, P: rusqlite::Params>(
        &self,
        sql: &str,
        params: P,
        map: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>> {
        let mut st = self.conn.prepare(sql).map_err(|e| self.e(e))?;
        let rows = st.query_map(params, map).map_err(|e| self.e(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.e(e))
    }

    fn setup(&mut self) -> Result<()> {
        self.conn
            .busy_timeout(Duration::from_secs(60))
            .map_err(|e| self.e(e))?;
        // Switching a brand-new database file to WAL while another process does the same can
        // return SQLITE_BUSY without consulting the busy handler: retry it for a while.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let pragmas = match self.journal {
            Journal::Wal => {
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;"
            }
            Journal::Rollback => {
                "PRAGMA journal_mode = DELETE; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;"
            }
        };
        loop {
            match self.conn.execute_batch(pragmas) {
                Ok(()) => break,
                Err(rusqlite::Error::SqliteFailure(f, _))
                    if f.code == rusqlite::ErrorCode::DatabaseBusy
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(self.e(e)),
            }
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| Error::Store {
                path: self.path.clone(),
                source: e,
            })?;
        let version: usize = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| Error::Store {
                path: self.path.clone(),
                source: e,
            })?;
        if version > SCHEMA_VERSION {
            return Err(Error::Other(format!(
                "{}: store schema version {version} is newer than this onestep ({SCHEMA_VERSION}); upgrade onestep",
                self.path.display()
            )));
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version) {
            tx.execute_batch(m).map_err(|e| Error::Store {
                path: self.path.clone(),
                source: e,
            })?;
            tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
                .map_err(|e| Error::Store {
                    path: self.path.clone(),
                    source: e,
                })?;
        }
        tx.commit().map_err(|e| Error::Store {
            path: self.path.clone(),
            source: e,
        })?;
        Ok(())
    }

    pub fn schema_version(&self) -> Result<usize> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| self.e(e))
    }

    pub fn integrity_check(&self) -> Result<String> {
        self.conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(|e| self.e(e))
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    pub fn upsert_experiment(&self, name: &str, description: &str, spec_path: &str) -> Result<i64> {
        let t = now();
        self.conn
            .execute(
                "INSERT INTO experiments (name, description, spec_path, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?4)
                 ON CONFLICT(name) DO UPDATE SET description = ?2, spec_path = ?3, updated_at = ?4",
                params![name, description, spec_path, t],
            )
            .map_err(|e| self.e(e))?;
        self.conn
            .query_row("SELECT id FROM experiments WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .map_err(|e| self.e(e))
    }

    /// Find the run with this identity, or create it (queued) with its params.
    pub fn find_or_create_run(
        &mut self,
        experiment_id: i64,
        variant: &str,
        seed: u64,
        spec_hash: &str,
        config: &str,
        params: &[(String, String)],
    ) -> Result<(i64, String)> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| Error::Store {
                path: path.clone(),
                source: e,
            })?;
        let se = |e| Error::Store {
            path: path.clone(),
            source: e,
        };
        let found: Option<(i64, String)> = tx
            .query_row(
                "SELECT id, status FROM runs WHERE experiment_id = ?1 AND variant = ?2 AND seed = ?3 AND spec_hash = ?4",
                params![experiment_id, variant, seed as i64, spec_hash],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(se)?;
        let out = match found {
            Some(f) => f,
            None => {
                tx.execute(
                    "INSERT INTO runs (experiment_id, variant, seed, spec_hash, config, status, created_at) VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6)",
                    params![experiment_id, variant, seed as i64, spec_hash, config, now()],
                )
                .map_err(se)?;
                let id = tx.last_insert_rowid();
                for (k, v) in params {
                    tx.execute(
                        "INSERT OR REPLACE INTO params (run_id, key, value) VALUES (?1, ?2, ?3)",
                        params![id, k, v],
                    )
                    .map_err(se)?;
                }
                (id, "queued".to_string())
            }
        };
        tx.commit().map_err(se)?;
        Ok(out)
    }

    pub fn start_run(&self, run_id: i64, git: &GitInfo, device: &str) -> Result<()> {
        self.conn
            .execute(
                "UPDATE runs SET status = 'running', started_at = COALESCE(started_at, ?2), ended_at = NULL, error = NULL,
                 git_commit = ?3, git_dirty = ?4, host = ?5, pid = ?6, device = ?7 WHERE id = ?1",
                params![run_id, now(), git.commit, git.dirty, crate::util::hostname(), std::process::id(), device],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    pub fn end_run(&self, run_id: i64, status: &str, error: Option<&str>) -> Result<()> {
        self.conn
            .execute(
                "UPDATE runs SET status = ?2, ended_at = ?3, error = ?4 WHERE id = ?1",
                params![run_id, status, now(), error],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    pub fn register_stage(
        &self,
        hash: &str,
        kind: &str,
        name: &str,
        params: &str,
        version: u32,
    ) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO stages (hash, kind, name, params, code_version, status) VALUES (?1, ?2, ?3, ?4, ?5, 'pending')",
                params![hash, kind, name, params, version],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    pub fn link_run_stage(
        &self,
        run_id: i64,
        position: usize,
        name: &str,
        hash: &str,
    ) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO run_stages (run_id, position, stage_name, stage_hash) VALUES (?1, ?2, ?3, ?4)",
                params![run_id, position as i64, name, hash],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    pub fn stage_status(&self, hash: &str) -> Result<Option<String>> {
        self.conn
            .query_row("SELECT status FROM stages WHERE hash = ?1", [hash], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.e(e))
    }

    /// The error a stage failed with, if it failed.
    pub fn stage_error(&self, hash: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT error FROM stages WHERE hash = ?1 AND status = 'failed'",
                [hash],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()
            .map_err(|e| self.e(e))?
            .flatten())
    }

    /// Take the lease of a stage unless it is finished or held by a live holder.
    pub fn acquire(&mut self, hash: &str, holder: &str, ttl: f64) -> Result<Lease> {
        let path = self.path.clone();
        let se = |e| Error::Store {
            path: path.clone(),
            source: e,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(se)?;
        let (status, lease_holder, expires): (String, Option<String>, Option<f64>) = tx
            .query_row(
                "SELECT status, lease_holder, lease_expires FROM stages WHERE hash = ?1",
                [hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(se)?;
        if status == "finished" {
            return Ok(Lease::Finished);
        }
        if let (Some(h), Some(exp)) = (lease_holder, expires) {
            if h != holder && exp > now() && holder_alive(&h) {
                return Ok(Lease::HeldBy(h));
            }
        }
        tx.execute(
            "UPDATE stages SET status = 'running', lease_holder = ?2, lease_expires = ?3, started_at = COALESCE(started_at, ?4), error = NULL WHERE hash = ?1",
            params![hash, holder, now() + ttl, now()],
        )
        .map_err(se)?;
        tx.commit().map_err(se)?;
        Ok(Lease::Acquired)
    }

    /// Extend a lease we hold; false if it is no longer ours.
    pub fn renew(&self, hash: &str, holder: &str, ttl: f64) -> Result<bool> {
        let n = self
            .conn
            .execute(
                "UPDATE stages SET lease_expires = ?3 WHERE hash = ?1 AND lease_holder = ?2",
                params![hash, holder, now() + ttl],
            )
            .map_err(|e| self.e(e))?;
        Ok(n == 1)
    }

    /// Release a stage's lease with a final status.
    pub fn release(
        &self,
        hash: &str,
        holder: &str,
        status: &str,
        error: Option<&str>,
    ) -> Result<()> {
        self.conn
            .execute(
                "UPDATE stages SET status = ?3, error = ?4, lease_holder = NULL, lease_expires = NULL,
                 ended_at = CASE WHEN ?3 = 'finished' THEN ?5 ELSE ended_at END WHERE hash = ?1 AND lease_holder = ?2",
                params![hash, holder, status, error, now()],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    /// Mark a stage finished whose outputs were found complete in the cache (another store,
    /// or an earlier store that was deleted).
    pub fn mark_cached(&self, hash: &str) -> Result<()> {
        self.conn
            .execute("UPDATE stages SET status = 'finished', ended_at = COALESCE(ended_at, ?2) WHERE hash = ?1 AND status != 'finished'", params![hash, now()])
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    /// The store says finished but the cache folder is gone: the stage must run again.
    pub fn reset_stage(&self, hash: &str) -> Result<()> {
        self.conn
            .execute(
                "UPDATE stages SET status = 'pending' WHERE hash = ?1",
                [hash],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    pub fn begin_attempt(
        &self,
        hash: &str,
        run_id: i64,
        holder: &str,
        resumed_from: Option<u64>,
    ) -> Result<i64> {
        self.conn
            .execute(
                "INSERT INTO stage_attempts (stage_hash, run_id, holder, started_at, resumed_from) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![hash, run_id, holder, now(), resumed_from.map(|s| s as i64)],
            )
            .map_err(|e| self.e(e))?;
        Ok(self.conn.last_insert_rowid())
    }

    pub fn end_attempt(&self, id: i64, outcome: &str, error: Option<&str>) -> Result<()> {
        self.conn
            .execute(
                "UPDATE stage_attempts SET ended_at = ?2, outcome = ?3, error = ?4 WHERE id = ?1",
                params![id, now(), outcome, error],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    /// Write a batch of metric rows in one transaction; a re-logged (stage, key, step) replaces
    /// the earlier value, so a resumed stage never duplicates rows.
    pub fn write_metrics(&mut self, rows: &[MetricRow]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let path = self.path.clone();
        let se = |e| Error::Store {
            path: path.clone(),
            source: e,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(se)?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO metrics (stage_hash, run_id, key, step, value, wall_time) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT(stage_hash, key, step) DO UPDATE SET value = excluded.value, wall_time = excluded.wall_time, run_id = excluded.run_id",
                )
                .map_err(se)?;
            for r in rows {
                st.execute(params![
                    r.stage_hash,
                    r.run_id,
                    r.key,
                    r.step as i64,
                    r.value,
                    r.wall_time
                ])
                .map_err(se)?;
            }
        }
        tx.commit().map_err(se)?;
        Ok(())
    }

    pub fn add_artifact(
        &self,
        stage_hash: &str,
        run_id: i64,
        path: &str,
        kind: &str,
        sha256: &str,
        bytes: u64,
    ) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO artifacts (stage_hash, run_id, path, kind, sha256, bytes, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![stage_hash, run_id, path, kind, sha256, bytes as i64, now()],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    // ---- queries -------------------------------------------------------------------------

    /// Runs, newest first, optionally filtered by experiment, status and `key=value` params.
    pub fn runs(
        &self,
        experiment: Option<&str>,
        status: Option<&str>,
        param: &[(String, String)],
    ) -> Result<Vec<RunRow>> {
        let mut sql = String::from(
            "SELECT r.id, e.name, r.variant, r.seed, r.spec_hash, r.status, r.started_at, r.ended_at, r.git_commit, r.git_dirty, r.host, r.device, r.error
             FROM runs r JOIN experiments e ON e.id = r.experiment_id WHERE 1 = 1",
        );
        let mut args: Vec<String> = Vec::new();
        if let Some(x) = experiment {
            args.push(x.to_string());
            sql.push_str(&format!(" AND e.name = ?{}", args.len()));
        }
        if let Some(s) = status {
            args.push(s.to_string());
            sql.push_str(&format!(" AND r.status = ?{}", args.len()));
        }
        for (k, v) in param {
            args.push(k.clone());
            args.push(v.clone());
            sql.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM params p WHERE p.run_id = r.id AND p.key = ?{} AND p.value = ?{})",
                args.len() - 1,
                args.len()
            ));
        }
        sql.push_str(" ORDER BY r.id");
        self.rows(&sql, rusqlite::params_from_iter(args.iter()), |r| {
            Ok(RunRow {
                id: r.get(0)?,
                experiment: r.get(1)?,
                variant: r.get(2)?,
                seed: r.get(3)?,
                spec_hash: r.get(4)?,
                status: r.get(5)?,
                started_at: r.get(6)?,
                ended_at: r.get(7)?,
                git_commit: r.get(8)?,
                git_dirty: r.get::<_, Option<i64>>(9)?.map(|d| d != 0),
                host: r.get(10)?,
                device: r.get(11)?,
                error: r.get(12)?,
            })
        })
    }

    pub fn run(&self, id: i64) -> Result<Option<RunRow>> {
        Ok(self.runs(None, None, &[])?.into_iter().find(|r| r.id == id))
    }

    pub fn params_of(&self, run_id: i64) -> Result<Vec<(String, String)>> {
        self.rows(
            "SELECT key, value FROM params WHERE run_id = ?1 ORDER BY key",
            [run_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    }

    /// A run's stages, in order.
    pub fn stages_of(&self, run_id: i64) -> Result<Vec<RunStageRow>> {
        self.rows("SELECT rs.position, rs.stage_name, s.kind, s.hash, s.status FROM run_stages rs JOIN stages s ON s.hash = rs.stage_hash
                 WHERE rs.run_id = ?1 ORDER BY rs.position", [run_id], |r| {
                Ok(RunStageRow {
                    position: r.get(0)?,
                    name: r.get(1)?,
                    kind: r.get(2)?,
                    hash: r.get(3)?,
                    status: r.get(4)?,
                })
            })
    }

    /// The last value (highest step) of every metric key of a run, as (stage, key, step, value).
    pub fn final_metrics(&self, run_id: i64) -> Result<Vec<(String, String, i64, f64)>> {
        self.rows("SELECT rs.stage_name, m.key, m.step, m.value FROM run_stages rs JOIN metrics m ON m.stage_hash = rs.stage_hash
                 WHERE rs.run_id = ?1 AND m.step = (SELECT MAX(step) FROM metrics m2 WHERE m2.stage_hash = m.stage_hash AND m2.key = m.key)
                 ORDER BY rs.position, m.key", [run_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
    }

    /// Every logged value of one metric of a stage, by step.
    pub fn metric_series(&self, stage_hash: &str, key: &str) -> Result<Vec<(i64, f64)>> {
        self.rows(
            "SELECT step, value FROM metrics WHERE stage_hash = ?1 AND key = ?2 ORDER BY step",
            rusqlite::params![stage_hash, key],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    }

    /// An experiment's description and the spec path it was last run from.
    pub fn experiment_info(&self, name: &str) -> Result<Option<(String, String)>> {
        Ok(self
            .rows(
                "SELECT description, spec_path FROM experiments WHERE name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?
            .into_iter()
            .next())
    }

    /// A run's artifacts.
    pub fn artifacts_of(&self, run_id: i64) -> Result<Vec<ArtifactRow>> {
        self.rows("SELECT rs.stage_name, a.path, a.kind, a.sha256, a.bytes FROM run_stages rs JOIN artifacts a ON a.stage_hash = rs.stage_hash
                 WHERE rs.run_id = ?1 ORDER BY rs.position, a.path", [run_id], |r| {
                Ok(ArtifactRow {
                    stage: r.get(0)?,
                    path: r.get(1)?,
                    kind: r.get(2)?,
                    sha256: r.get(3)?,
                    bytes: r.get(4)?,
                })
            })
    }

    /// Every attempt at a run's stages, oldest first.
    pub fn attempts_of(&self, run_id: i64) -> Result<Vec<AttemptRow>> {
        self.rows("SELECT rs.stage_name, a.holder, a.started_at, a.ended_at, a.resumed_from, a.outcome, a.error
                 FROM run_stages rs JOIN stage_attempts a ON a.stage_hash = rs.stage_hash WHERE rs.run_id = ?1 ORDER BY a.id", [run_id], |r| {
                Ok(AttemptRow {
                    stage: r.get(0)?,
                    holder: r.get(1)?,
                    started_at: r.get(2)?,
                    ended_at: r.get(3)?,
                    resumed_from: r.get(4)?,
                    outcome: r.get(5)?,
                    error: r.get(6)?,
                })
            })
    }
}

/// A stage of a run, as stored.
#[derive(Debug, Clone)]
pub struct RunStageRow {
    pub position: i64,
    pub name: String,
    pub kind: String,
    pub hash: String,
    pub status: String,
}

#[derive(Debug, Clone)]
pub struct ArtifactRow {
    pub stage: String,
    /// Relative to the results folder.
    pub path: String,
    pub kind: String,
    pub sha256: String,
    pub bytes: i64,
}

/// One execution of a stage (a resumed stage has several).
#[derive(Debug, Clone)]
pub struct AttemptRow {
    pub stage: String,
    pub holder: String,
    pub started_at: f64,
    pub ended_at: Option<f64>,
    pub resumed_from: Option<i64>,
    pub outcome: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct MetricRow {
    pub stage_hash: String,
    pub run_id: i64,
    pub key: String,
    pub step: u64,
    pub value: f64,
    pub wall_time: f64,
}

/// Git state of the working directory, recorded with every run.
#[derive(Debug, Clone, Default)]
pub struct GitInfo {
    pub commit: Option<String>,
    pub dirty: Option<bool>,
}

impl GitInfo {
    pub fn current() -> Self {
        let run = |args: &[&str]| {
            std::process::Command::new("git")
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        let commit = run(&["rev-parse", "HEAD"]);
        let dirty = commit
            .as_ref()
            .and_then(|_| run(&["status", "--porcelain", "--untracked-files=no"]))
            .map(|s| !s.is_empty());
        GitInfo { commit, dirty }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_metrics_upsert_and_leases() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.sqlite");
        let mut s = Store::open(&p).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        drop(s);
        s = Store::open(&p).unwrap(); // reopening does not re-run migrations
        s.register_stage("h", "data", "data", "", 1).unwrap();
        let row = |step, value| MetricRow {
            stage_hash: "h".into(),
            run_id: 1,
            key: "loss".into(),
            step,
            value,
            wall_time: 0.0,
        };
        s.write_metrics(&[row(1, 1.0), row(2, 2.0)]).unwrap();
        s.write_metrics(&[row(2, 3.0)]).unwrap(); // a resumed stage re-logs step 2
        let n: i64 = s
            .conn()
            .query_row("SELECT COUNT(*) FROM metrics", [], |r| r.get(0))
            .unwrap();
        let v: f64 = s
            .conn()
            .query_row("SELECT value FROM metrics WHERE step = 2", [], |r| r.get(0))
            .unwrap();
        assert_eq!((n, v), (2, 3.0));

        let me = holder_id();
        assert_eq!(s.acquire("h", &me, 60.0).unwrap(), Lease::Acquired);
        // A live holder on another host keeps the lease; a dead process of this host does not.
        let other = "elsewhere:1:0";
        assert_eq!(
            s.acquire("h", other, 60.0).unwrap(),
            Lease::HeldBy(me.clone())
        );
        s.release("h", &me, "interrupted", None).unwrap();
        let dead = format!("{}:{}:0", crate::util::hostname(), u32::MAX - 1);
        assert_eq!(s.acquire("h", &dead, 60.0).unwrap(), Lease::Acquired);
        assert_eq!(
            s.acquire("h", &me, 60.0).unwrap(),
            Lease::Acquired,
            "a dead holder's lease is free"
        );
        s.release("h", &me, "finished", None).unwrap();
        assert_eq!(s.acquire("h", other, 60.0).unwrap(), Lease::Finished);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.sqlite");
        let c = rusqlite::Connection::open(&p).unwrap();
        c.execute_batch(&format!("PRAGMA user_version = {}", SCHEMA_VERSION + 1))
            .unwrap();
        drop(c);
        let e = Store::open(&p).err().unwrap().to_string();
        assert!(e.contains("newer than this onestep"), "{e}");
    }
}

//! Store shards: each cluster task writes the store rows of the one node it computes into a
//! SQLite file of its own (rollback journal, one writer), so no SQLite file is ever shared
//! between machines. [`collect`] merges the finished shards into the main store.
//!
//! Merging is idempotent: every row is keyed by what identifies it (experiment name; run
//! variant, seed and identity; stage hash; run x stage name; metric stage x key x step; artifact
//! stage x path; attempt stage x holder x start), so collecting twice changes nothing. A shard is
//! merged only when its stage is finished in the shard and in the cache; a shard a killed task
//! left half-written (its stage still `running` or `interrupted`, a hot journal, a failed
//! integrity check) is reported and left for the task's retry.

use super::Node;
use crate::error::{Error, Result};
use crate::plan::{is_done, Plan};
use crate::store::{Store, SCHEMA_VERSION};
use rusqlite::{params, OptionalExtension};
use std::path::{Path, PathBuf};

/// What a shard holds, as far as collecting is concerned.
#[derive(Debug, Clone, PartialEq)]
pub enum ShardState {
    /// The stage finished and its cache folder is complete: ready to merge.
    Finished,
    /// The task failed with this error.
    Failed(String),
    /// Still being written, or left by a killed or preempted task: its retry resumes it.
    Incomplete(String),
    /// Not readable as a store of this onestep (corrupt, hot journal, other schema).
    Unreadable(String),
}

/// The outcome of collecting one shard.
#[derive(Debug, Clone)]
pub struct Collected {
    pub node: Node,
    pub path: PathBuf,
    pub state: ShardState,
    /// Whether this call merged it (a finished shard is merged on every call, which changes
    /// nothing the second time).
    pub merged: bool,
}

/// Inspect a shard without changing it.
pub fn inspect(path: &Path, hash: &str, results: &Path) -> ShardState {
    let conn = match rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    ) {
        Ok(c) => c,
        Err(e) => return ShardState::Unreadable(e.to_string()),
    };
    let check = || -> rusqlite::Result<ShardState> {
        let version: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version != SCHEMA_VERSION {
            return Ok(ShardState::Unreadable(format!(
                "store schema version {version}, this onestep writes {SCHEMA_VERSION}"
            )));
        }
        let ok: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if ok != "ok" {
            return Ok(ShardState::Unreadable(format!("integrity check: {ok}")));
        }
        let row: Option<(String, Option<String>)> = conn
            .query_row(
                "SELECT status, error FROM stages WHERE hash = ?1",
                [hash],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(match row {
            None => ShardState::Incomplete("the stage is not registered yet".into()),
            Some((s, _)) if s == "finished" => {
                if is_done(results, hash) {
                    ShardState::Finished
                } else {
                    ShardState::Unreadable(format!(
                        "the shard says finished but {} has no done.json: is the cache on a file system every node shares?",
                        crate::plan::cache_dir(results, hash).display()
                    ))
                }
            }
            Some((s, e)) if s == "failed" => ShardState::Failed(e.unwrap_or_default()),
            Some((s, _)) => ShardState::Incomplete(format!("stage {s}")),
        })
    };
    check().unwrap_or_else(|e| ShardState::Unreadable(e.to_string()))
}

/// Merge every finished shard of `shards` that belongs to the plan into `store`, then record the
/// plan's runs as a local run would (runs, params, run x stage links; a run is finished when all
/// its stages are finished in the cache). Shards of stages outside the plan are left alone.
pub fn collect(
    store: &Store,
    plan: &Plan,
    spec_path: &str,
    results: &Path,
    shards: &Path,
) -> Result<Vec<Collected>> {
    let mut out = Vec::new();
    for node in super::nodes(plan) {
        let path = super::shard_path(shards, &node.hash);
        if !path.is_file() {
            continue;
        }
        let state = inspect(&path, &node.hash, results);
        let merged = state == ShardState::Finished;
        if merged {
            merge(store, &path, &node.hash)?;
        }
        out.push(Collected {
            node,
            path,
            state,
            merged,
        });
    }
    record_runs(store, plan, spec_path, results)?;
    Ok(out)
}

/// Merge one shard (the rows of stage `hash` and the runs that link it) in one transaction.
fn merge(store: &Store, path: &Path, hash: &str) -> Result<()> {
    let se = |e: rusqlite::Error| Error::Other(format!("merging shard {}: {e}", path.display()));
    let conn = store.conn();
    let uri = format!(
        "file:{}?mode=ro",
        path.display()
            .to_string()
            .replace('%', "%25")
            .replace('?', "%3f")
            .replace('#', "%23")
    );
    conn.execute("ATTACH DATABASE ?1 AS shard", [uri])
        .map_err(se)?;
    let r = (|| -> rusqlite::Result<()> {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(MERGE_RUNS)?;
        tx.execute(
            "UPDATE main.stages SET status = 'finished', error = NULL, lease_holder = NULL, lease_expires = NULL,
               started_at = (SELECT CASE WHEN main.stages.started_at IS NULL OR s.started_at < main.stages.started_at
                                     THEN s.started_at ELSE main.stages.started_at END
                             FROM shard.stages s WHERE s.hash = ?1),
               ended_at = COALESCE(ended_at, (SELECT s.ended_at FROM shard.stages s WHERE s.hash = ?1))
             WHERE hash = ?1 AND status != 'finished'",
            params![hash],
        )?;
        tx.execute(
            "INSERT INTO main.stage_attempts (stage_hash, run_id, holder, started_at, ended_at, resumed_from, outcome, error)
             SELECT a.stage_hash, m.main_id, a.holder, a.started_at, a.ended_at, a.resumed_from, a.outcome, a.error
             FROM shard.stage_attempts a LEFT JOIN temp.run_map m ON m.shard_id = a.run_id
             WHERE a.stage_hash = ?1 AND NOT EXISTS (SELECT 1 FROM main.stage_attempts x
                 WHERE x.stage_hash = a.stage_hash AND x.holder = a.holder AND x.started_at = a.started_at)",
            params![hash],
        )?;
        tx.execute(
            "INSERT INTO main.metrics (stage_hash, run_id, key, step, value, wall_time)
             SELECT x.stage_hash, m.main_id, x.key, x.step, x.value, x.wall_time
             FROM shard.metrics x LEFT JOIN temp.run_map m ON m.shard_id = x.run_id WHERE x.stage_hash = ?1
             ON CONFLICT(stage_hash, key, step) DO UPDATE SET value = excluded.value,
               wall_time = excluded.wall_time, run_id = excluded.run_id",
            params![hash],
        )?;
        tx.execute(
            "INSERT INTO main.artifacts (stage_hash, run_id, path, kind, sha256, bytes, created_at)
             SELECT x.stage_hash, m.main_id, x.path, x.kind, x.sha256, x.bytes, x.created_at
             FROM shard.artifacts x LEFT JOIN temp.run_map m ON m.shard_id = x.run_id WHERE x.stage_hash = ?1
             ON CONFLICT(stage_hash, path) DO UPDATE SET run_id = excluded.run_id, kind = excluded.kind,
               sha256 = excluded.sha256, bytes = excluded.bytes, created_at = excluded.created_at",
            params![hash],
        )?;
        tx.execute_batch("DROP TABLE temp.run_map")?;
        tx.commit()
    })();
    let detached = conn.execute_batch("DETACH DATABASE shard");
    r.map_err(se)?;
    detached.map_err(se)
}

/// Experiments, runs (by identity), their params, every stage row (pending unless finished
/// elsewhere) and the run x stage links of a shard; `temp.run_map` maps shard run ids to the
/// main store's. A run's first start and its recorded git, host and device are kept from the
/// first shard that had them; its status is set by [`record_runs`].
const MERGE_RUNS: &str = "
INSERT INTO main.experiments (name, description, spec_path, created_at, updated_at)
  SELECT name, description, spec_path, created_at, updated_at FROM shard.experiments WHERE true
  ON CONFLICT(name) DO NOTHING;
INSERT INTO main.runs (experiment_id, variant, seed, spec_hash, config, status, created_at, started_at,
                       git_commit, git_dirty, host, pid, device)
  SELECT me.id, r.variant, r.seed, r.spec_hash, r.config, 'queued', r.created_at, r.started_at,
         r.git_commit, r.git_dirty, r.host, r.pid, r.device
  FROM shard.runs r JOIN shard.experiments se ON se.id = r.experiment_id
       JOIN main.experiments me ON me.name = se.name WHERE true
  ON CONFLICT(experiment_id, variant, seed, spec_hash) DO UPDATE SET
    created_at = MIN(runs.created_at, excluded.created_at),
    started_at = CASE WHEN runs.started_at IS NULL OR excluded.started_at < runs.started_at
                      THEN excluded.started_at ELSE runs.started_at END,
    git_commit = COALESCE(runs.git_commit, excluded.git_commit),
    git_dirty = COALESCE(runs.git_dirty, excluded.git_dirty),
    host = COALESCE(runs.host, excluded.host),
    pid = COALESCE(runs.pid, excluded.pid),
    device = COALESCE(runs.device, excluded.device);
CREATE TEMP TABLE run_map AS
  SELECT r.id AS shard_id, mr.id AS main_id
  FROM shard.runs r JOIN shard.experiments se ON se.id = r.experiment_id
       JOIN main.experiments me ON me.name = se.name
       JOIN main.runs mr ON mr.experiment_id = me.id AND mr.variant = r.variant
                        AND mr.seed = r.seed AND mr.spec_hash = r.spec_hash;
INSERT OR IGNORE INTO main.params (run_id, key, value)
  SELECT m.main_id, p.key, p.value FROM shard.params p JOIN temp.run_map m ON m.shard_id = p.run_id;
INSERT OR IGNORE INTO main.stages (hash, kind, name, params, code_version, status)
  SELECT hash, kind, name, params, code_version, 'pending' FROM shard.stages;
INSERT INTO main.run_stages (run_id, position, stage_name, stage_hash)
  SELECT m.main_id, rs.position, rs.stage_name, rs.stage_hash
  FROM shard.run_stages rs JOIN temp.run_map m ON m.shard_id = rs.run_id WHERE true
  ON CONFLICT(run_id, stage_name) DO NOTHING;
";

/// Record every run of the plan as a local run over a complete cache would: the run with its
/// params, its stages linked, stages finished in the cache marked finished, and the run's
/// status from its stages (finished when all are; failed when one failed; queued otherwise).
/// Writes only what differs, so a second call changes nothing.
pub fn record_runs(store: &Store, plan: &Plan, spec_path: &str, results: &Path) -> Result<()> {
    let conn = store.conn();
    let se = |e: rusqlite::Error| Error::Store {
        path: store.path().into(),
        source: e,
    };
    let tx = conn.unchecked_transaction().map_err(se)?;
    let t = crate::util::now();
    tx.execute(
        "INSERT INTO experiments (name, description, spec_path, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?4)
         ON CONFLICT(name) DO UPDATE SET description = ?2, spec_path = ?3, updated_at = ?4
         WHERE description != ?2 OR spec_path != ?3",
        params![plan.experiment, plan.description, spec_path, t],
    )
    .map_err(se)?;
    let exp: i64 = tx
        .query_row(
            "SELECT id FROM experiments WHERE name = ?1",
            [&plan.experiment],
            |r| r.get(0),
        )
        .map_err(se)?;
    for run in &plan.runs {
        tx.execute(
            "INSERT INTO runs (experiment_id, variant, seed, spec_hash, config, status, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6) ON CONFLICT DO NOTHING",
            params![
                exp,
                run.variant,
                run.seed as i64,
                run.spec_hash,
                run.config,
                t
            ],
        )
        .map_err(se)?;
        let id: i64 = tx
            .query_row(
                "SELECT id FROM runs WHERE experiment_id = ?1 AND variant = ?2 AND seed = ?3 AND spec_hash = ?4",
                params![exp, run.variant, run.seed as i64, run.spec_hash],
                |r| r.get(0),
            )
            .map_err(se)?;
        for (k, v) in &run.params {
            tx.execute(
                "INSERT OR IGNORE INTO params (run_id, key, value) VALUES (?1, ?2, ?3)",
                params![id, k, v],
            )
            .map_err(se)?;
        }
        let (mut complete, mut failed) = (true, None::<String>);
        let mut ended: Option<f64> = None;
        for (pos, st) in run.stages.iter().enumerate() {
            // The store's own statements, inside this transaction (same connection).
            let params_text = crate::util::canonical_toml(&st.params);
            store.register_stage(&st.hash, &st.kind, &st.name, &params_text, st.version)?;
            tx.execute(
                "INSERT INTO run_stages (run_id, position, stage_name, stage_hash) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(run_id, stage_name) DO UPDATE SET position = ?2, stage_hash = ?4
                 WHERE position != ?2 OR stage_hash != ?4",
                params![id, pos as i64, st.name, st.hash],
            )
            .map_err(se)?;
            let done = is_done(results, &st.hash);
            if done {
                store.mark_cached(&st.hash)?;
            }
            let (status, error, end): (String, Option<String>, Option<f64>) = tx
                .query_row(
                    "SELECT status, error, ended_at FROM stages WHERE hash = ?1",
                    [&st.hash],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .map_err(se)?;
            complete &= done;
            if status == "failed" && failed.is_none() {
                failed = Some(format!(
                    "stage `{}` ({}): {}",
                    st.name,
                    st.kind,
                    error.unwrap_or_default()
                ));
            }
            if let Some(e) = end {
                ended = Some(ended.map_or(e, |x: f64| x.max(e)));
            }
        }
        let (status, error, ended) = if complete {
            ("finished", None, ended)
        } else if let Some(e) = failed {
            ("failed", Some(e), None)
        } else {
            ("queued", None, None)
        };
        // A run recorded by a local runner keeps its own times when its status stands.
        tx.execute(
            "UPDATE runs SET status = ?2, error = ?3, ended_at = ?4 WHERE id = ?1 AND status != ?2",
            params![id, status, error, ended],
        )
        .map_err(se)?;
    }
    tx.commit().map_err(se)
}

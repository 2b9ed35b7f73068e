//! Executes a plan against the run store and the stage cache.
//!
//! For each run (variant x seed): every stage whose cache folder holds `done.json` is reused;
//! any other stage is executed by whoever holds its lease, resuming from its last checkpoint.
//! A failed run is recorded with its reason and the sweep goes on; Ctrl-C stops at the next
//! step boundary with the run marked interrupted.
//!
//! [`Scope::Node`] executes one node of the stage graph (one stage identity) and nothing else:
//! the unit of work of `run --jobs` and of a cluster task (`crate::cluster`), which refuse to
//! start it before its upstream stages are finished in the cache.

use crate::error::{Error, Result};
use crate::plan::{cache_dir, is_done, Plan, PlannedRun, PlannedStage, DONE_FILE};
use crate::progress::{Mode, Progress};
use crate::stages::{self, StageContext, StageLog, Upstream};
use crate::store::{holder_id, GitInfo, Journal, Lease, MetricRow, Store};
use crate::util::now;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a lease lasts without renewal, and how often the holder renews it.
const LEASE_TTL: f64 = 15.0;
const HEARTBEAT: Duration = Duration::from_secs(3);
/// Metrics are written in batches: at most this many rows or this long apart.
const METRIC_BATCH: usize = 512;
const METRIC_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct Options {
    pub results: PathBuf,
    pub store: PathBuf,
    pub assets: PathBuf,
    pub progress: Mode,
    pub spec_path: String,
    pub scope: Scope,
    /// The store's journal: [`Journal::Rollback`] for a cluster task's shard.
    pub journal: Journal,
}

/// What of a plan to execute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every stage of every run, reusing the cached ones.
    All,
    /// One stage identity (full hash): its upstream stages must be finished in the cache. The
    /// first run that contains it is the run it is computed for (as in a sequential run).
    Node(String),
    /// Record the runs of stages computed elsewhere: a stage not finished in the cache fails its
    /// run instead of being computed.
    CachedOnly,
}

#[derive(Debug, Clone)]
pub struct RunResult {
    pub run_id: i64,
    pub variant: String,
    pub seed: u64,
    pub status: String,
    pub error: Option<String>,
    pub executed: usize,
    pub reused: usize,
}

/// Execute every run of the plan; returns one result per run (stops early on interrupt).
pub fn execute(plan: &Plan, opts: &Options, interrupt: Arc<AtomicBool>) -> Result<Vec<RunResult>> {
    let runs: Vec<&PlannedRun> = match &opts.scope {
        Scope::Node(hash) => vec![plan
            .runs
            .iter()
            .find(|r| r.stages.iter().any(|s| &s.hash == hash))
            .ok_or_else(|| {
                Error::Other(format!(
                    "no stage {hash} in the plan of experiment `{}` (`onestep plan SPEC` lists them)",
                    plan.experiment
                ))
            })?],
        _ => plan.runs.iter().collect(),
    };
    let mut store = Store::open_with(&opts.store, opts.journal)?;
    let exp_id = store.upsert_experiment(&plan.experiment, &plan.description, &opts.spec_path)?;
    let git = GitInfo::current();
    let holder = holder_id();
    let mut progress = Progress::new(opts.progress, runs.len() as u64);
    let mut results = Vec::new();
    for (i, run) in runs.iter().copied().enumerate() {
        let (run_id, status) = store.find_or_create_run(
            exp_id,
            &run.variant,
            run.seed,
            &run.spec_hash,
            &run.config,
            &run.params,
        )?;
        let label = format!("{} seed={}", run.variant, run.seed);
        progress.run_start(i, runs.len(), &label);
        if status == "finished" && run.stages.iter().all(|s| is_done(&opts.results, &s.hash)) {
            progress.run_end("already finished");
            results.push(RunResult {
                run_id,
                variant: run.variant.clone(),
                seed: run.seed,
                status,
                error: None,
                executed: 0,
                reused: 0,
            });
            continue;
        }
        store.start_run(run_id, &git, &run.device.to_string())?;
        let r = execute_run(
            &mut store,
            run,
            run_id,
            &holder,
            opts,
            &interrupt,
            &mut progress,
        );
        let complete = run.stages.iter().all(|s| is_done(&opts.results, &s.hash));
        let (status, error, executed, reused) = match r {
            // One node of a run computed: the run waits for its other stages.
            Ok((e, u)) if !complete => ("queued", None, e, u),
            Ok((e, u)) => ("finished", None, e, u),
            Err((Error::Interrupted { .. }, e, u)) => (
                "interrupted",
                Some("interrupted by the user".to_string()),
                e,
                u,
            ),
            Err((err, e, u)) => ("failed", Some(err.to_string()), e, u),
        };
        store.end_run(run_id, status, error.as_deref())?;
        progress.run_end(status);
        results.push(RunResult {
            run_id,
            variant: run.variant.clone(),
            seed: run.seed,
            status: status.into(),
            error,
            executed,
            reused,
        });
        if status == "interrupted" {
            break;
        }
    }
    progress.finish();
    Ok(results)
}

type RunErr = (Error, usize, usize);

fn execute_run(
    store: &mut Store,
    run: &PlannedRun,
    run_id: i64,
    holder: &str,
    opts: &Options,
    interrupt: &Arc<AtomicBool>,
    progress: &mut Progress,
) -> Result<(usize, usize), RunErr> {
    let (mut executed, mut reused) = (0, 0);
    for (pos, st) in run.stages.iter().enumerate() {
        let fail = |e: Error, x: usize, r: usize| (e, x, r);
        let params_text = crate::util::canonical_toml(&st.params);
        store
            .register_stage(&st.hash, &st.kind, &st.name, &params_text, st.version)
            .and_then(|_| store.link_run_stage(run_id, pos, &st.name, &st.hash))
            .map_err(|e| fail(e, executed, reused))?;
        let computable = match &opts.scope {
            Scope::All => true,
            Scope::Node(h) => h == &st.hash,
            Scope::CachedOnly => false,
        };
        if !computable && !is_done(&opts.results, &st.hash) {
            if opts.scope == Scope::CachedOnly {
                let why = match store.stage_error(&st.hash) {
                    Ok(Some(e)) => format!("failed: {e}"),
                    _ => "was not computed; rerun to compute it".to_string(),
                };
                return Err(fail(
                    Error::Other(format!(
                        "stage `{}` ({}) {} {why}",
                        st.name,
                        st.kind,
                        st.short()
                    )),
                    executed,
                    reused,
                ));
            }
            // Another node of this run: not this task's to compute.
            continue;
        }
        if computable && matches!(opts.scope, Scope::Node(_)) {
            for &u in &st.upstream {
                let up = &run.stages[u];
                if !is_done(&opts.results, &up.hash) {
                    return Err(fail(
                        Error::Other(format!(
                            "stage `{}` ({}) {} needs stage `{}` ({}) {}, which is not finished in {}; run that node first",
                            st.name,
                            st.kind,
                            st.short(),
                            up.name,
                            up.kind,
                            up.short(),
                            up.dir(&opts.results).display()
                        )),
                        executed,
                        reused,
                    ));
                }
            }
        }
        let mut waited = false;
        loop {
            if is_done(&opts.results, &st.hash) {
                store
                    .mark_cached(&st.hash)
                    .map_err(|e| fail(e, executed, reused))?;
                progress.note(&format!("{} ({}): cached {}", st.name, st.kind, st.short()));
                reused += 1;
                break;
            }
            match store
                .acquire(&st.hash, holder, LEASE_TTL)
                .map_err(|e| fail(e, executed, reused))?
            {
                Lease::Finished => {
                    // The store says finished but the outputs are gone: compute them again.
                    store
                        .reset_stage(&st.hash)
                        .map_err(|e| fail(e, executed, reused))?;
                }
                Lease::HeldBy(h) => {
                    if !waited {
                        progress.note(&format!(
                            "{} ({}): waiting for {h}, which is computing it",
                            st.name, st.kind
                        ));
                        waited = true;
                    }
                    if interrupt.load(Ordering::SeqCst) {
                        return Err(fail(
                            Error::Interrupted {
                                stage: st.name.clone(),
                                step: 0,
                            },
                            executed,
                            reused,
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Lease::Acquired => {
                    if is_done(&opts.results, &st.hash) {
                        // Finished by a holder that died before releasing its lease.
                        store
                            .release(&st.hash, holder, "finished", None)
                            .map_err(|e| fail(e, executed, reused))?;
                        continue;
                    }
                    // Every ancestor, farthest first, so `upstream_of_kind` finds the nearest
                    // stage of a kind (a teacher reads its data stage through its autoencoder).
                    let upstream = ancestors(run, &st.upstream)
                        .into_iter()
                        .map(|i| {
                            let u = &run.stages[i];
                            Upstream {
                                name: u.name.clone(),
                                kind: u.kind.clone(),
                                hash: u.hash.clone(),
                                dir: u.dir(&opts.results),
                            }
                        })
                        .collect();
                    let r = execute_stage(
                        store, run, st, run_id, holder, upstream, opts, interrupt, progress,
                    );
                    match r {
                        Ok(()) => {
                            executed += 1;
                            break;
                        }
                        Err(e) => {
                            let e = match e {
                                Error::Interrupted { .. } => e,
                                other => Error::Other(format!(
                                    "stage `{}` ({}): {other}",
                                    st.name, st.kind
                                )),
                            };
                            return Err(fail(e, executed, reused));
                        }
                    }
                }
            }
        }
    }
    Ok((executed, reused))
}

/// Renews a lease from a thread of its own until dropped.
struct Heartbeat {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    fn start(store_path: &Path, journal: Journal, hash: &str, holder: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, p, h, o) = (
            stop.clone(),
            store_path.to_path_buf(),
            hash.to_string(),
            holder.to_string(),
        );
        let handle = std::thread::spawn(move || {
            let Ok(store) = Store::open_with(&p, journal) else {
                return;
            };
            let mut last = Instant::now();
            while !s.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
                if last.elapsed() >= HEARTBEAT {
                    last = Instant::now();
                    if let Ok(false) = store.renew(&h, &o, LEASE_TTL) {
                        tracing::warn!("lost the lease of stage {h}");
                    }
                }
            }
        });
        Heartbeat {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The stage's view of the store: batched metrics, hashed artifacts, progress.
struct StoreLog<'a> {
    store: &'a mut Store,
    progress: &'a mut Progress,
    interrupt: Arc<AtomicBool>,
    run_id: i64,
    hash: String,
    results: PathBuf,
    buffer: Vec<MetricRow>,
    last_flush: Instant,
}

impl StageLog for StoreLog<'_> {
    fn metric(&mut self, key: &str, step: u64, value: f64) -> Result<()> {
        self.buffer.push(MetricRow {
            stage_hash: self.hash.clone(),
            run_id: self.run_id,
            key: key.into(),
            step,
            value,
            wall_time: now(),
        });
        if self.buffer.len() >= METRIC_BATCH || self.last_flush.elapsed() >= METRIC_EVERY {
            self.flush()?;
        }
        Ok(())
    }
    fn artifact(&mut self, path: &Path, kind: &str) -> Result<()> {
        let sha = crate::util::sha256_file(path)?;
        let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let rel = path
            .strip_prefix(&self.results)
            .unwrap_or(path)
            .display()
            .to_string();
        self.store
            .add_artifact(&self.hash, self.run_id, &rel, kind, &sha, bytes)
    }
    fn flush(&mut self) -> Result<()> {
        self.store.write_metrics(&self.buffer)?;
        self.buffer.clear();
        self.last_flush = Instant::now();
        Ok(())
    }
    fn progress(&mut self, step: u64, total: u64, message: &str) {
        self.progress.stage_step(step, total, message);
    }
    fn note(&mut self, message: &str) {
        self.progress.note(message);
    }
    fn interrupted(&self) -> bool {
        self.interrupt.load(Ordering::SeqCst)
    }
}

#[allow(clippy::too_many_arguments)]
fn execute_stage(
    store: &mut Store,
    run: &PlannedRun,
    st: &PlannedStage,
    run_id: i64,
    holder: &str,
    upstream: Vec<Upstream>,
    opts: &Options,
    interrupt: &Arc<AtomicBool>,
    progress: &mut Progress,
) -> Result<()> {
    let kind = stages::kind(&st.kind)
        .ok_or_else(|| Error::Other(format!("unknown stage kind {}", st.kind)))?;
    let dir = cache_dir(&opts.results, &st.hash);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    // A runner killed mid-write leaves its temporary files; this one holds the lease now.
    crate::util::remove_stale_temps(&dir)?;
    let resumed = stages::checkpoint_step(&dir);
    let attempt = store.begin_attempt(&st.hash, run_id, holder, resumed)?;
    progress.stage_start(&st.name, &st.kind);
    if let Some(s) = resumed {
        progress.note(&format!(
            "{}: resuming from the checkpoint at step {s}",
            st.name
        ));
    }
    let heartbeat = Heartbeat::start(store.path(), store.journal(), &st.hash, holder);
    let result = {
        let mut log = StoreLog {
            store,
            progress,
            interrupt: interrupt.clone(),
            run_id,
            hash: st.hash.clone(),
            results: opts.results.clone(),
            buffer: Vec::new(),
            last_flush: Instant::now(),
        };
        let mut ctx = StageContext {
            name: st.name.clone(),
            kind: st.kind.clone(),
            hash: st.hash.clone(),
            seed: run.seed,
            device: run.device,
            params: st.params.clone(),
            dir: dir.clone(),
            assets: opts.assets.clone(),
            upstream,
            log: &mut log,
        };
        let r = kind.run(&mut ctx);
        let flushed = log.flush();
        r.and(flushed)
    };
    drop(heartbeat);
    match &result {
        Ok(()) => {
            let done = serde_json::json!({
                "name": st.name, "kind": st.kind, "hash": st.hash, "version": st.version,
                "params": serde_json::to_value(&st.params).unwrap_or_default(),
                "upstream": st.upstream.iter().map(|&i| run.stages[i].hash.clone()).collect::<Vec<_>>(),
                "finished_at": now(),
            });
            crate::util::atomic_write(&dir.join(DONE_FILE), done.to_string().as_bytes())?;
            store.release(&st.hash, holder, "finished", None)?;
            store.end_attempt(attempt, "finished", None)?;
            progress.stage_end("finished");
        }
        Err(e @ Error::Interrupted { .. }) => {
            store.release(&st.hash, holder, "interrupted", Some(&e.to_string()))?;
            store.end_attempt(attempt, "interrupted", Some(&e.to_string()))?;
            progress.stage_end("interrupted");
        }
        Err(e) => {
            store.release(&st.hash, holder, "failed", Some(&e.to_string()))?;
            store.end_attempt(attempt, "failed", Some(&e.to_string()))?;
            progress.stage_end(&format!("failed: {e}"));
        }
    }
    result
}

/// Indices of the stages `direct` depend on, transitively, each once, ancestors before the
/// stages that depend on them.
fn ancestors(run: &crate::plan::PlannedRun, direct: &[usize]) -> Vec<usize> {
    fn visit(run: &crate::plan::PlannedRun, i: usize, out: &mut Vec<usize>) {
        if out.contains(&i) {
            return;
        }
        for &u in &run.stages[i].upstream {
            visit(run, u, out);
        }
        out.push(i);
    }
    let mut out = Vec::new();
    for &i in direct {
        visit(run, i, &mut out);
    }
    out
}

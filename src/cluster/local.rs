//! `onestep run --jobs N`: the plan's unfinished nodes side by side on one machine, each in a
//! process of its own (`onestep run SPEC --node HASH`) sharing the main store (WAL) and cache.
//! A node starts when its upstream nodes have finished; a failed node skips the nodes that need
//! it and the others go on. Worker slots may pin a GPU each (`CUDA_VISIBLE_DEVICES`), and each
//! worker gets its share of the cores (`RAYON_NUM_THREADS`, unless set).

use super::Node;
use crate::error::{Error, Result};
use crate::plan::is_done;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Threads each of `jobs` workers gets: the machine's cores divided between them, at least one
/// (several workers each with a thread per core would oversubscribe the cores).
pub fn threads_per_worker(jobs: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / jobs.max(1)).max(1)
}

/// How a node ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Finished,
    /// The process exited unsuccessfully (exit code, if any).
    Failed(Option<i32>),
    /// Not started: an upstream node failed or was interrupted.
    Skipped(String),
    Interrupted,
}

#[derive(Debug, Clone)]
pub struct NodeResult {
    pub node: Node,
    pub outcome: Outcome,
    pub seconds: f64,
    pub log: PathBuf,
}

/// The worker slots.
#[derive(Debug, Clone, Copy)]
pub struct Pool<'a> {
    /// At most this many workers at once.
    pub jobs: usize,
    /// Devices the slots pin in turn (`CUDA_VISIBLE_DEVICES`); none: the environment is left
    /// alone.
    pub gpus: &'a [String],
    /// Where each node's output goes (`<stage>-<hash12>.log`, appended).
    pub logs: &'a Path,
}

/// Runs the nodes; `command(node)` is the worker's command line (without stdio). `say` gets a
/// line per start and end. Ctrl-C (`interrupt`) starts nothing more and forwards SIGINT to the
/// workers, which stop at their next step.
pub fn run_nodes(
    nodes: &[Node],
    results: &Path,
    pool: Pool<'_>,
    command: &dyn Fn(&Node) -> Command,
    interrupt: &AtomicBool,
    say: &mut dyn FnMut(&str),
) -> Result<Vec<NodeResult>> {
    let Pool { jobs, gpus, logs } = pool;
    std::fs::create_dir_all(logs).map_err(|e| Error::io(logs, e))?;
    let jobs = jobs.max(1);
    let todo: Vec<&Node> = nodes
        .iter()
        .filter(|n| !is_done(results, &n.hash))
        .collect();
    let mut ended: BTreeMap<String, NodeResult> = BTreeMap::new();
    // (node, child, slot, start)
    let mut running: Vec<(&Node, Child, usize, Instant)> = Vec::new();
    let mut forwarded = false;
    loop {
        // Reap.
        let mut i = 0;
        while i < running.len() {
            if let Some(status) = running[i]
                .1
                .try_wait()
                .map_err(|e| Error::Other(e.to_string()))?
            {
                let (node, _, _, t0) = running.remove(i);
                let outcome = if status.success() && is_done(results, &node.hash) {
                    Outcome::Finished
                } else if forwarded {
                    Outcome::Interrupted
                } else {
                    Outcome::Failed(status.code())
                };
                let r = NodeResult {
                    node: node.clone(),
                    outcome,
                    seconds: t0.elapsed().as_secs_f64(),
                    log: super::log_path(logs, node),
                };
                say(&match &r.outcome {
                    Outcome::Finished => format!("finished {} in {:.1}s", node.label(), r.seconds),
                    other => format!(
                        "{} {} after {:.1}s ({other:?}); log {}",
                        if forwarded { "stopped" } else { "FAILED" },
                        node.label(),
                        r.seconds,
                        r.log.display()
                    ),
                });
                ended.insert(node.hash.clone(), r);
            } else {
                i += 1;
            }
        }
        if interrupt.load(Ordering::SeqCst) && !forwarded {
            forwarded = true;
            for (_, c, _, _) in &running {
                // SAFETY: kill(2) on a child's pid; no memory is touched.
                unsafe {
                    libc::kill(c.id() as i32, libc::SIGINT);
                }
            }
        }
        // Skip the nodes whose upstream ended without finishing.
        for n in &todo {
            if ended.contains_key(&n.hash) {
                continue;
            }
            if let Some(u) = n.upstream.iter().find(|u| {
                ended
                    .get(*u)
                    .is_some_and(|r| r.outcome != Outcome::Finished)
            }) {
                let label = ended[u].node.label();
                ended.insert(
                    n.hash.clone(),
                    NodeResult {
                        node: (*n).clone(),
                        outcome: Outcome::Skipped(format!("needs {label}")),
                        seconds: 0.0,
                        log: super::log_path(logs, n),
                    },
                );
            }
        }
        // Start what is ready.
        if !forwarded {
            for n in &todo {
                if running.len() >= jobs {
                    break;
                }
                let started = running.iter().any(|r| r.0.hash == n.hash);
                let ready = n.upstream.iter().all(|u| is_done(results, u));
                if started || ended.contains_key(&n.hash) || !ready {
                    continue;
                }
                let slot = (0..jobs)
                    .find(|s| running.iter().all(|r| r.2 != *s))
                    .unwrap_or(0);
                let log = super::log_path(logs, n);
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .map_err(|e| Error::io(&log, e))?;
                let err = file.try_clone().map_err(|e| Error::io(&log, e))?;
                let mut c = command(n);
                c.stdin(Stdio::null()).stdout(file).stderr(err);
                // Its own process group: a terminal's Ctrl-C reaches the workers only through
                // this process, once.
                std::os::unix::process::CommandExt::process_group(&mut c, 0);
                // The machine's cores shared between the workers, unless the user chose.
                if std::env::var_os("RAYON_NUM_THREADS").is_none() {
                    c.env("RAYON_NUM_THREADS", threads_per_worker(jobs).to_string());
                }
                let mut gpu = String::new();
                if !gpus.is_empty() {
                    let g = &gpus[slot % gpus.len()];
                    c.env("CUDA_VISIBLE_DEVICES", g);
                    gpu = format!(", CUDA_VISIBLE_DEVICES={g}");
                }
                let child = c.spawn().map_err(|e| {
                    Error::Other(format!("starting a worker for {}: {e}", n.label()))
                })?;
                say(&format!(
                    "start {} (slot {slot}{gpu}); log {}",
                    n.label(),
                    log.display()
                ));
                running.push((n, child, slot, Instant::now()));
            }
        }
        let open = todo
            .iter()
            .any(|n| !ended.contains_key(&n.hash) && !running.iter().any(|r| r.0.hash == n.hash));
        if running.is_empty() && (forwarded || !open) {
            break;
        }
        if running.is_empty() && open {
            // Nothing runs and nothing can start: an upstream node outside this set is missing.
            for n in &todo {
                if !ended.contains_key(&n.hash) {
                    ended.insert(
                        n.hash.clone(),
                        NodeResult {
                            node: (*n).clone(),
                            outcome: Outcome::Skipped("an upstream stage is not finished".into()),
                            seconds: 0.0,
                            log: super::log_path(logs, n),
                        },
                    );
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(todo.iter().filter_map(|n| ended.remove(&n.hash)).collect())
}

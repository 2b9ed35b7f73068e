//! `onestep run SPEC`: execute a spec's sweep, then print a summary table.

use super::Global;
use anyhow::Context;
use onestep::spec::Device;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The spec and its overrides, as `run`, `submit`, `collect` and `status` take them.
#[derive(clap::Args, Debug)]
pub struct SpecArgs {
    /// The experiment spec (TOML).
    pub spec: PathBuf,
    /// Override a spec value: `--set stages.data.size=64` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Device for every run, overriding the spec's `device`.
    #[arg(long)]
    pub device: Option<DeviceArg>,
    /// Dtype of every stage that has a `dtype` key and does not set it, overriding the spec's
    /// top-level `dtype` (f32, bf16 or f16; half precision is for CUDA). It is part of the
    /// stages' identities, as `--set dtype=...` would be.
    #[arg(long, value_parser = ["f32", "bf16", "f16"])]
    pub dtype: Option<String>,
}

impl SpecArgs {
    pub fn plan(&self) -> anyhow::Result<onestep::plan::Plan> {
        plan_of(&self.spec, &self.sets(), self.device)
    }
    /// `--set` overrides, with `--dtype` as the last.
    fn sets(&self) -> Vec<String> {
        let mut sets = self.set.clone();
        if let Some(d) = &self.dtype {
            sets.push(format!("dtype=\"{d}\""));
        }
        sets
    }
    /// The `run` arguments a worker or cluster task repeats: overrides, device and dtype.
    pub fn run_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in &self.set {
            out.push("--set".into());
            out.push(s.clone());
        }
        if let Some(d) = self.device {
            out.push("--device".into());
            out.push(format!("{d:?}").to_lowercase());
        }
        if let Some(d) = &self.dtype {
            out.push("--dtype".into());
            out.push(d.clone());
        }
        out
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Run independent stages side by side, in up to N worker processes sharing the store and
    /// the cache (a stage starts once the stages it reads have finished).
    #[arg(long, value_name = "N", conflicts_with = "node")]
    pub jobs: Option<usize>,
    /// With --jobs: GPUs the worker slots pin in turn (`CUDA_VISIBLE_DEVICES`), e.g. `0,1,2,3`.
    #[arg(long, value_name = "LIST", value_delimiter = ',', requires = "jobs")]
    pub gpus: Vec<String>,
    /// Compute only this stage (its identity, or a unique prefix of 8+ characters, as `plan`
    /// prints it); the stages it reads must be finished. What `--jobs` workers and cluster
    /// tasks run.
    #[arg(long, value_name = "HASH")]
    pub node: Option<String>,
    /// The store is a cluster task's shard: SQLite's rollback journal instead of WAL (one
    /// writer; works on network file systems).
    #[arg(long)]
    pub shard: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

/// Refuse CUDA before anything is written when this build or this machine cannot use it.
pub fn check_device(d: Device) -> anyhow::Result<()> {
    if d == Device::Cuda {
        onestep::train::device(d)?;
    }
    Ok(())
}

/// Plan a spec as `run` would, with its overrides and device.
pub fn plan_of(
    spec: &std::path::Path,
    set: &[String],
    device: Option<DeviceArg>,
) -> anyhow::Result<onestep::plan::Plan> {
    let loaded = onestep::spec::load(spec, set, &onestep::stages::Registry)?;
    let device = device.map(|d| match d {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => Device::Cuda,
    });
    onestep::plan::plan(&loaded, device).with_context(|| format!("planning {}", spec.display()))
}

/// The node a `--node` argument names: a full stage identity or a unique prefix.
pub fn find_node(plan: &onestep::plan::Plan, prefix: &str) -> anyhow::Result<String> {
    let nodes = onestep::cluster::nodes(plan);
    let hits: Vec<_> = nodes
        .iter()
        .filter(|n| prefix.len() >= 8 && n.hash.starts_with(prefix))
        .collect();
    match hits.as_slice() {
        [one] => Ok(one.hash.clone()),
        [] => anyhow::bail!(
            "--node {prefix}: no stage of experiment `{}` has this identity (8+ characters of a hash `onestep plan` prints)",
            plan.experiment
        ),
        _ => anyhow::bail!("--node {prefix}: {} stages start with it; give more characters", hits.len()),
    }
}

pub fn execute(g: &Global, a: Args) -> anyhow::Result<ExitCode> {
    let plan = a.spec.plan()?;
    for r in &plan.runs {
        check_device(r.device)?;
    }
    let scope = match &a.node {
        Some(p) => onestep::runner::Scope::Node(find_node(&plan, p)?),
        None => onestep::runner::Scope::All,
    };
    let interrupt = Arc::new(AtomicBool::new(false));
    let flag = interrupt.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: stopping at the next step (press Ctrl-C again to abort now)");
    });
    let mut opts = onestep::runner::Options {
        results: g.results.clone(),
        store: g.store(),
        assets: g.assets(),
        progress: g.progress(),
        spec_path: a.spec.spec.display().to_string(),
        scope,
        journal: if a.shard {
            onestep::store::Journal::Rollback
        } else {
            onestep::store::Journal::Wal
        },
    };
    let t0 = std::time::Instant::now();
    let mut by_workers = 0;
    if let Some(jobs) = a.jobs {
        match run_parallel(g, &a, &plan, jobs, &interrupt)? {
            Parallel::Interrupted => return Ok(ExitCode::from(130)),
            // Record the runs: every stage computed by a worker is reused, none is computed.
            Parallel::Done(n) => {
                by_workers = n;
                opts.scope = onestep::runner::Scope::CachedOnly;
            }
        }
    }
    let results = onestep::runner::execute(&plan, &opts, interrupt)?;
    let store = onestep::store::Store::open(&opts.store)?;
    println!("{}", summary(&store, &plan, &results)?);
    let failed: Vec<_> = results.iter().filter(|r| r.status == "failed").collect();
    let interrupted = results.iter().any(|r| r.status == "interrupted");
    let (executed, reused): (usize, usize) = results
        .iter()
        .fold((by_workers, 0), |(e, u), r| (e + r.executed, u + r.reused));
    println!(
        "\n{} runs: {} finished, {} failed{}; {executed} stages computed, {reused} reused; {:.1}s; store {}",
        results.len(),
        results
            .iter()
            .filter(|r| r.status == "finished")
            .count(),
        failed.len(),
        if interrupted { ", interrupted" } else { "" },
        t0.elapsed().as_secs_f64(),
        opts.store.display()
    );
    if !failed.is_empty() {
        eprintln!("\nfailures:");
        for r in &failed {
            eprintln!(
                "  run {} ({} seed={}): {}",
                r.run_id,
                r.variant,
                r.seed,
                r.error.as_deref().unwrap_or("?")
            );
        }
        return Ok(ExitCode::from(1));
    }
    if interrupted {
        return Ok(ExitCode::from(130));
    }
    Ok(ExitCode::SUCCESS)
}

/// The summary table: one row per run, with the spec's `summary` metrics (or the final metrics
/// of each run's last stage).
fn summary(
    store: &onestep::store::Store,
    plan: &onestep::plan::Plan,
    results: &[onestep::runner::RunResult],
) -> anyhow::Result<String> {
    let mut columns: Vec<String> = plan.summary.clone();
    let mut per_run = Vec::new();
    for r in results {
        let m = store.final_metrics(r.run_id)?;
        if plan.summary.is_empty() {
            if let Some(last) = m.last().map(|x| x.0.clone()) {
                for (stage, key, _, _) in m.iter().filter(|x| x.0 == last) {
                    let c = format!("{stage}/{key}");
                    if !columns.contains(&c) && columns.len() < 8 {
                        columns.push(c);
                    }
                }
            }
        }
        per_run.push(m);
    }
    let mut header: Vec<String> = ["run", "variant", "seed", "status"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    header.extend(columns.iter().cloned());
    let rows: Vec<Vec<String>> = results
        .iter()
        .zip(&per_run)
        .map(|(r, m)| {
            let mut row = vec![
                r.run_id.to_string(),
                r.variant.clone(),
                r.seed.to_string(),
                r.status.clone(),
            ];
            for c in &columns {
                let v = m
                    .iter()
                    .find(|(s, k, _, _)| &format!("{s}/{k}") == c)
                    .map(|x| super::fmt_value(x.3));
                row.push(v.unwrap_or_else(|| "-".into()));
            }
            row
        })
        .collect();
    Ok(format!(
        "experiment {}\n{}",
        plan.experiment,
        super::table(&header, &rows)
    ))
}

enum Parallel {
    /// With the number of stages the workers computed.
    Done(usize),
    Interrupted,
}

/// `--jobs N`: every unfinished node in a worker process of its own (this binary, `run --node`).
fn run_parallel(
    g: &Global,
    a: &Args,
    plan: &onestep::plan::Plan,
    jobs: usize,
    interrupt: &Arc<AtomicBool>,
) -> anyhow::Result<Parallel> {
    let nodes = onestep::cluster::nodes(plan);
    let exe = std::env::current_exe().context("locating the onestep binary")?;
    let logs = onestep::cluster::experiment_dir(&g.results, &plan.experiment).join("logs");
    let command = |n: &onestep::cluster::Node| {
        let mut c = std::process::Command::new(&exe);
        c.arg("--results").arg(&g.results);
        c.arg("--store").arg(g.store());
        c.arg("--assets").arg(g.assets());
        c.args(["--progress", "lines", "run"]).arg(&a.spec.spec);
        c.args(a.spec.run_args());
        c.arg("--node").arg(&n.hash);
        c
    };
    let pending = nodes
        .iter()
        .filter(|n| !onestep::plan::is_done(&g.results, &n.hash))
        .count();
    println!(
        "{} stages, {pending} to compute in up to {jobs} workers; logs in {}",
        nodes.len(),
        logs.display()
    );
    let results = onestep::cluster::local::run_nodes(
        &nodes,
        &g.results,
        onestep::cluster::local::Pool {
            jobs,
            gpus: &a.gpus,
            logs: &logs,
        },
        &command,
        interrupt,
        &mut |line| println!("[jobs] {line}"),
    )?;
    use onestep::cluster::local::Outcome;
    if results.iter().any(|r| r.outcome == Outcome::Interrupted) || interrupt.load(Ordering::SeqCst)
    {
        return Ok(Parallel::Interrupted);
    }
    Ok(Parallel::Done(
        results
            .iter()
            .filter(|r| r.outcome == Outcome::Finished)
            .count(),
    ))
}

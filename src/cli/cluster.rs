//! `onestep submit SPEC --slurm`, `onestep collect SPEC`, `onestep status SPEC`: a sweep as
//! Slurm job arrays, its store shards merged back, and where every stage of it stands
//! (see `onestep::cluster` and docs/cluster.md).

use super::run::SpecArgs;
use super::Global;
use anyhow::Context;
use onestep::cluster::shard::{self, ShardState};
use onestep::cluster::slurm::{self, Invocation, SlurmOptions};
use onestep::cluster::{experiment_dir, nodes, waves, Node};
use onestep::plan::is_done;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Submit to Slurm (sbatch job arrays, one per wave of the stage graph).
    #[arg(long, required = true)]
    pub slurm: bool,
    /// Slurm partition of every task.
    #[arg(long)]
    pub partition: Option<String>,
    /// GPUs per task (each task computes one stage).
    #[arg(long)]
    pub gpus_per_task: Option<u32>,
    /// CPU cores per task.
    #[arg(long)]
    pub cpus_per_task: Option<u32>,
    /// Memory per node, as sbatch takes it (`64G`).
    #[arg(long)]
    pub mem: Option<String>,
    /// Time limit of each task, as sbatch takes it (`2:00:00`, `1-00:00:00`).
    #[arg(long)]
    pub time: Option<String>,
    /// At most K tasks of an array at once.
    #[arg(long, value_name = "K")]
    pub array_limit: Option<u32>,
    /// Slurm account to charge.
    #[arg(long)]
    pub account: Option<String>,
    /// Slurm quality of service.
    #[arg(long)]
    pub qos: Option<String>,
    /// A further sbatch option for every task (repeatable): `--sbatch=--constraint=a100`.
    #[arg(long = "sbatch", value_name = "OPTION", allow_hyphen_values = true)]
    pub sbatch: Vec<String>,
    /// Write and print the scripts and the sbatch commands; submit nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Submit even if tasks of an earlier submission of these stages are still queued or running.
    #[arg(long)]
    pub force: bool,
}

#[derive(clap::Args, Debug)]
pub struct CollectArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// The shards' folder (default `<results>/cluster/<experiment>/shards`).
    #[arg(long)]
    pub shards: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// The shards' folder (default `<results>/cluster/<experiment>/shards`).
    #[arg(long)]
    pub shards: Option<PathBuf>,
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::fs::canonicalize(p).with_context(|| format!("{}: cannot resolve", p.display()))
}

pub fn submit(g: &Global, a: SubmitArgs) -> anyhow::Result<ExitCode> {
    let plan = a.spec.plan()?;
    // No device check here: the submitting machine may lack the GPUs its tasks will have; each
    // task checks its own device before it writes anything.
    let all = nodes(&plan);
    let waves = waves(&all, &g.results);
    if waves.is_empty() {
        println!(
            "nothing to submit: all {} stages of `{}` are finished in {}; `onestep collect {}` records them",
            all.len(),
            plan.experiment,
            g.results.display(),
            a.spec.spec.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let dir = experiment_dir(&g.results, &plan.experiment);
    for d in [dir.join("shards"), dir.join("logs")] {
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    let dir = absolute(&dir)?;
    if !a.dry_run && !a.force {
        let subs = slurm::submissions(&dir)?;
        let latest = slurm::latest_tasks(&subs);
        let jobs = slurm::jobs_of(&latest);
        if !jobs.is_empty() {
            let states = slurm::query(&jobs)?;
            let busy: Vec<String> = waves
                .iter()
                .flatten()
                .filter_map(|n| {
                    let t = latest.get(&n.hash)?;
                    let s = states.get(t)?;
                    s.active()
                        .then(|| format!("{} is {} (job {}_{})", n.label(), s.state, t.0, t.1))
                })
                .collect();
            if !busy.is_empty() {
                anyhow::bail!(
                    "an earlier submission still has these stages queued or running:\n  {}\n(`onestep status {}`; `scancel` them, or pass --force)",
                    busy.join("\n  "),
                    a.spec.spec.display()
                );
            }
        }
    }
    let inv = Invocation {
        exe: std::env::current_exe().context("locating the onestep binary")?,
        results: absolute(&g.results)?,
        assets: Some(g.assets())
            .filter(|p| p.exists())
            .map(|p| absolute(&p))
            .transpose()?,
        spec: absolute(&a.spec.spec)?,
        run_args: a.spec.run_args(),
    };
    let opts = SlurmOptions {
        partition: a.partition.clone(),
        gpus_per_task: a.gpus_per_task,
        cpus_per_task: a.cpus_per_task,
        mem: a.mem.clone(),
        time: a.time.clone(),
        array_limit: a.array_limit,
        account: a.account.clone(),
        qos: a.qos.clone(),
        extra: a.sbatch.clone(),
    };
    let mut scripts = Vec::new();
    for (w, nodes) in waves.iter().enumerate() {
        let text = slurm::script(&plan.experiment, w, waves.len(), nodes, &inv, &dir, &opts);
        let p = dir.join(format!("wave-{w}.sbatch"));
        onestep::util::atomic_write(&p, text.as_bytes())?;
        scripts.push((p, text));
    }
    let total: usize = waves.iter().map(|w| w.len()).sum();
    println!(
        "experiment {}: {total} of {} stages to compute, in {} waves (job arrays); scripts in {}",
        plan.experiment,
        all.len(),
        waves.len(),
        dir.display()
    );
    if a.dry_run {
        for (w, (p, text)) in scripts.iter().enumerate() {
            let dep = if w == 0 {
                String::new()
            } else {
                format!(" --dependency=afterok:<job of wave {}>", w - 1)
            };
            println!("\n$ sbatch --parsable{dep} {}\n{text}", p.display());
        }
        println!("dry run: nothing submitted");
        return Ok(ExitCode::SUCCESS);
    }
    let mut jobs = Vec::new();
    let mut prev: Option<String> = None;
    for (w, ((p, _), nodes)) in scripts.iter().zip(&waves).enumerate() {
        let id = match slurm::sbatch(p, prev.as_deref()) {
            Ok(id) => id,
            Err(e) => {
                // Record what went in, so `status` and a resubmission see it.
                if !jobs.is_empty() {
                    slurm::record(&dir, jobs)?;
                }
                return Err(e.into());
            }
        };
        println!(
            "wave {w}: job {id}, {} task(s): {}",
            nodes.len(),
            nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        jobs.push(slurm::Job {
            job_id: id.clone(),
            wave: w,
            script: p.clone(),
            nodes: nodes.iter().map(|n| n.hash.clone()).collect(),
        });
        prev = Some(id);
    }
    slurm::record(&dir, jobs)?;
    println!(
        "\n`onestep status {0}` follows them; `onestep collect {0}` merges what finished into {1}",
        a.spec.spec.display(),
        g.store().display()
    );
    Ok(ExitCode::SUCCESS)
}

fn shards_dir(g: &Global, experiment: &str, given: &Option<PathBuf>) -> PathBuf {
    given
        .clone()
        .unwrap_or_else(|| experiment_dir(&g.results, experiment).join("shards"))
}

pub fn collect(g: &Global, a: CollectArgs) -> anyhow::Result<ExitCode> {
    let plan = a.spec.plan()?;
    let shards = shards_dir(g, &plan.experiment, &a.shards);
    let store = onestep::store::Store::open(&g.store())?;
    let spec_path = a.spec.spec.display().to_string();
    let found = shard::collect(&store, &plan, &spec_path, &g.results, &shards)?;
    let mut left = 0;
    for c in &found {
        let what = match &c.state {
            ShardState::Finished => "merged".to_string(),
            ShardState::Failed(e) => {
                left += 1;
                format!("failed, not merged: {e}")
            }
            ShardState::Incomplete(why) => {
                left += 1;
                format!("incomplete ({why}), left for a retry")
            }
            ShardState::Unreadable(why) => {
                left += 1;
                format!("unreadable ({why}), left for a retry")
            }
        };
        println!("{:<48} {what}", c.node.label());
    }
    let runs = store.runs(Some(&plan.experiment), None, &[])?;
    let count = |s: &str| runs.iter().filter(|r| r.status == s).count();
    println!(
        "\n{} shard(s) in {}: {} merged, {left} left; runs of `{}`: {} finished, {} queued, {} failed; store {}",
        found.len(),
        shards.display(),
        found.iter().filter(|c| c.merged).count(),
        plan.experiment,
        count("finished"),
        count("queued"),
        count("failed"),
        g.store().display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Where one node stands, from the cache, the main store, its shard and the scheduler.
fn node_state(
    n: &Node,
    results: &Path,
    store: Option<&onestep::store::Store>,
    shards: &Path,
    task: Option<(&(String, usize), Option<&slurm::TaskState>)>,
) -> (String, String) {
    let stored = store
        .and_then(|s| s.stage_status(&n.hash).ok().flatten())
        .unwrap_or_default();
    if is_done(results, &n.hash) {
        return if stored == "finished" {
            ("done".into(), String::new())
        } else {
            ("done".into(), "not collected yet".into())
        };
    }
    let job = task
        .map(|(t, _)| format!("job {}_{}", t.0, t.1))
        .unwrap_or_default();
    if let Some((_, Some(s))) = task {
        if s.active() {
            let reason = if s.reason.is_empty() || s.reason == "None" {
                String::new()
            } else {
                format!(" ({})", s.reason)
            };
            return (s.state.to_lowercase(), format!("{job}{reason}"));
        }
    }
    let path = onestep::cluster::shard_path(shards, &n.hash);
    if path.is_file() {
        match shard::inspect(&path, &n.hash, results) {
            ShardState::Failed(e) => return ("failed".into(), format!("{job} {e}").trim().into()),
            ShardState::Incomplete(why) => {
                let sched = task
                    .and_then(|(_, s)| s)
                    .map(|s| format!(", Slurm: {}", s.state))
                    .unwrap_or_default();
                return (
                    "stopped".into(),
                    format!("{job} {why}{sched}; resubmit to resume")
                        .trim()
                        .into(),
                );
            }
            ShardState::Unreadable(why) => {
                return (
                    "stopped".into(),
                    format!("{job} shard: {why}").trim().into(),
                )
            }
            ShardState::Finished => {}
        }
    }
    if let Some((_, Some(s))) = task {
        return (s.state.to_lowercase(), job);
    }
    match stored.as_str() {
        "running" => ("running".into(), "in a local run".into()),
        "failed" | "interrupted" => (stored, "in a local run".into()),
        _ if n.upstream.iter().all(|u| is_done(results, u)) => ("ready".into(), job),
        _ => ("waiting".into(), job),
    }
}

pub fn status(g: &Global, a: StatusArgs) -> anyhow::Result<ExitCode> {
    let plan = a.spec.plan()?;
    let dir = experiment_dir(&g.results, &plan.experiment);
    let shards = shards_dir(g, &plan.experiment, &a.shards);
    let store = g
        .store()
        .is_file()
        .then(|| onestep::store::Store::open(&g.store()))
        .transpose()?;
    let subs = slurm::submissions(&dir)?;
    let latest = slurm::latest_tasks(&subs);
    let jobs = slurm::jobs_of(&latest);
    let (states, note) = if jobs.is_empty() {
        (Default::default(), None)
    } else {
        match slurm::query(&jobs) {
            Ok(s) => (s, None),
            Err(e) => (Default::default(), Some(e.to_string())),
        }
    };
    let mut rows = Vec::new();
    let mut tally: std::collections::BTreeMap<String, usize> = Default::default();
    for n in nodes(&plan) {
        let task = latest.get(&n.hash).map(|t| (t, states.get(t)));
        let (state, detail) = node_state(&n, &g.results, store.as_ref(), &shards, task);
        *tally.entry(state.clone()).or_default() += 1;
        rows.push(vec![
            n.name.clone(),
            n.kind.clone(),
            n.short().to_string(),
            n.runs.len().to_string(),
            state,
            detail,
        ]);
    }
    println!(
        "experiment {} ({} stages, {} runs)",
        plan.experiment,
        rows.len(),
        plan.runs.len()
    );
    println!(
        "{}",
        super::table(
            &["stage", "kind", "identity", "runs", "state", "detail"].map(String::from),
            &rows
        )
    );
    if let Some(n) = note {
        println!("scheduler not queried: {n}");
    }
    println!(
        "{}",
        tally
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

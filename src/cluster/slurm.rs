//! Slurm: a sweep's unfinished nodes as one job array per wave ([`super::waves`]), each wave
//! `--dependency=afterok` on the one before, so a shared teacher trains once before the
//! distillation variants start. Every array task runs `onestep run SPEC --node HASH --shard`
//! into a store shard of its own; `onestep collect` merges them.
//!
//! Preemption: tasks are `--requeue`d by Slurm and resume from their stage's checkpoint in the
//! shared cache; 120 s before the time limit a task gets SIGINT (`--signal=B:INT@120`) and stops
//! at the next step. A failed, cancelled or timed-out task cancels the waves after it
//! (`--kill-on-invalid-dep=yes`); `onestep submit` again submits only the unfinished nodes.

use super::Node;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `#SBATCH` resources and limits of every task.
#[derive(Debug, Clone, Default)]
pub struct SlurmOptions {
    pub partition: Option<String>,
    pub gpus_per_task: Option<u32>,
    pub cpus_per_task: Option<u32>,
    pub mem: Option<String>,
    pub time: Option<String>,
    /// At most this many tasks of an array at once (`--array=0-N%K`).
    pub array_limit: Option<u32>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// Further `sbatch` options, one per `#SBATCH` line (`--constraint=a100`).
    pub extra: Vec<String>,
}

/// The command every task runs, less `--node` and the shard.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The onestep binary (an absolute path every node can read).
    pub exe: PathBuf,
    /// Absolute paths: results folder (with the stage cache, shared by every node), assets.
    pub results: PathBuf,
    pub assets: Option<PathBuf>,
    pub spec: PathBuf,
    /// `--set` overrides and `--device`, passed on as given.
    pub run_args: Vec<String>,
}

/// Single-quote a word for bash.
pub fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The batch script of one wave: one array task per node.
pub fn script(
    experiment: &str,
    wave: usize,
    waves: usize,
    nodes: &[Node],
    inv: &Invocation,
    dir: &Path,
    opts: &SlurmOptions,
) -> String {
    let logs = dir.join("logs");
    let shards = dir.join("shards");
    let mut s = String::from("#!/bin/bash\n");
    s.push_str(&format!(
        "# onestep: experiment `{experiment}`, wave {wave} (waves 0-{}): one array task per stage,\n\
         # each started once every earlier wave has finished (sbatch --dependency=afterok:<previous wave>).\n\
         # Written by `onestep submit`; each task writes its own store shard, merged by `onestep collect`.\n",
        waves.saturating_sub(1)
    ));
    let mut sb = |line: String| s.push_str(&format!("#SBATCH {line}\n"));
    let name: String = experiment
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    sb(format!("--job-name=onestep-{name}-w{wave}"));
    let limit = opts
        .array_limit
        .map(|k| format!("%{k}"))
        .unwrap_or_default();
    sb(format!(
        "--array=0-{}{limit}",
        nodes.len().saturating_sub(1)
    ));
    sb(format!(
        "--output={}",
        quote(&logs.join("slurm-%A_%a.out").display().to_string())
    ));
    sb("--open-mode=append".into());
    sb("--requeue".into());
    sb("--signal=B:INT@120".into());
    sb("--kill-on-invalid-dep=yes".into());
    if let Some(p) = &opts.partition {
        sb(format!("--partition={}", quote(p)));
    }
    if let Some(g) = opts.gpus_per_task {
        sb(format!("--gpus-per-task={g}"));
    }
    if let Some(c) = opts.cpus_per_task {
        sb(format!("--cpus-per-task={c}"));
    }
    if let Some(m) = &opts.mem {
        sb(format!("--mem={}", quote(m)));
    }
    if let Some(t) = &opts.time {
        sb(format!("--time={}", quote(t)));
    }
    if let Some(a) = &opts.account {
        sb(format!("--account={}", quote(a)));
    }
    if let Some(q) = &opts.qos {
        sb(format!("--qos={}", quote(q)));
    }
    for x in &opts.extra {
        sb(x.clone());
    }
    s.push_str("set -euo pipefail\n\n# task: stage (kind) identity\n");
    for (i, n) in nodes.iter().enumerate() {
        s.push_str(&format!("#   {i}: {}\n", n.label()));
    }
    let list = |f: &dyn Fn(&Node) -> String| {
        nodes
            .iter()
            .map(|n| quote(&f(n)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    s.push_str(&format!("NODES=({})\n", list(&|n| n.hash.clone())));
    s.push_str(&format!(
        "LOGS=({})\n",
        list(&|n| super::log_path(&logs, n).display().to_string())
    ));
    s.push_str("NODE=${NODES[$SLURM_ARRAY_TASK_ID]}\nLOG=${LOGS[$SLURM_ARRAY_TASK_ID]}\n");
    s.push_str(
        "echo \"onestep: node $NODE on $(hostname), job ${SLURM_JOB_ID}, restart ${SLURM_RESTART_COUNT:-0}; log $LOG\"\n",
    );
    let mut cmd = vec![
        quote(&inv.exe.display().to_string()),
        "--results".into(),
        quote(&inv.results.display().to_string()),
    ];
    if let Some(a) = &inv.assets {
        cmd.push("--assets".into());
        cmd.push(quote(&a.display().to_string()));
    }
    cmd.push("--store".into());
    cmd.push(format!(
        "\"{}/$NODE.sqlite\"",
        shards.display().to_string().replace('"', "\\\"")
    ));
    cmd.extend(["--progress".into(), "lines".into(), "run".into()]);
    cmd.push(quote(&inv.spec.display().to_string()));
    cmd.extend(inv.run_args.iter().map(|a| quote(a)));
    cmd.extend(["--node".into(), "\"$NODE\"".into(), "--shard".into()]);
    s.push_str(&format!("exec {} >>\"$LOG\" 2>&1\n", cmd.join(" ")));
    s
}

/// One `sbatch` of a submission.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Job {
    pub job_id: String,
    pub wave: usize,
    pub script: PathBuf,
    /// Node hashes, by array index.
    pub nodes: Vec<String>,
}

/// One `onestep submit`, as appended to `submissions.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Submission {
    pub time: f64,
    pub jobs: Vec<Job>,
}

pub const SUBMISSIONS: &str = "submissions.jsonl";

/// Submit one script, after job `after` if given; returns the job id.
pub fn sbatch(script: &Path, after: Option<&str>) -> Result<String> {
    let mut c = Command::new("sbatch");
    c.arg("--parsable");
    if let Some(a) = after {
        c.arg(format!("--dependency=afterok:{a}"));
    }
    c.arg(script);
    let o = c.output().map_err(|e| {
        Error::Other(format!(
            "sbatch {}: {e} (is Slurm installed on this machine?)",
            script.display()
        ))
    })?;
    if !o.status.success() {
        return Err(Error::Other(format!(
            "sbatch {}: {}",
            script.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    let out = String::from_utf8_lossy(&o.stdout);
    let id = out.trim().split(';').next().unwrap_or("").to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        return Err(Error::Other(format!(
            "sbatch {}: unexpected output {:?}",
            script.display(),
            out.trim()
        )));
    }
    Ok(id)
}

/// Every submission recorded in the experiment's folder, oldest first.
pub fn submissions(dir: &Path) -> Result<Vec<Submission>> {
    let p = dir.join(SUBMISSIONS);
    let Ok(text) = std::fs::read_to_string(&p) else {
        return Ok(Vec::new());
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| Error::Other(format!("{}:{}: {e}", p.display(), i + 1)))
        })
        .collect()
}

/// Append a submission of these jobs, made now, to the experiment's `submissions.jsonl`.
pub fn record(dir: &Path, jobs: Vec<Job>) -> Result<()> {
    use std::io::Write;
    let s = &Submission {
        time: crate::util::now(),
        jobs,
    };
    let p = dir.join(SUBMISSIONS);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
        .map_err(|e| Error::io(&p, e))?;
    let line = serde_json::to_string(s).map_err(|e| Error::Other(e.to_string()))?;
    writeln!(f, "{line}").map_err(|e| Error::io(&p, e))
}

/// The latest submitted (job, array index) of every node.
pub fn latest_tasks(subs: &[Submission]) -> BTreeMap<String, (String, usize)> {
    let mut out = BTreeMap::new();
    for s in subs {
        for j in &s.jobs {
            for (i, h) in j.nodes.iter().enumerate() {
                out.insert(h.clone(), (j.job_id.clone(), i));
            }
        }
    }
    out
}

/// The distinct job ids of these tasks, sorted.
pub fn jobs_of(tasks: &BTreeMap<String, (String, usize)>) -> Vec<String> {
    let mut j: Vec<String> = tasks.values().map(|x| x.0.clone()).collect();
    j.sort();
    j.dedup();
    j
}

/// A task's state as the scheduler reports it (`PENDING`, `RUNNING`, `COMPLETED`, `FAILED`,
/// `TIMEOUT`, `CANCELLED`, `PREEMPTED`, `NODE_FAIL`, `OUT_OF_MEMORY`, ...), with squeue's reason.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskState {
    pub state: String,
    pub reason: String,
}

impl TaskState {
    /// Queued or running: a task the scheduler may still start or is running.
    pub fn active(&self) -> bool {
        matches!(
            self.state.as_str(),
            "PENDING"
                | "RUNNING"
                | "CONFIGURING"
                | "COMPLETING"
                | "REQUEUED"
                | "RESIZING"
                | "SUSPENDED"
        ) || self.state.starts_with("REQUEUE")
    }
}

/// The scheduler's state of every task of these array jobs, keyed by (job, index): squeue for
/// jobs it still knows (`--states=all`), then sacct for older ones where accounting is on.
/// Jobs neither knows are missing from the map. Err when no Slurm client is installed.
pub fn query(jobs: &[String]) -> Result<BTreeMap<(String, usize), TaskState>> {
    let mut out = BTreeMap::new();
    for job in jobs {
        let o = Command::new("squeue")
            .args(["-h", "-r", "--states=all", "-j", job, "-o", "%i|%T|%r"])
            .output()
            .map_err(|e| Error::Other(format!("squeue: {e} (is Slurm installed?)")))?;
        if !parse_lines(&String::from_utf8_lossy(&o.stdout), &mut out) {
            // Older than squeue remembers: accounting, where it is on (`JobID|State` lines).
            if let Ok(o) = Command::new("sacct")
                .args(["-n", "-P", "-X", "-j", job, "-o", "JobID,State"])
                .output()
            {
                if o.status.success() {
                    let text: String = String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .map(|l| format!("{l}|\n"))
                        .collect();
                    parse_lines(&text, &mut out);
                }
            }
        }
    }
    Ok(out)
}

/// Parse `JOB_INDEX|STATE|REASON` lines into the map; true if any line parsed.
fn parse_lines(text: &str, out: &mut BTreeMap<(String, usize), TaskState>) -> bool {
    let mut any = false;
    for line in text.lines() {
        let f: Vec<&str> = line.trim().split('|').collect();
        if f.len() < 2 {
            continue;
        }
        let Some((job, idx)) = f[0].split_once('_') else {
            continue;
        };
        let Ok(idx) = idx.parse::<usize>() else {
            continue; // a pending range such as 12_[0-3], which -r expands
        };
        // sacct writes "CANCELLED by 0".
        let state = f[1].split_whitespace().next().unwrap_or("").to_string();
        out.insert(
            (job.to_string(), idx),
            TaskState {
                state,
                reason: f.get(2).unwrap_or(&"").to_string(),
            },
        );
        any = true;
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, hash: &str) -> Node {
        Node {
            hash: hash.into(),
            name: name.into(),
            kind: "teacher".into(),
            upstream: vec![],
            runs: vec![],
        }
    }

    #[test]
    fn scripts_quote_paths_and_map_tasks_to_nodes() {
        let inv = Invocation {
            exe: "/opt/one step/onestep".into(),
            results: "/shared/results".into(),
            assets: None,
            spec: "/home/u/exp's.toml".into(),
            run_args: vec!["--set".into(), "stages.data.size=64".into()],
        };
        let opts = SlurmOptions {
            partition: Some("gpu".into()),
            gpus_per_task: Some(1),
            time: Some("2:00:00".into()),
            array_limit: Some(4),
            ..Default::default()
        };
        let nodes = [node("a", &"a".repeat(64)), node("b", &"b".repeat(64))];
        let s = script(
            "toy 16",
            1,
            3,
            &nodes,
            &inv,
            Path::new("/shared/results/cluster/x"),
            &opts,
        );
        assert!(s.contains("#SBATCH --job-name=onestep-toy_16-w1\n"), "{s}");
        assert!(s.contains("#SBATCH --array=0-1%4\n"));
        assert!(s.contains("#SBATCH --partition=gpu\n#SBATCH --gpus-per-task=1\n"));
        assert!(s.contains("wave 1 (waves 0-2)"));
        assert!(s.contains(&format!("NODES=({} {})", "a".repeat(64), "b".repeat(64))));
        assert!(s.contains("exec '/opt/one step/onestep' --results /shared/results --store \"/shared/results/cluster/x/shards/$NODE.sqlite\""), "{s}");
        assert!(
            s.contains(r"'/home/u/exp'\''s.toml' --set stages.data.size=64 --node"),
            "{s}"
        );
        assert!(s.trim_end().ends_with(">>\"$LOG\" 2>&1"));
    }

    #[test]
    fn scheduler_lines_parse_by_job_and_index() {
        let mut m = BTreeMap::new();
        assert!(parse_lines(
            "12_0|RUNNING|None\n12_[1-3]|PENDING|Dependency\n12_4|PENDING|Priority\n13|COMPLETED|None\n",
            &mut m
        ));
        assert_eq!(m.len(), 2);
        assert_eq!(m[&("12".into(), 4)].reason, "Priority");
        assert!(m[&("12".into(), 0)].active());
        let mut m = BTreeMap::new();
        parse_lines("14_2|CANCELLED by 0|", &mut m);
        assert_eq!(m[&("14".into(), 2)].state, "CANCELLED");
        assert!(!m[&("14".into(), 2)].active());
    }
}

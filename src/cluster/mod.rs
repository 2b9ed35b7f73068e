//! Sweeps beyond one process: the plan's stage graph as nodes (one per stage identity), run
//! side by side on one machine ([`local`], `onestep run --jobs N`) or as Slurm job arrays
//! ([`slurm`], `onestep submit`), each cluster task writing a store shard of its own that
//! [`shard::collect`] merges into the main store.
//!
//! A node is executed by `onestep run SPEC --node HASH` ([`crate::runner::Scope::Node`]), which
//! refuses to start before its upstream stages are finished in the shared cache; a stage's
//! identity is its cache folder's name, so every machine computes the same graph from the spec.

pub mod local;
pub mod shard;
pub mod slurm;

use crate::plan::{is_done, Plan};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One stage identity of a plan: computed once, whichever runs share it.
#[derive(Debug, Clone)]
pub struct Node {
    pub hash: String,
    /// The stage's name in the first run that contains it.
    pub name: String,
    pub kind: String,
    /// Hashes of the stages it reads (direct upstream).
    pub upstream: Vec<String>,
    /// The runs (variant, seed) it belongs to.
    pub runs: Vec<(String, u64)>,
}

impl Node {
    pub fn short(&self) -> &str {
        &self.hash[..12.min(self.hash.len())]
    }
    /// `name (kind) hash12`, as the runner names stages.
    pub fn label(&self) -> String {
        format!("{} ({}) {}", self.name, self.kind, self.short())
    }
}

/// The plan's nodes in first-appearance order (upstream before downstream).
pub fn nodes(plan: &Plan) -> Vec<Node> {
    let mut out: Vec<Node> = Vec::new();
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    for run in &plan.runs {
        for st in &run.stages {
            let i = *index.entry(st.hash.clone()).or_insert_with(|| {
                out.push(Node {
                    hash: st.hash.clone(),
                    name: st.name.clone(),
                    kind: st.kind.clone(),
                    upstream: st
                        .upstream
                        .iter()
                        .map(|&u| run.stages[u].hash.clone())
                        .collect(),
                    runs: Vec::new(),
                });
                out.len() - 1
            });
            let r = (run.variant.clone(), run.seed);
            if !out[i].runs.contains(&r) {
                out[i].runs.push(r);
            }
        }
    }
    out
}

/// The nodes not finished in the cache, grouped in waves: a node's wave is one more than the
/// latest wave among its unfinished upstream nodes (0 when all of them are finished), so every
/// node of a wave can run once the waves before it have finished.
pub fn waves(nodes: &[Node], results: &Path) -> Vec<Vec<Node>> {
    let mut wave: BTreeMap<&str, usize> = BTreeMap::new();
    let mut out: Vec<Vec<Node>> = Vec::new();
    for n in nodes {
        if is_done(results, &n.hash) {
            continue;
        }
        // Nodes come upstream first, so every unfinished upstream node has its wave already.
        let w = n
            .upstream
            .iter()
            .filter_map(|u| wave.get(u.as_str()).map(|w| w + 1))
            .max()
            .unwrap_or(0);
        wave.insert(&n.hash, w);
        if out.len() <= w {
            out.resize(w + 1, Vec::new());
        }
        out[w].push(n.clone());
    }
    out
}

/// The folder of an experiment's cluster files: scripts, submissions, shards and logs.
pub fn experiment_dir(results: &Path, experiment: &str) -> PathBuf {
    results.join("cluster").join(experiment)
}

/// Where the task computing `hash` writes its store shard.
pub fn shard_path(shards: &Path, hash: &str) -> PathBuf {
    shards.join(format!("{hash}.sqlite"))
}

/// A node's log file: `<name>-<hash12>.log`.
pub fn log_path(logs: &Path, node: &Node) -> PathBuf {
    logs.join(format!("{}-{}.log", node.name, node.short()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{PlannedRun, PlannedStage};

    fn stage(name: &str, hash: &str, upstream: Vec<usize>) -> PlannedStage {
        PlannedStage {
            name: name.into(),
            kind: name.into(),
            version: 1,
            hash: hash.into(),
            params: toml::Value::Table(Default::default()),
            upstream,
        }
    }

    fn run(variant: &str, student: &str) -> PlannedRun {
        PlannedRun {
            variant: variant.into(),
            seed: 0,
            device: crate::device::Device::Cpu,
            spec_hash: variant.into(),
            config: String::new(),
            params: vec![],
            stages: vec![
                stage("data", "d".repeat(64).as_str(), vec![]),
                stage("teacher", "t".repeat(64).as_str(), vec![0]),
                stage("student", student, vec![1]),
                stage("fvd", &format!("f{student}"), vec![2]),
            ],
        }
    }

    #[test]
    fn shared_stages_are_one_node_and_waves_skip_finished_ones() {
        let plan = Plan {
            experiment: "x".into(),
            description: String::new(),
            summary: vec![],
            runs: vec![run("a", "sa"), run("b", "sb")],
        };
        let n = nodes(&plan);
        let names: Vec<_> = n.iter().map(|n| n.hash.clone()).collect();
        assert_eq!(n.len(), 6, "{names:?}");
        assert_eq!(n[1].runs, vec![("a".into(), 0), ("b".into(), 0)]);
        assert_eq!(n[2].upstream, vec!["t".repeat(64)]);

        let results = tempfile::tempdir().unwrap();
        let w = waves(&n, results.path());
        let hashes = |w: &Vec<Node>| w.iter().map(|n| n.hash.clone()).collect::<Vec<_>>();
        assert_eq!(w.len(), 4);
        assert_eq!(hashes(&w[2]), vec!["sa".to_string(), "sb".into()]);
        // With data and teacher finished, the students are the first wave.
        for h in ["d".repeat(64), "t".repeat(64)] {
            let d = crate::plan::cache_dir(results.path(), &h);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(crate::plan::DONE_FILE), "{}").unwrap();
        }
        let w = waves(&n, results.path());
        assert_eq!(w.len(), 2);
        assert_eq!(hashes(&w[0]), vec!["sa".to_string(), "sb".into()]);
        assert_eq!(hashes(&w[1]), vec!["fsa".to_string(), "fsb".into()]);
    }
}

//! `onestep compare RUN_A RUN_B ...`: the params in which runs differ, and their final
//! metrics, side by side.

use crate::error::{Error, Result};
use crate::store::{RunRow, Store};
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub struct Comparison {
    pub runs: Vec<RunRow>,
    /// Params whose values are not the same in every run: (key, value per run).
    pub params: Vec<(String, Vec<Option<String>>)>,
    /// Final metrics, `stage/key`: (key, value per run).
    pub metrics: Vec<(String, Vec<Option<f64>>)>,
    /// How many params all runs share.
    pub same: usize,
}

/// Compare runs of the store (at least two, by id).
pub fn compare(store: &Store, ids: &[i64]) -> Result<Comparison> {
    if ids.len() < 2 {
        return Err(Error::Data("compare needs at least two run ids".into()));
    }
    let mut runs = Vec::new();
    for &id in ids {
        runs.push(
            store
                .run(id)?
                .ok_or_else(|| Error::Data(format!("no run {id} in {}", store.path().display())))?,
        );
    }
    let n = runs.len();
    let mut params: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
    let mut metrics: BTreeMap<String, Vec<Option<f64>>> = BTreeMap::new();
    for (i, r) in runs.iter().enumerate() {
        for (k, v) in store.params_of(r.id)? {
            params.entry(k).or_insert_with(|| vec![None; n])[i] = Some(v);
        }
        for (stage, k, _, v) in store.final_metrics(r.id)? {
            metrics
                .entry(format!("{stage}/{k}"))
                .or_insert_with(|| vec![None; n])[i] = Some(v);
        }
    }
    let total = params.len();
    let params: Vec<_> = params
        .into_iter()
        .filter(|(_, v)| v.iter().any(|x| x != &v[0]))
        .collect();
    Ok(Comparison {
        runs,
        same: total - params.len(),
        params,
        metrics: metrics.into_iter().collect(),
    })
}

fn fmt_metric(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e9 {
        format!("{v:.0}")
    } else if v.abs() >= 0.01 && v.abs() < 1e6 {
        format!("{v:.4}")
    } else {
        format!("{v:.4e}")
    }
}

impl Comparison {
    /// Markdown: a params table (differing keys only) and a metrics table.
    pub fn markdown(&self) -> String {
        let head: String = self
            .runs
            .iter()
            .map(|r| {
                format!(
                    " run {} ({}/{}, seed {}) |",
                    r.id, r.experiment, r.variant, r.seed
                )
            })
            .collect();
        let rule = "---|".repeat(self.runs.len() + 1);
        let mut out = format!(
            "Params that differ ({} of {}; the other {} are equal):\n\n| param |{head}\n|{rule}\n",
            self.params.len(),
            self.params.len() + self.same,
            self.same
        );
        for (k, vs) in &self.params {
            out += &format!("| {k} |");
            for v in vs {
                out += &format!(" {} |", v.as_deref().unwrap_or("(absent)"));
            }
            out += "\n";
        }
        out += &format!("\nFinal metrics (last logged value):\n\n| metric |{head}\n|{rule}\n");
        for (k, vs) in &self.metrics {
            let differ = vs.iter().any(|x| x != &vs[0]);
            out += &format!(
                "| {}{k}{} |",
                if differ { "**" } else { "" },
                if differ { "**" } else { "" }
            );
            for v in vs {
                out += &format!(" {} |", v.map_or("-".into(), fmt_metric));
            }
            out += "\n";
        }
        out
    }
}

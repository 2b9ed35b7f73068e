//! `onestep runs`: list runs, filtered by experiment, status and params.

use super::Global;
use onestep::store::Store;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long, short)]
    pub experiment: Option<String>,
    /// queued | running | finished | failed | interrupted
    #[arg(long, short)]
    pub status: Option<String>,
    /// Only runs with this param value, `--param stages.data.size=32` (repeatable).
    #[arg(long, short)]
    pub param: Vec<String>,
}

pub fn execute(g: &Global, a: Args) -> anyhow::Result<ExitCode> {
    let store = Store::open_existing(&g.store())?;
    let filters = super::key_values(&a.param)?;
    let runs = store.runs(a.experiment.as_deref(), a.status.as_deref(), &filters)?;
    let header: Vec<String> = [
        "id",
        "experiment",
        "variant",
        "seed",
        "status",
        "started",
        "seconds",
        "commit",
        "error",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            let secs = match (r.started_at, r.ended_at) {
                (Some(s), Some(e)) => format!("{:.1}", e - s),
                _ => "-".into(),
            };
            let commit = r.git_commit.as_deref().map(|c| {
                format!(
                    "{}{}",
                    &c[..c.len().min(8)],
                    if r.git_dirty == Some(true) { "+" } else { "" }
                )
            });
            vec![
                r.id.to_string(),
                r.experiment.clone(),
                r.variant.clone(),
                r.seed.to_string(),
                r.status.clone(),
                super::time(r.started_at),
                secs,
                commit.unwrap_or_else(|| "-".into()),
                r.error
                    .clone()
                    .unwrap_or_default()
                    .chars()
                    .take(60)
                    .collect(),
            ]
        })
        .collect();
    println!("{}", super::table(&header, &rows));
    println!("{} run(s)", runs.len());
    Ok(ExitCode::SUCCESS)
}

//! `onestep run SPEC`: execute a spec's sweep, then print a summary table.

use super::Global;
use anyhow::Context;
use onestep::spec::Device;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The experiment spec (TOML).
    pub spec: PathBuf,
    /// Override a spec value: `--set stages.data.size=64` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Device for every run, overriding the spec's `device`.
    #[arg(long)]
    pub device: Option<DeviceArg>,
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

pub fn execute(g: &Global, a: Args) -> anyhow::Result<ExitCode> {
    let spec = onestep::spec::load(&a.spec, &a.set, &onestep::stages::Registry)?;
    let device = a.device.map(|d| match d {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => Device::Cuda,
    });
    let plan = onestep::plan::plan(&spec, device)
        .with_context(|| format!("planning {}", a.spec.display()))?;
    for r in &plan.runs {
        check_device(r.device)?;
    }
    let interrupt = Arc::new(AtomicBool::new(false));
    let flag = interrupt.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: stopping at the next step (press Ctrl-C again to abort now)");
    });
    let opts = onestep::runner::Options {
        results: g.results.clone(),
        store: g.store(),
        assets: g.assets(),
        progress: g.progress(),
        spec_path: a.spec.display().to_string(),
    };
    let t0 = std::time::Instant::now();
    let results = onestep::runner::execute(&plan, &opts, interrupt)?;
    let store = onestep::store::Store::open(&opts.store)?;
    println!("{}", summary(&store, &plan, &results)?);
    let failed: Vec<_> = results.iter().filter(|r| r.status == "failed").collect();
    let interrupted = results.iter().any(|r| r.status == "interrupted");
    let (executed, reused): (usize, usize) = results
        .iter()
        .fold((0, 0), |(e, u), r| (e + r.executed, u + r.reused));
    println!(
        "\n{} runs: {} finished, {} failed{}; {executed} stages computed, {reused} reused; {:.1}s; store {}",
        results.len(),
        results.iter().filter(|r| r.status == "finished").count(),
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

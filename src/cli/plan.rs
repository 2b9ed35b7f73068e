//! `onestep plan SPEC`: the expanded variants and each run's stage graph, marking what is
//! cached, what is being computed elsewhere, what resumes from a checkpoint and what will run.

use super::Global;
use onestep::plan::{cache_dir, is_done};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    pub spec: PathBuf,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

pub fn execute(g: &Global, a: Args) -> anyhow::Result<ExitCode> {
    let spec = onestep::spec::load(&a.spec, &a.set, &onestep::stages::Registry)?;
    let plan = onestep::plan::plan(&spec, None)?;
    // Read the store only if it exists: planning never creates one.
    let store = g
        .store()
        .is_file()
        .then(|| onestep::store::Store::open(&g.store()))
        .transpose()?;
    println!(
        "experiment {} ({} variants, {} runs)",
        plan.experiment,
        spec.variants.len(),
        plan.runs.len()
    );
    if !plan.description.is_empty() {
        println!("  {}", plan.description.trim());
    }
    for v in &spec.variants {
        let sets: Vec<String> = v
            .assignments
            .iter()
            .map(|(k, x)| format!("{k}={}", onestep::util::short_value(x)))
            .collect();
        println!(
            "variant {}: seeds {:?}{}",
            v.name,
            v.seeds,
            if sets.is_empty() {
                String::new()
            } else {
                format!("; {}", sets.join(", "))
            }
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    let (mut cached, mut to_run) = (0, 0);
    for r in &plan.runs {
        println!(
            "\nrun {} seed={} [{}]",
            r.variant,
            r.seed,
            &r.spec_hash[..12]
        );
        for s in &r.stages {
            let state = if is_done(&g.results, &s.hash) {
                cached += 1;
                "cached".to_string()
            } else if !seen.insert(s.hash.clone()) {
                "shared (computed by an earlier run of this plan)".to_string()
            } else {
                to_run += 1;
                let leased = store
                    .as_ref()
                    .and_then(|st| st.stage_status(&s.hash).ok().flatten())
                    .filter(|x| x == "running");
                match (
                    leased,
                    onestep::stages::checkpoint_step(&cache_dir(&g.results, &s.hash)),
                ) {
                    (Some(_), _) => "running elsewhere (leased)".to_string(),
                    (None, Some(step)) => format!("will resume from step {step}"),
                    (None, None) => "will run".to_string(),
                }
            };
            let after: Vec<&str> = s
                .upstream
                .iter()
                .map(|&i| r.stages[i].name.as_str())
                .collect();
            println!(
                "  {:<14} {:<12} {}  {}{}",
                s.name,
                s.kind,
                s.short(),
                state,
                if after.is_empty() {
                    String::new()
                } else {
                    format!("  <- {}", after.join(", "))
                }
            );
        }
    }
    println!("\n{cached} stage(s) cached, {to_run} to compute");
    Ok(ExitCode::SUCCESS)
}

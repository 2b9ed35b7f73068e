//! `onestep show RUN`: everything the store knows about one run.

use super::Global;
use onestep::store::Store;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Run id (see `onestep runs`).
    pub run: i64,
}

pub fn execute(g: &Global, a: Args) -> anyhow::Result<ExitCode> {
    let store = Store::open_existing(&g.store())?;
    let Some(r) = store.run(a.run)? else {
        anyhow::bail!("no run {} in {}", a.run, g.store().display());
    };
    println!(
        "run {}: experiment {}, variant {}, seed {}",
        r.id, r.experiment, r.variant, r.seed
    );
    println!(
        "status     {}{}",
        r.status,
        r.error
            .as_ref()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    );
    println!("identity   {}", r.spec_hash);
    println!(
        "started    {}  ended {}",
        super::time(r.started_at),
        super::time(r.ended_at)
    );
    println!(
        "host       {}  device {}  commit {}{}",
        r.host.as_deref().unwrap_or("-"),
        r.device.as_deref().unwrap_or("-"),
        r.git_commit.as_deref().unwrap_or("-"),
        if r.git_dirty == Some(true) {
            " (dirty)"
        } else {
            ""
        }
    );
    println!("\nparams");
    for (k, v) in store.params_of(r.id)? {
        println!("  {k} = {v}");
    }
    println!("\nstages");
    for s in store.stages_of(r.id)? {
        println!(
            "  {}. {} ({}) {} {}",
            s.position,
            s.name,
            s.kind,
            &s.hash[..12],
            s.status
        );
    }
    println!("\nfinal metrics");
    for (stage, key, step, value) in store.final_metrics(r.id)? {
        println!(
            "  {stage}/{key} = {} (step {step})",
            super::fmt_value(value)
        );
    }
    println!("\nattempts");
    for a in store.attempts_of(r.id)? {
        println!(
            "  {}: {} -> {} by {}{} {}{}",
            a.stage,
            super::time(Some(a.started_at)),
            super::time(a.ended_at),
            a.holder,
            a.resumed_from
                .map(|s| format!(", resumed from step {s}"))
                .unwrap_or_default(),
            a.outcome.unwrap_or_else(|| "unfinished".into()),
            a.error.map(|e| format!(": {e}")).unwrap_or_default()
        );
    }
    println!("\nartifacts");
    for a in store.artifacts_of(r.id)? {
        println!(
            "  {}: {} ({}, {} bytes, sha256 {})",
            a.stage,
            a.path,
            a.kind,
            a.bytes,
            &a.sha256[..12]
        );
    }
    Ok(ExitCode::SUCCESS)
}

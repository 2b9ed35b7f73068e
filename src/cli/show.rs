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
    for (pos, name, kind, hash, status) in store.stages_of(r.id)? {
        println!("  {pos}. {name} ({kind}) {} {status}", &hash[..12]);
    }
    println!("\nfinal metrics");
    for (stage, key, step, value) in store.final_metrics(r.id)? {
        println!(
            "  {stage}/{key} = {} (step {step})",
            super::fmt_value(value)
        );
    }
    println!("\nattempts");
    for (stage, holder, start, end, resumed, outcome, err) in store.attempts_of(r.id)? {
        println!(
            "  {stage}: {} -> {} by {holder}{} {}{}",
            super::time(Some(start)),
            super::time(end),
            resumed
                .map(|s| format!(", resumed from step {s}"))
                .unwrap_or_default(),
            outcome.unwrap_or_else(|| "unfinished".into()),
            err.map(|e| format!(": {e}")).unwrap_or_default()
        );
    }
    println!("\nartifacts");
    for (stage, path, kind, sha, bytes) in store.artifacts_of(r.id)? {
        println!(
            "  {stage}: {path} ({kind}, {bytes} bytes, sha256 {})",
            &sha[..12]
        );
    }
    Ok(ExitCode::SUCCESS)
}

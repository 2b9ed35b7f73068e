//! `onestep report EXPERIMENT`: the evaluation tables of an experiment (see
//! `onestep::report` and docs/evaluation.md).

use super::Global;
use onestep::store::Store;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Experiment name, or the spec file that names it.
    pub experiment: String,
    /// Bootstrap resamples of the paired comparisons between methods (default: as the stages).
    #[arg(long)]
    pub resamples: Option<usize>,
    /// Also write the report (Markdown) to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn execute(g: &Global, a: Args) -> anyhow::Result<ExitCode> {
    let name = if a.experiment.ends_with(".toml") {
        onestep::spec::load(
            std::path::Path::new(&a.experiment),
            &[],
            &onestep::stages::Registry,
        )?
        .name
    } else {
        a.experiment.clone()
    };
    let store = Store::open_existing(&g.store())?;
    let text = onestep::report::experiment_report(&store, &g.results, &name, a.resamples)?;
    print!("{text}");
    if let Some(out) = &a.out {
        if let Some(d) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(out, &text)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

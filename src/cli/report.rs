//! `onestep report EXPERIMENT`: the experiment's report folder (comparison table as Markdown,
//! LaTeX and CSV, figures, samples, `report.md`; see `onestep::report` and
//! docs/evaluation.md), and `onestep compare RUN_A RUN_B ...`.

use super::Global;
use onestep::report::document::{self, Options};
use onestep::store::Store;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Experiment name, or the spec file that names it.
    pub experiment: String,
    /// Bootstrap resamples of the paired comparisons between methods (default: as the stages).
    #[arg(long)]
    pub resamples: Option<usize>,
    /// Folder of the report (default `<results>/<experiment>/`); a path ending in `.md` names
    /// the Markdown file itself, the other files go beside it.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Row the verdicts compare against: `static`, an `fvd` stage name, or `variant/stage`.
    #[arg(long)]
    pub reference: Option<String>,
    /// Conditioning clips shown in the samples filmstrip and GIF.
    #[arg(long, default_value_t = 4)]
    pub strip_clips: usize,
}

fn experiment_name(e: &str) -> anyhow::Result<String> {
    Ok(if e.ends_with(".toml") {
        onestep::spec::load(Path::new(e), &[], &onestep::stages::Registry)?.name
    } else {
        e.to_string()
    })
}

pub fn execute(g: &Global, a: Args) -> anyhow::Result<ExitCode> {
    let name = experiment_name(&a.experiment)?;
    let store = Store::open_existing(&g.store())?;
    let (dir, file) = match &a.out {
        Some(p) if p.extension().is_some_and(|e| e == "md") => (
            p.parent()
                .filter(|d| !d.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
            p.file_name()
                .map_or("report.md".into(), |f| f.to_string_lossy().into_owned()),
        ),
        Some(p) => (p.clone(), "report.md".into()),
        None => (g.results.join(&name), "report.md".into()),
    };
    let opts = Options {
        reference: a.reference,
        resamples: a.resamples,
        strip_clips: a.strip_clips,
    };
    let w = document::write_report(&store, &g.results, &name, &dir, &file, &opts)?;
    print!("{}", w.markdown);
    eprintln!(
        "report: wrote {} files to {}: {}",
        w.files.len(),
        dir.display(),
        document::file_list(&w, &dir)
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// Run ids (see `onestep runs`), at least two.
    #[arg(required = true, num_args = 2..)]
    pub runs: Vec<i64>,
}

pub fn compare(g: &Global, a: CompareArgs) -> anyhow::Result<ExitCode> {
    let store = Store::open_existing(&g.store())?;
    let c = onestep::report::compare_runs::compare(&store, &a.runs)?;
    print!("{}", c.markdown());
    Ok(ExitCode::SUCCESS)
}

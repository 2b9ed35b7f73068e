//! Command-line interface: global options and dispatch to one module per subcommand.

mod cluster;
mod data;
mod device_check;
mod export;
mod generate;
mod metrics;
mod plan;
mod report;
mod run;
mod runs;
mod show;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "onestep",
    version,
    about = "One-step image-to-video generation: experiments, runs and results"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Global {
    /// Results folder: stage cache in `<results>/cache`, store and assets by default inside.
    #[arg(
        long,
        global = true,
        default_value = "results",
        env = "ONESTEP_RESULTS"
    )]
    pub results: PathBuf,
    /// Run store (SQLite); default `<results>/onestep.sqlite`.
    #[arg(long, global = true, env = "ONESTEP_STORE")]
    pub store: Option<PathBuf>,
    /// Downloaded assets (registry packages, videos, ffmpeg); default `<results>/assets`.
    #[arg(long, global = true, env = "ONESTEP_ASSETS")]
    pub assets: Option<PathBuf>,
    /// Progress display: auto (bars on a terminal, lines otherwise), bars, lines or none.
    #[arg(long, global = true, default_value = "auto")]
    pub progress: ProgressArg,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ProgressArg {
    Auto,
    Bars,
    Lines,
    None,
}

impl Global {
    pub fn store(&self) -> PathBuf {
        self.store
            .clone()
            .unwrap_or_else(|| self.results.join("onestep.sqlite"))
    }
    pub fn assets(&self) -> PathBuf {
        self.assets
            .clone()
            .unwrap_or_else(|| self.results.join("assets"))
    }
    pub fn progress(&self) -> onestep::progress::Mode {
        use onestep::progress::Mode;
        match self.progress {
            ProgressArg::Auto => Mode::auto(),
            ProgressArg::Bars => Mode::Bars,
            ProgressArg::Lines => Mode::Lines,
            ProgressArg::None => Mode::Quiet,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run every variant and seed of a spec, reusing finished stages.
    Run(run::Args),
    /// Show the variants and stage graph of a spec, and what is cached.
    Plan(plan::Args),
    /// Submit a spec's unfinished stages to a cluster (Slurm job arrays, one per wave of the
    /// stage graph), each task writing a store shard of its own.
    Submit(cluster::SubmitArgs),
    /// Merge the finished store shards of a cluster sweep into the store (idempotent).
    Collect(cluster::CollectArgs),
    /// Where every stage of a spec stands: done, running, pending, failed, stopped, waiting
    /// (from the cache, the store, the shards and the scheduler's queue).
    Status(cluster::StatusArgs),
    /// List runs in the store.
    Runs(runs::Args),
    /// Show one run: params, stages, final metrics, attempts, artifacts.
    Show(show::Args),
    /// Export store tables as CSV or Parquet.
    Export(export::Args),
    /// An experiment's report folder: the comparison table (Markdown, LaTeX, CSV) with the
    /// floor, static and ceiling rows and paired verdicts, figures (PNG, SVG), samples, report.md.
    Report(report::Args),
    /// Runs side by side: the params in which they differ and their final metrics.
    Compare(report::CompareArgs),
    /// Generate a video from an image with a trained model folder.
    Generate(generate::Args),
    /// Fetch, list and preview video data.
    #[command(subcommand)]
    Data(data::Command),
    /// Download and convert pretrained networks (`assets fetch i3d`).
    #[command(subcommand)]
    Assets(metrics::AssetsCommand),
    /// Per-video features of a network (I3D logits) as JSON or .npy.
    Features(metrics::FeaturesArgs),
    /// Fréchet video distance between two folders of videos.
    Fvd(metrics::FvdArgs),
    /// GPU checks (CPU/CUDA parity, full-size SVD timings); see tools/cuda/device-check.sh.
    #[command(hide = true)]
    DeviceCheck(device_check::Args),
}

pub fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(a) => run::execute(&cli.global, a),
        Command::Plan(a) => plan::execute(&cli.global, a),
        Command::Submit(a) => cluster::submit(&cli.global, a),
        Command::Collect(a) => cluster::collect(&cli.global, a),
        Command::Status(a) => cluster::status(&cli.global, a),
        Command::Runs(a) => runs::execute(&cli.global, a),
        Command::Show(a) => show::execute(&cli.global, a),
        Command::Export(a) => export::execute(&cli.global, a),
        Command::Report(a) => report::execute(&cli.global, a),
        Command::Compare(a) => report::compare(&cli.global, a),
        Command::Data(c) => data::execute(&cli.global, c),
        Command::Generate(a) => generate::execute(&cli.global, a),
        Command::Assets(c) => metrics::assets_execute(&cli.global, c),
        Command::Features(a) => metrics::features(&cli.global, a),
        Command::Fvd(a) => metrics::fvd(&cli.global, a),
        Command::DeviceCheck(a) => device_check::execute(a),
    }
}

pub use onestep::util::utc_time as time;

/// A plain text table with aligned columns.
pub fn table(header: &[String], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: &[String]| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(header);
    out.push('\n');
    out.push_str(
        &w.iter()
            .map(|n| "-".repeat(*n))
            .collect::<Vec<_>>()
            .join("  "),
    );
    for r in rows {
        out.push('\n');
        out.push_str(&line(r));
    }
    out
}

/// Parse `key=value` filters.
pub fn key_values(items: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| anyhow::anyhow!("`{s}`: expected key=value"))
        })
        .collect()
}

pub fn fmt_value(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e12 {
        format!("{}", v as i64)
    } else if v.abs() >= 1e-3 && v.abs() < 1e5 {
        format!("{v:.4}")
    } else {
        format!("{v:.4e}")
    }
}

//! `onestep export`: store tables to CSV or Parquet (through polars).

use super::Global;
use onestep::export::{Format, Table};
use onestep::store::Store;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Which table: runs (with final metrics as columns), params, metrics or artifacts.
    #[arg(long, short, default_value = "runs")]
    pub table: Table,
    /// csv or parquet; by default from the output's extension.
    #[arg(long, short)]
    pub format: Option<Format>,
    #[arg(long, short)]
    pub experiment: Option<String>,
    /// Output file.
    #[arg(long, short)]
    pub out: PathBuf,
}

pub fn execute(g: &Global, a: Args) -> anyhow::Result<ExitCode> {
    let format = match a.format {
        Some(f) => f,
        None => match a.out.extension().and_then(|e| e.to_str()) {
            Some("parquet") | Some("pq") => Format::Parquet,
            Some("csv") => Format::Csv,
            _ => anyhow::bail!(
                "{}: say --format csv or parquet (or end the file name in .csv / .parquet)",
                a.out.display()
            ),
        },
    };
    let store = Store::open_existing(&g.store())?;
    let mut df = onestep::export::frame(&store, a.table, a.experiment.as_deref())?;
    onestep::export::write(&mut df, format, &a.out)?;
    println!(
        "wrote {} rows x {} columns to {}",
        df.height(),
        df.width(),
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

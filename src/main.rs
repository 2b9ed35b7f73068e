//! The `onestep` command: a thin layer over the library (one file per subcommand in `cli/`).

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    onestep::alloc::tune_for_tensors();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = cli::Cli::parse();
    match cli::execute(args) {
        Ok(code) => code,
        Err(e) => {
            // Spec errors are usage errors: exit status 2, like clap's own.
            let spec = e.downcast_ref::<onestep::error::SpecError>().is_some()
                || matches!(
                    e.downcast_ref::<onestep::Error>(),
                    Some(onestep::Error::Spec(_))
                );
            eprintln!("error: {e:#}");
            ExitCode::from(if spec { 2 } else { 1 })
        }
    }
}

use std::process::ExitCode;

use clap::Parser;
use gractl::{
    cli::{self, Cli, Environment},
    exit,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli.output;
    // One thread is plenty for a CLI and starts fastest.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            return exit::report(
                &anyhow::Error::from(error).context("cannot start the async runtime"),
                format,
            );
        }
    };
    match runtime.block_on(cli::run(cli, Environment::from_process())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => exit::report(&error, format),
    }
}

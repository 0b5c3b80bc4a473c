// Tunnel frames are buffers of up to 256 KiB: glibc's malloc hands such
// blocks back to the kernel and faults them in again (a tenth of grad's time
// relaying a tunnel); mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    let result = runtime.block_on(cli::run(cli, Environment::from_process()));
    // A read of stdin (`gractl ssh`) may still be blocked in a thread that
    // cannot be cancelled; exiting must not wait for it.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => exit::report(&error, format),
    }
}

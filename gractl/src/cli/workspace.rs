//! `gractl workspace init`.

use std::{
    io::{self, Write},
    path::PathBuf,
};

use clap::Subcommand;

use super::Context;
use crate::{
    config::{DEFAULT_SERVER, Workspace},
    output::{self, Format},
};

#[derive(Debug, Subcommand)]
pub enum WorkspaceCommand {
    /// Create config.yaml, datasets/ and runners/ in DIR
    Init {
        /// The workspace directory (created if missing)
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Overwrite an existing config.yaml
        #[arg(long)]
        force: bool,
    },
}

pub(super) fn run(context: &Context, command: WorkspaceCommand) -> anyhow::Result<()> {
    let WorkspaceCommand::Init { dir, force } = command;
    // The server gractl would use right now; a broken config elsewhere must
    // not stop a new workspace from being made.
    let workspace = context.workspace().ok().flatten();
    let credentials = context.credentials().ok().flatten();
    let server = context
        .server(workspace.as_ref(), credentials.as_ref())
        .unwrap_or_else(|| DEFAULT_SERVER.to_owned());

    let init = Workspace::init(&dir, &server, force)?;
    let mut out = io::stdout().lock();
    match context.format {
        Format::Table => {
            writeln!(out, "Initialized workspace in {}", dir.display())?;
            writeln!(out, "  {}  (server: {server})", Workspace::FILE)?;
            for name in Workspace::DIRS {
                writeln!(out, "  {name}/")?;
            }
        }
        Format::Json | Format::Ndjson => output::write_json(
            &mut out,
            &output::WorkspaceInit {
                path: dir.display().to_string(),
                config: init.config.display().to_string(),
                created: init
                    .created_dirs
                    .iter()
                    .map(|path| path.display().to_string())
                    .collect(),
            },
        )?,
    }
    Ok(())
}

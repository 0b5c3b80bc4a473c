//! `gractl execution list`.

use std::io::{self, Write as _};

use clap::Subcommand;

use super::Context;
use crate::output::{self, Format, Table};

#[derive(Debug, Subcommand)]
pub enum ExecutionCommand {
    /// A runner's most recent executions, newest first
    #[command(visible_alias = "ls")]
    List {
        /// Runner [default: the workspace's defaults.runner]
        #[arg(short, long, value_name = "NAME")]
        runner: Option<String>,
        /// How many to show
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

pub(super) async fn run(context: &Context, command: ExecutionCommand) -> anyhow::Result<()> {
    let ExecutionCommand::List { runner, limit } = command;
    let workspace = context.workspace()?;
    let runner = context.runner(runner, workspace.as_ref())?;
    let client = context.connect(workspace.as_ref()).await?;
    let executions = client.list_executions(&runner, limit).await?;

    let mut out = io::stdout().lock();
    match context.format {
        Format::Table => {
            let mut table = Table::new(&["ID", "STATUS", "COUNT", "DURATION", "SESSION", "CODE"]);
            for execution in &executions {
                table.row(vec![
                    execution.id.clone(),
                    output::exec_status(execution.status()),
                    execution.execution_count.to_string(),
                    output::duration(execution.duration_us),
                    execution.session.clone(),
                    output::first_line(&execution.code, 40),
                ]);
            }
            table.write(&mut out)?;
        }
        Format::Json => output::write_json(
            &mut out,
            &output::ExecutionList {
                executions: executions.iter().map(output::Execution::from).collect(),
            },
        )?,
        Format::Ndjson => {
            for execution in &executions {
                output::write_json(&mut out, &output::Execution::from(execution))?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

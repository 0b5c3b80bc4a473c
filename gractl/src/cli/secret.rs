//! `gractl secret set|list|rm`: the caller's grad secrets. Values are read
//! from a file, from stdin, or typed at a prompt that does not echo: never
//! from the command line, where other users and shell histories see them.

use std::{
    io::{self, BufRead, IsTerminal, Read, Write},
    path::PathBuf,
    time::SystemTime,
};

use anyhow::Context as _;
use clap::{Args, Subcommand};

use super::Context;
use crate::{
    exit::{Code, Failure},
    output::{self, Format, Table},
    terminal::NoEcho,
};

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Create or replace a secret; its value comes from --from-file, from
    /// stdin when it is piped, or from a prompt that does not echo
    Set(SetArgs),
    /// Your secrets' names (never their values)
    #[command(visible_alias = "ls")]
    List,
    /// Delete a secret
    #[command(visible_alias = "rm")]
    Remove {
        /// Secret name
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct SetArgs {
    /// Secret name: letters, digits, '_', '-' or '.' (e.g. WANDB_API_KEY, taxi-s3)
    name: String,
    /// Read the value from this file
    #[arg(long, value_name = "FILE")]
    from_file: Option<PathBuf>,
}

/// One trailing newline is how a value ends, not part of it.
fn without_newline(mut value: String) -> String {
    if value.ends_with('\n') {
        value.pop();
        if value.ends_with('\r') {
            value.pop();
        }
    }
    value
}

fn read_value(
    context: &Context,
    name: &str,
    from_file: Option<&PathBuf>,
) -> anyhow::Result<String> {
    if let Some(path) = from_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Failure::new(Code::Usage, format!("--from-file {}: {e}", path.display()))
        })?;
        return Ok(without_newline(text));
    }
    let stdin = io::stdin();
    if stdin.is_terminal() {
        if !context.may_prompt() {
            return Err(Failure::new(
                Code::Usage,
                format!(
                    "secret {name}: --no-input: give the value on stdin or with --from-file FILE"
                ),
            )
            .into());
        }
        eprint!("value for secret {name}: ");
        io::stderr().flush()?;
        let _quiet = NoEcho::enable().context("turning off echo to read the secret")?;
        let mut line = String::new();
        stdin.lock().read_line(&mut line)?;
        return Ok(without_newline(line));
    }
    let mut text = String::new();
    stdin
        .lock()
        .read_to_string(&mut text)
        .context("reading the secret from stdin")?;
    Ok(without_newline(text))
}

pub(super) async fn run(context: &Context, command: SecretCommand) -> anyhow::Result<()> {
    // The value is read before connecting: a prompt should not wait on the network.
    let value = match &command {
        SecretCommand::Set(args) => Some(read_value(context, &args.name, args.from_file.as_ref())?),
        _ => None,
    };
    let workspace = context.workspace()?;
    let client = context.connect(workspace.as_ref()).await?;
    let mut out = io::stdout().lock();
    match command {
        SecretCommand::Set(args) => {
            let value = value.unwrap_or_default();
            if value.is_empty() {
                return Err(Failure::new(
                    Code::Usage,
                    format!("secret {}: the value is empty; nothing was set", args.name),
                )
                .into());
            }
            let secret = client.set_secret(&args.name, value).await?;
            match context.format {
                Format::Table => writeln!(out, "secret/{} set", secret.name)?,
                Format::Json | Format::Ndjson => {
                    output::write_json(&mut out, &output::Secret::from(&secret))?
                }
            }
        }
        SecretCommand::List => {
            let secrets = client.list_secrets().await?;
            match context.format {
                Format::Table => {
                    let now = SystemTime::now();
                    let mut table = Table::new(&["NAME", "CREATED", "UPDATED"]);
                    for secret in &secrets {
                        table.row(vec![
                            secret.name.clone(),
                            format!("{} ago", output::age(secret.create_time.as_ref(), now)),
                            format!("{} ago", output::age(secret.update_time.as_ref(), now)),
                        ]);
                    }
                    table.write(&mut out)?;
                }
                Format::Json => output::write_json(
                    &mut out,
                    &output::SecretList {
                        secrets: secrets.iter().map(output::Secret::from).collect(),
                    },
                )?,
                Format::Ndjson => {
                    for secret in &secrets {
                        output::write_json(&mut out, &output::Secret::from(secret))?;
                    }
                }
            }
        }
        SecretCommand::Remove { name } => {
            let secret = client.delete_secret(&name).await?;
            match context.format {
                Format::Table => writeln!(out, "secret/{} deleted", secret.name)?,
                Format::Json | Format::Ndjson => {
                    output::write_json(&mut out, &output::Secret::from(&secret))?
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_trailing_newline_is_not_part_of_the_value() {
        assert_eq!(without_newline("abc\n".into()), "abc");
        assert_eq!(without_newline("abc\r\n".into()), "abc");
        assert_eq!(without_newline("abc\n\n".into()), "abc\n");
        assert_eq!(without_newline("a b ".into()), "a b ");
    }
}

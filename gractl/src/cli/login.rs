//! `gractl login` and `gractl whoami`.

use std::{
    io::{self, Read, Write},
    path::PathBuf,
};

use anyhow::Context as _;
use clap::{ArgGroup, Args};

use super::Context;
use crate::{
    client::Client,
    config::Credentials,
    exit::{Code, Failure},
    output::{self, Format},
};

/// The token is read from a file or stdin, never from a flag value, so it
/// stays out of shell history and `ps`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("source").required(true).args(["token_file", "token_stdin"])))]
pub struct LoginArgs {
    /// Read the token from FILE
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Read the token from stdin
    #[arg(long)]
    token_stdin: bool,
}

pub(super) async fn login(context: &Context, args: LoginArgs) -> anyhow::Result<()> {
    let server = match &context.server {
        Some(server) => server.clone(),
        None => context
            .workspace()?
            .and_then(|workspace| workspace.server)
            .ok_or_else(|| Failure::new(Code::Usage, "pass --server URL to log in"))?,
    };
    let token = read_token(&args)?;
    let path = context.credentials_path.clone().ok_or_else(|| {
        Failure::new(
            Code::Usage,
            "cannot tell where to store credentials: HOME is not set; pass --config FILE",
        )
    })?;

    let client = Client::connect(&server, &token).await?;
    let user = client.whoami().await?;
    // Store the normalized URL so later commands connect the same way.
    let credentials = Credentials {
        server: client.server().to_owned(),
        token,
    };
    credentials.save(&path)?;

    let user = output::User::from(&user);
    let mut out = io::stdout().lock();
    match context.format {
        Format::Table => writeln!(
            out,
            "Logged in to {} as {} ({}, {})",
            credentials.server, user.name, user.role, user.plan
        )?,
        Format::Json | Format::Ndjson => output::write_json(
            &mut out,
            &output::Login {
                server: credentials.server,
                config: path.display().to_string(),
                user,
            },
        )?,
    }
    Ok(())
}

fn read_token(args: &LoginArgs) -> anyhow::Result<String> {
    let token = match &args.token_file {
        Some(path) => std::fs::read_to_string(path).map_err(|error| {
            Failure::new(
                Code::Usage,
                format!("cannot read --token-file {}: {error}", path.display()),
            )
        })?,
        None => {
            let mut token = String::new();
            io::stdin()
                .read_to_string(&mut token)
                .context("cannot read the token from stdin")?;
            token
        }
    };
    let token = token.trim();
    if token.is_empty() {
        let source = match &args.token_file {
            Some(path) => format!("--token-file {}", path.display()),
            None => "stdin".to_owned(),
        };
        return Err(Failure::new(Code::Usage, format!("no token in {source}")).into());
    }
    Ok(token.to_owned())
}

pub(super) async fn whoami(context: &Context) -> anyhow::Result<()> {
    let workspace = context.workspace()?;
    let client = context.connect(workspace.as_ref()).await?;
    let user = client.whoami().await?;
    let whoami = output::Whoami {
        server: client.server().to_owned(),
        user: output::User::from(&user),
    };
    let mut out = io::stdout().lock();
    match context.format {
        Format::Table => output::write_fields(
            &mut out,
            &[
                ("name", whoami.user.name),
                ("role", whoami.user.role),
                ("plan", whoami.user.plan),
                ("server", whoami.server),
            ],
        )?,
        Format::Json | Format::Ndjson => output::write_json(&mut out, &whoami)?,
    }
    Ok(())
}

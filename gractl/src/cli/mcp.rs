//! `gractl mcp`: the tools of [`super::tools`] as a Model Context Protocol
//! server on stdio (rmcp), for Gemini CLI and other agents. Nothing but
//! protocol messages goes to stdout; logs go to stderr.

use std::io::{self, Write};

use clap::{Args, ValueEnum};
use rmcp::{
    ErrorData, RoleServer, ServerHandler, ServiceExt,
    model::{
        CallToolRequestParams, CallToolResponse, Implementation, ListToolsResult,
        PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
    },
    service::RequestContext,
};
use serde_json::Value;

use super::{
    Context,
    tools::{self, Refusal},
};

#[derive(Debug, Args)]
pub struct McpArgs {
    /// Print the settings block that starts this server from an agent, and exit
    #[arg(long, value_enum, value_name = "AGENT")]
    print_config: Option<Agent>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Agent {
    /// ~/.gemini/settings.json
    Gemini,
}

#[derive(Clone)]
struct Server {
    context: Context,
}

fn tool(declaration: tools::Declaration) -> Tool {
    let schema = match declaration.input_schema {
        Value::Object(schema) => schema,
        _ => serde_json::Map::new(),
    };
    Tool::new(declaration.name, declaration.description, schema)
}

impl ServerHandler for Server {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("grad", env!("CARGO_PKG_VERSION")))
            .with_instructions(tools::INSTRUCTIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(
            tools::declarations().into_iter().map(tool).collect(),
        ))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let args = request.arguments.map(Value::Object).unwrap_or(Value::Null);
        match tools::call(&self.context, &request.name, args)
            .await
            .or_else(Refusal::answer)
        {
            Ok(answer) => Ok(tools::to_result(answer).into()),
            Err(Refusal::BadArguments(message) | Refusal::Unknown(message)) => {
                Err(ErrorData::invalid_params(message, None))
            }
            Err(Refusal::Refused(message)) => Err(ErrorData::internal_error(message, None)),
            Err(Refusal::Failed(error)) => {
                tracing::warn!(tool = %request.name, error = %format!("{error:#}"), "tool failed");
                Err(ErrorData::internal_error(format!("{error:#}"), None))
            }
        }
    }
}

pub(super) async fn run(context: &Context, args: McpArgs) -> anyhow::Result<()> {
    if let Some(Agent::Gemini) = args.print_config {
        let server = context.server.clone();
        let mut out = io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &tools::client_config(server.as_deref()))?;
        writeln!(out)?;
        return Ok(());
    }
    let server = Server {
        context: context.clone(),
    };
    let running = server.serve(rmcp::transport::stdio()).await?;
    running.waiting().await?;
    Ok(())
}

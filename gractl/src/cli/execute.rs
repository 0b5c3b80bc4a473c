//! `gractl execute-code`: streams a run's events to the terminal (table),
//! one line each (ndjson), or as one document at the end (json).

use std::{
    io::{self, IsTerminal, Read, Write},
    path::PathBuf,
    time::Duration,
};

use clap::Args;
use grad_proto::{ExecStatus, ExecuteCodeRequest, exec_event::Event};

use super::Context;
use crate::{
    client::{ClientError, millis},
    exit::{Code, Failure},
    output::{self, Format},
    quantity::{QuantityError, parse_duration},
};

#[derive(Debug, Args)]
pub struct ExecuteCodeArgs {
    /// Runner to run on [default: the workspace's defaults.runner]
    #[arg(short, long, value_name = "NAME")]
    runner: Option<String>,
    /// The code to run (else --file, else stdin)
    #[arg(long, value_name = "CODE", conflicts_with = "file")]
    code: Option<String>,
    /// Read the code from PATH (`-` for stdin)
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// A parameter for the code, available as params["KEY"]; VALUE is JSON if it parses
    /// (n=10, xs=[1,2]), else a string (name=abc). Repeatable
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_param)]
    params: Vec<(String, serde_json::Value)>,
    /// Interpreter session; each has its own variables [default: default]
    #[arg(long, value_name = "NAME")]
    session: Option<String>,
    /// Interrupt the code after this long (the interpreter keeps its state) [default: no limit]
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
    timeout: Option<Duration>,
}

/// `KEY=VALUE`, where VALUE is JSON if it parses and a string otherwise.
pub fn parse_param(text: &str) -> Result<(String, serde_json::Value), String> {
    let (key, value) = text
        .split_once('=')
        .filter(|(key, _)| !key.trim().is_empty())
        .ok_or_else(|| "expected KEY=VALUE, like n=10, name=abc or xs=[1,2]".to_owned())?;
    let value =
        serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.to_owned()));
    Ok((key.trim().to_owned(), value))
}

fn parse_timeout(text: &str) -> Result<Duration, QuantityError> {
    parse_duration(text)
}

/// The code to run, from --code, --file or stdin.
fn read_code(args: &ExecuteCodeArgs) -> anyhow::Result<String> {
    if let Some(code) = &args.code {
        return Ok(code.clone());
    }
    match &args.file {
        Some(path) if path.as_os_str() != "-" => std::fs::read_to_string(path).map_err(|error| {
            Failure::new(
                Code::Usage,
                format!("cannot read --file {}: {error}", path.display()),
            )
            .into()
        }),
        _ => {
            let mut stdin = io::stdin();
            if stdin.is_terminal() {
                eprintln!("reading code from stdin; end it with Ctrl-D");
            }
            let mut code = String::new();
            stdin.read_to_string(&mut code).map_err(|error| {
                Failure::new(Code::Usage, format!("cannot read code from stdin: {error}"))
            })?;
            Ok(code)
        }
    }
}

pub(super) async fn execute_code(context: &Context, args: ExecuteCodeArgs) -> anyhow::Result<()> {
    let workspace = context.workspace()?;
    let runner = context.runner(args.runner.clone(), workspace.as_ref())?;
    let code = read_code(&args)?;
    let params_json = if args.params.is_empty() {
        String::new()
    } else {
        serde_json::Value::Object(args.params.into_iter().collect()).to_string()
    };
    let session = args.session.unwrap_or_default();
    let request = ExecuteCodeRequest {
        runner: runner.clone(),
        code,
        session: session.clone(),
        params_json,
        timeout_ms: args.timeout.map(millis).unwrap_or(0),
    };
    let client = context.connect(workspace.as_ref()).await?;

    let mut run = Run::new(context.format, runner, session);
    // Ctrl-C from here on drops the stream, which makes grad interrupt the code.
    let interrupted = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(interrupted);
    let mut stream = tokio::select! {
        biased;
        () = &mut interrupted => return run.cancelled(),
        stream = client.execute_code(request) => stream?,
    };
    loop {
        let message = tokio::select! {
            biased;
            () = &mut interrupted => {
                drop(stream);
                // Let the connection send the stream reset before the process exits.
                tokio::task::yield_now().await;
                return run.cancelled();
            }
            message = stream.message() => message,
        };
        match message {
            Ok(Some(event)) => {
                if let Some(event) = event.event {
                    run.event(event)?;
                }
            }
            Ok(None) => break,
            Err(status) => return Err(ClientError::from(status).into()),
        }
    }
    run.finish()
}

/// One execution as it happens: prints events in the chosen format and
/// collects what `-o json` prints at the end.
struct Run {
    format: Format,
    result: output::ExecResult,
    finished: Option<ExecStatus>,
}

impl Run {
    fn new(format: Format, runner: String, session: String) -> Run {
        Run {
            format,
            result: output::ExecResult::empty(runner, session, "cancelled"),
            finished: None,
        }
    }

    fn event(&mut self, event: Event) -> io::Result<()> {
        let shown = match event {
            Event::Started(started) => {
                self.result.execution_id = started.execution_id;
                if !started.session.is_empty() {
                    self.result.session = started.session;
                }
                output::ExecEvent::Started {
                    execution_id: self.result.execution_id.clone(),
                    runner: self.result.runner.clone(),
                    session: self.result.session.clone(),
                }
            }
            Event::Stream(chunk) => {
                if self.format == Format::Table {
                    if chunk.name == "stderr" {
                        let mut err = io::stderr().lock();
                        err.write_all(chunk.text.as_bytes())?;
                        err.flush()?;
                    } else {
                        let mut out = io::stdout().lock();
                        out.write_all(chunk.text.as_bytes())?;
                        out.flush()?;
                    }
                }
                if self.format == Format::Json {
                    match chunk.name.as_str() {
                        "stderr" => self.result.stderr.push_str(&chunk.text),
                        _ => self.result.stdout.push_str(&chunk.text),
                    }
                }
                output::ExecEvent::Stream {
                    name: chunk.name,
                    text: chunk.text,
                }
            }
            Event::Display(display) => {
                let display = output::Display::from(&display);
                if self.format == Format::Table {
                    let mut out = io::stdout().lock();
                    let text = render_display(&display);
                    out.write_all(text.as_bytes())?;
                    if !text.ends_with('\n') {
                        out.write_all(b"\n")?;
                    }
                    out.flush()?;
                }
                if self.format == Format::Json {
                    self.result.outputs.push(display.clone());
                }
                output::ExecEvent::Display(display)
            }
            Event::Error(error) => {
                let error = output::ExecError::from(&error);
                if self.format == Format::Table {
                    let mut err = io::stderr().lock();
                    err.write_all(render_error(&error).as_bytes())?;
                    err.flush()?;
                }
                self.result.error = Some(error.clone());
                output::ExecEvent::Error(error)
            }
            Event::Finished(finished) => {
                let status = finished.status();
                self.finished = Some(status);
                self.result.status = output::exec_status(status);
                self.result.execution_count = finished.execution_count;
                self.result.duration_ms = output::duration_ms(finished.duration_us);
                self.result.message = Some(finished.message).filter(|m| !m.is_empty());
                output::ExecEvent::Finished {
                    status: self.result.status.clone(),
                    execution_count: finished.execution_count,
                    duration_ms: self.result.duration_ms,
                    message: self.result.message.clone(),
                }
            }
        };
        if self.format == Format::Ndjson {
            let mut out = io::stdout().lock();
            output::write_json(&mut out, &shown)?;
            out.flush()?;
        }
        Ok(())
    }

    /// Prints the document (json) and turns the final status into the exit code.
    fn finish(self) -> anyhow::Result<()> {
        let Some(status) = self.finished else {
            return Err(Failure::new(
                Code::Unavailable,
                "the execution stream ended without a result",
            )
            .into());
        };
        if self.format == Format::Json {
            output::write_json(&mut io::stdout().lock(), &self.result)?;
        }
        let message = self.result.message.unwrap_or_default();
        let with = |default: &str| {
            if message.is_empty() {
                default.to_owned()
            } else {
                format!("{default}: {message}")
            }
        };
        let failure = match status {
            ExecStatus::Ok => return Ok(()),
            // The traceback (table) or the document (json) already said it.
            ExecStatus::Error => Failure::quiet(Code::CodeRaised),
            ExecStatus::Timeout => Failure::new(Code::Timeout, with("execution timed out")),
            ExecStatus::Cancelled => Failure::new(Code::Interrupted, with("execution cancelled")),
            ExecStatus::Failed => {
                Failure::new(Code::Unavailable, with("the runner could not run the code"))
            }
            ExecStatus::Unspecified => {
                Failure::new(Code::Internal, "the execution ended with no status")
            }
        };
        Err(failure.into())
    }

    /// After Ctrl-C: say so, and still print what arrived (json).
    fn cancelled(self) -> anyhow::Result<()> {
        match self.format {
            Format::Table => {
                eprintln!("cancelled");
                Err(Failure::quiet(Code::Interrupted).into())
            }
            Format::Json => {
                output::write_json(&mut io::stdout().lock(), &self.result)?;
                Err(Failure::new(Code::Interrupted, "cancelled").into())
            }
            Format::Ndjson => Err(Failure::new(Code::Interrupted, "cancelled").into()),
        }
    }
}

/// A rich output for the terminal: images by the file the runner saved,
/// everything else by its plain-text form.
fn render_display(display: &output::Display) -> String {
    if let Some(mime) = display.data.keys().find(|mime| mime.starts_with("image/")) {
        let extension = mime
            .trim_start_matches("image/")
            .split('+')
            .next()
            .unwrap_or("");
        let file = display
            .files
            .iter()
            .find(|file| file.ends_with(&format!(".{extension}")))
            .or(display.files.first());
        return match file {
            Some(file) => format!("[{mime}: {file}]"),
            None => format!("[{mime}]"),
        };
    }
    if let Some(text) = display.data.get("text/plain") {
        return text.clone();
    }
    match display.data.keys().next() {
        Some(mime) => format!("[{mime}]"),
        None => String::new(),
    }
}

/// The traceback, then `ename: evalue` unless the traceback already ends with it.
fn render_error(error: &output::ExecError) -> String {
    let summary = if error.evalue.is_empty() {
        error.ename.clone()
    } else {
        format!("{}: {}", error.ename, error.evalue)
    };
    let mut text = error.traceback.join("\n");
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    if text.trim_end().lines().last() != Some(summary.as_str()) {
        text.push_str(&summary);
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn param_values_are_json_when_they_parse_and_strings_otherwise() {
        assert_eq!(parse_param("k=10"), Ok(("k".into(), json!(10))));
        assert_eq!(parse_param("k=abc"), Ok(("k".into(), json!("abc"))));
        assert_eq!(parse_param("k=[1,2]"), Ok(("k".into(), json!([1, 2]))));
        assert_eq!(parse_param("k=true"), Ok(("k".into(), json!(true))));
        assert_eq!(parse_param("k=\"10\""), Ok(("k".into(), json!("10"))));
        assert_eq!(parse_param("k="), Ok(("k".into(), json!(""))));
        assert_eq!(parse_param("url=a=b"), Ok(("url".into(), json!("a=b"))));
    }

    #[test]
    fn a_param_without_a_key_or_equals_sign_is_rejected() {
        assert!(parse_param("k").is_err());
        assert!(parse_param("=1").is_err());
    }

    #[test]
    fn images_show_the_file_the_runner_saved() {
        let display = output::Display {
            data: [
                ("image/png".to_owned(), "iVBOR".to_owned()),
                ("text/plain".to_owned(), "<Figure size 640x480>".to_owned()),
            ]
            .into(),
            is_result: false,
            files: vec!["outputs/figure-1-1.png".into()],
        };
        assert_eq!(
            render_display(&display),
            "[image/png: outputs/figure-1-1.png]"
        );
    }

    #[test]
    fn plain_text_is_preferred_over_html() {
        let display = output::Display {
            data: [
                ("text/html".to_owned(), "<table/>".to_owned()),
                ("text/plain".to_owned(), "   a\n0  1".to_owned()),
            ]
            .into(),
            is_result: true,
            files: vec![],
        };
        assert_eq!(render_display(&display), "   a\n0  1");
    }

    #[test]
    fn errors_end_with_the_exception_name_and_value_once() {
        let error = output::ExecError {
            ename: "ZeroDivisionError".into(),
            evalue: "division by zero".into(),
            traceback: vec![
                "Traceback (most recent call last):".into(),
                "  line 1".into(),
            ],
        };
        assert_eq!(
            render_error(&error),
            "Traceback (most recent call last):\n  line 1\nZeroDivisionError: division by zero\n"
        );
        let error = output::ExecError {
            traceback: vec![
                "  line 1".into(),
                "ZeroDivisionError: division by zero".into(),
            ],
            ..error
        };
        assert_eq!(
            render_error(&error),
            "  line 1\nZeroDivisionError: division by zero\n"
        );
    }
}

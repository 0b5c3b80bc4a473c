//! execute-code through grad: find the caller's runner, hand the code to its
//! agent, relay the agent's events back to the caller, record the execution.
//! A caller that goes away (Ctrl-C) cancels the code on the runner.

use std::{pin::Pin, sync::Arc};

use grad_proto::{
    AgentCommand, CancelCode, ExecEvent, ExecFinished, ExecStarted, ExecStatus, ExecuteCodeRequest,
    RunCode, agent_command::Command, exec_client::ExecClient, exec_event::Event,
};
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::Status;

use crate::{
    auth::UserCaller,
    error::{Error, Result},
    replicas::Origin,
    runners::{Reach, Runners},
    store::{self, now_ms},
};

pub struct Request {
    pub runner: String,
    pub code: String,
    pub session: String,
    pub params_json: String,
    pub timeout_ms: u32,
}

/// The execution's events, from this replica's agent or the replica
/// holding it.
pub type Events = Pin<Box<dyn Stream<Item = Result<ExecEvent, Status>> + Send>>;

fn validate(req: &mut Request) -> Result<()> {
    if req.session.is_empty() {
        req.session = "default".into();
    }
    let session_ok = req.session.len() <= 64
        && req
            .session
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !session_ok {
        return Err(Error::InvalidArgument(format!(
            "invalid session '{}': use up to 64 letters, digits, '-', '_' or '.'",
            req.session
        )));
    }
    if req.params_json.trim().is_empty() {
        req.params_json = "{}".into();
    }
    match serde_json::from_str::<serde_json::Value>(&req.params_json) {
        Ok(serde_json::Value::Object(_)) => Ok(()),
        Ok(_) => Err(Error::InvalidArgument(
            "params_json must be a JSON object".into(),
        )),
        Err(e) => Err(Error::InvalidArgument(format!(
            "params_json is not JSON: {e}"
        ))),
    }
}

pub async fn execute(
    runners: &Arc<Runners>,
    caller: &UserCaller,
    mut req: Request,
    origin: &Origin,
) -> Result<Events> {
    validate(&mut req)?;
    let mut moved = false;
    let (runner, agent) = loop {
        match runners.usable(caller, &req.runner, origin).await? {
            Reach::Here(runner, agent) => break (runner, agent),
            Reach::Replica(runner, url) => match forward(runners, origin, &url, &req).await {
                // That replica is gone: the runner is on its way to another.
                Err(Error::Forwarded(status)) if status.code() == tonic::Code::Unavailable => {
                    runners.replicas().unreachable(&url);
                    if moved || !runners.wait_moved(&runner.id, &url).await? {
                        return Err(runners.replicas().unreachable_error(
                            &req.runner,
                            &url,
                            status.message(),
                        ));
                    }
                    moved = true;
                }
                forwarded => return forwarded,
            },
        }
    };

    let execution_id = uuid::Uuid::new_v4().to_string();
    let mut from_runner = agent.expect(&execution_id);
    let run = AgentCommand {
        command: Some(Command::RunCode(RunCode {
            request_id: execution_id.clone(),
            execution_id: execution_id.clone(),
            code: req.code.clone(),
            session: req.session.clone(),
            params_json: req.params_json,
            timeout_ms: req.timeout_ms,
        })),
    };
    if agent.commands.send(run).await.is_err() {
        agent.forget(&execution_id);
        return Err(Error::Unavailable(format!(
            "runner {} disconnected; retry in a few seconds",
            req.runner
        )));
    }

    let (to_caller, events) = mpsc::channel(256);
    let started = ExecEvent {
        event: Some(Event::Started(ExecStarted {
            execution_id: execution_id.clone(),
            session: req.session.clone(),
        })),
    };
    // Cannot fail: the channel is new and has room.
    let _ = to_caller.try_send(Ok(started));
    let mut record = store::Execution {
        id: execution_id.clone(),
        runner_id: runner.id.clone(),
        owner_id: runner.owner_id.clone(),
        session: req.session,
        code: req.code,
        status: String::new(),
        execution_count: 0,
        duration_us: 0,
        started_at: now_ms(),
    };
    let store = runners.store().clone();
    let activity = agent.activity();
    let commands = agent.commands.clone();
    let closed = agent.closed.clone();
    // Relays until the runner says finished or its agent goes away (which
    // grad's shutdown forces), so the tracker can join it.
    runners.tracker().spawn(async move {
        let _activity = activity;
        let mut cancelled = false;
        let finished = loop {
            let event = tokio::select! {
                event = from_runner.recv() => event,
                _ = to_caller.closed(), if !cancelled => {
                    cancelled = true;
                    let cancel = AgentCommand {
                        command: Some(Command::CancelCode(CancelCode {
                            request_id: record.id.clone(),
                        })),
                    };
                    let _ = commands.send(cancel).await;
                    continue;
                }
                _ = closed.cancelled() => None,
            };
            let Some(event) = event else {
                break ExecFinished {
                    status: ExecStatus::Failed as i32,
                    message: "the runner disconnected during the execution".into(),
                    ..Default::default()
                };
            };
            if let Some(Event::Finished(f)) = &event.event {
                break f.clone();
            }
            if !cancelled {
                let _ = to_caller.send(Ok(event)).await;
            }
        };
        record.status = status_name(finished.status).to_string();
        record.execution_count = finished.execution_count;
        record.duration_us = finished.duration_us;
        if let Err(e) = store.insert_execution(&record).await {
            tracing::error!(error = %e, execution = %record.id, "recording execution");
        }
        let _ = to_caller
            .send(Ok(ExecEvent {
                event: Some(Event::Finished(finished)),
            }))
            .await;
        agent.forget(&record.id);
    });
    Ok(Box::pin(ReceiverStream::new(events)))
}

/// Runs the code through the replica its runner's agent is connected to.
/// The caller going away drops the forwarded call, which cancels the code
/// there.
async fn forward(runners: &Runners, origin: &Origin, url: &str, req: &Request) -> Result<Events> {
    let replicas = runners.replicas();
    let message = ExecuteCodeRequest {
        runner: req.runner.clone(),
        code: req.code.clone(),
        session: req.session.clone(),
        params_json: req.params_json.clone(),
        timeout_ms: req.timeout_ms,
    };
    let events = ExecClient::new(replicas.channel(url)?)
        .max_decoding_message_size(crate::server::MAX_MESSAGE_BYTES)
        .execute_code(replicas.forward(origin, message))
        .await
        .map_err(Error::Forwarded)?;
    Ok(Box::pin(events.into_inner()))
}

pub fn status_name(status: i32) -> &'static str {
    match ExecStatus::try_from(status).unwrap_or(ExecStatus::Unspecified) {
        ExecStatus::Ok => "ok",
        ExecStatus::Error => "error",
        ExecStatus::Timeout => "timeout",
        ExecStatus::Cancelled => "cancelled",
        ExecStatus::Failed => "failed",
        ExecStatus::Unspecified => "unspecified",
    }
}

pub fn status_from_name(name: &str) -> ExecStatus {
    match name {
        "ok" => ExecStatus::Ok,
        "error" => ExecStatus::Error,
        "timeout" => ExecStatus::Timeout,
        "cancelled" => ExecStatus::Cancelled,
        "failed" => ExecStatus::Failed,
        _ => ExecStatus::Unspecified,
    }
}

pub async fn list(
    runners: &Arc<Runners>,
    caller: &UserCaller,
    runner: &str,
    limit: u32,
) -> Result<Vec<(store::Execution, String)>> {
    let r = runners.resolve(caller, runner).await?;
    let limit = if limit == 0 { 50 } else { limit.min(1000) };
    let rows = runners.store().list_executions(&r.id, limit).await?;
    Ok(rows.into_iter().map(|e| (e, r.name.clone())).collect())
}

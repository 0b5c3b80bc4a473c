//! gractl (binary and library) against a fake grad on loopback: a real tonic
//! server that answers like grad does, so the client side is tested as is.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use gractl::Client;
use grad_proto::{
    CreateRunnerRequest, DeleteRunnerRequest, DisplayData, ExecError, ExecEvent, ExecFinished,
    ExecStarted, ExecStatus, ExecuteCodeRequest, Execution, GetRunnerRequest,
    ListExecutionsRequest, ListExecutionsResponse, ListRunnersRequest, ListRunnersResponse,
    PauseRunnerRequest, Resources, ResumeRunnerRequest, Runner, RunnerState, StreamChunk, User,
    WaitRunnerRequest, WhoAmIRequest,
    exec_event::Event,
    exec_server::{Exec, ExecServer},
    runners_server::{Runners, RunnersServer},
    users_server::{Users, UsersServer},
};
use tokio::{io::AsyncBufReadExt, sync::mpsc};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

const TOKEN: &str = "secret-token";

#[derive(Default)]
struct State {
    runners: BTreeMap<String, Runner>,
    requests: Vec<ExecuteCodeRequest>,
    dropped_streams: usize,
}

#[derive(Clone, Default)]
struct Fake {
    state: Arc<Mutex<State>>,
}

impl Fake {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("state lock")
    }
}

fn authorize<T>(request: &Request<T>) -> Result<(), Status> {
    let expected = format!("Bearer {TOKEN}");
    match request.metadata().get("authorization") {
        Some(value) if value.to_str().ok() == Some(expected.as_str()) => Ok(()),
        _ => Err(Status::unauthenticated("invalid or expired token")),
    }
}

fn not_found(name: &str) -> Status {
    Status::not_found(format!("runner \"{name}\" not found"))
}

#[tonic::async_trait]
impl Users for Fake {
    async fn who_am_i(&self, request: Request<WhoAmIRequest>) -> Result<Response<User>, Status> {
        authorize(&request)?;
        Ok(Response::new(User {
            name: "alice".into(),
            role: "user".into(),
            plan: "pro".into(),
        }))
    }

    async fn add_ssh_key(
        &self,
        _: Request<grad_proto::AddSshKeyRequest>,
    ) -> Result<Response<grad_proto::SshKey>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn list_ssh_keys(
        &self,
        _: Request<grad_proto::ListSshKeysRequest>,
    ) -> Result<Response<grad_proto::ListSshKeysResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn delete_ssh_key(
        &self,
        _: Request<grad_proto::DeleteSshKeyRequest>,
    ) -> Result<Response<grad_proto::SshKey>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }
}

#[tonic::async_trait]
impl Runners for Fake {
    async fn create_runner(
        &self,
        request: Request<CreateRunnerRequest>,
    ) -> Result<Response<Runner>, Status> {
        authorize(&request)?;
        let request = request.into_inner();
        let mut state = self.state();
        if state.runners.contains_key(&request.name) {
            return Err(Status::already_exists(format!(
                "runner \"{}\" already exists",
                request.name
            )));
        }
        let runner = Runner {
            name: request.name.clone(),
            owner: "alice".into(),
            state: RunnerState::Pending as i32,
            resources: request.resources,
            backend: "local".into(),
            workspace: format!("/data/runners/{}", request.name),
            create_time: Some((SystemTime::now() - Duration::from_secs(125)).into()),
            ..Runner::default()
        };
        state.runners.insert(request.name, runner.clone());
        Ok(Response::new(runner))
    }

    async fn get_runner(
        &self,
        request: Request<GetRunnerRequest>,
    ) -> Result<Response<Runner>, Status> {
        authorize(&request)?;
        let name = request.into_inner().name;
        let state = self.state();
        let runner = state.runners.get(&name).ok_or_else(|| not_found(&name))?;
        Ok(Response::new(runner.clone()))
    }

    async fn list_runners(
        &self,
        request: Request<ListRunnersRequest>,
    ) -> Result<Response<ListRunnersResponse>, Status> {
        authorize(&request)?;
        let runners = self.state().runners.values().cloned().collect();
        Ok(Response::new(ListRunnersResponse { runners }))
    }

    async fn pause_runner(
        &self,
        request: Request<PauseRunnerRequest>,
    ) -> Result<Response<Runner>, Status> {
        authorize(&request)?;
        self.set_state(&request.into_inner().name, RunnerState::Pausing)
    }

    async fn resume_runner(
        &self,
        request: Request<ResumeRunnerRequest>,
    ) -> Result<Response<Runner>, Status> {
        authorize(&request)?;
        self.set_state(&request.into_inner().name, RunnerState::Resuming)
    }

    async fn delete_runner(
        &self,
        request: Request<DeleteRunnerRequest>,
    ) -> Result<Response<Runner>, Status> {
        authorize(&request)?;
        let name = request.into_inner().name;
        let mut runner = self
            .state()
            .runners
            .remove(&name)
            .ok_or_else(|| not_found(&name))?;
        runner.state = RunnerState::Deleting as i32;
        Ok(Response::new(runner))
    }

    async fn wait_runner(
        &self,
        request: Request<WaitRunnerRequest>,
    ) -> Result<Response<Runner>, Status> {
        authorize(&request)?;
        let request = request.into_inner();
        let name = request.name;
        if name == "slow" {
            return Err(Status::deadline_exceeded(format!(
                "runner \"slow\" did not reach the requested state within {}ms",
                request.timeout_ms
            )));
        }
        let want = request.states.first().copied().unwrap_or_default();
        let mut state = self.state();
        let Some(runner) = state.runners.get_mut(&name) else {
            return Err(not_found(&name));
        };
        if name == "doomed" {
            runner.state = RunnerState::Failed as i32;
            runner.reason = "process exited: signal 9".into();
        } else {
            runner.state = want;
        }
        Ok(Response::new(runner.clone()))
    }
}

impl Fake {
    fn set_state(&self, name: &str, to: RunnerState) -> Result<Response<Runner>, Status> {
        let mut state = self.state();
        let runner = state.runners.get_mut(name).ok_or_else(|| not_found(name))?;
        runner.state = to as i32;
        Ok(Response::new(runner.clone()))
    }
}

fn event(event: Event) -> Result<ExecEvent, Status> {
    Ok(ExecEvent { event: Some(event) })
}

fn finished(status: ExecStatus, message: &str) -> Result<ExecEvent, Status> {
    event(Event::Finished(ExecFinished {
        status: status as i32,
        execution_count: 3,
        duration_us: 1200,
        message: message.into(),
    }))
}

fn stdout(text: &str) -> Result<ExecEvent, Status> {
    event(Event::Stream(StreamChunk {
        name: "stdout".into(),
        text: text.into(),
    }))
}

#[tonic::async_trait]
impl Exec for Fake {
    type ExecuteCodeStream = ReceiverStream<Result<ExecEvent, Status>>;

    async fn execute_code(
        &self,
        request: Request<ExecuteCodeRequest>,
    ) -> Result<Response<Self::ExecuteCodeStream>, Status> {
        authorize(&request)?;
        let request = request.into_inner();
        if !self.state().runners.contains_key(&request.runner) {
            return Err(not_found(&request.runner));
        }
        self.state().requests.push(request.clone());
        let started = event(Event::Started(ExecStarted {
            execution_id: "ex-1".into(),
            session: if request.session.is_empty() {
                "default".into()
            } else {
                request.session.clone()
            },
        }));
        let mut events = vec![started];
        match request.code.as_str() {
            "print(1)" => events.extend([stdout("1\n"), finished(ExecStatus::Ok, "")]),
            "1/0" => events.extend([
                stdout("before\n"),
                event(Event::Error(ExecError {
                    ename: "ZeroDivisionError".into(),
                    evalue: "division by zero".into(),
                    traceback: vec![
                        "Traceback (most recent call last):".into(),
                        "  File \"<cell>\", line 1, in <module>".into(),
                    ],
                })),
                finished(ExecStatus::Error, ""),
            ]),
            "plot()" => events.extend([
                event(Event::Display(DisplayData {
                    data: [
                        ("image/png".to_owned(), "iVBORw0KGgo=".to_owned()),
                        ("text/plain".to_owned(), "<Figure size 640x480>".to_owned()),
                    ]
                    .into(),
                    is_result: false,
                    files: vec!["outputs/figure-1-1.png".into()],
                })),
                event(Event::Display(DisplayData {
                    data: [("text/plain".to_owned(), "42".to_owned())].into(),
                    is_result: true,
                    files: vec![],
                })),
                finished(ExecStatus::Ok, ""),
            ]),
            "sleep()" => events.push(finished(ExecStatus::Timeout, "timed out after 1s")),
            "crash()" => events.push(finished(ExecStatus::Failed, "interpreter died: signal 9")),
            "hang()" => events.push(stdout("waiting\n")),
            code => events.extend([
                stdout(&format!("{code}\n")),
                stdout(&format!("{}\n", request.params_json)),
                finished(ExecStatus::Ok, ""),
            ]),
        }
        let hang = request.code == "hang()";
        let (sender, receiver) = mpsc::channel(16);
        let state = self.state.clone();
        tokio::spawn(async move {
            for event in events {
                if sender.send(event).await.is_err() {
                    return;
                }
            }
            if hang {
                // Until gractl drops the stream, as it does on Ctrl-C.
                sender.closed().await;
                state.lock().expect("state lock").dropped_streams += 1;
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn list_executions(
        &self,
        request: Request<ListExecutionsRequest>,
    ) -> Result<Response<ListExecutionsResponse>, Status> {
        authorize(&request)?;
        let request = request.into_inner();
        let executions = (0..request.limit.min(2))
            .map(|i| Execution {
                id: format!("ex-{i}"),
                runner: request.runner.clone(),
                session: "default".into(),
                code: "import pandas as pd\ndf = pd.read_csv('data.csv')".into(),
                status: ExecStatus::Ok as i32,
                execution_count: i + 1,
                duration_us: 45_000,
                start_time: Some(SystemTime::now().into()),
            })
            .collect();
        Ok(Response::new(ListExecutionsResponse { executions }))
    }
}

/// Starts the fake on a free port; it lives as long as the test's runtime.
async fn start() -> (String, Fake) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let fake = Fake::default();
    let server = tonic::transport::Server::builder()
        .add_service(UsersServer::new(fake.clone()))
        .add_service(RunnersServer::new(fake.clone()))
        .add_service(ExecServer::new(fake.clone()))
        // Without TCP_NODELAY on the server side, Nagle's algorithm and
        // delayed ACKs add ~40 ms to small exchanges.
        .serve_with_incoming(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        );
    tokio::spawn(server);
    (format!("http://{address}"), fake)
}

fn command(server: &str, home: &Path, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_gractl"));
    command
        .args(args)
        .current_dir(home)
        .env("GRAD_SERVER", server)
        .env("GRAD_TOKEN", TOKEN)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env_remove("GRAD_WORKSPACE")
        .env_remove("GRACTL_CONFIG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

async fn gractl(server: &str, home: &Path, args: &[&str]) -> Output {
    command(server, home, args)
        .output()
        .await
        .expect("gractl runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|error| panic!("not one JSON document ({error}): {}", text(bytes)))
}

async fn with_runner(name: &str) -> (String, Fake, tempfile::TempDir) {
    let (server, fake) = start().await;
    let home = tempfile::tempdir().expect("tempdir");
    let output = gractl(&server, home.path(), &["runner", "create", name]).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    (server, fake, home)
}

#[tokio::test]
async fn login_verifies_the_token_and_stores_it_for_later_commands() {
    let (server, _fake) = start().await;
    let home = tempfile::tempdir().expect("tempdir");
    let token_file = home.path().join("token");
    fs::write(&token_file, format!("{TOKEN}\n")).expect("write token");

    let mut login = command(
        &server,
        home.path(),
        &["--server", &server, "login", "--token-file", "token"],
    );
    login.env_remove("GRAD_TOKEN").env_remove("GRAD_SERVER");
    let output = login.output().await.expect("gractl runs");
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(
        text(&output.stdout),
        format!("Logged in to {server} as alice (user, pro)\n")
    );

    let stored = home.path().join(".config/gractl/config.yaml");
    let mode = fs::metadata(&stored).expect("stored").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(fs::read_to_string(&stored).expect("read").contains(TOKEN));

    let mut whoami = command(&server, home.path(), &["whoami", "-o", "json"]);
    whoami.env_remove("GRAD_TOKEN").env_remove("GRAD_SERVER");
    let output = whoami.output().await.expect("gractl runs");
    assert!(output.status.success(), "{}", text(&output.stderr));
    let user = json(&output.stdout);
    assert_eq!(user["name"], "alice");
    assert_eq!(user["server"], server.as_str());
}

#[tokio::test]
async fn login_reads_the_token_from_stdin() {
    let (server, _fake) = start().await;
    let home = tempfile::tempdir().expect("tempdir");
    let mut login = command(&server, home.path(), &["login", "--token-stdin"]);
    login
        .env_remove("GRAD_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = login.spawn().expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    tokio::io::AsyncWriteExt::write_all(&mut stdin, TOKEN.as_bytes())
        .await
        .expect("write");
    drop(stdin);
    let output = child.wait_with_output().await.expect("wait");
    assert!(output.status.success(), "{}", text(&output.stderr));
}

#[tokio::test]
async fn a_rejected_token_exits_3_with_the_servers_message_and_stores_nothing() {
    let (server, _fake) = start().await;
    let home = tempfile::tempdir().expect("tempdir");
    fs::write(home.path().join("token"), "wrong").expect("write token");
    let output = gractl(&server, home.path(), &["login", "--token-file", "token"]).await;
    assert_eq!(output.status.code(), Some(3));
    assert_eq!(text(&output.stderr), "error: invalid or expired token\n");
    assert!(!home.path().join(".config/gractl/config.yaml").exists());
}

#[tokio::test]
async fn runners_are_created_listed_and_shown() {
    let (server, fake) = start().await;
    let home = tempfile::tempdir().expect("tempdir");
    let dir = home.path();

    let output = gractl(
        &server,
        dir,
        &["runner", "create", "a", "--cpu", "500m", "--memory", "1Gi"],
    )
    .await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "runner/a created\n");
    let resources = fake.state().runners["a"].resources.expect("resources");
    assert_eq!(
        resources,
        Resources {
            cpu_millis: 500,
            memory_bytes: 1 << 30,
            storage_bytes: 10 << 30,
            gpus: 0
        }
    );

    let output = gractl(&server, dir, &["runner", "list"]).await;
    assert_eq!(
        text(&output.stdout),
        "NAME   STATE     CPU    MEMORY   GPUS   AGE\n\
         a      PENDING   500m   1Gi      0      2m\n"
    );

    let output = gractl(&server, dir, &["runner", "list", "--all"]).await;
    assert!(
        text(&output.stdout).starts_with("NAME   OWNER   STATE"),
        "{}",
        text(&output.stdout)
    );

    let output = gractl(&server, dir, &["runner", "get", "a", "-o", "json"]).await;
    let runner = json(&output.stdout);
    assert_eq!(runner["state"], "pending");
    assert_eq!(runner["cpu"], "500m");
    assert_eq!(runner["memory"], "1Gi");
    assert_eq!(runner["storage"], "10Gi");
    assert!(runner["created"].as_str().expect("created").ends_with('Z'));

    let output = gractl(&server, dir, &["runner", "get", "a"]).await;
    let shown = text(&output.stdout);
    assert!(
        shown.starts_with("name:       a\nowner:      alice\nstate:      PENDING\n"),
        "{shown}"
    );

    let output = gractl(&server, dir, &["runner", "list", "-o", "ndjson"]).await;
    assert_eq!(text(&output.stdout).lines().count(), 1);
}

#[tokio::test]
async fn server_errors_print_grads_message_with_their_exit_code() {
    let (server, _fake, home) = with_runner("a").await;
    let dir = home.path();

    let output = gractl(&server, dir, &["runner", "create", "a"]).await;
    assert_eq!(output.status.code(), Some(5));
    assert_eq!(text(&output.stderr), "error: runner \"a\" already exists\n");

    let output = gractl(&server, dir, &["runner", "get", "nope", "-o", "json"]).await;
    assert_eq!(output.status.code(), Some(4));
    assert_eq!(
        json(&output.stderr),
        serde_json::json!({"error": {"code": "not_found", "message": "runner \"nope\" not found"}})
    );
}

#[tokio::test]
async fn waiting_reports_the_reason_of_a_runner_that_failed() {
    let (server, _fake) = start().await;
    let home = tempfile::tempdir().expect("tempdir");
    let output = gractl(
        &server,
        home.path(),
        &["runner", "create", "doomed", "--wait"],
    )
    .await;
    assert_eq!(output.status.code(), Some(5));
    assert_eq!(
        text(&output.stderr),
        "error: runner doomed is failed, not ready: process exited: signal 9\n"
    );

    let output = gractl(&server, home.path(), &["runner", "list"]).await;
    assert!(
        text(&output.stdout).contains("FAILED (process exited: signal 9)"),
        "{}",
        text(&output.stdout)
    );
}

#[tokio::test]
async fn a_wait_that_times_out_exits_7() {
    let (server, _fake) = start().await;
    let home = tempfile::tempdir().expect("tempdir");
    let output = gractl(
        &server,
        home.path(),
        &["runner", "create", "slow", "--wait", "--timeout", "1s"],
    )
    .await;
    assert_eq!(output.status.code(), Some(7));
    assert!(
        text(&output.stderr).contains("within 1000ms"),
        "{}",
        text(&output.stderr)
    );
}

#[tokio::test]
async fn pause_resume_and_delete_wait_for_their_states() {
    let (server, fake, home) = with_runner("a").await;
    let dir = home.path();
    let output = gractl(&server, dir, &["runner", "pause", "a", "--wait"]).await;
    assert_eq!(
        text(&output.stdout),
        "runner/a paused\n",
        "{}",
        text(&output.stderr)
    );
    let output = gractl(&server, dir, &["runner", "resume", "a"]).await;
    assert_eq!(text(&output.stdout), "runner/a resuming\n");
    let output = gractl(&server, dir, &["runner", "resume", "a", "--wait"]).await;
    assert_eq!(text(&output.stdout), "runner/a ready\n");
    let output = gractl(
        &server,
        dir,
        &["runner", "delete", "a", "--wait", "-o", "json"],
    )
    .await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(json(&output.stdout)["state"], "deleted");
    assert!(fake.state().runners.is_empty());
}

#[tokio::test]
async fn the_workspace_supplies_defaults_for_resources_and_the_runner() {
    let (server, fake) = start().await;
    let home = tempfile::tempdir().expect("tempdir");
    let dir = home.path();
    fs::create_dir(dir.join("runners")).expect("mkdir");
    fs::write(
        dir.join("config.yaml"),
        "defaults:\n  runner: ws\n  cpu: 2\n  memory: 8Gi\n  gpus: 1\n",
    )
    .expect("write");

    let output = gractl(&server, dir, &["runner", "create", "ws", "--storage", "1G"]).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let resources = fake.state().runners["ws"].resources.expect("resources");
    assert_eq!(
        resources,
        Resources {
            cpu_millis: 2000,
            memory_bytes: 8 << 30,
            storage_bytes: 1_000_000_000,
            gpus: 1
        }
    );

    let output = gractl(
        &server,
        &dir.join("runners"),
        &["execute-code", "--code", "print(1)"],
    )
    .await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(fake.state().requests[0].runner, "ws");
}

#[tokio::test]
async fn output_streams_and_rich_results_print_for_people() {
    let (server, _fake, home) = with_runner("a").await;
    let output = gractl(
        &server,
        home.path(),
        &["execute-code", "-r", "a", "--code", "print(1)"],
    )
    .await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "1\n");

    let output = gractl(
        &server,
        home.path(),
        &["exec", "-r", "a", "--code", "plot()"],
    )
    .await;
    assert_eq!(
        text(&output.stdout),
        "[image/png: outputs/figure-1-1.png]\n42\n"
    );
}

#[tokio::test]
async fn code_that_raises_prints_the_traceback_and_exits_8() {
    let (server, _fake, home) = with_runner("a").await;
    let output = gractl(
        &server,
        home.path(),
        &["execute-code", "-r", "a", "--code", "1/0"],
    )
    .await;
    assert_eq!(output.status.code(), Some(8));
    assert_eq!(text(&output.stdout), "before\n");
    assert_eq!(
        text(&output.stderr),
        "Traceback (most recent call last):\n  File \"<cell>\", line 1, in <module>\n\
         ZeroDivisionError: division by zero\n"
    );
}

#[tokio::test]
async fn json_output_is_one_document_with_everything() {
    let (server, _fake, home) = with_runner("a").await;
    let output = gractl(
        &server,
        home.path(),
        &["execute-code", "-r", "a", "--code", "1/0", "-o", "json"],
    )
    .await;
    assert_eq!(output.status.code(), Some(8));
    assert!(output.stderr.is_empty(), "{}", text(&output.stderr));
    let result = json(&output.stdout);
    assert_eq!(result["execution_id"], "ex-1");
    assert_eq!(result["runner"], "a");
    assert_eq!(result["session"], "default");
    assert_eq!(result["status"], "error");
    assert_eq!(result["execution_count"], 3);
    assert_eq!(result["duration_ms"], 1.2);
    assert_eq!(result["stdout"], "before\n");
    assert_eq!(result["stderr"], "");
    assert_eq!(result["error"]["ename"], "ZeroDivisionError");
    assert_eq!(result["outputs"], serde_json::json!([]));

    let output = gractl(
        &server,
        home.path(),
        &["execute-code", "-r", "a", "--code", "plot()", "-o", "json"],
    )
    .await;
    let result = json(&output.stdout);
    assert_eq!(result["error"], serde_json::Value::Null);
    assert_eq!(result["outputs"][0]["files"][0], "outputs/figure-1-1.png");
    assert_eq!(result["outputs"][1]["data"]["text/plain"], "42");
    assert_eq!(result["outputs"][1]["is_result"], true);
}

#[tokio::test]
async fn ndjson_output_is_one_event_per_line() {
    let (server, _fake, home) = with_runner("a").await;
    let output = gractl(
        &server,
        home.path(),
        &[
            "execute-code",
            "-r",
            "a",
            "--code",
            "print(1)",
            "-o",
            "ndjson",
        ],
    )
    .await;
    assert!(output.status.success());
    let events: Vec<serde_json::Value> = text(&output.stdout)
        .lines()
        .map(|line| json(line.as_bytes()))
        .collect();
    assert_eq!(
        events,
        vec![
            serde_json::json!({"event": "started", "execution_id": "ex-1", "runner": "a", "session": "default"}),
            serde_json::json!({"event": "stream", "name": "stdout", "text": "1\n"}),
            serde_json::json!({"event": "finished", "status": "ok", "execution_count": 3, "duration_ms": 1.2}),
        ]
    );
}

#[tokio::test]
async fn a_timeout_exits_7_and_a_dead_interpreter_exits_6() {
    let (server, _fake, home) = with_runner("a").await;
    let output = gractl(
        &server,
        home.path(),
        &[
            "execute-code",
            "-r",
            "a",
            "--code",
            "sleep()",
            "--timeout",
            "1s",
        ],
    )
    .await;
    assert_eq!(output.status.code(), Some(7));
    assert_eq!(
        text(&output.stderr),
        "error: execution timed out: timed out after 1s\n"
    );

    let output = gractl(
        &server,
        home.path(),
        &["execute-code", "-r", "a", "--code", "crash()"],
    )
    .await;
    assert_eq!(output.status.code(), Some(6));
    assert_eq!(
        text(&output.stderr),
        "error: the runner could not run the code: interpreter died: signal 9\n"
    );
}

#[tokio::test]
async fn params_session_timeout_and_code_from_a_file_reach_grad() {
    let (server, fake, home) = with_runner("a").await;
    fs::write(home.path().join("job.py"), "x = params['n']").expect("write");
    let output = gractl(
        &server,
        home.path(),
        &[
            "execute-code",
            "-r",
            "a",
            "--file",
            "job.py",
            "--param",
            "n=10",
            "--param",
            "name=abc",
            "--param",
            "xs=[1,2]",
            "--session",
            "s2",
            "--timeout",
            "1m",
        ],
    )
    .await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let request = fake.state().requests[0].clone();
    assert_eq!(request.code, "x = params['n']");
    assert_eq!(request.session, "s2");
    assert_eq!(request.timeout_ms, 60_000);
    let params: serde_json::Value =
        serde_json::from_str(&request.params_json).expect("params json");
    assert_eq!(
        params,
        serde_json::json!({"n": 10, "name": "abc", "xs": [1, 2]})
    );

    let output = gractl(
        &server,
        home.path(),
        &["execute-code", "-r", "a", "--file", "missing.py"],
    )
    .await;
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).starts_with("error: cannot read --file missing.py: "));
}

#[tokio::test]
async fn code_is_read_from_stdin_when_not_given() {
    let (server, fake, home) = with_runner("a").await;
    let mut command = command(&server, home.path(), &["execute-code", "-r", "a"]);
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    tokio::io::AsyncWriteExt::write_all(&mut stdin, b"print(1)")
        .await
        .expect("write");
    drop(stdin);
    let output = child.wait_with_output().await.expect("wait");
    assert_eq!(text(&output.stdout), "1\n");
    assert_eq!(fake.state().requests[0].code, "print(1)");
}

#[tokio::test]
async fn ctrl_c_drops_the_stream_says_cancelled_and_exits_130() {
    let (server, fake, home) = with_runner("a").await;
    let mut command = command(
        &server,
        home.path(),
        &["execute-code", "-r", "a", "--code", "hang()"],
    );
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("output in time")
        .expect("read");
    assert_eq!(first.as_deref(), Some("waiting"));

    let pid = child.id().expect("pid").to_string();
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let output = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("exits in time")
        .expect("wait");
    assert_eq!(output.status.code(), Some(130));
    assert_eq!(text(&output.stderr), "cancelled\n");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fake.state().dropped_streams == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "grad never saw the stream dropped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn executions_are_listed_with_the_first_line_of_their_code() {
    let (server, _fake, home) = with_runner("a").await;
    let output = gractl(
        &server,
        home.path(),
        &["execution", "list", "-r", "a", "--limit", "1"],
    )
    .await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(
        text(&output.stdout),
        "ID     STATUS   COUNT   DURATION   SESSION   CODE\n\
         ex-0   ok       1       45ms       default   import pandas as pd …\n"
    );
    let output = gractl(
        &server,
        home.path(),
        &["execution", "list", "-r", "a", "-o", "json"],
    )
    .await;
    assert_eq!(
        json(&output.stdout)["executions"].as_array().map(Vec::len),
        Some(2)
    );
}

#[tokio::test]
async fn the_library_client_streams_events_over_one_connection() {
    let (server, fake) = start().await;
    let client = Client::connect(&server, TOKEN).await.expect("connect");
    assert_eq!(client.whoami().await.expect("whoami").name, "alice");
    client
        .create_runner("lib", Resources::default())
        .await
        .expect("create");
    let ready = client
        .wait_runner("lib", &[RunnerState::Ready], Duration::from_secs(5))
        .await
        .expect("wait");
    assert_eq!(ready.state(), RunnerState::Ready);
    assert_eq!(client.list_runners(false).await.expect("list").len(), 1);

    for _ in 0..3 {
        let request = ExecuteCodeRequest {
            runner: "lib".into(),
            code: "print(1)".into(),
            ..ExecuteCodeRequest::default()
        };
        let events: Vec<_> = client
            .clone()
            .execute_code(request)
            .await
            .expect("execute")
            .collect::<Result<Vec<_>, _>>()
            .await
            .expect("events");
        assert_eq!(events.len(), 3);
        assert!(matches!(events[2].event, Some(Event::Finished(_))));
    }
    assert_eq!(fake.state().requests.len(), 3);

    let error = client.get_runner("nope").await.expect_err("not found");
    assert_eq!(error.to_string(), "runner \"nope\" not found");
    assert_eq!(
        error.status().map(tonic::Status::code),
        Some(tonic::Code::NotFound)
    );

    let stranger = Client::connect(&server, "bad").await.expect("connect");
    let error = stranger.whoami().await.expect_err("rejected");
    assert_eq!(
        error.status().map(tonic::Status::code),
        Some(tonic::Code::Unauthenticated)
    );
}

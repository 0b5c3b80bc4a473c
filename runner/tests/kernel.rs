//! The Python kernel against a real `python3`, over a temporary workspace.
//!
//! Without python3 (or, for the pandas/matplotlib tests, those packages) a
//! test prints why and passes, unless CI=true, where it fails.

use std::time::{Duration, Instant};

use grad_proto::exec_event::Event;
use grad_proto::{DisplayData, ExecError, ExecEvent, ExecFinished, ExecStatus};
use grad_runner::kernel::{Config, Error, Request, Sessions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn skip(why: &str) {
    assert!(!in_ci(), "{why} (required when CI=true)");
    eprintln!("skipping: {why}");
}

fn python_has(module: &str) -> bool {
    std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

struct Kernel {
    sessions: Sessions,
    workspace: tempfile::TempDir,
}

/// A kernel over a fresh workspace; None (after saying why) without python3.
fn kernel() -> Option<Kernel> {
    if std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_err()
    {
        skip("python3 not found");
        return None;
    }
    Some(kernel_with("python3"))
}

fn kernel_with(python: &str) -> Kernel {
    let workspace = tempfile::tempdir().expect("temp workspace");
    for dir in ["code", "outputs", "data"] {
        std::fs::create_dir(workspace.path().join(dir)).expect("workspace dir");
    }
    let sessions = Sessions::new(Config {
        python: python.into(),
        workspace: workspace.path().to_owned(),
        env: vec![("GRAD_TEST_VAR".into(), "from-config".into())],
    });
    Kernel {
        sessions,
        workspace,
    }
}

fn request(code: &str) -> Request {
    Request {
        execution_id: "test".into(),
        code: code.into(),
        params_json: String::new(),
        timeout: None,
    }
}

struct Run {
    events: Vec<Event>,
    finished: ExecFinished,
}

impl Run {
    fn status(&self) -> ExecStatus {
        ExecStatus::try_from(self.finished.status).expect("known status")
    }

    fn stream(&self, name: &str) -> String {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Stream(s) if s.name == name => Some(s.text.as_str()),
                _ => None,
            })
            .collect()
    }

    fn stdout(&self) -> String {
        self.stream("stdout")
    }

    fn displays(&self) -> Vec<&DisplayData> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Display(d) => Some(d),
                _ => None,
            })
            .collect()
    }

    fn result(&self) -> Option<&DisplayData> {
        self.displays().into_iter().find(|d| d.is_result)
    }

    fn result_text(&self) -> Option<&str> {
        self.result()
            .and_then(|d| d.data.get("text/plain"))
            .map(String::as_str)
    }

    fn error(&self) -> Option<&ExecError> {
        self.events.iter().find_map(|e| match e {
            Event::Error(e) => Some(e),
            _ => None,
        })
    }

    #[track_caller]
    fn assert_ok(&self) {
        assert_eq!(
            self.status(),
            ExecStatus::Ok,
            "events: {:?}, finished: {:?}",
            self.events,
            self.finished
        );
    }
}

impl Kernel {
    async fn run(&self, code: &str) -> Run {
        self.run_in("", request(code), CancellationToken::new())
            .await
    }

    async fn run_in(&self, session: &str, req: Request, cancel: CancellationToken) -> Run {
        let (tx, mut rx) = mpsc::channel::<ExecEvent>(64);
        let exec = self.sessions.execute(session, req, tx, cancel);
        let collect = async {
            let mut events = Vec::new();
            while let Some(event) = rx.recv().await {
                events.extend(event.event);
            }
            events
        };
        let (finished, events) = tokio::join!(exec, collect);
        Run { events, finished }
    }
}

#[tokio::test]
async fn variables_survive_between_calls() {
    let Some(k) = kernel() else { return };
    k.run("x = 41").await.assert_ok();
    let run = k.run("x + 1").await;
    run.assert_ok();
    assert_eq!(run.result_text(), Some("42"));
    assert_eq!(run.finished.execution_count, 2);
    let run = k.run("_ * 2").await;
    assert_eq!(
        run.result_text(),
        Some("84"),
        "the last result is kept in _"
    );
    k.sessions.shutdown().await;
}

#[tokio::test]
async fn params_arrive_as_a_dict() {
    let Some(k) = kernel() else { return };
    let mut req = request("type(params).__name__, params['n'] * 2, params['name']");
    req.params_json = r#"{"n": 21, "name": "grad"}"#.into();
    let run = k.run_in("", req, CancellationToken::new()).await;
    run.assert_ok();
    assert_eq!(run.result_text(), Some("('dict', 42, 'grad')"));
    let run = k.run("params").await;
    assert_eq!(
        run.result_text(),
        Some("{}"),
        "params is empty when none are given"
    );

    let mut req = request("1");
    req.params_json = "[1, 2]".into();
    let run = k.run_in("", req, CancellationToken::new()).await;
    assert_eq!(run.status(), ExecStatus::Failed);
    assert!(
        run.finished.message.contains("JSON object"),
        "{}",
        run.finished.message
    );
    k.sessions.shutdown().await;
}

#[tokio::test]
async fn last_expression_is_the_result() {
    let Some(k) = kernel() else { return };
    let run = k.run("a = 1\n1 + a").await;
    run.assert_ok();
    assert_eq!(run.result_text(), Some("2"));
    assert_eq!(run.displays().len(), 1);

    let run = k.run("None").await;
    assert!(run.result().is_none(), "None shows nothing");
    let run = k.run("a = 3").await;
    assert!(run.result().is_none(), "an assignment shows nothing");
    let run = k.run("a;").await;
    assert!(
        run.result().is_none(),
        "a trailing semicolon hides the result"
    );
    let run = k
        .run("import os\nos.environ['GRAD_TEST_VAR'], os.environ['MPLBACKEND']")
        .await;
    assert_eq!(run.result_text(), Some("('from-config', 'Agg')"));
    k.sessions.shutdown().await;
}

#[tokio::test]
async fn stdout_and_stderr_stream_in_order_with_prints() {
    let Some(k) = kernel() else { return };
    let code =
        "import sys\nprint('one')\nprint('two', file=sys.stderr)\ndisplay(3)\nprint('four')\n5";
    let run = k.run(code).await;
    run.assert_ok();
    // How text is cut into chunks is not part of the contract (print writes
    // "two" and "\n" separately and they may leave in two messages): compare
    // the order with adjacent chunks of the same stream joined.
    let mut order: Vec<String> = Vec::new();
    let mut last_stream: Option<String> = None;
    for e in &run.events {
        match e {
            Event::Stream(s) if last_stream.as_deref() == Some(s.name.as_str()) => {
                if let Some(last) = order.last_mut() {
                    last.push_str(&s.text);
                }
            }
            Event::Stream(s) => {
                order.push(format!("{}:{}", s.name, s.text));
                last_stream = Some(s.name.clone());
            }
            Event::Display(d) => {
                order.push(format!("display:{}", d.data["text/plain"]));
                last_stream = None;
            }
            other => {
                order.push(format!("{other:?}"));
                last_stream = None;
            }
        }
    }
    assert_eq!(
        order,
        [
            "stdout:one\n",
            "stderr:two\n",
            "display:3",
            "stdout:four\n",
            "display:5"
        ]
    );
    assert!(!run.displays()[0].is_result, "display() is not the result");
    assert!(run.displays()[1].is_result);
    k.sessions.shutdown().await;
}

#[tokio::test]
async fn subprocess_output_is_captured() {
    let Some(k) = kernel() else { return };
    for i in 0..20 {
        let run = k
            .run(&format!(
                "import os\nos.system('echo hi {i}')\nos.system('echo err {i} >&2');"
            ))
            .await;
        run.assert_ok();
        assert_eq!(run.stdout(), format!("hi {i}\n"), "call {i}");
        assert_eq!(run.stream("stderr"), format!("err {i}\n"), "call {i}");
    }
    let run = k
        .run("import subprocess\nsubprocess.run(['echo', 'from run'])\nNone")
        .await;
    assert_eq!(run.stdout(), "from run\n");

    // Subprocess output keeps its place between the prints around it.
    for i in 0..20 {
        let run = k
            .run("import os\nprint('a')\nos.system('echo b')\nprint('c')")
            .await;
        assert_eq!(run.stdout(), "a\nb\nc\n", "call {i}");
    }
    k.sessions.shutdown().await;
}

#[tokio::test]
async fn error_reports_name_value_and_traceback() {
    let Some(k) = kernel() else { return };
    let run = k
        .run("x = 1\ndef f():\n    return x / 0\nprint('before')\nf()")
        .await;
    assert_eq!(run.status(), ExecStatus::Error);
    assert_eq!(run.stdout(), "before\n");
    let error = run.error().expect("an error event");
    assert_eq!(error.ename, "ZeroDivisionError");
    assert_eq!(error.evalue, "division by zero");
    let tb = error.traceback.join("\n");
    assert!(tb.starts_with("Traceback (most recent call last):"), "{tb}");
    assert!(
        tb.contains("File \"<cell-1>\", line 5, in <module>"),
        "{tb}"
    );
    assert!(
        tb.contains("    return x / 0"),
        "the user's line is shown: {tb}"
    );
    assert!(tb.contains("in f"), "{tb}");
    assert!(!tb.contains("<string>"), "no driver frames: {tb}");
    assert_eq!(
        error.traceback.last().map(String::as_str),
        Some("ZeroDivisionError: division by zero")
    );

    // Functions from an earlier cell still show their source.
    let run = k.run("f()").await;
    let tb = run.error().expect("error").traceback.join("\n");
    assert!(
        tb.contains("<cell-1>") && tb.contains("return x / 0"),
        "{tb}"
    );
    let run = k.run("x").await;
    run.assert_ok();
    k.sessions.shutdown().await;
}

#[tokio::test]
async fn syntax_error_is_an_error_result() {
    let Some(k) = kernel() else { return };
    k.run("y = 2").await.assert_ok();
    let run = k.run("print('never')\nx = (").await;
    assert_eq!(run.status(), ExecStatus::Error);
    assert_eq!(run.stdout(), "", "nothing runs");
    let error = run.error().expect("an error event");
    assert_eq!(error.ename, "SyntaxError");
    let tb = error.traceback.join("\n");
    assert!(tb.contains("<cell-2>") && tb.contains("x = ("), "{tb}");
    assert_eq!(k.run("y").await.result_text(), Some("2"));
    k.sessions.shutdown().await;
}

#[tokio::test]
async fn timeout_interrupts_and_the_next_call_works() {
    let Some(k) = kernel() else { return };
    k.run("x = 'kept'").await.assert_ok();
    let mut req = request("import time\nprint('sleeping')\ntime.sleep(30)");
    req.timeout = Some(Duration::from_millis(500));
    let started = Instant::now();
    let run = k.run_in("", req, CancellationToken::new()).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(run.status(), ExecStatus::Timeout);
    assert_eq!(run.finished.message, "timed out after 500ms; interrupted");
    assert_eq!(run.stdout(), "sleeping\n");
    assert_eq!(
        run.error().map(|e| e.ename.as_str()),
        Some("KeyboardInterrupt")
    );

    let run = k.run("x").await;
    run.assert_ok();
    assert_eq!(run.result_text(), Some("'kept'"));

    // A subprocess the code waits on is interrupted too.
    let mut req = request("import os\nos.system('sleep 30')\nafter = 1");
    req.timeout = Some(Duration::from_millis(300));
    let started = Instant::now();
    let run = k.run_in("", req, CancellationToken::new()).await;
    assert_eq!(run.status(), ExecStatus::Timeout);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(k.run("x").await.result_text(), Some("'kept'"));
    k.sessions.shutdown().await;
}

#[tokio::test]
async fn an_interpreter_that_ignores_the_interrupt_is_restarted() {
    let Some(k) = kernel() else { return };
    k.run("x = 1").await.assert_ok();
    let code = "import time\nwhile True:\n    try:\n        time.sleep(10)\n    except KeyboardInterrupt:\n        pass";
    let mut req = request(code);
    req.timeout = Some(Duration::from_millis(200));
    let run = k.run_in("", req, CancellationToken::new()).await;
    assert_eq!(run.status(), ExecStatus::Timeout);
    assert!(
        run.finished.message.contains("restarted") && run.finished.message.contains("lost"),
        "{}",
        run.finished.message
    );
    let run = k.run("'x' in globals()").await;
    run.assert_ok();
    assert_eq!(run.result_text(), Some("False"), "a fresh interpreter");
    k.sessions.shutdown().await;
}

#[tokio::test]
async fn cancel_interrupts() {
    let Some(k) = kernel() else { return };
    k.run("x = 'kept'").await.assert_ok();
    let cancel = CancellationToken::new();
    let (tx, mut rx) = mpsc::channel::<ExecEvent>(64);
    let exec = k.sessions.execute(
        "",
        request("import time\nprint('started', flush=True)\ntime.sleep(30)"),
        tx,
        cancel.clone(),
    );
    let watch = async {
        let mut events = Vec::new();
        while let Some(event) = rx.recv().await {
            if let Some(Event::Stream(s)) = &event.event
                && s.text.contains("started")
            {
                cancel.cancel();
            }
            events.extend(event.event);
        }
        events
    };
    let (finished, _events) = tokio::join!(exec, watch);
    assert_eq!(
        finished.status,
        ExecStatus::Cancelled as i32,
        "{finished:?}"
    );
    assert!(finished.message.contains("cancel"), "{}", finished.message);
    assert_eq!(k.run("x").await.result_text(), Some("'kept'"));

    // Dropping the receiver counts as a cancel too.
    let (tx, rx) = mpsc::channel::<ExecEvent>(1);
    drop(rx);
    let finished = k
        .sessions
        .execute(
            "",
            request("import time\nprint('x')\ntime.sleep(30)"),
            tx,
            CancellationToken::new(),
        )
        .await;
    assert_eq!(
        finished.status,
        ExecStatus::Cancelled as i32,
        "{finished:?}"
    );
    k.sessions.shutdown().await;
}

#[tokio::test]
async fn a_dropped_call_is_interrupted_and_the_session_goes_on() {
    let Some(k) = kernel() else { return };
    k.run("x = 'kept'").await.assert_ok();
    let (tx, mut rx) = mpsc::channel::<ExecEvent>(64);
    let exec = k.sessions.execute(
        "",
        request("import time\nprint('started', flush=True)\ntime.sleep(30)"),
        tx,
        CancellationToken::new(),
    );
    tokio::select! {
        _ = exec => panic!("the call should still be running"),
        _ = rx.recv() => {}
    }
    let started = Instant::now();
    let run = k.run("x").await;
    run.assert_ok();
    assert_eq!(run.result_text(), Some("'kept'"));
    assert!(started.elapsed() < Duration::from_secs(3));
    k.sessions.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_independent() {
    let Some(k) = kernel() else { return };
    let cancel = CancellationToken::new;
    k.run_in("a", request("x = 'a'"), cancel())
        .await
        .assert_ok();
    let run = k.run_in("b", request("x"), cancel()).await;
    assert_eq!(run.error().map(|e| e.ename.as_str()), Some("NameError"));
    assert_eq!(
        k.run_in("a", request("x"), cancel()).await.result_text(),
        Some("'a'")
    );
    assert_eq!(k.sessions.count(), 2);

    // They run in parallel: "a" waits for a file that only "b" creates.
    let mut wait =
        request("import os, time\nwhile not os.path.exists('flag'):\n    time.sleep(0.01)\n'seen'");
    wait.timeout = Some(Duration::from_secs(20));
    let (waited, created) = tokio::join!(
        k.run_in("a", wait, cancel()),
        k.run_in("b", request("open('flag', 'w').close()"), cancel()),
    );
    created.assert_ok();
    waited.assert_ok();
    assert_eq!(waited.result_text(), Some("'seen'"));
    k.sessions.shutdown().await;
    assert_eq!(k.sessions.count(), 0);
}

#[tokio::test]
async fn calls_on_one_session_run_one_after_another() {
    let Some(k) = kernel() else { return };
    let (first, second) = tokio::join!(
        k.run("import time\ntime.sleep(0.3)\nv = 'first'"),
        k.run("v"),
    );
    first.assert_ok();
    second.assert_ok();
    assert_eq!(second.result_text(), Some("'first'"));
    assert_eq!(second.finished.execution_count, 2);
    k.sessions.shutdown().await;
}

#[tokio::test]
async fn interpreter_dying_is_reported_and_the_session_restarts() {
    let Some(k) = kernel() else { return };
    k.run("x = 1").await.assert_ok();
    let run = k
        .run("import os\nprint('bye', flush=True)\nos._exit(3)")
        .await;
    assert_eq!(run.status(), ExecStatus::Failed);
    assert!(
        run.finished.message.contains("exit status: 3"),
        "{}",
        run.finished.message
    );
    assert_eq!(run.stdout(), "bye\n");
    assert_eq!(k.sessions.count(), 0);

    let run = k.run("'x' in globals()").await;
    run.assert_ok();
    assert_eq!(run.result_text(), Some("False"));

    // A forked child keeping the interpreter's pipes open does not hide its death.
    let started = Instant::now();
    let run = k
        .run(
            "import os, time\nif os.fork() == 0:\n    time.sleep(60)\n    os._exit(0)\nos._exit(4)",
        )
        .await;
    assert_eq!(run.status(), ExecStatus::Failed);
    assert!(
        run.finished.message.contains("exit status: 4"),
        "{}",
        run.finished.message
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    let run = k.run("import ctypes\nctypes.string_at(0)").await;
    assert_eq!(run.status(), ExecStatus::Failed);
    assert!(
        run.finished.message.contains("SIGSEGV"),
        "{}",
        run.finished.message
    );
    assert!(
        run.stream("stderr").contains("Fatal Python error"),
        "{}",
        run.stream("stderr")
    );
    k.run("1").await.assert_ok();
    k.sessions.shutdown().await;
}

#[tokio::test]
async fn an_interpreter_killed_while_idle_is_replaced_with_a_note() {
    let Some(k) = kernel() else { return };
    let run = k.run("import os\nos.getpid()").await;
    let pid = run.result_text().expect("pid").to_owned();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    // Wait until it is really gone (a zombie with no threads left, so that
    // waitpid reports it), as it long is when an interpreter dies between
    // calls in real use.
    let gone = || {
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_or(true, |status| status.contains("State:\tZ"));
        let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count);
        zombie && threads <= 1
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gone() {
        assert!(Instant::now() < deadline, "pid {pid} did not die");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let run = k.run("'fresh'").await;
    run.assert_ok();
    assert_eq!(run.result_text(), Some("'fresh'"));
    let note = run.stream("stderr");
    assert!(
        note.starts_with("grad: the session's interpreter had exited"),
        "{note}"
    );
    k.sessions.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_running_calls() {
    let Some(k) = kernel() else { return };
    let (tx, mut rx) = mpsc::channel::<ExecEvent>(64);
    let exec = k.sessions.execute(
        "",
        request("import time\nprint('started', flush=True)\ntime.sleep(30)"),
        tx,
        CancellationToken::new(),
    );
    let stop = async {
        rx.recv().await;
        k.sessions.shutdown().await;
    };
    let started = Instant::now();
    let (finished, ()) = tokio::join!(exec, stop);
    assert_eq!(finished.status, ExecStatus::Failed as i32, "{finished:?}");
    assert_eq!(finished.message, "the runner is shutting down");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(k.sessions.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_can_be_shared_across_tasks() {
    let Some(k) = kernel() else { return };
    let sessions = std::sync::Arc::new(k.sessions);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..4 {
        let sessions = sessions.clone();
        tasks.spawn(async move {
            let (tx, _rx) = mpsc::channel(64);
            let req = request(&format!("{i} * 10"));
            sessions
                .execute(&format!("s{i}"), req, tx, CancellationToken::new())
                .await
        });
    }
    while let Some(finished) = tasks.join_next().await {
        let finished = finished.expect("task");
        assert_eq!(finished.status, ExecStatus::Ok as i32, "{finished:?}");
    }
    assert_eq!(sessions.count(), 4);
    sessions.shutdown().await;
}

#[tokio::test]
async fn missing_interpreter_is_reported_by_name() {
    let k = kernel_with("python3.99");
    let run = k.run("1").await;
    assert_eq!(run.status(), ExecStatus::Failed);
    assert_eq!(
        run.finished.message,
        "python interpreter 'python3.99' not found; set --python or GRAD_PYTHON to a Python 3 with pandas and duckdb"
    );
    match k.sessions.python_version().await {
        Err(e @ Error::PythonNotFound { .. }) => assert!(e.to_string().contains("'python3.99'")),
        other => panic!("expected PythonNotFound, got {other:?}"),
    }
    k.sessions.prestart();
    assert_eq!(k.sessions.count(), 0);
}

#[tokio::test]
async fn python_version_and_prestart_work() {
    let Some(k) = kernel() else { return };
    let version = k.sessions.python_version().await.expect("version");
    assert!(version.starts_with("3."), "{version}");
    k.sessions.prestart();
    assert_eq!(k.sessions.count(), 1);
    k.sessions.prestart();
    assert_eq!(k.sessions.count(), 1, "prestart is idempotent");
    let run = k.run("import sys\n'%d.%d.%d' % sys.version_info[:3]").await;
    assert_eq!(run.result_text(), Some(format!("'{version}'").as_str()));
    assert_eq!(
        k.sessions.count(),
        1,
        "the call used the prestarted interpreter"
    );
    k.sessions.shutdown().await;
    assert_eq!(k.sessions.count(), 0);
    let run = k.run("1").await;
    assert_eq!(run.status(), ExecStatus::Failed, "no calls after shutdown");
}

#[tokio::test]
async fn module_not_found_has_a_hint() {
    let Some(k) = kernel() else { return };
    let run = k.run("import sklearn_not_installed_here.sub").await;
    assert_eq!(run.status(), ExecStatus::Error);
    let error = run.error().expect("error");
    assert_eq!(error.ename, "ModuleNotFoundError");
    let hint = error.traceback.last().expect("traceback");
    assert!(hint.starts_with("hint: the runner's Python ("), "{hint}");
    assert!(
        hint.contains("has no module 'sklearn_not_installed_here'; install it there (pip install sklearn_not_installed_here) or pick another interpreter with --python / GRAD_PYTHON"),
        "{hint}"
    );
    k.sessions.shutdown().await;
}

#[tokio::test]
async fn rich_reprs_are_used_and_their_errors_ignored() {
    let Some(k) = kernel() else { return };
    let code = r#"
class Rich:
    def __repr__(self): return 'Rich()'
    def _repr_html_(self): return '<b>rich</b>'
    def _repr_json_(self): return {'a': 1}
    def _repr_png_(self): return b'\x89PNG'
    def _repr_markdown_(self): raise ValueError('broken')
Rich()"#;
    let run = k.run(code).await;
    run.assert_ok();
    let data = &run.result().expect("result").data;
    assert_eq!(data["text/plain"], "Rich()");
    assert_eq!(data["text/html"], "<b>rich</b>");
    assert_eq!(data["application/json"], r#"{"a": 1}"#);
    assert_eq!(data["image/png"], "iVBORw==");
    assert!(!data.contains_key("text/markdown"));
    k.sessions.shutdown().await;
}

#[tokio::test]
async fn large_output_streams_in_bounded_chunks() {
    let Some(k) = kernel() else { return };
    let run = k
        .run("import os\nprint('x' * 200_000)\nos.system('head -c 300000 /dev/zero | tr \"\\\\0\" y');")
        .await;
    run.assert_ok();
    let chunks: Vec<usize> = run
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Stream(s) => Some(s.text.len()),
            _ => None,
        })
        .collect();
    assert!(chunks.iter().all(|&n| n <= 64 * 1024), "{chunks:?}");
    assert_eq!(run.stdout().len(), 200_001 + 300_000);
    k.sessions.shutdown().await;
}

#[tokio::test]
async fn stdin_reads_get_eof_and_top_level_await_works() {
    let Some(k) = kernel() else { return };
    let run = k.run("input()").await;
    assert_eq!(run.error().map(|e| e.ename.as_str()), Some("EOFError"));
    let run = k
        .run("import asyncio\nawait asyncio.sleep(0)\nawait asyncio.sleep(0, result=7)")
        .await;
    run.assert_ok();
    assert_eq!(run.result_text(), Some("7"));
    k.sessions.shutdown().await;
}

#[tokio::test]
async fn a_pandas_dataframe_is_shown_as_html() {
    let Some(k) = kernel() else { return };
    if !python_has("pandas") {
        return skip("pandas is not importable by python3");
    }
    let run = k
        .run("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})")
        .await;
    run.assert_ok();
    let data = &run.result().expect("result").data;
    assert!(data["text/html"].contains("<table"), "{data:?}");
    assert!(data["text/plain"].contains('a') && data["text/plain"].contains('y'));
    k.sessions.shutdown().await;
}

#[tokio::test]
async fn a_matplotlib_figure_is_saved_to_outputs_and_returned_as_png() {
    let Some(k) = kernel() else { return };
    if !python_has("matplotlib") {
        return skip("matplotlib is not importable by python3");
    }
    let run = k
        .run("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])")
        .await;
    run.assert_ok();
    let displays = run.displays();
    assert_eq!(displays.len(), 2, "{:?}", run.events);
    let result = displays[0];
    assert!(result.is_result);
    assert!(
        result.data["text/plain"].contains("Line2D"),
        "{:?}",
        result.data
    );
    let figure = displays[1];
    assert!(!figure.is_result);
    assert_eq!(
        figure.data["text/plain"],
        "<Figure size 640x480 with 1 Axes>"
    );
    assert!(
        figure.data["image/png"].starts_with("iVBORw0KGgo"),
        "base64 PNG"
    );
    assert_eq!(figure.files, ["outputs/figure-1-1.png"]);
    let png = std::fs::read(k.workspace.path().join("outputs/figure-1-1.png")).expect("saved");
    assert!(png.starts_with(b"\x89PNG"));
    assert_eq!(run.stream("stderr"), "", "no warnings");

    let run = k.run("plt.get_fignums()").await;
    assert_eq!(
        run.result_text(),
        Some("[]"),
        "figures are closed after a call"
    );
    let run = k
        .run("fig, ax = plt.subplots()\nax.plot([1])\nplt.show()\ndisplay(fig)")
        .await;
    run.assert_ok();
    let displays = run.displays();
    assert_eq!(displays.len(), 1, "a displayed figure is not shown again");
    assert_eq!(displays[0].files, ["outputs/figure-3-1.png"]);
    k.sessions.shutdown().await;
}

#[tokio::test]
#[ignore = "a measurement, not a test: cargo test -p grad-runner --test kernel -- --ignored --nocapture"]
async fn trivial_calls_round_trip_quickly() {
    let Some(k) = kernel() else { return };
    let started = Instant::now();
    k.run("1").await.assert_ok();
    eprintln!(
        "first call (starts the interpreter): {:?}",
        started.elapsed()
    );
    let mut times = Vec::new();
    for _ in 0..2000 {
        let started = Instant::now();
        let run = k.run("1+1").await;
        times.push(started.elapsed());
        assert_eq!(run.result_text(), Some("2"));
    }
    times.sort();
    eprintln!(
        "1+1 round trip: median {:?}, p90 {:?}, p99 {:?}",
        times[times.len() / 2],
        times[times.len() * 9 / 10],
        times[times.len() * 99 / 100]
    );
    k.sessions.shutdown().await;
}

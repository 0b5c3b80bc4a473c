//! Runner lifecycle on the embedded default: real grad, real grad-runner
//! processes, temp data dirs, port 0.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::time::Duration;

use grad_proto::{Resources, RunnerState};
use grad_tests::{Grad, OutputExt, signal, wait_until};

const READY: &[RunnerState] = &[RunnerState::Ready];
const WAIT: Duration = Duration::from_secs(20);

fn res() -> Resources {
    Resources {
        cpu_millis: 2000,
        memory_bytes: 4 << 30,
        storage_bytes: 0,
        gpus: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_created_runner_becomes_ready_with_its_workspace_laid_out() {
    let grad = Grad::start();
    let admin = grad.admin().await;
    let created = admin.create_runner("r1", res(), Vec::new()).await.unwrap();
    assert_eq!(created.name, "r1");
    assert_eq!(created.owner, "admin");
    let ready = admin.wait_runner("r1", READY, WAIT).await.unwrap();
    assert_eq!(ready.state(), RunnerState::Ready, "{ready:?}");
    assert!(ready.connected);
    assert_eq!(ready.resources.unwrap().cpu_millis, 2000);
    let ws = grad.workspace("admin", "r1");
    for sub in ["code", "outputs", "data"] {
        assert!(ws.join(sub).is_dir(), "{}/{sub} missing", ws.display());
    }
    assert_eq!(ready.workspace, ws.display().to_string());
    assert_eq!(grad.runner_pids().len(), 1);
    let listed = admin.list_runners(false).await.unwrap();
    assert_eq!(
        listed.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        ["r1"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_runner_keeps_its_workspace_files_and_resumes() {
    let grad = Grad::start();
    let admin = grad.admin().await;
    admin.create_runner("r1", res(), Vec::new()).await.unwrap();
    admin.wait_runner("r1", READY, WAIT).await.unwrap();
    let file = grad.workspace("admin", "r1").join("code/keep.txt");
    std::fs::write(&file, "still here").unwrap();

    let pausing = admin.pause_runner("r1", false).await.unwrap();
    assert_eq!(pausing.state(), RunnerState::Pausing);
    let paused = admin
        .wait_runner("r1", &[RunnerState::Paused], WAIT)
        .await
        .unwrap();
    assert_eq!(paused.state(), RunnerState::Paused);
    assert!(
        grad.runner_pids().is_empty(),
        "runner process survived the pause"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "still here");

    let out = grad.run(&["execute-code", "-r", "r1", "--code", "1"]);
    assert_eq!(out.code(), 5, "{}", out.stderr_str());
    assert!(
        out.stderr_str()
            .contains("runner r1 is paused; run `gractl runner resume r1`"),
        "{}",
        out.stderr_str()
    );

    admin.resume_runner("r1").await.unwrap();
    let ready = admin.wait_runner("r1", READY, WAIT).await.unwrap();
    assert_eq!(ready.state(), RunnerState::Ready);
    let out = grad.run(&[
        "execute-code",
        "-r",
        "r1",
        "--code",
        "open('keep.txt').read()",
    ]);
    assert!(out.status.success(), "{}", out.stderr_str());
    assert!(
        out.stdout_str().contains("still here"),
        "{}",
        out.stdout_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_delete_chain_without_waiting_works() {
    let grad = Grad::start();
    let admin = grad.admin().await;
    admin.create_runner("r1", res(), Vec::new()).await.unwrap();
    admin.pause_runner("r1", false).await.unwrap();
    admin.resume_runner("r1").await.unwrap();
    admin.pause_runner("r1", false).await.unwrap();
    admin.resume_runner("r1").await.unwrap();
    let ready = admin.wait_runner("r1", READY, WAIT).await.unwrap();
    assert_eq!(ready.state(), RunnerState::Ready);
    assert_eq!(grad.runner_pids().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_runner_removes_its_process_and_workspace() {
    let grad = Grad::start();
    let admin = grad.admin().await;
    admin.create_runner("r1", res(), Vec::new()).await.unwrap();
    admin.wait_runner("r1", READY, WAIT).await.unwrap();
    let ws = grad.workspace("admin", "r1");
    std::fs::write(ws.join("outputs/result.csv"), "x\n1\n").unwrap();
    let deleting = admin.delete_runner("r1", false).await.unwrap();
    assert_eq!(deleting.state(), RunnerState::Deleting);
    let gone = admin
        .wait_runner("r1", &[RunnerState::Deleted], WAIT)
        .await
        .unwrap();
    assert_eq!(gone.state(), RunnerState::Deleted);
    assert!(
        !ws.exists(),
        "workspace {} survived the delete",
        ws.display()
    );
    assert!(grad.runner_pids().is_empty());
    let err = admin.get_runner("r1").await.unwrap_err();
    assert_eq!(err.status().unwrap().code(), tonic::Code::NotFound);
    // The name is free again.
    admin.create_runner("r1", res(), Vec::new()).await.unwrap();
    admin.wait_runner("r1", READY, WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_runner_process_is_noticed_within_seconds_and_can_be_resumed() {
    let grad = Grad::start();
    let admin = grad.admin().await;
    admin.create_runner("r1", res(), Vec::new()).await.unwrap();
    admin.wait_runner("r1", READY, WAIT).await.unwrap();
    let pids = grad.runner_pids();
    assert_eq!(pids.len(), 1);
    signal(pids[0], libc::SIGKILL);
    let failed = admin
        .wait_runner("r1", &[RunnerState::Failed], Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(failed.state(), RunnerState::Failed);
    assert!(
        failed.reason.contains("exited") && failed.reason.contains("SIGKILL"),
        "reason: {}",
        failed.reason
    );
    let out = grad.run(&["execute-code", "-r", "r1", "--code", "1"]);
    assert_eq!(out.code(), 5, "{}", out.stderr_str());
    assert!(out.stderr_str().contains("failed"), "{}", out.stderr_str());

    admin.resume_runner("r1").await.unwrap();
    let ready = admin.wait_runner("r1", READY, WAIT).await.unwrap();
    assert_eq!(ready.state(), RunnerState::Ready);
    assert!(ready.reason.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_that_stops_heartbeating_is_marked_failed() {
    let grad = Grad::start_with(&["--heartbeat-interval", "100ms", "--heartbeat-timeout", "1s"]);
    let admin = grad.admin().await;
    admin.create_runner("r1", res(), Vec::new()).await.unwrap();
    admin.wait_runner("r1", READY, WAIT).await.unwrap();
    let pid = grad.runner_pids()[0];
    signal(pid, libc::SIGSTOP);
    let failed = admin
        .wait_runner("r1", &[RunnerState::Failed], Duration::from_secs(5))
        .await;
    signal(pid, libc::SIGCONT);
    let failed = failed.unwrap();
    assert_eq!(failed.state(), RunnerState::Failed);
    assert!(
        failed.reason.contains("no heartbeat"),
        "reason: {}",
        failed.reason
    );
    // The hung process is not left behind.
    wait_until("the hung runner to be stopped", WAIT, || {
        grad.runner_pids().is_empty()
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_grad_restart_a_live_runner_reconnects_and_keeps_its_state() {
    let mut grad = Grad::start();
    {
        let admin = grad.admin().await;
        admin.create_runner("r1", res(), Vec::new()).await.unwrap();
        admin.wait_runner("r1", READY, WAIT).await.unwrap();
    }
    let out = grad.run(&["execute-code", "-r", "r1", "--code", "x = 41"]);
    assert!(out.status.success(), "{}", out.stderr_str());
    let pids = grad.runner_pids();

    let status = grad.restart_status();
    assert!(
        status.is_some_and(|s| s.success()),
        "grad did not stop cleanly: {status:?}"
    );
    assert_eq!(
        grad.runner_pids(),
        pids,
        "the runner process did not survive grad's restart"
    );

    let admin = grad.admin().await;
    let ready = admin.wait_runner("r1", READY, WAIT).await.unwrap();
    assert_eq!(ready.state(), RunnerState::Ready);
    wait_until("the runner to reconnect", WAIT, || {
        let out = grad.run(&["runner", "get", "r1", "-o", "json"]);
        out.stdout_str().contains("\"connected\": true")
            || out.stdout_str().contains("\"connected\":true")
    });
    let out = grad.run(&["execute-code", "-r", "r1", "--code", "x + 1"]);
    assert!(out.status.success(), "{}", out.stderr_str());
    assert!(out.stdout_str().contains("42"), "{}", out.stdout_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_runner_requests_are_refused_with_clear_messages() {
    let grad = Grad::start();
    let admin = grad.admin().await;
    let err = admin
        .create_runner("R_1", res(), Vec::new())
        .await
        .unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("invalid runner name 'R_1'"),
        "{}",
        status.message()
    );

    let mut huge = res();
    huge.memory_bytes = 1 << 45;
    let err = admin
        .create_runner("r2", huge, Vec::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("512Gi"), "{err}");

    admin.create_runner("r1", res(), Vec::new()).await.unwrap();
    let err = admin
        .create_runner("r1", res(), Vec::new())
        .await
        .unwrap_err();
    assert_eq!(err.status().unwrap().code(), tonic::Code::AlreadyExists);

    let err = admin.get_runner("nope").await.unwrap_err();
    assert_eq!(err.status().unwrap().code(), tonic::Code::NotFound);
    assert!(err.to_string().contains("runner 'nope' not found"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_nobody_uses_is_paused_and_use_keeps_it_up() {
    let grad = Grad::start_with(&["--idle-pause", "2s"]);
    let admin = grad.admin().await;
    admin.create_runner("r1", res(), Vec::new()).await.unwrap();
    admin.wait_runner("r1", READY, WAIT).await.unwrap();
    let state = |admin: &gractl::client::Client| {
        let admin = admin.clone();
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async move {
                let r = admin.get_runner("r1").await.unwrap();
                (r.state(), r.reason)
            })
        })
    };

    // Each use lasts longer than the idle time; none leaves a gap as long.
    let out = grad.run(&[
        "execute-code",
        "-r",
        "r1",
        "--code",
        "open('../outputs/result.txt','w').write('42'); import time; time.sleep(3)",
    ]);
    assert_eq!(out.code(), 0, "{}", out.stderr_str());
    assert_eq!(
        state(&admin).0,
        RunnerState::Ready,
        "paused during an execution"
    );
    let out = grad.run(&["ssh", "r1", "--", "sleep 3"]);
    assert_eq!(out.code(), 0, "{}", out.stderr_str());
    assert_eq!(
        state(&admin).0,
        RunnerState::Ready,
        "paused during an SSH session"
    );
    let job = tempfile::tempdir().unwrap();
    std::fs::write(
        job.path().join("job.yaml"),
        "name: busy\ncommand: sleep 3\nrunner: r1\n",
    )
    .unwrap();
    let out = grad.run(&["job", "submit", job.path().to_str().unwrap(), "--wait"]);
    assert_eq!(out.code(), 0, "{}", out.stderr_str());
    assert_eq!(state(&admin).0, RunnerState::Ready, "paused during a job");

    // Then nobody: paused within a few seconds, its outputs collected.
    let paused = admin
        .wait_runner("r1", &[RunnerState::Paused], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(paused.state(), RunnerState::Paused);
    assert_eq!(paused.reason, "paused after 2s without use");
    let out = grad.run(&["outputs", "list", "r1"]);
    assert_eq!(out.code(), 0, "{}", out.stderr_str());
    assert!(
        out.stdout_str().contains("result.txt"),
        "{}",
        out.stdout_str()
    );
    // Resumed, it is a runner like any other.
    let out = grad.run(&["runner", "resume", "r1", "--wait"]);
    assert_eq!(out.code(), 0, "{}", out.stderr_str());
}

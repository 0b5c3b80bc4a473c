//! Several grad replicas on loopback sharing one PostgreSQL database (and
//! one data dir, for the embedded blob store and the keys): any replica
//! answers any call. execute-code, SSH, outputs and the lifecycle through
//! the replica that does not hold the runner's agent; SSH keys added on one
//! replica reaching runners on another; a job queued on one replica waking
//! a worker waiting on another, its log followed through a third; thousands
//! of jobs claimed at once through three replicas, each run once; and a
//! replica killed mid-flight: only its own calls fail, its runner and
//! worker carry on through the other.
#![allow(clippy::unwrap_used)]

use std::{
    collections::{HashMap, HashSet},
    process::Stdio,
    time::{Duration, Instant},
};

use gractl::client::Client;
use grad_proto::{
    ClaimJobRequest, FinishJobRequest, JobOutcome, JobSpec, JobState, Resources, RunnerState,
    WorkerCapabilities, worker_agent_client::WorkerAgentClient,
};
use grad_tests::{Grad, OutputExt, Postgres};

/// Replicas of one grad on a fresh database; the first owns the data dir.
/// Fields drop in order: the grads before their database.
struct Cluster {
    grads: Vec<Grad>,
    _postgres: Postgres,
}

fn cluster(n: usize) -> Option<Cluster> {
    let postgres = Postgres::start()?;
    let first = Grad::start_on(Some(postgres.database()), &[], &[]);
    let mut grads = vec![first];
    for _ in 1..n {
        let replica = grads[0].replica();
        grads.push(replica);
    }
    Some(Cluster {
        grads,
        _postgres: postgres,
    })
}

async fn ready_runner(grad: &Grad, name: &str) {
    let admin = grad.admin().await;
    admin
        .create_runner(name, Resources::default(), Vec::new())
        .await
        .unwrap();
    let runner = admin
        .wait_runner(name, &[RunnerState::Ready], Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(runner.state(), RunnerState::Ready, "{runner:?}");
}

fn exec(grad: &Grad, code: &str) -> String {
    let out = grad.run(&["execute-code", "-r", "r1", "--code", code]);
    assert!(
        out.status.success(),
        "execute-code through {}: {}",
        grad.url,
        out.stderr_str()
    );
    out.stdout_str()
}

/// Uploads a bundle of `job.yaml` (once); answers its digest.
async fn bundle(client: &Client) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("job.yaml"), "name: j\ncommand: true\n").unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    let made =
        grad_bundle::create(dir.path(), std::io::BufWriter::new(file.reopen().unwrap())).unwrap();
    if let Some(put) = client.create_upload(&made.sha256, made.size).await.unwrap() {
        grad_transfer::Client::new()
            .unwrap()
            .put_file(&put, file.path(), 0, made.size, None)
            .await
            .unwrap();
    }
    made.sha256
}

fn spec(name: &str, command: &str) -> JobSpec {
    JobSpec {
        name: name.into(),
        command: command.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_code_ssh_outputs_and_lifecycle_work_through_the_other_replica() {
    let Some(cluster) = cluster(2) else { return };
    let (a, b) = (&cluster.grads[0], &cluster.grads[1]);
    // Created through A, the runner dials A first (its list: A, then B).
    ready_runner(a, "r1").await;
    let held_by = |grad: &Grad| {
        grad.query_postgres(
            "SELECT p.url FROM agent_routes a JOIN replicas p ON p.id = a.replica_id \
             WHERE a.detached_at IS NULL",
        )
    };
    assert_eq!(held_by(a), a.url, "r1's agent is on A");
    let seen_from_b = b.admin().await.get_runner("r1").await.unwrap();
    assert!(
        seen_from_b.connected,
        "B sees r1 connected: {seen_from_b:?}"
    );

    // One interpreter, whichever replica the call reaches.
    exec(b, "x = 41");
    assert_eq!(exec(a, "print(x + 1)").trim(), "42");
    assert_eq!(exec(b, "print(x + 1)").trim(), "42");
    // An error keeps its exit code through the forwarding replica.
    let out = b.run(&["execute-code", "-r", "r1", "--code", "1/0"]);
    assert_eq!(out.code(), 8, "{}", out.stderr_str());
    assert!(
        out.stderr_str().contains("ZeroDivisionError"),
        "{}",
        out.stderr_str()
    );

    // SSH through B: gractl registers its key with B, the runner on A gets
    // it, and the tunnel goes B → A → runner.
    let out = b.run(&["ssh", "r1", "--", "echo via-b; pwd"]);
    assert!(out.status.success(), "{}", out.stderr_str());
    let ws = a.workspace("admin", "r1");
    assert_eq!(
        out.stdout_str().lines().collect::<Vec<_>>(),
        ["via-b", ws.to_str().unwrap()]
    );
    // SFTP (bulk data over the two-leg tunnel), checked on the runner's disk.
    let local = tempfile::NamedTempFile::new().unwrap();
    let payload: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(local.path(), &payload).unwrap();
    let out = b.run(&["cp", local.path().to_str().unwrap(), "r1:code/blob.bin"]);
    assert!(out.status.success(), "{}", out.stderr_str());
    assert_eq!(std::fs::read(ws.join("code/blob.bin")).unwrap(), payload);

    // Outputs collected through B, by the agent on A.
    std::fs::write(ws.join("outputs/result.txt"), "from r1\n").unwrap();
    let out = b.run(&["outputs", "collect", "r1", "-o", "json"]);
    assert!(out.status.success(), "{}", out.stderr_str());
    assert!(
        out.stdout_str().contains("result.txt"),
        "{}",
        out.stdout_str()
    );

    // Pause through B collects first (on A), then stops the runner;
    // resumed through B, it comes back and runs code again.
    std::fs::write(ws.join("outputs/late.txt"), "written before pause\n").unwrap();
    let out = b.run(&["runner", "pause", "r1", "--wait"]);
    assert!(out.status.success(), "{}", out.stderr_str());
    let pulled = tempfile::tempdir().unwrap();
    let out = a.run(&["outputs", "pull", "r1", pulled.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.stderr_str());
    assert_eq!(
        std::fs::read_to_string(pulled.path().join("late.txt")).unwrap(),
        "written before pause\n"
    );
    let out = b.run(&["runner", "resume", "r1", "--wait"]);
    assert!(out.status.success(), "{}", out.stderr_str());
    assert_eq!(exec(a, "print('back')").trim(), "back");
    assert_eq!(exec(b, "print('back')").trim(), "back");
    // Resumed by B, it dials B first now: A is the other replica.
    assert_eq!(held_by(a), b.url, "r1's agent is on B");

    // Delete through whichever replica does not hold it now.
    let out = b.run(&["runner", "delete", "r1", "--yes", "--wait"]);
    assert!(out.status.success(), "{}", out.stderr_str());
    assert!(!ws.exists(), "the workspace is gone");
    let out = a.run(&["runner", "get", "r1"]);
    assert_eq!(out.code(), 4, "{}", out.stderr_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_queued_on_one_replica_wakes_a_worker_waiting_on_another_and_streams_through_a_third()
{
    let Some(cluster) = cluster(3) else { return };
    let (a, b, c) = (&cluster.grads[0], &cluster.grads[1], &cluster.grads[2]);
    // The worker long-polls C (20 s per claim): only a shared wake-up makes
    // it see a job queued on A at once.
    let _worker = a.start_agent_at(&c.url, &a.admin_token, "w1", &[], &[], &[]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let client = a.admin().await;
    let digest = bundle(&client).await;
    let started = Instant::now();
    let job = client
        .submit_job(spec("two-lines", "echo one; sleep 2; echo two"), &digest)
        .await
        .unwrap();

    let follower = b.admin().await;
    let mut stream = follower.stream_logs(&job.id, 0, true).await.unwrap();
    let mut seen = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        for line in chunk.lines {
            seen.push((line.text.trim().to_owned(), started.elapsed()));
        }
    }
    let texts: Vec<&str> = seen.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(texts, ["one", "two"], "{seen:?}");
    // "one" was claimed and printed well before the 20 s claim expired,
    // and reached the follower on B while the job still ran.
    assert!(seen[0].1 < Duration::from_secs(5), "{seen:?}");
    assert!(seen[1].1 - seen[0].1 > Duration::from_secs(1), "{seen:?}");
    let done = c.admin().await.get_job(&job.id).await.unwrap();
    assert_eq!(done.state(), JobState::Succeeded, "{done:?}");
}

/// One claimer: a worker's token claiming through one replica and
/// finishing at once; answers the (job, attempt) pairs it got.
async fn claim_until_empty(url: String, token: String, expected: usize) -> Vec<(String, u32)> {
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = WorkerAgentClient::new(channel);
    let auth: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    fn authed<T>(
        auth: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
        message: T,
    ) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert("authorization", auth.clone());
        request
    }
    let mut got = Vec::new();
    let mut empty = 0;
    while empty < 3 && got.len() < expected {
        let claimed = client
            .claim_job(authed(
                &auth,
                ClaimJobRequest {
                    capabilities: Some(WorkerCapabilities::default()),
                    wait_ms: 200,
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        let Some(job) = claimed.job else {
            empty += 1;
            continue;
        };
        empty = 0;
        client
            .finish_job(authed(
                &auth,
                FinishJobRequest {
                    id: job.id.clone(),
                    attempt: job.attempt,
                    outcome: JobOutcome::Exited as i32,
                    ..Default::default()
                },
            ))
            .await
            .unwrap();
        got.push((job.id, job.attempt));
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_jobs_claimed_at_once_through_three_replicas_each_run_once() {
    let Some(cluster) = cluster(3) else { return };
    let grads = &cluster.grads;
    let client = grads[0].admin().await;
    let digest = bundle(&client).await;
    // Submitted through all three replicas at once.
    const JOBS: usize = 2000;
    let mut submitters = tokio::task::JoinSet::new();
    for (i, grad) in grads.iter().enumerate() {
        let client = grad.admin().await;
        let digest = digest.clone();
        submitters.spawn(async move {
            let mut ids = Vec::new();
            for n in (i..JOBS).step_by(3) {
                let job = client
                    .submit_job(spec(&format!("j{n}"), "true"), &digest)
                    .await
                    .unwrap();
                ids.push(job.id);
            }
            ids
        });
    }
    let mut submitted = HashSet::new();
    while let Some(ids) = submitters.join_next().await {
        submitted.extend(ids.unwrap());
    }
    assert_eq!(submitted.len(), JOBS);

    // Six workers, two per replica, claiming as fast as they can.
    let mut claimers = tokio::task::JoinSet::new();
    for w in 0..6 {
        let worker = client
            .create_worker(&format!("w{w}"), HashMap::new(), false)
            .await
            .unwrap();
        let url = grads[w % 3].url.clone();
        claimers.spawn(claim_until_empty(url, worker.token, JOBS));
    }
    let mut claims = Vec::new();
    let mut workers_with_work = 0;
    while let Some(got) = claimers.join_next().await {
        let got = got.unwrap();
        workers_with_work += usize::from(!got.is_empty());
        claims.extend(got);
    }
    let distinct: HashSet<&String> = claims.iter().map(|(id, _)| id).collect();
    assert_eq!(claims.len(), JOBS, "every job claimed exactly once");
    assert_eq!(distinct.len(), JOBS, "no job claimed twice");
    assert!(claims.iter().all(|(_, attempt)| *attempt == 1));
    assert!(distinct.iter().all(|id| submitted.contains(*id)));
    assert!(workers_with_work >= 3, "claims spread over the workers");
    let jobs = client.list_jobs(false, 10).await.unwrap();
    assert!(
        jobs.iter().all(|j| j.state() == JobState::Succeeded),
        "{jobs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_fails_only_its_own_calls_and_its_runner_and_worker_move_on() {
    let Some(mut cluster) = cluster(2) else {
        return;
    };
    ready_runner(&cluster.grads[0], "r1").await;
    let (a_url, b_url) = (cluster.grads[0].url.clone(), cluster.grads[1].url.clone());
    // The worker dials A first, B if A is gone.
    let _worker = cluster.grads[0].start_agent_at(
        &format!("{a_url},{b_url}"),
        &cluster.grads[0].admin_token,
        "w1",
        &["--label", "pool=standing"],
        &[],
        &[],
    );
    exec(&cluster.grads[0], "kept = 'state'");

    // In flight on A when it dies: a slow execution (its own session) and
    // a running job.
    let mut slow = cluster.grads[0]
        .gractl(&cluster.grads[0].admin_token)
        .args(["execute-code", "-r", "r1", "--session", "slow"])
        .args(["--code", "import time; time.sleep(60)"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let client = cluster.grads[1].admin().await;
    let digest = bundle(&client).await;
    // For the standing worker (the runner is a worker for its owner too).
    let survivor = JobSpec {
        labels: HashMap::from([("pool".to_owned(), "standing".to_owned())]),
        ..spec("survivor", "echo before; sleep 4; echo after")
    };
    let job = client.submit_job(survivor, &digest).await.unwrap();
    eventually("the job running", Duration::from_secs(20), || async {
        client.get_job(&job.id).await.unwrap().state() == JobState::Running
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    cluster.grads[0].kill();
    let killed = Instant::now();

    // The call that was on A fails as unavailable, promptly.
    let status = wait_for_exit(&mut slow, Duration::from_secs(15));
    let stderr = {
        use std::io::Read;
        let mut text = String::new();
        slow.stderr
            .take()
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        text
    };
    assert_eq!(
        status,
        Some(6),
        "execute-code in flight on the dead replica: {stderr}"
    );

    // The runner reconnects to B within seconds, still ready, its
    // interpreter intact; a call through B meanwhile waits for it.
    let b = &cluster.grads[1];
    assert_eq!(exec(b, "print(kept)").trim(), "state");
    let moved_in = killed.elapsed();
    assert!(
        moved_in < Duration::from_secs(5),
        "reconnected after {moved_in:?}"
    );
    let held_by = b.query_postgres(
        "SELECT p.url FROM agent_routes a JOIN replicas p ON p.id = a.replica_id \
         WHERE a.detached_at IS NULL",
    );
    assert_eq!(held_by, b.url);
    let admin_b = b.admin().await;
    let runner = admin_b.get_runner("r1").await.unwrap();
    assert_eq!(runner.state(), RunnerState::Ready, "{runner:?}");
    assert!(runner.connected);

    // The job's worker carried on through B: one attempt, succeeded, whole log.
    let done = admin_b
        .wait_job(&job.id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.state(), JobState::Succeeded, "{done:?}");
    assert_eq!(done.attempt, 1, "{done:?}");
    assert_eq!(done.worker, "w1", "{done:?}");
    let out = b.run(&["job", "logs", &job.id]);
    assert!(out.status.success(), "{}", out.stderr_str());
    assert_eq!(
        out.stdout_str().lines().collect::<Vec<_>>(),
        ["before", "after"]
    );

    // Some seconds later the runner is still fine: no replica failed it.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let runner = admin_b.get_runner("r1").await.unwrap();
    assert_eq!(runner.state(), RunnerState::Ready, "{runner:?}");
    assert!(runner.connected);
}

/// Waits for `cond` with a deadline; panics naming `what` if it never holds.
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn wait_for_exit(child: &mut std::process::Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Outputs' object GC across replicas: while one replica holds an owner's
/// objects lock (recording a set, or deciding what nobody refers to), a
/// second replica's store waits for it; the lock goes when released, and
/// with its connection when a holder dies without releasing it; a wait
/// given up (the timeouts here) leaves nothing held behind. Another
/// owner's lock is independent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outputs_objects_lock_holds_across_replicas() {
    let Some(postgres) = Postgres::start() else {
        return;
    };
    let url = postgres.database();
    let a = grad::store::Store::connect(&url).await.unwrap();
    let b = grad::store::Store::connect(&url).await.unwrap();
    let waits = |store: grad::store::Store, owner: &'static str| async move {
        tokio::time::timeout(Duration::from_millis(500), store.lock_objects(owner)).await
    };

    let held = a.lock_objects("alice").await.unwrap();
    assert!(
        waits(b.clone(), "alice").await.is_err(),
        "B took alice's objects lock while A held it"
    );
    let bobs = waits(b.clone(), "bob")
        .await
        .expect("bob's lock is not alice's");
    bobs.unwrap().release().await.unwrap();
    held.release().await.unwrap();
    let taken = waits(b.clone(), "alice").await.expect("released by A");
    taken.unwrap().release().await.unwrap();

    // A holder that goes away without releasing (an error, a cancelled
    // call, a dying replica) takes the lock with its connection.
    let held = a.lock_objects("alice").await.unwrap();
    drop(held);
    let taken = waits(b.clone(), "alice")
        .await
        .expect("the lock went with A's connection");
    taken.unwrap().release().await.unwrap();
    a.close().await;
    b.close().await;
}

//! Batch jobs end to end: the real grad, real `grad-runner agent` workers
//! and gractl on loopback. The golden loop (bundle, presigned upload,
//! queue, claim, run, logs, outcome), re-submission uploading nothing,
//! secrets reaching the job but never its log or grad's data, a killed
//! worker's job finished by another after its lease ran out, a grad restart
//! in the middle of a job, cancel, timeout, a hostile bundle, a malformed
//! job.yaml, the pro plan for GPUs, and workers running only their owner's
//! jobs.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use grad_tests::{Grad, OutputExt, files_containing, wait_until};
use serde_json::Value;

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not one JSON document ({e}): {}\nstderr: {}",
            out.stdout_str(),
            out.stderr_str()
        )
    })
}

/// A project directory holding `job.yaml` and `files`.
fn project(job_yaml: &str, files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("job.yaml"), job_yaml).unwrap();
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    dir
}

fn submit(grad: &Grad, token: &str, dir: &Path) -> Value {
    let out = grad
        .gractl(token)
        .args(["job", "submit", dir.to_str().unwrap(), "-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "submit: {}", out.stderr_str());
    json(&out)
}

/// Submits `dir` and answers the new job's id.
fn submit_id(grad: &Grad, token: &str, dir: &Path) -> String {
    submit(grad, token, dir)["job"]["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn job(grad: &Grad, token: &str, id: &str) -> Value {
    let out = grad
        .gractl(token)
        .args(["job", "get", id, "-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "get: {}", out.stderr_str());
    json(&out)
}

fn wait(grad: &Grad, token: &str, id: &str) -> (i32, Value) {
    let out = grad
        .gractl(token)
        .args(["job", "wait", id, "--timeout", "60s", "-o", "json"])
        .output()
        .unwrap();
    (out.code(), json(&out))
}

/// The job's log as gractl prints it (stdout lines only).
fn logs(grad: &Grad, token: &str, id: &str) -> String {
    let out = grad
        .gractl(token)
        .args(["job", "logs", id])
        .output()
        .unwrap();
    assert!(out.status.success(), "logs: {}", out.stderr_str());
    out.stdout_str()
}

fn wait_for_state(grad: &Grad, token: &str, id: &str, state: &str) -> Value {
    let mut last = Value::Null;
    wait_until(
        &format!("job {id} {state}"),
        Duration::from_secs(30),
        || {
            last = job(grad, token, id);
            last["state"] == state
        },
    );
    last
}

#[test]
fn a_job_runs_end_to_end_and_resubmitting_uploads_nothing() {
    let grad = Grad::start();
    let _worker = grad.start_agent(&grad.admin_token, "w1", &[], &[]);
    let dir = project(
        "name: hello\n\
         command: echo \"hello $WHO\"; ls; echo oops >&2\n\
         env: { WHO: world }\n",
        &[
            ("train.py", "print(1)\n"),
            ("data/big.bin", "ignored"),
            (".gradignore", "data/\n"),
        ],
    );
    let first = submit(&grad, &grad.admin_token, dir.path());
    assert!(first["uploaded_bytes"].as_u64().unwrap() > 0, "{first}");
    assert_eq!(first["bundle_files"], 3, "{first}");
    let id = first["job"]["id"].as_str().unwrap().to_owned();
    let (code, done) = wait(&grad, &grad.admin_token, &id);
    assert_eq!(code, 0, "{done}");
    assert_eq!(done["state"], "succeeded");
    assert_eq!(done["exit_code"], 0);
    assert_eq!(done["worker"], "w1");
    let printed = logs(&grad, &grad.admin_token, &id);
    assert_eq!(
        printed, "hello world\njob.yaml\ntrain.py\n",
        "data/ was bundled or lines lost"
    );
    let out = grad
        .gractl(&grad.admin_token)
        .args(["job", "logs", &id, "-o", "ndjson"])
        .output()
        .unwrap();
    let lines: Vec<Value> = out
        .stdout_str()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert!(
        lines
            .iter()
            .any(|l| l["stream"] == "stderr" && l["text"] == "oops")
    );
    let seqs: Vec<u64> = lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    // The same tree again: same bundle, nothing uploaded.
    let again = submit(&grad, &grad.admin_token, dir.path());
    assert_eq!(again["uploaded_bytes"], 0, "{again}");
    assert_eq!(again["job"]["bundle_sha256"], first["job"]["bundle_sha256"]);
    let (code, _) = wait(
        &grad,
        &grad.admin_token,
        again["job"]["id"].as_str().unwrap(),
    );
    assert_eq!(code, 0);

    let listed = json(
        &grad
            .gractl(&grad.admin_token)
            .args(["job", "list", "-o", "json"])
            .output()
            .unwrap(),
    );
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 2);
    // A failing command fails the job with its exit code, and `wait` says so.
    std::fs::write(
        dir.path().join("job.yaml"),
        "name: fails\ncommand: exit 3\n",
    )
    .unwrap();
    let failing = submit(&grad, &grad.admin_token, dir.path());
    let (code, done) = wait(
        &grad,
        &grad.admin_token,
        failing["job"]["id"].as_str().unwrap(),
    );
    assert_eq!(code, 9, "{done}");
    assert_eq!(
        (done["state"].as_str(), done["reason"].as_str()),
        (Some("failed"), Some("exit code 3"))
    );
}

#[test]
fn a_secret_reaches_the_job_and_never_its_log_or_grads_data() {
    const SECRET: &str = "wandb-7f3a9c2e1b4d5a69-secret";
    let grad = Grad::start();
    let worker = grad.start_agent(&grad.admin_token, "w1", &[], &[]);
    let set = grad.run_with_input(
        &grad.admin_token,
        &["secret", "set", "WANDB_API_KEY"],
        SECRET.as_bytes(),
    );
    assert!(set.status.success(), "{}", set.stderr_str());
    let dir = project(
        "name: uses-secret\n\
         command: echo \"key=$WANDB_API_KEY\"; printf %s \"$WANDB_API_KEY\" | sha256sum\n\
         secrets: [WANDB_API_KEY]\n",
        &[],
    );
    let submitted = submit(&grad, &grad.admin_token, dir.path());
    let id = submitted["job"]["id"].as_str().unwrap().to_owned();
    let (code, done) = wait(&grad, &grad.admin_token, &id);
    assert_eq!(code, 0, "{done}");
    let printed = logs(&grad, &grad.admin_token, &id);
    let expected = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(SECRET.as_bytes()))
    };
    // The job had the value (its digest is right), the log shows none of it.
    assert!(printed.starts_with("key=***\n"), "{printed}");
    assert!(
        printed.contains(&expected),
        "the job did not get the secret: {printed}"
    );
    assert!(!printed.contains(SECRET));
    assert_eq!(
        files_containing(&grad.data_dir, SECRET.as_bytes()),
        Vec::<PathBuf>::new()
    );
    assert_eq!(
        files_containing(worker.dir.path(), SECRET.as_bytes()),
        Vec::<PathBuf>::new()
    );
    // A job naming a secret its owner lacks is refused at submit.
    std::fs::write(
        dir.path().join("job.yaml"),
        "name: x\ncommand: true\nsecrets: [NOT_SET]\n",
    )
    .unwrap();
    let out = grad
        .gractl(&grad.admin_token)
        .args(["job", "submit", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.code(), 5, "{}", out.stderr_str());
    assert!(
        out.stderr_str().contains("you have no secret NOT_SET"),
        "{}",
        out.stderr_str()
    );
}

#[test]
fn a_killed_workers_job_goes_back_to_the_queue_and_another_worker_finishes_it() {
    let grad = Grad::start_with(&["--job-lease", "1s"]);
    let mut first = grad.start_agent(&grad.admin_token, "w1", &[], &[]);
    let pids = tempfile::tempdir().unwrap();
    let pidfile = pids.path().join("attempt-1.pid");
    let dir = project(
        &format!(
            "name: survives\n\
             command: if [ \"$GRAD_JOB_ATTEMPT\" = 1 ]; then echo $$ > {}; echo first; sleep 60; else echo second; fi\n\
             retries: 1\n",
            pidfile.display()
        ),
        &[],
    );
    let id = submit_id(&grad, &grad.admin_token, dir.path());
    let running = wait_for_state(&grad, &grad.admin_token, &id, "running");
    assert_eq!(running["worker"], "w1");
    wait_until(
        "attempt 1 to start its command",
        Duration::from_secs(20),
        || pidfile.exists(),
    );
    // Killed only once its first line reached grad: a line the worker
    // never read cannot be kept.
    wait_until(
        "attempt 1's first line to reach grad",
        Duration::from_secs(20),
        || logs(&grad, &grad.admin_token, &id) == "first\n",
    );
    first.kill();
    // The orphaned command of the dead worker, as a dead machine would take it.
    let orphan: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    grad_tests::signal(orphan as u32, libc::SIGKILL);

    let requeued = wait_for_state(&grad, &grad.admin_token, &id, "queued");
    assert!(
        requeued["reason"]
            .as_str()
            .unwrap()
            .contains("attempt 1 lost: worker w1 stopped renewing its lease"),
        "{requeued}"
    );
    let _second = grad.start_agent(&grad.admin_token, "w2", &[], &[]);
    let (code, done) = wait(&grad, &grad.admin_token, &id);
    assert_eq!(code, 0, "{done}");
    assert_eq!(
        (done["attempt"].as_u64(), done["worker"].as_str()),
        (Some(2), Some("w2"))
    );
    let printed = logs(&grad, &grad.admin_token, &id);
    assert_eq!(
        printed, "first\nsecond\n",
        "the lost attempt's live lines were kept"
    );
}

#[test]
fn a_grad_restart_in_the_middle_of_a_job_loses_nothing() {
    let mut grad = Grad::start();
    let _worker = grad.start_agent(&grad.admin_token, "w1", &[], &[]);
    let dir = project(
        "name: long\ncommand: for i in $(seq 1 40); do echo line $i; sleep 0.05; done\n",
        &[],
    );
    let id = submit_id(&grad, &grad.admin_token, dir.path());
    wait_for_state(&grad, &grad.admin_token, &id, "running");
    // A `job wait` that started before the restart sees the job through.
    let waiting = grad
        .gractl(&grad.admin_token)
        .args(["job", "wait", &id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    grad.restart_status();
    let waited = waiting.wait_with_output().unwrap();
    assert!(waited.status.success(), "{}", waited.stderr_str());
    let (code, done) = wait(&grad, &grad.admin_token, &id);
    assert_eq!(code, 0, "{done}");
    let expected: String = (1..=40).map(|i| format!("line {i}\n")).collect();
    assert_eq!(logs(&grad, &grad.admin_token, &id), expected);
    assert_eq!(done["attempt"], 1, "the job ran once: {done}");
}

#[test]
fn cancel_stops_a_running_job_within_seconds_and_a_queued_one_at_once() {
    let grad = Grad::start();
    let _worker = grad.start_agent(&grad.admin_token, "w1", &[], &[]);
    let dir = project("name: sleeper\ncommand: echo started; sleep 60\n", &[]);
    let id = submit_id(&grad, &grad.admin_token, dir.path());
    wait_for_state(&grad, &grad.admin_token, &id, "running");
    let asked = Instant::now();
    let out = grad.run(&["job", "cancel", &id]);
    assert!(out.status.success(), "{}", out.stderr_str());
    let (code, done) = wait(&grad, &grad.admin_token, &id);
    assert_eq!(code, 9);
    assert_eq!(
        (done["state"].as_str(), done["reason"].as_str()),
        (Some("cancelled"), Some("cancelled by admin"))
    );
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );

    // Nobody can run this one (no worker has the label): cancelled at once.
    std::fs::write(
        dir.path().join("job.yaml"),
        "name: nowhere\ncommand: true\nlabels: { zone: mars }\n",
    )
    .unwrap();
    let id = submit_id(&grad, &grad.admin_token, dir.path());
    let cancelled = json(&grad.run(&["job", "cancel", &id, "-o", "json"]));
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
}

#[test]
fn a_timeout_fails_the_job() {
    let grad = Grad::start();
    let _worker = grad.start_agent(&grad.admin_token, "w1", &[], &[]);
    let dir = project("name: slow\ncommand: sleep 60\ntimeout: 1s\n", &[]);
    let id = submit_id(&grad, &grad.admin_token, dir.path());
    let (code, done) = wait(&grad, &grad.admin_token, &id);
    assert_eq!(code, 9);
    assert_eq!(
        (done["state"].as_str(), done["reason"].as_str()),
        (Some("failed"), Some("timed out after 1s"))
    );
}

/// A gzipped tar with one entry whose name is written raw.
fn hostile_bundle(name: &str) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o644);
    header.set_size(5);
    let raw = &mut header.as_old_mut().name;
    raw[..name.len()].copy_from_slice(name.as_bytes());
    header.set_cksum();
    let mut tar = tar::Builder::new(Vec::new());
    tar.append(&header, &b"evil\n"[..]).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar.into_inner().unwrap()).unwrap();
    gz.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bundle_that_reaches_out_of_its_directory_is_refused() {
    let grad = Grad::start();
    let worker = grad.start_agent(&grad.admin_token, "w1", &[], &[]);
    let bytes = hostile_bundle("../../escaped.txt");
    let sha256 = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    let client = grad.admin().await;
    let upload = client
        .create_upload(&sha256, bytes.len() as u64)
        .await
        .unwrap()
        .expect("a new bundle needs an upload");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &bytes).unwrap();
    grad_transfer::Client::new()
        .unwrap()
        .put_file(&upload, file.path(), 0, bytes.len() as u64, None)
        .await
        .unwrap();
    let spec = grad_proto::JobSpec {
        name: "zip-slip".into(),
        command: "true".into(),
        ..Default::default()
    };
    let submitted = client.submit_job(spec, &sha256).await.unwrap();
    let done = client
        .wait_job(&submitted.id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done.state(), grad_proto::JobState::Failed, "{done:?}");
    assert!(
        done.reason.contains("the bundle was refused") && done.reason.contains("'..'"),
        "{}",
        done.reason
    );
    assert_eq!(done.attempt, 1, "a refused bundle is not retried");
    let escaped = files_containing(worker.dir.path(), b"evil");
    assert_eq!(escaped, Vec::<PathBuf>::new());
    assert!(!worker.dir.path().join("escaped.txt").exists());
}

#[test]
fn a_malformed_job_yaml_is_a_clear_error_and_queues_nothing() {
    let grad = Grad::start();
    let dir = project("name: train\ncommand: python train.py\nretrys: 2\n", &[]);
    let out = grad.run(&["job", "submit", dir.path().to_str().unwrap()]);
    assert_eq!(out.code(), 2, "{}", out.stderr_str());
    let said = out.stderr_str();
    assert!(
        said.contains("job.yaml: line 3: unknown field `retrys`"),
        "{said}"
    );
    let listed = json(&grad.run(&["job", "list", "-o", "json"]));
    assert_eq!(listed["jobs"], serde_json::json!([]));
    let out = grad.run(&["job", "submit", "/no/such/dir"]);
    assert_eq!(out.code(), 2, "{}", out.stderr_str());
}

#[test]
fn gpu_jobs_need_the_pro_plan() {
    let grad = Grad::start();
    let free = grad.add_user("carol", &["--plan", "free"]);
    let dir = project("name: gpu\ncommand: nvidia-smi\ngpu: true\n", &[]);
    let out = grad
        .gractl(&free)
        .args(["job", "submit", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.code(), 3, "{}", out.stderr_str());
    assert!(
        out.stderr_str()
            .contains("GPU jobs need the pro plan; your plan is free"),
        "{}",
        out.stderr_str()
    );
    // An admin moves carol to pro: her token, unchanged, may now ask for GPUs.
    let moved = grad
        .admin_command(&["user", "plan", "carol", "pro"])
        .output()
        .unwrap();
    assert!(moved.status.success(), "{}", moved.stderr_str());
    let out = grad
        .gractl(&free)
        .args(["job", "submit", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", out.stderr_str());
}

#[test]
fn workers_run_only_their_owners_jobs_and_jobs_are_private() {
    let grad = Grad::start();
    let alice = grad.add_user("alice", &[]);
    let bob = grad.add_user("bob", &[]);
    let _alices_worker = grad.start_agent(&alice, "alice-w", &[], &[]);
    let dir = project("name: bobs\ncommand: echo bob\n", &[]);
    let id = submit_id(&grad, &bob, dir.path());
    // Alice's worker is idle and polling, yet bob's job stays queued.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(job(&grad, &bob, &id)["state"], "queued");
    let out = grad
        .gractl(&alice)
        .args(["job", "get", &id])
        .output()
        .unwrap();
    assert_eq!(out.code(), 4, "{}", out.stderr_str());
    let out = grad
        .gractl(&alice)
        .args(["job", "cancel", &id])
        .output()
        .unwrap();
    assert_eq!(out.code(), 4, "{}", out.stderr_str());
    // Bob's own worker takes it.
    let _bobs_worker = grad.start_agent(&bob, "bob-w", &[], &[]);
    let (code, done) = wait(&grad, &bob, &id);
    assert_eq!((code, done["worker"].as_str()), (0, Some("bob-w")));
    // Only admins make shared workers.
    let out = grad
        .gractl(&alice)
        .args(["worker", "create", "pool", "--shared"])
        .output()
        .unwrap();
    assert_eq!(out.code(), 3, "{}", out.stderr_str());
}

#[test]
fn logs_follow_the_job_live() {
    let grad = Grad::start();
    let _worker = grad.start_agent(&grad.admin_token, "w1", &[], &[]);
    let dir = project(
        "name: live\ncommand: echo first; sleep 3; echo second\n",
        &[],
    );
    let id = submit_id(&grad, &grad.admin_token, dir.path());
    let mut follow = grad
        .gractl(&grad.admin_token)
        .args(["job", "logs", "-f", &id])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follow.stdout.take().unwrap()).lines();
    let started = Instant::now();
    assert_eq!(lines.next().unwrap().unwrap(), "first");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "the first line came only at the end: {:?}",
        started.elapsed()
    );
    assert_eq!(lines.next().unwrap().unwrap(), "second");
    assert!(lines.next().is_none());
    assert!(follow.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn several_workers_never_run_the_same_attempt() {
    let grad = Grad::start();
    let _workers: Vec<_> = (1..=3)
        .map(|i| grad.start_agent(&grad.admin_token, &format!("w{i}"), &[], &[]))
        .collect();
    let ran = tempfile::tempdir().unwrap();
    let record = ran.path().join("ran.txt");
    let dir = project(
        &format!(
            "name: many\ncommand: echo \"$GRAD_JOB_ID $GRAD_JOB_ATTEMPT\" >> {}\n",
            record.display()
        ),
        &[],
    );
    let client = grad.admin().await;
    let mut ids = Vec::new();
    for _ in 0..30 {
        ids.push(submit_id(&grad, &grad.admin_token, dir.path()));
    }
    for id in &ids {
        let done = client.wait_job(id, Duration::from_secs(60)).await.unwrap();
        assert_eq!(done.state(), grad_proto::JobState::Succeeded, "{done:?}");
    }
    let text = std::fs::read_to_string(&record).unwrap();
    let mut runs: Vec<&str> = text.lines().collect();
    runs.sort();
    let mut expected: Vec<String> = ids.iter().map(|id| format!("{id} 1")).collect();
    expected.sort();
    assert_eq!(runs, expected, "a job ran twice or not at all");
}

/// Jobs with an image, on a real Docker engine (a private dockerd with a
/// locally built busybox image): the job's directory mounted as the working
/// directory, limits applied, secrets sourced from a tmpfs file (never in
/// the container's configuration or the engine's disk), GPUs as NVIDIA
/// device requests, the container gone afterwards, and cancel stopping it.
#[test]
fn docker_jobs_run_in_ephemeral_containers_with_gpu_device_requests() {
    const SECRET: &str = "docker-secret-5a69c2e1b4d7f3a9";
    let Some(engine) = grad_tests::DockerEngine::start() else {
        return;
    };
    let grad = Grad::start();
    let _worker = grad.start_agent_with_env(
        &grad.admin_token,
        "dw",
        &[],
        &["--gpus", "2"],
        &[("DOCKER_HOST", &engine.host)],
    );
    let set = grad.run_with_input(
        &grad.admin_token,
        &["secret", "set", "TOKEN"],
        SECRET.as_bytes(),
    );
    assert!(set.status.success(), "{}", set.stderr_str());
    let dir = project(
        &format!(
            "name: in-docker\n\
             image: {}\n\
             command: pwd; cat data.txt; echo \"token=$TOKEN\"; printf %s \"$TOKEN\" | sha256sum; \
             echo \"gpus=$NVIDIA_VISIBLE_DEVICES\"; \
             cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes; \
             cat /sys/fs/cgroup/cpu.max 2>/dev/null || cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us; \
             echo \"lr=$LR\"\n\
             gpus: 2\n\
             env: {{ LR: \"0.01\" }}\n\
             secrets: [TOKEN]\n\
             resources: {{ cpu: 1, memory: 256Mi }}\n",
            grad_tests::DockerEngine::IMAGE
        ),
        &[("data.txt", "from the bundle\n")],
    );
    let id = submit_id(&grad, &grad.admin_token, dir.path());
    let (code, done) = wait(&grad, &grad.admin_token, &id);
    assert_eq!(code, 0, "{done}");
    let printed = logs(&grad, &grad.admin_token, &id);
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(SECRET.as_bytes()))
    };
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines[0], "/job", "{printed}");
    assert_eq!(lines[1], "from the bundle");
    assert_eq!(lines[2], "token=***");
    assert!(
        lines[3].starts_with(&digest),
        "the container lacked the secret: {printed}"
    );
    assert_eq!(lines[4], "gpus=0,1", "the GPU device request: {printed}");
    assert_eq!(
        lines[5],
        (256u64 << 20).to_string(),
        "the memory limit: {printed}"
    );
    assert!(lines[6].starts_with("100000"), "one CPU's quota: {printed}");
    assert_eq!(lines[7], "lr=0.01");
    let containers = engine.docker(&["ps", "-a", "-q"]);
    assert_eq!(
        containers.stdout_str().trim(),
        "",
        "a container was left behind"
    );
    assert_eq!(
        files_containing(engine.dir.path(), SECRET.as_bytes()),
        Vec::<PathBuf>::new(),
        "the secret reached the engine's disk"
    );

    // A missing image is a clear failure; a running container is cancelled.
    std::fs::write(
        dir.path().join("job.yaml"),
        "name: no-image\nimage: not-here:1\ncommand: true\n",
    )
    .unwrap();
    let id = submit_id(&grad, &grad.admin_token, dir.path());
    let (code, done) = wait(&grad, &grad.admin_token, &id);
    assert_eq!(code, 9);
    assert!(
        done["reason"]
            .as_str()
            .unwrap()
            .contains("image not-here:1 is not on this worker and could not be pulled"),
        "{done}"
    );
    std::fs::write(
        dir.path().join("job.yaml"),
        format!(
            "name: sleeps\nimage: {}\ncommand: echo up; sleep 60\n",
            grad_tests::DockerEngine::IMAGE
        ),
    )
    .unwrap();
    let id = submit_id(&grad, &grad.admin_token, dir.path());
    wait_for_state(&grad, &grad.admin_token, &id, "running");
    wait_until("the container to run", Duration::from_secs(20), || {
        !engine.docker(&["ps", "-q"]).stdout_str().trim().is_empty()
    });
    let asked = Instant::now();
    assert!(grad.run(&["job", "cancel", &id]).status.success());
    let (code, done) = wait(&grad, &grad.admin_token, &id);
    assert_eq!(
        (code, done["state"].as_str()),
        (9, Some("cancelled")),
        "{done}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(engine.docker(&["ps", "-a", "-q"]).stdout_str().trim(), "");
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_no_worker_can_run_do_not_hide_the_ones_behind_them() {
    let grad = Grad::start();
    let _worker = grad.start_agent(&grad.admin_token, "w1", &[], &[]);
    let dir = project("name: stuck\ncommand: true\nlabels: { zone: mars }\n", &[]);
    let first = submit(&grad, &grad.admin_token, dir.path());
    let bundle = first["job"]["bundle_sha256"].as_str().unwrap().to_owned();
    let client = grad.admin().await;
    let stuck = grad_proto::JobSpec {
        name: "stuck".into(),
        command: "true".into(),
        labels: [("zone".to_owned(), "mars".to_owned())].into(),
        ..Default::default()
    };
    // More than one page of the claim's scan.
    for _ in 0..150 {
        client.submit_job(stuck.clone(), &bundle).await.unwrap();
    }
    let runnable = grad_proto::JobSpec {
        name: "runs".into(),
        command: "true".into(),
        ..Default::default()
    };
    let job = client.submit_job(runnable, &bundle).await.unwrap();
    let done = client
        .wait_job(&job.id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done.state(), grad_proto::JobState::Succeeded, "{done:?}");
}

#[test]
fn a_jobs_outputs_are_collected_when_it_ends_and_pulled() {
    let grad = Grad::start();
    let _worker = grad.start_agent(&grad.admin_token, "w1", &[], &[]);
    let dir = project(
        "name: makes-things\n\
         command: mkdir -p results/plots; echo 'a,b' > results/table.csv; \
         head -c 100000 /dev/urandom > results/plots/p.bin; sha256sum results/plots/p.bin\n\
         outputs: results/\n",
        &[],
    );
    let id = submit_id(&grad, &grad.admin_token, dir.path());
    let (code, done) = wait(&grad, &grad.admin_token, &id);
    assert_eq!(code, 0, "{done}");
    let tmp = tempfile::tempdir().unwrap();
    let out = grad
        .gractl(&grad.admin_token)
        .args([
            "job",
            "outputs",
            &id,
            tmp.path().to_str().unwrap(),
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", out.stderr_str());
    let pulled = json(&out);
    assert_eq!(
        pulled["downloaded"],
        serde_json::json!(["plots/p.bin", "table.csv"]),
        "{pulled}"
    );
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("table.csv")).unwrap(),
        "a,b\n"
    );
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(
            std::fs::read(tmp.path().join("plots/p.bin")).unwrap(),
        ))
    };
    assert!(
        logs(&grad, &grad.admin_token, &id).starts_with(&digest),
        "the pulled file differs from the one the job wrote"
    );
    // Job outputs are not runners' outputs.
    let listed = json(&grad.run(&["outputs", "list", "-o", "json"]));
    assert_eq!(listed["outputs"], serde_json::json!([]), "{listed}");

    // An outputs directory that is a link out of the job is not followed.
    std::fs::write(
        dir.path().join("job.yaml"),
        "name: links-out\ncommand: ln -s /etc results\noutputs: results/\n",
    )
    .unwrap();
    let id = submit_id(&grad, &grad.admin_token, dir.path());
    let (code, done) = wait(&grad, &grad.admin_token, &id);
    assert_eq!(code, 9, "{done}");
    assert!(
        done["reason"]
            .as_str()
            .unwrap()
            .contains("outputs: results is a symbolic link"),
        "{done}"
    );
    let out = grad
        .gractl(&grad.admin_token)
        .args([
            "job",
            "outputs",
            &id,
            tmp.path().join("etc").to_str().unwrap(),
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    assert_eq!(json(&out)["downloaded"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn runners_run_their_owners_jobs_and_the_jobs_that_name_them() {
    let grad = Grad::with_runners(&["r1"]).await;
    let dir = project("name: anywhere\ncommand: echo \"on $GRAD_JOB_ID\"\n", &[]);
    // No standing worker: the owner's runner takes it.
    let id = submit_id(&grad, &grad.admin_token, dir.path());
    let (code, done) = wait(&grad, &grad.admin_token, &id);
    assert_eq!(
        (code, done["worker"].as_str()),
        (0, Some("runner/r1")),
        "{done}"
    );
    assert_eq!(logs(&grad, &grad.admin_token, &id), format!("on {id}\n"));

    // A job that names r1 goes to r1, not to a standing worker.
    let _worker = grad.start_agent(&grad.admin_token, "w1", &[], &[]);
    std::fs::write(
        dir.path().join("job.yaml"),
        "name: on-r1\ncommand: true\nrunner: r1\n",
    )
    .unwrap();
    for _ in 0..3 {
        let id = submit_id(&grad, &grad.admin_token, dir.path());
        let (code, done) = wait(&grad, &grad.admin_token, &id);
        assert_eq!(
            (code, done["worker"].as_str()),
            (0, Some("runner/r1")),
            "{done}"
        );
    }
    let out = grad.run(&[
        "job",
        "submit",
        dir.path().to_str().unwrap(),
        "--runner",
        "nope",
    ]);
    assert_eq!(out.code(), 4, "{}", out.stderr_str());
    assert!(
        out.stderr_str().contains("you have no runner 'nope'"),
        "{}",
        out.stderr_str()
    );
}

#[test]
fn a_follower_resumes_after_grad_restarts_and_misses_nothing() {
    let mut grad = Grad::start();
    let _worker = grad.start_agent(&grad.admin_token, "w1", &[], &[]);
    let dir = project(
        "name: chatty\ncommand: for i in $(seq 1 60); do echo line $i; sleep 0.05; done\n",
        &[],
    );
    let id = submit_id(&grad, &grad.admin_token, dir.path());
    let follow = grad
        .gractl(&grad.admin_token)
        .args(["job", "logs", "-f", &id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_state(&grad, &grad.admin_token, &id, "running");
    std::thread::sleep(Duration::from_millis(800));
    grad.restart_status();
    let out = follow.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", out.stderr_str());
    let expected: String = (1..=60).map(|i| format!("line {i}\n")).collect();
    assert_eq!(
        out.stdout_str(),
        expected,
        "lines lost or repeated across the restart"
    );
}

//! Datasets end to end: a parquet file uploaded to a real S3-compatible
//! server (`s3s-fs`, by presigned PUT), a runner created with the bucket as a
//! dataset, grad-runner mounting it read-only with the real `s3fs`, and DuckDB
//! in the runner's Python reading it through the mount. Wrong credentials
//! leave the runner up with s3fs's reason on its status; the mount comes back
//! after pause and resume, and its keys file lives only while it is mounted.
#![allow(clippy::unwrap_used)]

use std::{os::unix::fs::PermissionsExt, path::Path, process::Command, time::Duration};

use grad::blobs::{BlobStore, Key, S3Store, Sha256, s3};
use grad_proto::{
    CreateRunnerRequest, Dataset, GetRunnerRequest, Runner, RunnerState, S3Credentials,
    runners_client::RunnersClient,
};
use grad_tests::{Grad, S3Server, python, python_has, require};
use tonic::{Request, transport::Channel};

const BUCKET: &str = "trips";

fn prerequisites() -> bool {
    let s3fs = Command::new("s3fs").arg("--version").output().is_ok();
    require("s3fs (apt-get install s3fs)", s3fs)
        && require("/dev/fuse (FUSE) for s3fs", Path::new("/dev/fuse").exists())
        && require("DuckDB for the runner's Python", python_has("duckdb"))
}

fn dataset(server: &S3Server, name: &str, secret: &str) -> Dataset {
    Dataset {
        name: name.into(),
        bucket: BUCKET.into(),
        prefix: String::new(),
        endpoint: server.endpoint.clone(),
        region: "us-east-1".into(),
        path_style: true,
        credentials: Some(S3Credentials {
            access_key_id: S3Server::ACCESS_KEY.into(),
            secret_access_key: secret.into(),
        }),
        credentials_secret: String::new(),
    }
}

async fn runners(grad: &Grad) -> RunnersClient<Channel> {
    let channel = Channel::from_shared(grad.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    RunnersClient::new(channel)
}

fn authorized<T>(grad: &Grad, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", grad.admin_token).parse().unwrap(),
    );
    request
}

/// Creates runner `name` with `dataset` and waits until the runner has
/// tried to mount it.
async fn create_and_wait(grad: &Grad, name: &str, dataset: Dataset) -> Runner {
    runners(grad)
        .await
        .create_runner(authorized(
            grad,
            CreateRunnerRequest {
                name: name.into(),
                resources: None,
                datasets: vec![dataset],
            },
        ))
        .await
        .unwrap();
    wait_for(grad, name, "the mount attempt", |r| {
        r.datasets
            .first()
            .is_some_and(|d| d.mounted || !d.error.is_empty())
    })
    .await
}

/// Polls the runner until `done` holds for it (30 s at most).
async fn wait_for(grad: &Grad, name: &str, what: &str, done: impl Fn(&Runner) -> bool) -> Runner {
    let mut client = runners(grad).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let runner = client
            .get_runner(authorized(grad, GetRunnerRequest { name: name.into() }))
            .await
            .unwrap()
            .into_inner();
        if done(&runner) {
            return runner;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} never happened: {runner:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes a parquet file of 1000 rows with DuckDB and uploads it to the
/// bucket through a presigned URL.
async fn upload_parquet(server: &S3Server, dir: &Path) {
    let file = dir.join("trips.parquet");
    let made = Command::new(python())
        .arg("-c")
        .arg(format!(
            "import duckdb; duckdb.sql(\"COPY (SELECT i AS id, i * 2 AS fare FROM range(1000) t(i)) TO '{}' (FORMAT parquet)\")",
            file.display()
        ))
        .status()
        .unwrap();
    assert!(made.success(), "writing parquet with DuckDB failed");
    let bytes = std::fs::read(&file).unwrap();
    let store = S3Store::new(&s3::Settings {
        bucket: BUCKET.into(),
        prefix: String::new(),
        endpoint: Some(server.endpoint.clone()),
        region: Some("us-east-1".into()),
        path_style: true,
        credentials: Some(s3::Credentials {
            access_key_id: S3Server::ACCESS_KEY.into(),
            secret_access_key: S3Server::SECRET_KEY.into(),
        }),
        anonymous: false,
    })
    .await
    .unwrap();
    let key = Key::new("trips.parquet").unwrap();
    let put = store
        .presign_put(&key, Sha256::of(&bytes), Duration::from_secs(60))
        .await
        .unwrap();
    let mut curl = Command::new("curl");
    curl.args(["-sSf", "-X", "PUT", "--data-binary"])
        .arg(format!("@{}", file.display()));
    for (name, value) in &put.headers {
        curl.arg("-H").arg(format!("{name}: {value}"));
    }
    assert!(
        curl.arg(&put.url).status().unwrap().success(),
        "upload failed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dataset_is_mounted_read_only_and_duckdb_reads_it() {
    if !prerequisites() {
        return;
    }
    let Some(server) = S3Server::start(BUCKET) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    upload_parquet(&server, tmp.path()).await;
    let grad = Grad::start();
    let runner = create_and_wait(&grad, "r1", dataset(&server, "taxi", S3Server::SECRET_KEY)).await;
    let status = &runner.datasets[0];
    assert!(status.mounted, "not mounted: {}", status.error);
    assert_eq!(status.source, "s3://trips/");

    let out = grad.run(&[
        "execute-code",
        "-r",
        "r1",
        "--code",
        "import duckdb\nprint(duckdb.sql(\"SELECT count(*), sum(fare) FROM '../data/taxi/trips.parquet'\").fetchall())",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("[(1000, 999000)]"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Read-only.
    let out = grad.run(&[
        "execute-code",
        "-r",
        "r1",
        "--code",
        "open('../data/taxi/new.txt', 'w').write('x')",
    ]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() && said.contains("Read-only file system"),
        "{said}"
    );
    // The keys live in a 0600 file outside the workspace while mounted.
    let passwd = grad.data_dir.join("runners/admin/r1/s3fs/taxi.passwd");
    let mode = std::fs::metadata(&passwd).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // Paused: unmounted, keys gone. Resumed: mounted again.
    assert!(
        grad.run(&["runner", "pause", "r1", "--wait"])
            .status
            .success()
    );
    assert!(!passwd.exists(), "the keys file outlived the mount");
    assert!(
        grad.run(&["runner", "resume", "r1", "--wait"])
            .status
            .success()
    );
    wait_for(&grad, "r1", "the mount after resume", |r| {
        r.state == RunnerState::Ready as i32 && r.datasets.first().is_some_and(|d| d.mounted)
    })
    .await;
    let out = grad.run(&[
        "execute-code",
        "-r",
        "r1",
        "--code",
        "import os\nprint(sorted(os.listdir('../data/taxi')))",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("['trips.parquet']"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Killed outright, s3fs with it: the dead mount is cleared and the
    // dataset mounted again when the runner is resumed.
    for pid in processes_under(&grad.data_dir) {
        grad_tests::signal(pid, libc::SIGKILL);
    }
    wait_for(&grad, "r1", "the runner's failure", |r| {
        r.state == RunnerState::Failed as i32
    })
    .await;
    assert!(
        grad.run(&["runner", "resume", "r1", "--wait"])
            .status
            .success()
    );
    wait_for(&grad, "r1", "the mount after a kill", |r| {
        r.state == RunnerState::Ready as i32 && r.datasets.first().is_some_and(|d| d.mounted)
    })
    .await;
    let out = grad.run(&[
        "execute-code",
        "-r",
        "r1",
        "--code",
        "import os\nprint(sorted(os.listdir('../data/taxi')))",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("['trips.parquet']"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        grad.run(&["runner", "delete", "r1", "--wait"])
            .status
            .success()
    );
}

/// `gractl ARGS` in workspace `ws` as the admin, with the test server's
/// keys (and a wrong secret key) in environment variables.
fn in_workspace(grad: &Grad, ws: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = grad
        .gractl(&grad.admin_token)
        .arg("--workspace")
        .arg(ws)
        .args(args)
        .env("TAXI_AK", S3Server::ACCESS_KEY)
        .env("TAXI_SK", S3Server::SECRET_KEY)
        .env("WRONG_SK", "not-the-secret")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The runners and s3fs processes working below `dir`.
fn processes_under(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let cmdline = String::from_utf8_lossy(&c).into_owned();
                let program = cmdline.split('\0').next().unwrap_or_default().to_owned();
                (program.ends_with("grad-runner") || program.ends_with("s3fs"))
                    && cmdline.contains(&needle)
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_credentials_are_reported_on_the_runner_with_s3fs_reason() {
    if !prerequisites() {
        return;
    }
    let Some(server) = S3Server::start(BUCKET) else {
        return;
    };
    let grad = Grad::start();
    let mut client = runners(&grad).await;
    let runner = create_and_wait(&grad, "r2", dataset(&server, "taxi", "wrong-secret")).await;
    let status = &runner.datasets[0];
    assert!(!status.mounted);
    assert!(
        status.error.starts_with("s3fs exited")
            && status.error.contains("invalid credentials")
            && status.error.contains("SignatureDoesNotMatch"),
        "{}",
        status.error
    );
    // The runner itself is fine, and no keys file is left.
    assert_eq!(runner.state, RunnerState::Ready as i32);
    assert!(
        !grad
            .data_dir
            .join("runners/admin/r2/s3fs/taxi.passwd")
            .exists()
    );
    // A bad dataset is refused at creation, naming the field.
    let mut bad = dataset(&server, "taxi", "x");
    bad.bucket = "No_Such".into();
    let err = client
        .create_runner(authorized(
            &grad,
            CreateRunnerRequest {
                name: "r3".into(),
                resources: None,
                datasets: vec![bad],
            },
        ))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("bucket 'No_Such'"),
        "{}",
        err.message()
    );
}

/// The issue's user flow through gractl: `dataset add` writes the YAML (key
/// variable names, not keys), `runner create --dataset` reads the keys from
/// the environment, `runner get` shows the mount.
#[tokio::test(flavor = "multi_thread")]
async fn gractl_adds_a_dataset_and_creates_a_runner_with_it() {
    if !prerequisites() {
        return;
    }
    let Some(server) = S3Server::start(BUCKET) else {
        return;
    };
    let grad = Grad::start();
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path().join("ws");
    let gractl = |args: &[&str]| in_workspace(&grad, &ws, args);
    let init = grad
        .gractl(&grad.admin_token)
        .args(["workspace", "init"])
        .arg(&ws)
        .output()
        .unwrap();
    assert!(init.status.success());
    let (code, _, err) = gractl(&[
        "dataset",
        "add",
        "taxi",
        "--bucket",
        BUCKET,
        "--endpoint",
        &server.endpoint,
        "--region",
        "us-east-1",
        "--env-access-key-id",
        "TAXI_AK",
        "--env-secret-access-key",
        "TAXI_SK",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let yaml = std::fs::read_to_string(ws.join("datasets/taxi.yaml")).unwrap();
    assert!(yaml.contains("access_key_id: TAXI_AK"), "{yaml}");
    assert!(
        !yaml.contains(S3Server::SECRET_KEY),
        "a key was written: {yaml}"
    );
    let (_, list, _) = gractl(&["dataset", "list"]);
    assert!(
        list.contains("taxi") && list.contains("s3://trips/") && list.contains("env"),
        "{list}"
    );

    let (code, _, err) = gractl(&["runner", "create", "r1", "--dataset", "taxi", "--wait"]);
    assert_eq!(code, Some(0), "{err}");
    wait_for(&grad, "r1", "the dataset mount", |r| {
        r.datasets.first().is_some_and(|d| d.mounted)
    })
    .await;
    let (_, shown, _) = gractl(&["runner", "get", "r1"]);
    assert!(
        shown.contains("taxi: s3://trips/ mounted at data/taxi"),
        "{shown}"
    );

    // The same bucket with its keys in a grad secret.
    let keys = format!("{}:{}", S3Server::ACCESS_KEY, S3Server::SECRET_KEY);
    let set = grad.run_with_input(
        &grad.admin_token,
        &["secret", "set", "trips-keys"],
        keys.as_bytes(),
    );
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let (code, _, err) = gractl(&[
        "dataset",
        "add",
        "sealed",
        "--bucket",
        BUCKET,
        "--endpoint",
        &server.endpoint,
        "--secret",
        "trips-keys",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let yaml = std::fs::read_to_string(ws.join("datasets/sealed.yaml")).unwrap();
    assert!(yaml.contains("secret: trips-keys"), "{yaml}");
    let (code, _, err) = gractl(&["runner", "create", "r3", "--dataset", "sealed", "--wait"]);
    assert_eq!(code, Some(0), "{err}");
    wait_for(&grad, "r3", "the mount with keys from a secret", |r| {
        r.datasets
            .first()
            .is_some_and(|d| d.mounted || !d.error.is_empty())
    })
    .await;
    let (_, shown, _) = gractl(&["runner", "get", "r3"]);
    assert!(
        shown.contains("sealed: s3://trips/ mounted at data/sealed"),
        "{shown}"
    );

    // An unknown dataset lists the known ones and creates nothing.
    let (code, _, err) = gractl(&["runner", "create", "r2", "--dataset", "nope"]);
    assert_eq!(code, Some(4), "{err}");
    assert!(
        err.contains("no dataset 'nope'") && err.contains("known: sealed, taxi"),
        "{err}"
    );
    let (_, list, _) = gractl(&["runner", "list"]);
    assert!(!list.contains("r2"), "{list}");
    // A broken file names itself, the line and the field.
    std::fs::write(
        ws.join("datasets/bad.yaml"),
        "name: bad\ns3:\n  bukket: x\n",
    )
    .unwrap();
    let (code, _, err) = gractl(&["dataset", "show", "bad"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("bad.yaml: line 3: s3: unknown field `bukket`"),
        "{err}"
    );
    let (code, _, _) = gractl(&["dataset", "remove", "taxi"]);
    assert_eq!(code, Some(0));
    assert!(!ws.join("datasets/taxi.yaml").exists());
}

/// `gractl dataset test`: grad lists the bucket with the dataset's own keys
/// and says why it cannot, with the exit code of the failure's class.
#[tokio::test(flavor = "multi_thread")]
async fn dataset_test_tells_good_keys_from_wrong_ones_and_missing_buckets() {
    let Some(server) = S3Server::start(BUCKET) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    upload_parquet(&server, tmp.path()).await;
    let grad = Grad::start();
    let ws = tmp.path().join("ws");
    let gractl = |args: &[&str]| in_workspace(&grad, &ws, args);
    assert_eq!(
        gractl(&["workspace", "init", ws.to_str().unwrap()]).0,
        Some(0)
    );
    let add = |name: &str, bucket: &str, endpoint: &str, secret_var: &str| {
        let (code, _, err) = gractl(&[
            "dataset",
            "add",
            name,
            "--bucket",
            bucket,
            "--endpoint",
            endpoint,
            "--env-access-key-id",
            "TAXI_AK",
            "--env-secret-access-key",
            secret_var,
        ]);
        assert_eq!(code, Some(0), "{err}");
    };
    add("good", BUCKET, &server.endpoint, "TAXI_SK");
    add("wrong", BUCKET, &server.endpoint, "WRONG_SK");
    add("missing", "no-such-bucket", &server.endpoint, "TAXI_SK");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    add("nowhere", BUCKET, &nowhere, "TAXI_SK");

    let (code, out, err) = gractl(&["dataset", "test", "good"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out,
        "dataset/good ok: s3://trips/ lists 1 object: trips.parquet\n"
    );
    let (code, out, _) = gractl(&["dataset", "test", "good", "-o", "json"]);
    assert_eq!(code, Some(0));
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["sample"], serde_json::json!(["trips.parquet"]));

    let (code, _, err) = gractl(&["dataset", "test", "wrong"]);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("grad cannot list s3://trips/") && err.contains("SignatureDoesNotMatch"),
        "{err}"
    );
    assert!(
        !err.contains("not-the-secret"),
        "the key was printed: {err}"
    );
    let (code, _, err) = gractl(&["dataset", "test", "missing"]);
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("NoSuchBucket"), "{err}");
    let (code, _, err) = gractl(&["dataset", "test", "nowhere"]);
    assert_eq!(code, Some(6), "{err}");
    assert!(err.contains("Unreachable"), "{err}");

    // Keys in a grad secret: named in the file, read by grad.
    let (code, _, err) = gractl(&[
        "dataset",
        "add",
        "sealed",
        "--bucket",
        BUCKET,
        "--endpoint",
        &server.endpoint,
        "--secret",
        "trips-keys",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = gractl(&["dataset", "test", "sealed"]);
    assert_eq!(code, Some(5), "{err}");
    assert!(
        err.contains("credentials.secret 'trips-keys': you have no such secret")
            && err.contains("gractl secret set trips-keys"),
        "{err}"
    );
    let set_secret = |value: &str| {
        let set = grad.run_with_input(
            &grad.admin_token,
            &["secret", "set", "trips-keys"],
            value.as_bytes(),
        );
        assert!(set.status.success());
    };
    set_secret("no colon here");
    let (code, _, err) = gractl(&["dataset", "test", "sealed"]);
    assert_eq!(code, Some(5), "{err}");
    assert!(
        err.contains("must hold ACCESS_KEY_ID:SECRET_ACCESS_KEY"),
        "{err}"
    );
    set_secret(&format!(
        "{}:{}\n",
        S3Server::ACCESS_KEY,
        S3Server::SECRET_KEY
    ));
    let (code, out, err) = gractl(&["dataset", "test", "sealed"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("trips.parquet"), "{out}");
}

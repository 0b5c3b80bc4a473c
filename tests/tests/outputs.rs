//! Outputs end to end: runners write files to outputs/ with execute-code,
//! grad-runner collects them into the blob store (grad's embedded store on
//! its own port, or a real S3-compatible server, `s3s-fs`, in parts for
//! large files), and `gractl outputs pull` downloads them by presigned URL,
//! checking every SHA-256. Only changed content moves; pause and delete
//! collect first; a deleted runner's outputs stay until removed; other
//! users reach none of it.
#![allow(clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    process::Output,
};

use grad_proto::{OutputManifest, runner_agent_client::RunnerAgentClient};
use grad_tests::{Grad, OutputExt, S3Server};
use serde_json::Value;
use tonic::{Request, transport::Channel};

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "exit {}: {}{}",
        out.code(),
        out.stdout_str(),
        out.stderr_str()
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("not one JSON document ({e}): {}", out.stdout_str());
    })
}

/// Runs Python on the admin's runner `runner`; it must succeed.
fn python(grad: &Grad, runner: &str, code: &str) {
    let out = grad.run(&["execute-code", "-r", runner, "--code", code]);
    assert!(
        out.status.success(),
        "{}{}",
        out.stdout_str(),
        out.stderr_str()
    );
}

fn create(grad: &Grad, token: &str, name: &str) {
    let out = grad
        .gractl(token)
        .args(["runner", "create", name, "--wait"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", out.stderr_str());
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

fn pull(grad: &Grad, runner: &str, dir: &Path) -> Value {
    json(&grad.run(&[
        "outputs",
        "pull",
        runner,
        dir.to_str().unwrap(),
        "-o",
        "json",
    ]))
}

fn same_bytes(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert!(x == y, "{} and {} differ", a.display(), b.display());
}

/// The objects the embedded store holds.
fn objects(grad: &Grad) -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_type().unwrap().is_dir() {
                walk(&entry.path(), found);
            } else {
                found.push(entry.path());
            }
        }
    }
    let mut found = Vec::new();
    walk(&grad.data_dir.join("blobs/objects"), &mut found);
    found
}

#[test]
fn outputs_are_pulled_and_afterwards_only_changed_content_moves() {
    let grad = Grad::start();
    create(&grad, &grad.admin_token, "r1");
    python(
        &grad,
        "r1",
        "import os\n\
         os.makedirs('../outputs/plots', exist_ok=True)\n\
         open('../outputs/report.csv', 'w').write('a,b\\n1,2\\n')\n\
         open('../outputs/plots/a.bin', 'wb').write(os.urandom(1 << 20))\n\
         os.symlink('/etc/passwd', '../outputs/link')",
    );
    let workspace = grad.workspace("admin", "r1").join("outputs");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pulled");

    let first = pull(&grad, "r1", &dir);
    assert_eq!(first["collected_now"], true);
    assert_eq!(strings(&first["downloaded"]), ["plots/a.bin", "report.csv"]);
    assert_eq!(first["downloaded_bytes"], (1 << 20) + 8);
    same_bytes(&workspace.join("plots/a.bin"), &dir.join("plots/a.bin"));
    same_bytes(&workspace.join("report.csv"), &dir.join("report.csv"));
    assert!(!dir.join("link").exists(), "a symbolic link was followed");
    assert_eq!(objects(&grad).len(), 2);

    // Nothing changed: nothing uploaded, nothing downloaded.
    let collected = json(&grad.run(&["outputs", "collect", "r1", "-o", "json"]));
    assert_eq!(collected["uploaded_files"], 0);
    assert!(
        strings(&collected["skipped"]).contains(&"link: a symbolic link (not followed)".into()),
        "{collected}"
    );
    let again = pull(&grad, "r1", &dir);
    assert_eq!(strings(&again["downloaded"]), Vec::<String>::new());
    assert_eq!(strings(&again["unchanged"]), ["plots/a.bin", "report.csv"]);

    // One file changed, one copied: only the new content goes up (a copy
    // is content the store already has), and the old content is freed.
    python(
        &grad,
        "r1",
        "import shutil\n\
         open('../outputs/report.csv', 'w').write('a,b\\n3,4\\n5,6\\n')\n\
         shutil.copy('../outputs/plots/a.bin', '../outputs/plots/b.bin')",
    );
    let collected = json(&grad.run(&["outputs", "collect", "r1", "-o", "json"]));
    assert_eq!(collected["uploaded_files"], 1, "{collected}");
    assert_eq!(collected["uploaded_bytes"], 12);
    assert_eq!(collected["file_count"], 3);
    assert_eq!(
        objects(&grad).len(),
        2,
        "the replaced content was not freed"
    );
    let third = pull(&grad, "r1", &dir);
    assert_eq!(strings(&third["downloaded"]), ["plots/b.bin", "report.csv"]);
    assert_eq!(strings(&third["unchanged"]), ["plots/a.bin"]);
    same_bytes(&workspace.join("report.csv"), &dir.join("report.csv"));
    same_bytes(&workspace.join("plots/b.bin"), &dir.join("plots/b.bin"));

    let table = grad.run(&["outputs", "list", "r1"]).stdout_str();
    assert!(
        table.starts_with("runner/r1: 3 files") && table.contains("plots/b.bin"),
        "{table}"
    );
}

#[test]
fn pause_and_delete_collect_first_and_a_deleted_runners_outputs_stay_until_removed() {
    let grad = Grad::start();
    create(&grad, &grad.admin_token, "r1");
    python(
        &grad,
        "r1",
        "open('../outputs/before-pause.txt', 'w').write('paused')",
    );
    assert!(
        grad.run(&["runner", "pause", "r1", "--wait"])
            .status
            .success()
    );
    let listed = json(&grad.run(&["outputs", "list", "r1", "-o", "json"]));
    assert_eq!(listed["files"][0]["path"], "before-pause.txt", "{listed}");

    assert!(
        grad.run(&["runner", "resume", "r1", "--wait"])
            .status
            .success()
    );
    python(
        &grad,
        "r1",
        "open('../outputs/before-delete.txt', 'w').write('deleted')",
    );
    assert!(
        grad.run(&["runner", "delete", "r1", "--wait"])
            .status
            .success()
    );
    let all = json(&grad.run(&["outputs", "list", "-o", "json"]));
    let sets = all["outputs"].as_array().unwrap();
    assert_eq!(sets.len(), 1, "{all}");
    assert_eq!(sets[0]["runner_deleted"], true);
    assert_eq!(sets[0]["file_count"], 2);
    let old_id = sets[0]["runner_id"].as_str().unwrap().to_owned();

    let tmp = tempfile::tempdir().unwrap();
    let pulled = pull(&grad, "r1", &tmp.path().join("a"));
    assert_eq!(pulled["collected_now"], false);
    assert_eq!(
        strings(&pulled["downloaded"]),
        ["before-delete.txt", "before-pause.txt"]
    );
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("a/before-delete.txt")).unwrap(),
        "deleted"
    );

    // A new runner of the same name starts with none; the old one's are
    // still reachable by id, and removing them frees their objects.
    create(&grad, &grad.admin_token, "r1");
    let fresh = pull(&grad, "r1", &tmp.path().join("b"));
    assert_eq!(strings(&fresh["downloaded"]), Vec::<String>::new());
    let old = pull(&grad, &old_id, &tmp.path().join("c"));
    assert_eq!(strings(&old["downloaded"]).len(), 2);
    let live = grad.run(&["outputs", "rm", "r1"]);
    assert_eq!(live.code(), 5, "{}", live.stderr_str());
    assert!(
        live.stderr_str().contains("still exists"),
        "{}",
        live.stderr_str()
    );
    assert!(grad.run(&["outputs", "rm", &old_id]).status.success());
    assert_eq!(objects(&grad), Vec::<PathBuf>::new());
    let gone = grad.run(&[
        "outputs",
        "pull",
        &old_id,
        tmp.path().join("d").to_str().unwrap(),
    ]);
    assert_eq!(gone.code(), 4, "{}", gone.stderr_str());
}

#[test]
fn skip_outputs_pauses_and_deletes_without_collecting() {
    let grad = Grad::start();
    create(&grad, &grad.admin_token, "r1");
    python(&grad, "r1", "open('../outputs/x.txt', 'w').write('x')");
    let paused = grad.run(&["runner", "pause", "r1", "--skip-outputs", "--wait"]);
    assert!(paused.status.success(), "{}", paused.stderr_str());
    let listed = json(&grad.run(&["outputs", "list", "r1", "-o", "json"]));
    assert_eq!(listed["file_count"], 0, "{listed}");
    assert_eq!(listed["collected"], Value::Null);
    assert!(
        grad.run(&["runner", "resume", "r1", "--wait"])
            .status
            .success()
    );
    let deleted = grad.run(&["runner", "delete", "r1", "--skip-outputs", "--wait"]);
    assert!(deleted.status.success(), "{}", deleted.stderr_str());
    let all = json(&grad.run(&["outputs", "list", "-o", "json"]));
    assert_eq!(all["outputs"], serde_json::json!([]), "{all}");
}

#[test]
fn outputs_on_s3_go_up_in_parts_and_a_failed_collection_leaves_the_runner_as_it_was() {
    let Some(server) = S3Server::start("grad") else {
        return;
    };
    let grad = Grad::start_with_env(
        &[
            "--blob-store",
            "s3",
            "--s3-bucket",
            "grad",
            "--s3-prefix",
            "blobs/",
            "--s3-endpoint",
            &server.endpoint,
            "--s3-path-style",
            "--s3-region",
            "us-east-1",
            "--s3-multipart-threshold",
            "5Mi",
        ],
        &[
            ("AWS_ACCESS_KEY_ID", S3Server::ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", S3Server::SECRET_KEY),
        ],
    );
    create(&grad, &grad.admin_token, "r1");
    // 12 MiB + 1: three parts of 5 MiB... the last one short.
    python(
        &grad,
        "r1",
        "import os\n\
         open('../outputs/model.bin', 'wb').write(os.urandom((12 << 20) + 1))\n\
         open('../outputs/small.txt', 'w').write('small')",
    );
    let collected = json(&grad.run(&["outputs", "collect", "r1", "-o", "json"]));
    assert_eq!(collected["uploaded_files"], 2, "{collected}");
    let tmp = tempfile::tempdir().unwrap();
    let pulled = pull(&grad, "r1", tmp.path());
    assert_eq!(strings(&pulled["downloaded"]), ["model.bin", "small.txt"]);
    let workspace = grad.workspace("admin", "r1").join("outputs");
    same_bytes(&workspace.join("model.bin"), &tmp.path().join("model.bin"));
    // The objects are in the bucket, under the prefix, by content.
    let sha = collected["files"][0]["sha256"].as_str().unwrap();
    let stored = std::fs::read_dir(server.root.path().join("grad/blobs/users"))
        .unwrap()
        .flatten()
        .map(|user| user.path().join("sha256").join(sha))
        .find(|path| path.exists());
    assert!(stored.is_some(), "model.bin is not in the bucket");

    // The store goes away: a pause cannot collect, and changes nothing.
    drop(server);
    python(
        &grad,
        "r1",
        "open('../outputs/small.txt', 'w').write('changed')",
    );
    let refused = grad.run(&["runner", "pause", "r1"]);
    assert_ne!(refused.code(), 0);
    let said = refused.stderr_str();
    assert!(
        said.contains("collecting the outputs of runner r1")
            && said.contains("the runner was left as it was")
            && said.contains("--skip-outputs"),
        "{said}"
    );
    let runner = json(&grad.run(&["runner", "get", "r1", "-o", "json"]));
    assert_eq!(runner["state"], "ready");
    let paused = grad.run(&["runner", "pause", "r1", "--skip-outputs", "--wait"]);
    assert!(paused.status.success(), "{}", paused.stderr_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn other_users_reach_no_outputs_and_users_cannot_act_as_runners() {
    let grad = Grad::start();
    let alice = grad.add_user("alice", &[]);
    let bob = grad.add_user("bob", &[]);
    create(&grad, &alice, "r1");
    let as_alice = |args: &[&str]| grad.gractl(&alice).args(args).output().unwrap();
    let as_bob = |args: &[&str]| grad.gractl(&bob).args(args).output().unwrap();
    let out = as_alice(&[
        "execute-code",
        "-r",
        "r1",
        "--code",
        "open('../outputs/secret.txt', 'w').write('alice only')",
    ]);
    assert!(out.status.success(), "{}", out.stderr_str());
    let set = json(&as_alice(&["outputs", "collect", "r1", "-o", "json"]));
    let id = set["runner_id"].as_str().unwrap().to_owned();

    let tmp = tempfile::tempdir().unwrap();
    let listed = json(&as_bob(&["outputs", "list", "-o", "json"]));
    assert_eq!(listed["outputs"], serde_json::json!([]));
    for target in ["r1", id.as_str(), "alice/r1"] {
        let out = as_bob(&["outputs", "pull", target, tmp.path().to_str().unwrap()]);
        assert_eq!(out.code(), 4, "{target}: {}", out.stderr_str());
        let out = as_bob(&["outputs", "rm", target]);
        assert_eq!(out.code(), 4, "{target}: {}", out.stderr_str());
    }
    let out = as_bob(&["outputs", "list", "--all"]);
    assert_eq!(out.code(), 3, "{}", out.stderr_str());
    assert!(std::fs::read_dir(tmp.path()).unwrap().next().is_none());

    // The runners' side of collection takes runner tokens only.
    let channel = Channel::from_shared(grad.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut request = Request::new(OutputManifest::default());
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {bob}").parse().unwrap());
    let refused = RunnerAgentClient::new(channel)
        .plan_outputs(request)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
}

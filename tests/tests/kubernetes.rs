//! The `kubernetes` backend against a Kubernetes API server double nobody
//! here wrote: kmock's Kubernetes emulator (PyPI `kmock`), which stores
//! what it is sent, answers GET/LIST/DELETE, serves watches and records
//! every request. grad (the real binary, kube-rs inside) is pointed at it
//! with a kubeconfig; the tests assert the requests grad made (paths,
//! verbs, field manager, bodies) and drive Pod states as a kubelet would.
//! A kubelet double runs a Pod's container as a local `grad-runner` with
//! the Pod's own args, env and volumes, so a runner made from the Pod grad
//! wrote really connects, runs code, and keeps its files across a pause.
//!
//! What only a real cluster can prove is in `kubernetes_cluster.rs` (runs
//! when GRAD_TEST_KUBECONFIG is set).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use grad_proto::{Resources, RunnerState};
use grad_tests::{Grad, Kmock, Kubelet, OutputExt, wait_until};
use serde_json::Value;

const NS: &str = "grad-runners";
const WAIT: Duration = Duration::from_secs(30);

fn grad_on(kmock: &Kmock, extra: &[&str]) -> Grad {
    let mut args = vec![
        "--backend",
        "kubernetes",
        "--namespace",
        NS,
        "--runner-image",
        "grad-runner:test",
        "--start-timeout",
        "20s",
    ];
    args.extend_from_slice(extra);
    Grad::start_with_env(&args, &[("KUBECONFIG", kmock.kubeconfig.to_str().unwrap())])
}

/// GPUs need the pro plan.
fn pro(grad: &Grad) {
    let out = grad
        .admin_command(&["user", "plan", "admin", "pro"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", out.stderr_str());
}

fn res(storage_gib: u64, gpus: u32) -> Resources {
    Resources {
        cpu_millis: 2000,
        memory_bytes: 8 << 30,
        storage_bytes: storage_gib << 30,
        gpus,
    }
}

fn list(kmock: &Kmock, kind: &str) -> Vec<Value> {
    kmock.get(&format!("/api/v1/namespaces/{NS}/{kind}"))["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The id grad gave runner `name`, from its Pod's labels.
fn runner_id(kmock: &Kmock, name: &str) -> String {
    let mut id = String::new();
    wait_until("the runner's pod", WAIT, || {
        id = list(kmock, "pods")
            .iter()
            .find(|p| p["metadata"]["labels"]["grad.dev/runner"] == name)
            .and_then(|p| p["metadata"]["labels"]["grad.dev/runner-id"].as_str())
            .unwrap_or_default()
            .to_owned();
        !id.is_empty()
    });
    id
}

/// grad's requests (not the tests' own) with `method` on `path`.
fn requests(kmock: &Kmock, method: &str, path: &str) -> Vec<Value> {
    kmock
        .requests()
        .into_iter()
        .filter(|r| r["method"] == method && r["path"] == path)
        .collect()
}

fn body(request: &Value) -> Value {
    serde_json::from_str(request["body"].as_str().unwrap()).unwrap()
}

fn assert_applied_by_grad(request: &Value) {
    assert_eq!(request["query"]["fieldManager"], "grad", "{request}");
    assert_eq!(request["query"]["force"], "true", "{request}");
    assert!(
        request["content_type"]
            .as_str()
            .unwrap()
            .starts_with("application/apply-patch"),
        "server-side apply: {request}"
    );
}

async fn wait_state(grad: &Grad, name: &str, states: &[RunnerState]) -> grad_proto::Runner {
    grad.admin()
        .await
        .wait_runner(name, states, WAIT)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_is_a_pod_on_its_own_claim_and_pause_keeps_the_claim() {
    let Some(kmock) = Kmock::start() else { return };
    let kubelet = Kubelet::start(&kmock, NS, true);
    let grad = grad_on(&kmock, &[]);
    let admin = grad.admin().await;
    admin
        .create_runner("r1", res(20, 0), Vec::new())
        .await
        .unwrap();
    let id = runner_id(&kmock, "r1");
    let (pod, claim, secret) = (
        format!("runner-{id}"),
        format!("runner-{id}-workspace"),
        format!("runner-{id}-token"),
    );

    // Secret, claim and Pod, each applied server-side by one field manager.
    let base = format!("/api/v1/namespaces/{NS}");
    let applied_secret = requests(&kmock, "PATCH", &format!("{base}/secrets/{secret}"));
    let applied_claim = requests(
        &kmock,
        "PATCH",
        &format!("{base}/persistentvolumeclaims/{claim}"),
    );
    let applied_pod = requests(&kmock, "PATCH", &format!("{base}/pods/{pod}"));
    for r in [&applied_secret, &applied_claim, &applied_pod] {
        assert_eq!(r.len(), 1, "{r:?}");
        assert_applied_by_grad(&r[0]);
    }
    let token = body(&applied_secret[0])["stringData"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(token.len() > 20, "the runner's token is in its Secret");
    let claim_body = body(&applied_claim[0]);
    assert_eq!(
        claim_body["spec"]["resources"]["requests"]["storage"],
        (20u64 << 30).to_string()
    );
    assert_eq!(claim_body["spec"]["accessModes"][0], "ReadWriteOnce");
    let pod_body = body(&applied_pod[0]);
    let labels = &pod_body["metadata"]["labels"];
    assert_eq!(labels["app.kubernetes.io/managed-by"], "grad");
    assert_eq!(labels["grad.dev/runner"], "r1");
    assert_eq!(
        pod_body["metadata"]["annotations"]["grad.dev/owner"],
        "admin"
    );
    let spec = &pod_body["spec"];
    let container = &spec["containers"][0];
    assert_eq!(container["image"], "grad-runner:test");
    assert_eq!(container["resources"]["limits"]["cpu"], "2000m");
    assert_eq!(
        container["resources"]["limits"]["memory"],
        (8u64 << 30).to_string()
    );
    assert_eq!(
        container["resources"]["limits"]["ephemeral-storage"],
        "10Gi"
    );
    assert_eq!(
        container["resources"]["requests"],
        container["resources"]["limits"]
    );
    assert!(container["resources"]["limits"]["nvidia.com/gpu"].is_null());
    assert_eq!(spec["restartPolicy"], "Never");
    assert_eq!(spec["automountServiceAccountToken"], false);
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    // Without datasets: no capabilities, no escalation, no /dev/fuse.
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"][0],
        "ALL"
    );
    assert!(!pod_body.to_string().contains("/dev/fuse"));
    let claimed = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["persistentVolumeClaim"]["claimName"] == claim.as_str());
    assert!(claimed, "the workspace is the claim: {spec}");
    // The token travels only in the Secret: never in the Pod or a URL.
    assert!(
        !pod_body.to_string().contains(&token),
        "token in the pod spec"
    );
    assert!(
        kmock
            .requests()
            .iter()
            .all(|r| !r["path"].to_string().contains(&token)
                && !r["query"].to_string().contains(&token)),
        "token in a request line"
    );

    // The kubelet double runs the Pod: the runner registers and runs code.
    let ready = wait_state(&grad, "r1", &[RunnerState::Ready, RunnerState::Failed]).await;
    assert_eq!(ready.state(), RunnerState::Ready, "{ready:?}");
    assert_eq!(ready.backend, "kubernetes");
    assert_eq!(ready.workspace, "/workspace");
    let out = grad.run(&[
        "execute-code",
        "-r",
        "r1",
        "--code",
        "open('kept.txt','w').write('still here'); import os; print(os.getcwd().endswith('/workspace/code'))",
    ]);
    assert_eq!(out.code(), 0, "{}", out.stderr_str());
    assert_eq!(out.stdout_str().trim(), "True");
    let kept = kubelet.claim_dir(&claim).join("workspace/code/kept.txt");
    assert_eq!(std::fs::read_to_string(&kept).unwrap(), "still here");

    // Pause deletes the Pod and keeps the claim and the Secret.
    let out = grad.run(&["runner", "pause", "r1", "--wait"]);
    assert_eq!(out.code(), 0, "{}", out.stderr_str());
    assert_eq!(
        requests(&kmock, "DELETE", &format!("{base}/pods/{pod}")).len(),
        1
    );
    assert!(list(&kmock, "pods").is_empty());
    assert_eq!(list(&kmock, "persistentvolumeclaims").len(), 1);
    assert!(
        requests(
            &kmock,
            "DELETE",
            &format!("{base}/persistentvolumeclaims/{claim}")
        )
        .is_empty()
    );

    // Resume: a new Pod (a new token) on the same claim; the file is there.
    let out = grad.run(&["runner", "resume", "r1", "--wait"]);
    assert_eq!(out.code(), 0, "{}", out.stderr_str());
    assert_eq!(
        requests(&kmock, "PATCH", &format!("{base}/pods/{pod}")).len(),
        2
    );
    let secrets = requests(&kmock, "PATCH", &format!("{base}/secrets/{secret}"));
    assert_ne!(
        body(&secrets[1])["stringData"]["token"],
        token.as_str(),
        "a fresh token"
    );
    let out = grad.run(&[
        "execute-code",
        "-r",
        "r1",
        "--code",
        "print(open('kept.txt').read())",
    ]);
    assert_eq!(out.code(), 0, "{}", out.stderr_str());
    assert_eq!(out.stdout_str().trim(), "still here");

    // Delete: Pod, claim and Secret go.
    let out = grad.run(&["runner", "delete", "r1", "--wait"]);
    assert_eq!(out.code(), 0, "{}", out.stderr_str());
    for kind in ["pods", "persistentvolumeclaims", "secrets"] {
        assert!(
            list(&kmock, kind).is_empty(),
            "{kind} left: {:?}",
            list(&kmock, kind)
        );
    }
    assert_eq!(
        requests(
            &kmock,
            "DELETE",
            &format!("{base}/persistentvolumeclaims/{claim}")
        )
        .len(),
        1
    );
    assert_eq!(
        requests(&kmock, "DELETE", &format!("{base}/secrets/{secret}")).len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpus_and_datasets_shape_the_pod() {
    let Some(kmock) = Kmock::start() else { return };
    let grad = grad_on(&kmock, &[]);
    let admin = grad.admin().await;
    pro(&grad);
    let dataset = grad_proto::Dataset {
        name: "taxi".into(),
        bucket: "nyc-taxi".into(),
        ..Default::default()
    };
    admin
        .create_runner("g1", res(10, 2), vec![dataset])
        .await
        .unwrap();
    let id = runner_id(&kmock, "g1");
    let pod = kmock.get(&format!("/api/v1/namespaces/{NS}/pods/runner-{id}"));
    let container = &pod["spec"]["containers"][0];
    assert_eq!(container["resources"]["limits"]["nvidia.com/gpu"], "2");
    assert_eq!(container["resources"]["requests"]["nvidia.com/gpu"], "2");
    assert_eq!(pod["spec"]["tolerations"][0]["key"], "nvidia.com/gpu");
    // s3fs needs /dev/fuse and CAP_SYS_ADMIN; nothing more.
    assert_eq!(
        container["securityContext"]["capabilities"]["add"],
        serde_json::json!(["SYS_ADMIN"])
    );
    assert!(container["securityContext"]["privileged"].is_null());
    let fuse = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "fuse")
        .unwrap();
    assert_eq!(fuse["hostPath"]["path"], "/dev/fuse");
    assert_eq!(fuse["hostPath"]["type"], "CharDevice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_states_become_runner_states_with_the_clusters_reasons() {
    let Some(kmock) = Kmock::start() else { return };
    let kubelet = Kubelet::start(&kmock, NS, false);
    let grad = grad_on(&kmock, &[]);
    let admin = grad.admin().await;
    for name in ["pull", "sched", "oom", "evict", "gone"] {
        admin
            .create_runner(name, res(1, 0), Vec::new())
            .await
            .unwrap();
    }
    // Named now: a failed runner's Pod is deleted.
    let pods: std::collections::HashMap<&str, String> = ["pull", "sched", "oom", "evict", "gone"]
        .into_iter()
        .map(|name| (name, format!("runner-{}", runner_id(&kmock, name))))
        .collect();
    let pod = |name: &str| pods[name].clone();

    kmock.set_pod_status(
        NS,
        &pod("pull"),
        serde_json::json!({
            "phase": "Pending",
            "containerStatuses": [{"name": "runner", "ready": false, "restartCount": 0, "image": "grad-runner:test", "imageID": "",
                "state": {"waiting": {"reason": "ImagePullBackOff",
                    "message": "Back-off pulling image \"grad-runner:test\""}}}]
        }),
    );
    let failed = wait_state(&grad, "pull", &[RunnerState::Failed]).await;
    assert!(
        failed.reason.contains("ImagePullBackOff")
            && failed.reason.contains("Back-off pulling image"),
        "{}",
        failed.reason
    );

    kmock.set_pod_status(
        NS,
        &pod("sched"),
        serde_json::json!({
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/1 nodes are available: 1 Insufficient memory."}]
        }),
    );
    let admin2 = grad.admin().await;
    wait_until("the scheduler's words on the runner", WAIT, || {
        let runner = block_on(admin2.get_runner("sched"));
        runner.state() == RunnerState::Starting && runner.reason.contains("Insufficient memory")
    });

    // Running, then OOMKilled / evicted / deleted behind grad's back.
    for name in ["oom", "evict", "gone"] {
        kubelet.run(&pod(name));
    }
    for name in ["oom", "evict", "gone"] {
        let ready = wait_state(&grad, name, &[RunnerState::Ready, RunnerState::Failed]).await;
        assert_eq!(ready.state(), RunnerState::Ready, "{name}: {ready:?}");
    }
    kmock.set_pod_status(
        NS,
        &pod("oom"),
        serde_json::json!({
            "phase": "Failed",
            "containerStatuses": [{"name": "runner", "ready": false, "restartCount": 0, "image": "grad-runner:test", "imageID": "",
                "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]
        }),
    );
    let failed = wait_state(&grad, "oom", &[RunnerState::Failed]).await;
    assert!(failed.reason.contains("out of memory"), "{}", failed.reason);
    assert!(
        failed.reason.contains(&(8u64 << 30).to_string()),
        "{}",
        failed.reason
    );

    kmock.set_pod_status(
        NS,
        &pod("evict"),
        serde_json::json!({"phase": "Failed", "reason": "Evicted",
            "message": "The node was low on resource: memory."}),
    );
    let failed = wait_state(&grad, "evict", &[RunnerState::Failed]).await;
    assert!(
        failed.reason.contains("Evicted") && failed.reason.contains("low on resource"),
        "{}",
        failed.reason
    );

    let gone = pod("gone");
    kmock.delete(&format!("/api/v1/namespaces/{NS}/pods/{gone}"));
    let failed = wait_state(&grad, "gone", &[RunnerState::Failed]).await;
    assert!(
        failed.reason.contains("pod was deleted"),
        "{}",
        failed.reason
    );

    // A failed runner resumes on a new Pod: the old one's end is no news.
    kubelet.run(&pod("pull"));
    let out = grad.run(&["runner", "resume", "pull", "--wait"]);
    assert_eq!(out.code(), 0, "{}", out.stderr_str());
    let resumed = wait_state(&grad, "pull", &[RunnerState::Ready, RunnerState::Failed]).await;
    assert_eq!(resumed.state(), RunnerState::Ready, "{resumed:?}");
}

/// Blocks on a client call from a sync closure (the tests' runtime has
/// threads to spare).
fn block_on<F: std::future::Future<Output = Result<T, E>>, T, E: std::fmt::Debug>(f: F) -> T {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_no_runner_owns_are_removed_and_others_are_left_alone() {
    let Some(kmock) = Kmock::start() else { return };
    let grad = grad_on(&kmock, &["--leftover-interval", "300ms"]);
    let admin = grad.admin().await;
    admin
        .create_runner("mine", res(1, 0), Vec::new())
        .await
        .unwrap();
    let mine = runner_id(&kmock, "mine");
    let orphan = "0b9a4f1e-0000-4000-8000-000000000000";
    let labels = serde_json::json!({
        "app.kubernetes.io/managed-by": "grad",
        "grad.dev/runner-id": orphan,
    });
    let base = format!("/api/v1/namespaces/{NS}");
    kmock.post(
        &format!("{base}/pods"),
        &serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("runner-{orphan}"), "labels": labels},
            "spec": {"containers": [{"name": "runner", "image": "grad-runner:test"}]}}),
    );
    kmock.post(
        &format!("{base}/persistentvolumeclaims"),
        &serde_json::json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": format!("runner-{orphan}-workspace"), "labels": labels},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}),
    );
    kmock.post(
        &format!("{base}/secrets"),
        &serde_json::json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": format!("runner-{orphan}-token"), "labels": labels}}),
    );
    // Not grad's: no managed-by label.
    kmock.post(
        &format!("{base}/secrets"),
        &serde_json::json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "someone-elses", "labels": {"grad.dev/runner-id": orphan}}}),
    );
    wait_until("the leftovers to go", WAIT, || {
        let names = |kind| -> Vec<String> {
            list(&kmock, kind)
                .iter()
                .filter_map(|o| o["metadata"]["name"].as_str().map(str::to_owned))
                .collect()
        };
        !names("pods").iter().any(|n| n.contains(orphan))
            && !names("persistentvolumeclaims")
                .iter()
                .any(|n| n.contains(orphan))
            && !names("secrets").iter().any(|n| n.contains(orphan))
    });
    let names: Vec<String> = list(&kmock, "secrets")
        .iter()
        .filter_map(|o| o["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    assert!(names.contains(&"someone-elses".to_owned()), "{names:?}");
    assert!(names.contains(&format!("runner-{mine}-token")), "{names:?}");
    assert_eq!(list(&kmock, "pods").len(), 1, "the live runner's pod stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_grad_lists_the_cluster_again_and_heals() {
    let Some(kmock) = Kmock::start() else { return };
    let kubelet = Kubelet::start(&kmock, NS, true);
    let mut grad = grad_on(&kmock, &[]);
    let admin = grad.admin().await;
    for name in ["stays", "dies"] {
        admin
            .create_runner(name, res(1, 0), Vec::new())
            .await
            .unwrap();
        let ready = wait_state(&grad, name, &[RunnerState::Ready, RunnerState::Failed]).await;
        assert_eq!(ready.state(), RunnerState::Ready, "{ready:?}");
    }
    let out = grad.run(&["execute-code", "-r", "stays", "--code", "x = 41"]);
    assert_eq!(out.code(), 0, "{}", out.stderr_str());
    grad.stop();
    // While grad is down, one Pod is evicted.
    let dies = format!("runner-{}", runner_id(&kmock, "dies"));
    kmock.set_pod_status(
        NS,
        &dies,
        serde_json::json!({"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: ephemeral-storage."}),
    );
    grad.restart_status();
    let failed = wait_state(&grad, "dies", &[RunnerState::Failed]).await;
    assert!(
        failed.reason.contains("ephemeral-storage"),
        "{}",
        failed.reason
    );
    // The other runner's Pod is still running: it reconnects, state intact.
    let admin = grad.admin().await;
    wait_until("runner stays to reconnect", WAIT, || {
        let runner = block_on(admin.get_runner("stays"));
        runner.state() == RunnerState::Ready && runner.connected
    });
    let out = grad.run(&["execute-code", "-r", "stays", "--code", "print(x + 1)"]);
    assert_eq!(out.code(), 0, "{}", out.stderr_str());
    assert_eq!(out.stdout_str().trim(), "42");
    drop(kubelet);
}

/// Every object grad sent and every manifest in k8s/ against the
/// Kubernetes schemas (`kubernetes-validate --strict`: unknown fields are
/// errors too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_objects_grad_applies_and_the_k8s_manifests_pass_schema_validation() {
    let Some(kmock) = Kmock::start() else { return };
    let present = std::process::Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !grad_tests::require(
        "kubernetes-validate (pip install kubernetes-validate==1.37.0)",
        present,
    ) {
        return;
    }
    let grad = grad_on(&kmock, &["--job-pods", "--job-pod-delay", "0s"]);
    pro(&grad);
    let admin = grad.admin().await;
    admin
        .create_runner("plain", res(1, 0), Vec::new())
        .await
        .unwrap();
    let dataset = grad_proto::Dataset {
        name: "taxi".into(),
        bucket: "nyc-taxi".into(),
        ..Default::default()
    };
    admin
        .create_runner("gpu", res(5, 1), vec![dataset])
        .await
        .unwrap();
    runner_id(&kmock, "plain");
    runner_id(&kmock, "gpu");
    // A job's Pod too, in its own image with grad-runner copied in.
    let id = submit(
        &grad,
        "name: own\nimage: python:3.12-slim\ngpus: 1\ncommand: true\nresources: { cpu: 1, memory: 1Gi }\n",
    );
    wait_until("the job's pod", WAIT, || {
        !requests(
            &kmock,
            "PATCH",
            &format!("/api/v1/namespaces/{NS}/pods/job-{id}-1"),
        )
        .is_empty()
    });
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (i, request) in kmock
        .requests()
        .iter()
        .filter(|r| r["method"] == "PATCH")
        .enumerate()
    {
        let path = dir.path().join(format!("object-{i}.json"));
        std::fs::write(&path, request["body"].as_str().unwrap()).unwrap();
        files.push(path);
    }
    assert!(
        files.len() >= 8,
        "secret, claim and pod for each runner, secret and pod for the job: {files:?}"
    );
    for version in ["1.33.0", "1.37.0"] {
        let out = std::process::Command::new("kubernetes-validate")
            .args(["--strict", "--kubernetes-version", version])
            .args(&files)
            .output()
            .unwrap();
        assert!(
            out.status.success() && !out.stdout_str().contains("WARN"),
            "{version}: {}{}",
            out.stdout_str(),
            out.stderr_str()
        );
    }
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/validate_manifests.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        out.stdout_str(),
        out.stderr_str()
    );
}

/// Submits the job in `dir` (`job.yaml` as given) and answers its id.
fn submit(grad: &Grad, job_yaml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("job.yaml"), job_yaml).unwrap();
    let out = grad.run(&["job", "submit", dir.path().to_str().unwrap(), "-o", "json"]);
    assert_eq!(out.code(), 0, "{}", out.stderr_str());
    let v: Value = serde_json::from_str(&out.stdout_str()).unwrap();
    v["job"]["id"].as_str().unwrap().to_owned()
}

fn job_wait(grad: &Grad, id: &str) -> (i32, Value) {
    let out = grad.run(&["job", "wait", id, "--timeout", "60s", "-o", "json"]);
    let v = serde_json::from_str(&out.stdout_str()).unwrap_or(Value::Null);
    (out.code(), v)
}

fn job_logs(grad: &Grad, id: &str) -> String {
    let out = grad.run(&["job", "logs", id]);
    assert_eq!(out.code(), 0, "{}", out.stderr_str());
    out.stdout_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_jobs_run_as_their_own_pods_in_their_image_with_gpus_and_retries() {
    let Some(kmock) = Kmock::start() else { return };
    let _kubelet = Kubelet::start(&kmock, NS, true);
    let grad = grad_on(&kmock, &["--job-pods", "--job-pod-delay", "0s"]);
    pro(&grad);
    let base = format!("/api/v1/namespaces/{NS}");

    // In the runner image, retried once: attempt 1 fails, attempt 2 (a new
    // Pod) succeeds; the log streams like any worker's.
    let id = submit(
        &grad,
        "name: plain\ncommand: echo attempt $GRAD_JOB_ATTEMPT; [ \"$GRAD_JOB_ATTEMPT\" = 2 ]\nretries: 1\n",
    );
    let (code, done) = job_wait(&grad, &id);
    assert_eq!(code, 0, "{done}");
    assert_eq!(done["attempt"], 2, "{done}");
    assert_eq!(job_logs(&grad, &id), "attempt 1\nattempt 2\n");
    for attempt in [1, 2] {
        let applied = requests(&kmock, "PATCH", &format!("{base}/pods/job-{id}-{attempt}"));
        assert_eq!(applied.len(), 1, "attempt {attempt}'s pod");
        assert_applied_by_grad(&applied[0]);
        let pod = body(&applied[0]);
        let container = &pod["spec"]["containers"][0];
        assert_eq!(container["image"], "grad-runner:test");
        assert_eq!(container["command"][0], "/usr/local/bin/grad-runner");
        let args: Vec<&str> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|a| a.as_str())
            .collect();
        assert!(
            args.windows(2).any(|w| w == ["--job", id.as_str()]),
            "{args:?}"
        );
        assert!(pod["spec"]["initContainers"].is_null());
        assert_eq!(pod["metadata"]["labels"]["grad.dev/job-id"], id.as_str());
    }
    // Ended attempts leave nothing: no Pod, no Secret, no worker.
    wait_until("the job's pods to go", WAIT, || {
        list(&kmock, "pods").is_empty() && list(&kmock, "secrets").is_empty()
    });
    let workers = grad.run(&["worker", "list", "-o", "json"]);
    assert_eq!(workers.code(), 0, "{}", workers.stderr_str());
    assert!(
        !workers.stdout_str().contains(&id),
        "{}",
        workers.stdout_str()
    );

    // The job's own image, with grad-runner copied in, and a GPU.
    let id = submit(
        &grad,
        "name: own\nimage: python:3.12-slim\ngpus: 1\ncommand: echo gpus=$CUDA_VISIBLE_DEVICES\nresources: { cpu: 2, memory: 4Gi }\n",
    );
    let (code, done) = job_wait(&grad, &id);
    assert_eq!(code, 0, "{done}");
    assert_eq!(job_logs(&grad, &id), "gpus=0\n");
    let pod = body(&requests(&kmock, "PATCH", &format!("{base}/pods/job-{id}-1"))[0]);
    let container = &pod["spec"]["containers"][0];
    assert_eq!(container["image"], "python:3.12-slim");
    assert_eq!(container["command"][0], "/grad/bin/grad-runner");
    assert_eq!(
        pod["spec"]["initContainers"][0]["image"],
        "grad-runner:test"
    );
    assert_eq!(container["resources"]["limits"]["nvidia.com/gpu"], "1");
    assert_eq!(container["resources"]["limits"]["cpu"], "2000m");
    assert_eq!(
        container["resources"]["limits"]["memory"],
        (4u64 << 30).to_string()
    );
    assert_eq!(pod["spec"]["tolerations"][0]["key"], "nvidia.com/gpu");
    // The worker's token is in the Secret only.
    let secret = body(&requests(&kmock, "PATCH", &format!("{base}/secrets/job-{id}-1-token"))[0]);
    let token = secret["stringData"]["token"].as_str().unwrap();
    assert!(!pod.to_string().contains(token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_pod_cannot_start_fails_with_the_clusters_reason() {
    let Some(kmock) = Kmock::start() else { return };
    let _kubelet = Kubelet::start(&kmock, NS, false);
    let grad = grad_on(&kmock, &["--job-pods", "--job-pod-delay", "0s"]);
    let id = submit(&grad, "name: nope\nimage: no-such-image:1\ncommand: true\n");
    let pod = format!("job-{id}-1");
    wait_until("the job's pod", WAIT, || {
        list(&kmock, "pods")
            .iter()
            .any(|p| p["metadata"]["name"] == pod.as_str())
    });
    kmock.set_pod_status(
        NS,
        &pod,
        serde_json::json!({
            "phase": "Pending",
            "initContainerStatuses": [],
            "containerStatuses": [{"name": "job", "ready": false, "restartCount": 0, "image": "no-such-image:1", "imageID": "",
                "state": {"waiting": {"reason": "ImagePullBackOff",
                    "message": "Back-off pulling image \"no-such-image:1\""}}}]
        }),
    );
    let (code, done) = job_wait(&grad, &id);
    assert_eq!(code, 9, "{done}");
    let reason = done["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("ImagePullBackOff") && reason.contains("no-such-image:1"),
        "{done}"
    );
    wait_until("the pod and its secret to go", WAIT, || {
        list(&kmock, "pods").is_empty() && list(&kmock, "secrets").is_empty()
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_pods_token_claims_its_own_job_and_nothing_else() {
    let Some(kmock) = Kmock::start() else { return };
    let _kubelet = Kubelet::start(&kmock, NS, false);
    let grad = grad_on(&kmock, &["--job-pods", "--job-pod-delay", "0s"]);
    let a = submit(&grad, "name: a\ncommand: true\n");
    let b = submit(&grad, "name: b\ncommand: true\n");
    let secret = format!("/api/v1/namespaces/{NS}/secrets/job-{a}-1-token");
    let mut token = String::new();
    wait_until("job a's secret", WAIT, || {
        token = kmock.get(&secret)["stringData"]["token"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        !token.is_empty()
    });
    let channel = tonic::transport::Endpoint::from_shared(grad.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = grad_proto::worker_agent_client::WorkerAgentClient::new(channel);
    let claim = |job_id: &str| {
        let mut request = tonic::Request::new(grad_proto::ClaimJobRequest {
            capabilities: Some(grad_proto::WorkerCapabilities::default()),
            wait_ms: 200,
            job_id: job_id.to_owned(),
        });
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    };
    let any = client.claim_job(claim("")).await.unwrap().into_inner();
    assert!(
        any.job.is_none(),
        "claimed {:?} without naming a job",
        any.job
    );
    let other = client.claim_job(claim(&b)).await.unwrap().into_inner();
    assert!(other.job.is_none(), "claimed job b: {:?}", other.job);
    let own = client.claim_job(claim(&a)).await.unwrap().into_inner();
    assert_eq!(own.job.map(|j| j.id), Some(a));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_pod_killed_mid_attempt_ends_the_attempt_with_the_clusters_reason() {
    let Some(kmock) = Kmock::start() else { return };
    let _kubelet = Kubelet::start(&kmock, NS, true);
    let grad = grad_on(&kmock, &["--job-pods", "--job-pod-delay", "0s"]);
    let id = submit(&grad, "name: big\ncommand: echo started; sleep 60\n");
    wait_until("the job to run in its pod", WAIT, || {
        job_logs(&grad, &id) == "started\n"
    });
    kmock.set_pod_status(
        NS,
        &format!("job-{id}-1"),
        serde_json::json!({
            "phase": "Failed",
            "containerStatuses": [{"name": "job", "ready": false, "restartCount": 0, "image": "grad-runner:test", "imageID": "",
                "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]
        }),
    );
    let started = std::time::Instant::now();
    let (code, done) = job_wait(&grad, &id);
    assert_eq!(code, 9, "{done}");
    let reason = done["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("ran out of memory") && reason.contains(&format!("job-{id}-1")),
        "{done}"
    );
    // At once, not when the lease (15 s) runs out.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

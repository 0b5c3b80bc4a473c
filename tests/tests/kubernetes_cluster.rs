//! The `kubernetes` backend on a real cluster: what kmock cannot prove —
//! that the Pods grad writes are admitted and scheduled, that the runner
//! image starts and dials back through the Service URL, that the claim
//! keeps the workspace across a pause, that delete leaves nothing.
//!
//! Ignored by default (no cluster can run on the CI machines); run it with
//! a cluster that has the runner image (`make images` in minikube's docker)
//! and can reach this machine:
//!
//! ```text
//! GRAD_TEST_KUBECONFIG=~/.kube/config \
//! GRAD_TEST_SERVICE_URL=http://host.minikube.internal:7070 \
//!   cargo test -p grad-tests --test kubernetes_cluster -- --ignored
//! ```
//!
//! GRAD_TEST_NAMESPACE (default grad-test) must exist; GRAD_TEST_RUNNER_IMAGE
//! defaults to grad-runner:dev. grad listens on 0.0.0.0 at the service
//! URL's port.
#![allow(clippy::unwrap_used)]

use std::{process::Command, time::Duration};

use grad_proto::{Resources, RunnerState};
use grad_tests::{Grad, OutputExt};

fn setting(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real Kubernetes cluster: set GRAD_TEST_KUBECONFIG and GRAD_TEST_SERVICE_URL, run with --ignored"]
async fn a_runner_on_a_real_cluster_runs_code_and_keeps_its_files_across_a_pause() {
    let kubeconfig = setting("GRAD_TEST_KUBECONFIG")
        .or_else(|| setting("KUBECONFIG"))
        .expect("GRAD_TEST_KUBECONFIG (or KUBECONFIG): the cluster to test on");
    let service_url = setting("GRAD_TEST_SERVICE_URL")
        .expect("GRAD_TEST_SERVICE_URL: the URL pods reach this machine's grad at");
    let namespace = setting("GRAD_TEST_NAMESPACE").unwrap_or_else(|| "grad-test".into());
    let image = setting("GRAD_TEST_RUNNER_IMAGE").unwrap_or_else(|| "grad-runner:dev".into());
    let port = service_url
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse::<u16>().ok())
        .expect("GRAD_TEST_SERVICE_URL names a port");
    let listen = format!("0.0.0.0:{port}");
    let grad = Grad::start_listening(
        &listen,
        None,
        &[
            "--backend",
            "kubernetes",
            "--namespace",
            &namespace,
            "--runner-image",
            &image,
            "--image-pull-policy",
            "IfNotPresent",
            "--service-url",
            &service_url,
        ],
        &[("KUBECONFIG", &kubeconfig)],
    );
    let admin = grad.admin().await;
    let resources = Resources {
        cpu_millis: 500,
        memory_bytes: 1 << 30,
        storage_bytes: 1 << 30,
        gpus: 0,
    };
    admin
        .create_runner("cluster-r1", resources, Vec::new())
        .await
        .unwrap();
    let ready = admin
        .wait_runner(
            "cluster-r1",
            &[RunnerState::Ready, RunnerState::Failed],
            Duration::from_secs(300),
        )
        .await
        .unwrap();
    assert_eq!(ready.state(), RunnerState::Ready, "{}", ready.reason);
    let out = grad.run(&[
        "execute-code",
        "-r",
        "cluster-r1",
        "--code",
        "import pandas, duckdb; open('kept.txt','w').write('on the claim'); print(duckdb.sql('select 41 + 1').fetchone()[0])",
    ]);
    assert_eq!(out.code(), 0, "{}", out.stderr_str());
    assert_eq!(out.stdout_str().trim(), "42");

    for step in [
        ["pause", "cluster-r1", "--wait"],
        ["resume", "cluster-r1", "--wait"],
    ] {
        let out = grad.run(&["runner", step[0], step[1], step[2]]);
        assert_eq!(out.code(), 0, "{}", out.stderr_str());
    }
    let out = grad.run(&[
        "execute-code",
        "-r",
        "cluster-r1",
        "--code",
        "print(open('kept.txt').read())",
    ]);
    assert_eq!(out.code(), 0, "{}", out.stderr_str());
    assert_eq!(out.stdout_str().trim(), "on the claim");

    let out = grad.run(&["runner", "delete", "cluster-r1", "--wait"]);
    assert_eq!(out.code(), 0, "{}", out.stderr_str());
    let left = Command::new("kubectl")
        .args(["--kubeconfig", &kubeconfig, "-n", &namespace])
        .args([
            "get",
            "pods,pvc,secrets",
            "-l",
            "grad.dev/runner=cluster-r1",
            "-o",
            "name",
        ])
        .output()
        .unwrap();
    assert!(left.status.success(), "{}", left.stderr_str());
    assert_eq!(left.stdout_str().trim(), "", "left in the cluster");
}

//! `grad serve`: one port for gRPC (health, reflection, the API) and HTTP,
//! and a graceful stop.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Command,
};

use grad_tests::{Grad, OutputExt, bin};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

fn http_get(url: &str, path: &str) -> String {
    let addr = url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_healthz_and_grpc_health_share_the_port_without_a_token() {
    let grad = Grad::start();
    let response = http_get(&grad.url, "/healthz");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("ok\n"), "{response}");

    let channel = Channel::from_shared(grad.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "grad.v1.Runners", "grad.v1.Exec"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "service '{service}'");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_api_for_callers_with_a_token() {
    use tokio_stream::StreamExt;
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let grad = Grad::start();
    let channel = Channel::from_shared(grad.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let list = || ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };

    let mut anonymous = ServerReflectionClient::new(channel.clone());
    let err = anonymous
        .server_reflection_info(tokio_stream::iter([list()]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    let token = grad.admin_token.clone();
    let mut client =
        ServerReflectionClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            Ok(req)
        });
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([list()]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(services)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<_> = services.service.iter().map(|s| s.name.as_str()).collect();
    for want in [
        "grad.v1.Runners",
        "grad.v1.Exec",
        "grad.v1.Users",
        "grad.v1.RunnerAgent",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_grad_gracefully() {
    let mut grad = Grad::start();
    let status = grad.stop().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn bad_flags_are_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("grad"))
        .args(["serve", "--listen", "localhost:notaport", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        out.stderr_str().contains("--listen"),
        "{}",
        out.stderr_str()
    );

    let out = Command::new(bin("grad"))
        .args([
            "serve",
            "--heartbeat-timeout",
            "1s",
            "--heartbeat-interval",
            "2s",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        out.stderr_str().contains("--heartbeat-timeout"),
        "{}",
        out.stderr_str()
    );
    assert!(
        !dir.path().join("grad.db").exists(),
        "grad started despite a bad flag"
    );

    // The Kubernetes flags: each refusal names its flag and what is valid.
    for (args, named, valid) in [
        (
            &["--backend", "kubernetes", "--namespace", "Runners_1"][..],
            "--namespace 'Runners_1'",
            "lowercase letters",
        ),
        (
            &[
                "--backend",
                "kubernetes",
                "--runner-ephemeral-storage",
                "10 GiB",
            ][..],
            "--runner-ephemeral-storage '10 GiB'",
            "10Gi",
        ),
        (&["--job-pods"][..], "--job-pods", "--backend kubernetes"),
        (&["--backend", "nomad"][..], "--backend", "kubernetes"),
    ] {
        let out = Command::new(bin("grad"))
            .arg("serve")
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .env_remove("KUBECONFIG")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} accepted");
        let err = out.stderr_str();
        assert!(
            err.contains(named) && err.contains(valid),
            "{args:?}: {err}"
        );
        assert!(
            !dir.path().join("grad.db").exists(),
            "{args:?}: grad started"
        );
    }

    let out = Command::new(bin("grad"))
        .args(["user", "add", "Bad Name", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        out.stderr_str().contains("invalid user name 'Bad Name'"),
        "{}",
        out.stderr_str()
    );
}

#[test]
fn grad_refuses_a_port_in_use_naming_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("grad"))
        .args(["serve", "--listen", &addr, "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stderr_str().contains(&addr), "{}", out.stderr_str());
}

//! Authentication and ownership: tokens are checked on every call, and users
//! never see or touch each other's runners.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::{os::unix::fs::PermissionsExt, time::Duration};

use gractl::client::Client;
use grad_proto::{Resources, RunnerState};
use grad_tests::{Grad, OutputExt};
use jsonwebtoken::{EncodingKey, Header};

fn sign(secret: &[u8], claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_is_written_once_readable_only_by_its_owner() {
    let grad = Grad::start();
    let meta = std::fs::metadata(grad.data_dir.join("admin.token")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let me = grad.admin().await.whoami().await.unwrap();
    assert_eq!((me.name.as_str(), me.role.as_str()), ("admin", "admin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_a_valid_token_are_refused() {
    let grad = Grad::start();
    // No token at all.
    let out = grad
        .gractl("")
        .env_remove("GRAD_TOKEN")
        .args(["runner", "list"])
        .output()
        .unwrap();
    assert_eq!(out.code(), 3, "{}", out.stderr_str());

    // Forged: signed with another key.
    let forged = sign(
        &[9u8; 32],
        serde_json::json!({"sub": "x", "kind": "user", "name": "admin", "role": "admin",
                           "plan": "pro", "jti": "j", "iat": unix_now(), "exp": unix_now() + 600}),
    );
    let out = grad
        .gractl(&forged)
        .args(["runner", "list"])
        .output()
        .unwrap();
    assert_eq!(out.code(), 3, "{}", out.stderr_str());
    assert!(
        out.stderr_str().contains("bad signature"),
        "{}",
        out.stderr_str()
    );

    // Expired: signed with grad's own key, but past its expiry.
    let key = std::fs::read(grad.data_dir.join("jwt.key")).unwrap();
    let me = grad.admin().await.whoami().await.unwrap();
    assert_eq!(me.name, "admin");
    let expired = sign(
        &key,
        serde_json::json!({"sub": "x", "kind": "user", "name": "admin", "role": "admin",
                           "plan": "pro", "jti": "j", "iat": unix_now() - 100, "exp": unix_now() - 10}),
    );
    let out = grad
        .gractl(&expired)
        .args(["runner", "list"])
        .output()
        .unwrap();
    assert_eq!(out.code(), 3, "{}", out.stderr_str());
    assert!(
        out.stderr_str().contains("token expired"),
        "{}",
        out.stderr_str()
    );

    // Garbage.
    let err = Client::connect(&grad.url, "not-a-jwt")
        .await
        .unwrap()
        .list_runners(false)
        .await
        .unwrap_err();
    assert_eq!(err.status().unwrap().code(), tonic::Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_never_sees_or_touches_another_users_runner() {
    let grad = Grad::start();
    let alice = grad.client(&grad.add_user("alice", &[])).await;
    let bob = grad.client(&grad.add_user("bob", &[])).await;
    alice
        .create_runner("r1", Resources::default(), Vec::new())
        .await
        .unwrap();
    alice
        .wait_runner("r1", &[RunnerState::Ready], Duration::from_secs(20))
        .await
        .unwrap();

    assert!(bob.list_runners(false).await.unwrap().is_empty());
    // Exactly what a runner that does not exist gets: nothing leaks.
    for (name, err) in [
        ("r1", bob.get_runner("r1").await.unwrap_err()),
        ("r1", bob.pause_runner("r1", false).await.unwrap_err()),
        ("r1", bob.resume_runner("r1").await.unwrap_err()),
        ("r1", bob.delete_runner("r1", false).await.unwrap_err()),
        ("r1", bob.list_executions("r1", 10).await.unwrap_err()),
        ("alice/r1", bob.get_runner("alice/r1").await.unwrap_err()),
    ] {
        let status = err.status().unwrap();
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
        assert_eq!(status.message(), format!("runner '{name}' not found"));
    }
    let out = grad
        .gractl(&grad.add_user("carol", &[]))
        .args(["execute-code", "-r", "r1", "--code", "1"])
        .output()
        .unwrap();
    assert_eq!(out.code(), 4, "{}", out.stderr_str());
    // Bob may use the same name for his own runner.
    bob.create_runner("r1", Resources::default(), Vec::new())
        .await
        .unwrap();

    // Alice's runner is untouched.
    let r = alice.get_runner("r1").await.unwrap();
    assert_eq!(r.state(), RunnerState::Ready);

    // Admins see everyone's, and may address them as OWNER/NAME.
    let admin = grad.admin().await;
    let all = admin.list_runners(true).await.unwrap();
    let mut owners: Vec<_> = all
        .iter()
        .map(|r| format!("{}/{}", r.owner, r.name))
        .collect();
    owners.sort();
    assert_eq!(owners, ["alice/r1", "bob/r1"]);
    assert_eq!(admin.get_runner("alice/r1").await.unwrap().owner, "alice");
    let err = alice.list_runners(true).await.unwrap_err();
    assert_eq!(err.status().unwrap().code(), tonic::Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpus_need_the_pro_plan() {
    let grad = Grad::start();
    let free = grad.client(&grad.add_user("free", &[])).await;
    let pro = grad.client(&grad.add_user("pro", &["--plan", "pro"])).await;
    let gpu = Resources {
        gpus: 1,
        ..Default::default()
    };
    let err = free.create_runner("g1", gpu, Vec::new()).await.unwrap_err();
    assert_eq!(err.status().unwrap().code(), tonic::Code::PermissionDenied);
    assert!(err.to_string().contains("pro plan"), "{err}");
    pro.create_runner("g1", gpu, Vec::new()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_token_cannot_call_user_methods_and_users_cannot_attach() {
    let grad = Grad::start();
    let key = std::fs::read(grad.data_dir.join("jwt.key")).unwrap();
    let runner_token = sign(
        &key,
        serde_json::json!({"sub": "some-runner", "kind": "runner", "jti": "t",
                           "iat": unix_now(), "exp": unix_now() + 600}),
    );
    let err = Client::connect(&grad.url, &runner_token)
        .await
        .unwrap()
        .list_runners(false)
        .await
        .unwrap_err();
    assert_eq!(err.status().unwrap().code(), tonic::Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_stores_credentials_readable_only_by_the_user() {
    let grad = Grad::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gractl/config.yaml");
    let out = grad
        .gractl("")
        .env_remove("GRAD_TOKEN")
        .env_remove("GRAD_SERVER")
        .env("GRACTL_CONFIG", &config)
        .args(["login", "--server", &grad.url, "--token-file"])
        .arg(grad.data_dir.join("admin.token"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", out.stderr_str());
    assert_eq!(
        std::fs::metadata(&config).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let out = grad
        .gractl("")
        .env_remove("GRAD_TOKEN")
        .env_remove("GRAD_SERVER")
        .env("GRACTL_CONFIG", &config)
        .args(["runner", "list", "-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", out.stderr_str());
}

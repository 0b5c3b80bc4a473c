//! Tunnels and SSH keys at the API level: who may open a tunnel to which
//! runner, and users' SSH keys. (SSH through tunnels is in ssh.rs.)

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::time::Duration;

use grad_proto::{
    AddSshKeyRequest, DeleteSshKeyRequest, ListSshKeysRequest, Resources, RunnerState, TunnelFrame,
    tunnels_client::TunnelsClient, users_client::UsersClient,
};
use grad_tests::Grad;
use tonic::{Code, Request, transport::Channel};

const KEY_A: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFwxNjMS61BO9lU4HLNZtAs7V3SZVOjctFI85IOQxleu alice@laptop";
const KEY_A_FINGERPRINT: &str = "SHA256:AE1qvapWigr2BiiDT7/EbUBMqYt07b/Q7URHRUQSkD4";

fn with_token<T>(token: &str, message: T) -> Request<T> {
    let mut req = Request::new(message);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

async fn channel(grad: &Grad) -> Channel {
    Channel::from_shared(grad.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Opens a tunnel to `runner` and returns how grad answered.
async fn open(grad: &Grad, token: &str, runner: &str) -> Result<(), tonic::Status> {
    let first = TunnelFrame {
        runner: runner.into(),
        ..Default::default()
    };
    let frames = tokio_stream::iter([first]).chain(tokio_stream::pending());
    TunnelsClient::new(channel(grad).await)
        .open(with_token(token, frames))
        .await
        .map(|_| ())
}

use tokio_stream::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_cannot_open_a_tunnel_to_another_users_runner() {
    let grad = Grad::start();
    let alice_token = grad.add_user("alice", &[]);
    let bob_token = grad.add_user("bob", &[]);
    let alice = grad.client(&alice_token).await;
    alice
        .create_runner("r1", Resources::default(), Vec::new())
        .await
        .unwrap();
    alice
        .wait_runner("r1", &[RunnerState::Ready], Duration::from_secs(20))
        .await
        .unwrap();
    let err = open(&grad, &bob_token, "r1").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(err.message(), "runner 'r1' not found");
    let err = open(&grad, &bob_token, "alice/r1").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = open(&grad, "forged", "r1").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_needs_a_runner_name_and_a_ready_runner() {
    let grad = Grad::start();
    let admin = grad.admin().await;
    let err = open(&grad, &grad.admin_token, "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("runner"), "{err:?}");

    admin
        .create_runner("r1", Resources::default(), Vec::new())
        .await
        .unwrap();
    admin.pause_runner("r1", false).await.unwrap();
    admin
        .wait_runner("r1", &[RunnerState::Paused], Duration::from_secs(20))
        .await
        .unwrap();
    let err = open(&grad, &grad.admin_token, "r1").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("gractl runner resume r1"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_cannot_serve_the_runner_side_of_a_tunnel() {
    let grad = Grad::start();
    let first = TunnelFrame {
        tunnel_id: "guess".into(),
        ..Default::default()
    };
    let err = grad_proto::runner_agent_client::RunnerAgentClient::new(channel(&grad).await)
        .tunnel(with_token(&grad.admin_token, tokio_stream::iter([first])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_keys_are_registered_once_listed_and_deleted_per_user() {
    let grad = Grad::start();
    let alice = grad.add_user("alice", &[]);
    let bob = grad.add_user("bob", &[]);
    let mut users = UsersClient::new(channel(&grad).await);
    let add = |token: &str, key: &str| {
        with_token(
            token,
            AddSshKeyRequest {
                public_key: key.into(),
                name: String::new(),
            },
        )
    };
    let key = users
        .add_ssh_key(add(&alice, KEY_A))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(key.fingerprint, KEY_A_FINGERPRINT);
    assert_eq!(key.name, "alice@laptop");
    // Idempotent.
    users.add_ssh_key(add(&alice, KEY_A)).await.unwrap();
    let list = |token: &str| with_token(token, ListSshKeysRequest {});
    assert_eq!(
        users
            .list_ssh_keys(list(&alice))
            .await
            .unwrap()
            .into_inner()
            .keys
            .len(),
        1
    );
    assert!(
        users
            .list_ssh_keys(list(&bob))
            .await
            .unwrap()
            .into_inner()
            .keys
            .is_empty()
    );

    let err = users
        .add_ssh_key(add(&alice, "ssh-ed25519 nonsense"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("public_key: "), "{err:?}");

    let delete = |token: &str| {
        with_token(
            token,
            DeleteSshKeyRequest {
                fingerprint: KEY_A_FINGERPRINT.into(),
            },
        )
    };
    let err = users.delete_ssh_key(delete(&bob)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    users.delete_ssh_key(delete(&alice)).await.unwrap();
    assert!(
        users
            .list_ssh_keys(list(&alice))
            .await
            .unwrap()
            .into_inner()
            .keys
            .is_empty()
    );
}

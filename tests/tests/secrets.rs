//! Secrets through gractl against the real grad: values go in by stdin or
//! file (never argv), never come back out, are sealed in the database, and
//! belong to their owner alone. A configured key that is missing stops
//! grad at start.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

use grad_tests::{Grad, OutputExt, bin, files_containing};
use serde_json::Value;

const VALUE: &str = "AKIDEXAMPLE:wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY";

fn set(grad: &Grad, token: &str, name: &str, value: &str) -> Output {
    grad.run_with_input(token, &["secret", "set", name], value.as_bytes())
}

fn json(out: &Output) -> Value {
    assert!(out.status.success(), "{}", out.stderr_str());
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn secrets_are_set_from_stdin_listed_without_values_and_sealed_at_rest() {
    let grad = Grad::start();
    let out = set(&grad, &grad.admin_token, "taxi-s3", &format!("{VALUE}\n"));
    assert!(out.status.success(), "{}", out.stderr_str());
    assert_eq!(out.stdout_str(), "secret/taxi-s3 set\n");

    let listed = grad.run(&["secret", "list"]);
    let table = listed.stdout_str();
    assert!(
        table.starts_with("NAME") && table.contains("taxi-s3"),
        "{table}"
    );
    assert!(!table.contains("wJalr"), "a value was listed: {table}");
    let listed = json(&grad.run(&["secret", "list", "-o", "json"]));
    assert_eq!(listed["secrets"][0]["name"], "taxi-s3");
    assert!(!listed.to_string().contains("wJalr"), "{listed}");

    // Nowhere in the data dir (database, WAL, logs) in plaintext.
    let secret_part = VALUE.split_once(':').unwrap().1.as_bytes();
    assert_eq!(
        files_containing(&grad.data_dir, secret_part),
        Vec::<std::path::PathBuf>::new()
    );

    // Replacing keeps the creation time; deleting twice is "not found".
    let first = listed["secrets"][0].clone();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), "other:value\n").unwrap();
    let replaced = json(&grad.run(&[
        "secret",
        "set",
        "taxi-s3",
        "--from-file",
        file.path().to_str().unwrap(),
        "-o",
        "json",
    ]));
    assert_eq!(replaced["created"], first["created"]);
    assert_ne!(replaced["updated"], first["updated"]);
    assert!(grad.run(&["secret", "rm", "taxi-s3"]).status.success());
    let again = grad.run(&["secret", "rm", "taxi-s3"]);
    assert_eq!(again.code(), 4, "{}", again.stderr_str());

    // Bad names and empty values are refused, naming what is valid.
    let bad = set(&grad, &grad.admin_token, "has space", "x");
    assert_eq!(bad.code(), 2, "{}", bad.stderr_str());
    assert!(
        bad.stderr_str().contains("invalid secret name 'has space'"),
        "{}",
        bad.stderr_str()
    );
    let empty = set(&grad, &grad.admin_token, "empty", "\n");
    assert_eq!(empty.code(), 2, "{}", empty.stderr_str());
    assert!(empty.stderr_str().contains("the value is empty"));
}

#[test]
fn a_users_secrets_are_theirs_alone() {
    let grad = Grad::start();
    let alice = grad.add_user("alice", &[]);
    let bob = grad.add_user("bob", &[]);
    assert!(
        set(&grad, &alice, "api-key", "alice-value")
            .status
            .success()
    );
    assert!(set(&grad, &bob, "other", "bob-value").status.success());

    let as_bob = |args: &[&str]| grad.gractl(&bob).args(args).output().unwrap();
    let listed = json(&as_bob(&["secret", "list", "-o", "json"]));
    let names: Vec<&str> = listed["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["other"]);
    let out = as_bob(&["secret", "rm", "api-key"]);
    assert_eq!(out.code(), 4, "{}", out.stderr_str());
    // The same name is bob's own secret, not alice's.
    assert!(set(&grad, &bob, "api-key", "bob's own").status.success());
    let out = grad
        .gractl(&alice)
        .args(["secret", "list"])
        .output()
        .unwrap();
    assert!(out.stdout_str().contains("api-key"));
}

#[test]
fn a_missing_secrets_key_file_stops_grad_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such.key");
    let out = Command::new(bin("grad"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--secrets-key-file")
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = out.stderr_str();
    assert!(
        said.contains(&format!("--secrets-key-file {}", missing.display()))
            && said.contains("head -c 32 /dev/urandom"),
        "{said}"
    );
    assert!(
        !dir.path().join("data/grad.db").exists(),
        "grad started without its key"
    );
}

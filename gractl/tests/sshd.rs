//! gractl's SSH and SFTP client against OpenSSH's own server (see
//! `common`): the same client code that `gractl ssh` and `gractl cp` run
//! over a grad tunnel, here over `sshd -i`'s stdin and stdout.

#![allow(clippy::unwrap_used)] // a panic is the failure report

mod common;

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use common::{Server, user};
use gractl::{
    ssh::{
        self, Error, Handle, Identity,
        session::{Exit, Input, Pty, Request},
    },
    transfer::{self, PARALLEL_FILES},
};

/// Runs `request` with `input`; returns how it ended, stdout and stderr.
async fn run(handle: &Handle, request: Request, input: Vec<Input>) -> (Exit, String, String) {
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let exit = ssh::session::run(
        handle,
        &request,
        tokio_stream::iter(input),
        &mut stdout,
        &mut stderr,
    )
    .await
    .unwrap();
    (
        exit,
        String::from_utf8(stdout).unwrap(),
        String::from_utf8(stderr).unwrap(),
    )
}

fn command(line: &str) -> Request {
    Request {
        command: Some(line.into()),
        ..Request::default()
    }
}

#[tokio::test]
async fn a_command_streams_its_output_and_exits_with_its_status() {
    let Some(server) = Server::new() else { return };
    let (_sshd, handle) = server.connect().await;
    let (exit, out, err) = run(
        &handle,
        command("echo out; echo err >&2; exit 3"),
        vec![Input::Eof],
    )
    .await;
    assert_eq!(
        (exit.clone(), out.as_str(), err.as_str()),
        (Exit::Status(3), "out\n", "err\n")
    );
    assert_eq!(exit.code(), 3);

    // Several commands on one connection, each on its own channel.
    let (exit, out, _) = run(&handle, command("true"), vec![Input::Eof]).await;
    assert_eq!((exit, out.as_str()), (Exit::Status(0), ""));
}

#[tokio::test]
async fn stdin_reaches_the_command_until_end_of_input() {
    let Some(server) = Server::new() else { return };
    let (_sshd, handle) = server.connect().await;
    let big: Vec<u8> = (0..3_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let input = vec![
        Input::Data(b"hello\n".to_vec()),
        Input::Data(big.clone()),
        Input::Eof,
    ];
    let (exit, out, _) = run(&handle, command("wc -c"), input).await;
    assert_eq!(exit, Exit::Status(0));
    assert_eq!(out.trim(), (big.len() + 6).to_string());
}

#[tokio::test]
async fn a_command_killed_by_a_signal_exits_with_128_plus_its_number() {
    let Some(server) = Server::new() else { return };
    let (_sshd, handle) = server.connect().await;
    let (exit, _, _) = run(&handle, command("kill -TERM $$"), vec![Input::Eof]).await;
    assert_eq!(exit, Exit::Signal("TERM".into()));
    assert_eq!(exit.code(), 143);
}

#[tokio::test]
async fn a_terminal_has_the_requested_size_and_follows_resizes() {
    let Some(server) = Server::new() else { return };
    let (_sshd, handle) = server.connect().await;
    let request = Request {
        command: Some("stty size; echo $TERM; echo $LANG".into()),
        pty: Some(Pty {
            term: "xterm-256color".into(),
            columns: 100,
            rows: 30,
        }),
        env: vec![("LANG".into(), "C.UTF-8".into())],
    };
    let (exit, out, err) = run(&handle, request, vec![Input::Eof]).await;
    assert_eq!(exit, Exit::Status(0));
    // A terminal merges stderr into stdout and ends lines with CR LF.
    assert_eq!(out, "30 100\r\nxterm-256color\r\nC.UTF-8\r\n");
    assert_eq!(err, "");

    // A shell that waits for input sees the resize before it reads.
    let request = Request {
        command: Some("read line; stty size".into()),
        pty: Some(Pty {
            term: "xterm".into(),
            columns: 80,
            rows: 24,
        }),
        env: Vec::new(),
    };
    let input = vec![
        Input::Resize {
            columns: 120,
            rows: 40,
        },
        Input::Data(b"go\r".to_vec()),
    ];
    let (exit, out, _) = run(&handle, request, input).await;
    assert_eq!(exit, Exit::Status(0));
    assert!(out.ends_with("40 120\r\n"), "{out:?}");
}

#[tokio::test]
async fn another_host_key_is_refused_naming_both_fingerprints() {
    let Some(server) = Server::new() else { return };
    let (_sshd, stream) = server.spawn();
    let other = ssh::host_key(
        "r1",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFwxNjMS61BO9lU4HLNZtAs7V3SZVOjctFI85IOQxleu",
    )
    .unwrap();
    let Err(error) = ssh::connect_stream(stream, "r1", &other, &server.identity, &user()).await
    else {
        panic!("connected despite the wrong host key");
    };
    let Error::HostKeyMismatch {
        runner,
        expected,
        got,
    } = &error
    else {
        panic!("{error:?}");
    };
    assert_eq!(runner, "r1");
    assert_eq!(
        expected,
        "SHA256:AE1qvapWigr2BiiDT7/EbUBMqYt07b/Q7URHRUQSkD4"
    );
    assert_eq!(got, &ssh::fingerprint(&server.host_key));
    assert_eq!(
        error.to_string(),
        format!(
            "host key of runner r1 does not match the one grad recorded \
             (expected SHA256:AE1qvapWigr2BiiDT7/EbUBMqYt07b/Q7URHRUQSkD4, got {got})"
        )
    );
}

#[tokio::test]
async fn a_key_the_server_does_not_know_is_refused() {
    let Some(server) = Server::new() else { return };
    let (_sshd, stream) = server.spawn();
    let stranger = Identity::load_or_create(&server.dir.path().join("other/id_ed25519")).unwrap();
    let Err(error) = ssh::connect_stream(stream, "r1", &server.host_key, &stranger, &user()).await
    else {
        panic!("signed in with an unknown key");
    };
    assert!(
        matches!(&error, Error::KeyRejected { runner, fingerprint }
            if runner == "r1" && *fingerprint == stranger.fingerprint()),
        "{error:?}"
    );
}

/// A tree with nested directories, modes, an empty file and a file large
/// enough for many SFTP requests in flight.
fn make_tree(root: &Path) -> Vec<(String, Vec<u8>, u32)> {
    let files = vec![
        ("a.txt".to_owned(), b"alpha\n".to_vec(), 0o644),
        ("empty".to_owned(), Vec::new(), 0o600),
        (
            "bin/run.sh".to_owned(),
            b"#!/bin/sh\necho hi\n".to_vec(),
            0o755,
        ),
        (
            "data/deep/big.bin".to_owned(),
            (0..5_000_003u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
            0o640,
        ),
    ];
    for (path, content, mode) in &files {
        let path = root.join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, content).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(*mode)).unwrap();
    }
    fs::set_permissions(root.join("data"), fs::Permissions::from_mode(0o750)).unwrap();
    files
}

fn assert_tree(root: &Path, files: &[(String, Vec<u8>, u32)]) {
    for (path, content, mode) in files {
        let path = root.join(path);
        let bytes = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(bytes == *content, "{} differs", path.display());
        let actual = fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(actual, *mode, "mode of {}", path.display());
    }
    let data = fs::metadata(root.join("data"))
        .unwrap()
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(data, 0o750);
}

fn counter() -> (Arc<AtomicU64>, transfer::Progress) {
    let total = Arc::new(AtomicU64::new(0));
    let seen = Arc::clone(&total);
    (
        total,
        Arc::new(move |bytes| {
            seen.fetch_add(bytes, Ordering::Relaxed);
        }),
    )
}

#[tokio::test]
async fn a_directory_tree_round_trips_through_sftp_with_its_modes() {
    let Some(server) = Server::new() else { return };
    let (_sshd, handle) = server.connect().await;
    let sftp = Arc::new(ssh::sftp(&handle).await.unwrap());
    let local = tempfile::tempdir().unwrap();
    let source = local.path().join("project");
    let files = make_tree(&source);
    let total: u64 = files
        .iter()
        .map(|(_, content, _)| content.len() as u64)
        .sum();

    // Upload into an existing directory: it lands under its own name.
    let remote = server.files().display().to_string();
    let plan = transfer::plan_upload(&sftp, "sshd", std::slice::from_ref(&source), &remote, true)
        .await
        .unwrap();
    assert_eq!(plan.total_bytes(), total);
    assert_eq!(plan.file_count(), files.len());
    let (seen, progress) = counter();
    let report = plan
        .execute(Arc::clone(&sftp), PARALLEL_FILES, progress)
        .await
        .unwrap();
    assert_eq!(report.bytes, total);
    assert_eq!(seen.load(Ordering::Relaxed), total);
    assert_eq!(report.copied.len(), files.len());
    assert!(
        report
            .copied
            .contains(&format!("sshd:{remote}/project/bin/run.sh"))
    );
    assert_tree(&server.files().join("project"), &files);

    // And back, to a new name.
    let back = local.path().join("back");
    let plan = transfer::plan_download(&sftp, "sshd", &[format!("{remote}/project")], &back, true)
        .await
        .unwrap();
    assert_eq!(plan.total_bytes(), total);
    let (_, progress) = counter();
    let report = plan
        .execute(Arc::clone(&sftp), PARALLEL_FILES, progress)
        .await
        .unwrap();
    assert_eq!(report.bytes, total);
    assert_tree(&back, &files);

    // Copying it again over the existing tree replaces the files.
    fs::write(source.join("a.txt"), "changed\n").unwrap();
    let plan = transfer::plan_upload(
        &sftp,
        "sshd",
        &[source.join("a.txt")],
        &format!("{remote}/project/"),
        false,
    )
    .await
    .unwrap();
    let (_, progress) = counter();
    plan.execute(Arc::clone(&sftp), 1, progress).await.unwrap();
    assert_eq!(
        fs::read_to_string(server.files().join("project/a.txt")).unwrap(),
        "changed\n"
    );
}

#[tokio::test]
async fn single_files_copy_to_a_new_name_or_into_a_directory() {
    let Some(server) = Server::new() else { return };
    let (_sshd, handle) = server.connect().await;
    let sftp = Arc::new(ssh::sftp(&handle).await.unwrap());
    let local = tempfile::tempdir().unwrap();
    fs::write(local.path().join("x.py"), "print(1)\n").unwrap();
    let remote = server.files().display().to_string();

    let plan = transfer::plan_upload(
        &sftp,
        "sshd",
        &[local.path().join("x.py")],
        &format!("{remote}/renamed.py"),
        false,
    )
    .await
    .unwrap();
    let (_, progress) = counter();
    let report = plan.execute(Arc::clone(&sftp), 4, progress).await.unwrap();
    assert_eq!(report.copied, [format!("sshd:{remote}/renamed.py")]);

    let plan = transfer::plan_download(
        &sftp,
        "sshd",
        &[format!("{remote}/renamed.py")],
        local.path(),
        false,
    )
    .await
    .unwrap();
    let (_, progress) = counter();
    plan.execute(Arc::clone(&sftp), 4, progress).await.unwrap();
    assert_eq!(
        fs::read_to_string(local.path().join("renamed.py")).unwrap(),
        "print(1)\n"
    );
}

#[tokio::test]
async fn copy_errors_name_the_path_and_the_flag() {
    let Some(server) = Server::new() else { return };
    let (_sshd, handle) = server.connect().await;
    let sftp = ssh::sftp(&handle).await.unwrap();
    let remote = server.files().display().to_string();
    fs::create_dir(server.files().join("dir")).unwrap();
    let local = tempfile::tempdir().unwrap();

    let error = transfer::plan_download(
        &sftp,
        "r1",
        &[format!("{remote}/missing")],
        local.path(),
        false,
    )
    .await
    .expect_err("missing");
    assert_eq!(
        error.to_string(),
        format!("r1:{remote}/missing: no such file or directory")
    );

    let error =
        transfer::plan_download(&sftp, "r1", &[format!("{remote}/dir")], local.path(), false)
            .await
            .expect_err("directory");
    assert_eq!(
        error.to_string(),
        format!("r1:{remote}/dir is a directory; pass -r/--recursive to copy it")
    );

    let error = transfer::plan_upload(&sftp, "r1", &[local.path().to_owned()], &remote, false)
        .await
        .expect_err("local directory");
    assert!(
        matches!(error, transfer::Error::IsDirectory { .. }),
        "{error:?}"
    );

    let error = transfer::plan_upload(&sftp, "r1", &[local.path().join("nope")], &remote, false)
        .await
        .expect_err("missing local");
    assert_eq!(
        error.to_string(),
        format!(
            "{}: no such file or directory",
            local.path().join("nope").display()
        )
    );
}

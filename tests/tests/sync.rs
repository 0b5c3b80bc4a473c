//! `gractl workspace sync`: every runner of mine mounted under
//! `runners/<name>/` through a real FUSE mount over SFTP over the tunnel.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use grad_proto::{Resources, RunnerState};
use grad_tests::{Grad, OutputExt, require, wait_until};

fn fuse_available() -> bool {
    require(
        "FUSE (/dev/fuse and fusermount3: apt-get install fuse3)",
        Path::new("/dev/fuse").exists()
            && std::process::Command::new("fusermount3")
                .arg("-V")
                .output()
                .is_ok(),
    )
}

fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = path.display().to_string();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(path.as_str()))
}

struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    fn new(grad: &Grad) -> Workspace {
        let dir = tempfile::tempdir().unwrap();
        let out = grad
            .gractl(&grad.admin_token)
            .args(["workspace", "init"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", out.stderr_str());
        Workspace { dir }
    }

    fn gractl(&self, grad: &Grad, args: &[&str]) -> Output {
        grad.gractl(&grad.admin_token)
            .current_dir(self.dir.path())
            .args(args)
            .output()
            .unwrap()
    }

    fn mount(&self, runner: &str) -> PathBuf {
        self.dir.path().join("runners").join(runner)
    }
}

fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sha256sum {}: {}",
        path.display(),
        out.stderr_str()
    );
    out.stdout_str()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_written_on_either_side_show_on_the_other() {
    if !fuse_available() {
        return;
    }
    let grad = Grad::with_runners(&["r1"]).await;
    let ws = Workspace::new(&grad);
    let out = ws.gractl(&grad, &["workspace", "sync"]);
    assert!(
        out.status.success(),
        "{}{}",
        out.stdout_str(),
        out.stderr_str()
    );
    let mnt = ws.mount("r1");
    assert!(is_mounted(&mnt), "runners/r1 is not mounted");
    let remote = grad.workspace("admin", "r1");

    // Local → runner, and visible to code running there.
    std::fs::write(mnt.join("code/train.py"), "print('trained')\n").unwrap();
    assert_eq!(
        std::fs::read_to_string(remote.join("code/train.py")).unwrap(),
        "print('trained')\n"
    );
    let out = ws.gractl(
        &grad,
        &[
            "execute-code",
            "-r",
            "r1",
            "--code",
            "exec(open('train.py').read())",
        ],
    );
    assert_eq!(out.stdout_str(), "trained\n", "{}", out.stderr_str());

    // Runner → local (within the attribute cache's lifetime).
    let out = ws.gractl(
        &grad,
        &[
            "execute-code",
            "-r",
            "r1",
            "--code",
            "open('../outputs/result.csv', 'w').write('x\\n1\\n')",
        ],
    );
    assert!(out.status.success(), "{}", out.stderr_str());
    wait_until(
        "the runner's file to show locally",
        Duration::from_secs(5),
        || std::fs::read_to_string(mnt.join("outputs/result.csv")).is_ok_and(|s| s == "x\n1\n"),
    );

    // Rename, delete, mkdir, rmdir, symlink, chmod, truncate.
    std::fs::rename(mnt.join("code/train.py"), mnt.join("code/fit.py")).unwrap();
    assert!(remote.join("code/fit.py").exists() && !remote.join("code/train.py").exists());
    std::fs::create_dir(mnt.join("code/pkg")).unwrap();
    std::os::unix::fs::symlink("../fit.py", mnt.join("code/pkg/link.py")).unwrap();
    assert_eq!(
        std::fs::read_link(remote.join("code/pkg/link.py")).unwrap(),
        Path::new("../fit.py")
    );
    std::fs::remove_file(mnt.join("code/pkg/link.py")).unwrap();
    std::fs::remove_dir(mnt.join("code/pkg")).unwrap();
    assert!(!remote.join("code/pkg").exists());
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            mnt.join("code/fit.py"),
            std::fs::Permissions::from_mode(0o750),
        )
        .unwrap();
        let mode = std::fs::metadata(remote.join("code/fit.py"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o750);
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("code/fit.py"))
        .unwrap();
    f.set_len(5).unwrap();
    drop(f);
    assert_eq!(std::fs::read(remote.join("code/fit.py")).unwrap(), b"print");
    std::fs::remove_file(mnt.join("code/fit.py")).unwrap();
    assert!(!remote.join("code/fit.py").exists());

    let out = ws.gractl(&grad, &["workspace", "sync", "--status"]);
    assert!(out.status.success(), "{}", out.stderr_str());
    assert!(out.stdout_str().contains("r1"), "{}", out.stdout_str());

    let out = ws.gractl(&grad, &["workspace", "unsync"]);
    assert!(out.status.success(), "{}", out.stderr_str());
    assert!(!is_mounted(&mnt), "unsync left runners/r1 mounted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_file_and_many_small_files_round_trip() {
    if !fuse_available() {
        return;
    }
    let grad = Grad::with_runners(&["r1"]).await;
    let ws = Workspace::new(&grad);
    let out = ws.gractl(&grad, &["workspace", "sync"]);
    assert!(
        out.status.success(),
        "{}{}",
        out.stdout_str(),
        out.stderr_str()
    );
    let mnt = ws.mount("r1");
    let remote = grad.workspace("admin", "r1");

    // 256 MiB of pseudo-random bytes, written through the mount.
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("big.bin");
    {
        let mut urandom = std::fs::File::open("/dev/urandom").unwrap();
        let mut out = std::io::BufWriter::new(std::fs::File::create(&src).unwrap());
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..256 {
            urandom.read_exact(&mut buf).unwrap();
            out.write_all(&buf).unwrap();
        }
    }
    std::fs::copy(&src, mnt.join("data/big.bin")).unwrap();
    let expected = sha256(&src);
    assert_eq!(sha256(&remote.join("data/big.bin")), expected);
    assert_eq!(sha256(&mnt.join("data/big.bin")), expected);

    std::fs::create_dir(mnt.join("data/small")).unwrap();
    for i in 0..2000 {
        std::fs::write(mnt.join(format!("data/small/f{i}")), format!("file {i}\n")).unwrap();
    }
    assert_eq!(
        std::fs::read_dir(remote.join("data/small"))
            .unwrap()
            .count(),
        2000
    );
    assert_eq!(
        std::fs::read_dir(mnt.join("data/small")).unwrap().count(),
        2000
    );
    assert_eq!(
        std::fs::read_to_string(mnt.join("data/small/f1999")).unwrap(),
        "file 1999\n"
    );

    let out = ws.gractl(&grad, &["workspace", "unsync"]);
    assert!(out.status.success(), "{}", out.stderr_str());
    assert!(!is_mounted(&mnt));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_a_runner_unmounts_it_and_a_new_runner_appears_on_the_next_sync() {
    if !fuse_available() {
        return;
    }
    let grad = Grad::with_runners(&["r1"]).await;
    let ws = Workspace::new(&grad);
    assert!(ws.gractl(&grad, &["workspace", "sync"]).status.success());
    assert!(is_mounted(&ws.mount("r1")));

    let admin = grad.admin().await;
    admin
        .create_runner("r2", Resources::default(), Vec::new())
        .await
        .unwrap();
    admin
        .wait_runner("r2", &[RunnerState::Ready], Duration::from_secs(20))
        .await
        .unwrap();
    let out = ws.gractl(&grad, &["workspace", "sync"]);
    assert!(out.status.success(), "{}", out.stderr_str());
    assert!(
        is_mounted(&ws.mount("r2")),
        "r2 was not mounted by the second sync"
    );

    admin.pause_runner("r1", false).await.unwrap();
    wait_until(
        "runners/r1 to be unmounted after the pause",
        Duration::from_secs(15),
        || !is_mounted(&ws.mount("r1")),
    );
    assert!(is_mounted(&ws.mount("r2")));
    assert!(ws.gractl(&grad, &["workspace", "unsync"]).status.success());
    assert!(!is_mounted(&ws.mount("r2")));
}

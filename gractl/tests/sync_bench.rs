//! Measurements, not checks (all `#[ignore]`d): the workspace sync's mount
//! and `sshfs` side by side on the same workloads as BENCHMARKS.md, over
//! the same link, printed as a table. Run with
//! `cargo test --release -p gractl --test sync_bench -- --ignored --nocapture`.
//!
//! Two links: OpenSSH's `sftp-server` on pipes (the filesystems alone) and
//! a private `sshd -i` (SSH included: gractl's russh client against
//! OpenSSH's `ssh` under sshfs). The remote directory is on tmpfs, so the
//! disk is not what is measured. The machine's other load shows in the
//! numbers: compare the columns of one run, not runs.

#![allow(clippy::unwrap_used)] // a panic is the failure report

mod common;

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use gractl::{
    ssh,
    sync::{self, Connect, Mount, Options, connect_with, daemon},
};

const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";
const SSHFS: &str = "/usr/bin/sshfs";
const RUNS: usize = 3;

fn ready() -> bool {
    let missing = [SFTP_SERVER, SSHFS, common::SSHD]
        .into_iter()
        .find(|path| !Path::new(path).exists())
        .map(|path| format!("{path} is missing"))
        .or_else(|| sync::check_prerequisites().err().map(|e| e.to_string()))
        .or_else(|| (!common::is_root()).then(|| "needs root".to_owned()));
    if let Some(why) = &missing {
        eprintln!("skipping: {why}");
    }
    missing.is_none()
}

/// Runs `script` with `sh` in `dir`, timed.
fn timed(dir: &Path, script: &str) -> Duration {
    let started = Instant::now();
    let status = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "{script}");
    started.elapsed()
}

fn drop_caches() {
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

const NAMES: [&str; 5] = [
    "write 256 MiB (MB/s)",
    "read 256 MiB cold (MB/s)",
    "create 2000 files (s)",
    "ls -lR cold (s)",
    "cat 2000 files cold (s)",
];

/// A way to mount an empty remote directory at a mount point, twice.
trait Side {
    fn mount(&mut self, point: &Path);
    fn unmount(&mut self, point: &Path);
}

/// The workloads through a fresh mount of an empty remote directory; "cold"
/// ones run on a fresh mount with the page cache dropped.
fn workloads(side: &mut dyn Side) -> [f64; 5] {
    let point = tempfile::tempdir().unwrap();
    let point = point.path();
    let remount = |side: &mut dyn Side| {
        side.unmount(point);
        drop_caches();
        side.mount(point);
    };
    side.mount(point);
    let mb = 256.0 * 1.048_576;
    let write = timed(
        point,
        "dd if=/dev/zero of=seq.bin bs=1M count=256 conv=fsync 2>/dev/null",
    );
    remount(side);
    let read = timed(point, "cat seq.bin > /dev/null");
    let creates = timed(
        point,
        "mkdir small && for i in $(seq 2000); do echo $i > small/f$i; done",
    );
    remount(side);
    let list = timed(point, "ls -lR > /dev/null");
    remount(side);
    let cat = timed(point, "cat small/* > /dev/null");
    timed(point, "rm -r small seq.bin");
    side.unmount(point);
    [
        mb / write.as_secs_f64(),
        mb / read.as_secs_f64(),
        creates.as_secs_f64(),
        list.as_secs_f64(),
        cat.as_secs_f64(),
    ]
}

fn median(runs: &[[f64; 5]], i: usize) -> f64 {
    let mut values: Vec<f64> = runs.iter().map(|run| run[i]).collect();
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn compare(link: &str, ours: &mut dyn Side, theirs: &mut dyn Side) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        a.push(workloads(ours));
        b.push(workloads(theirs));
    }
    eprintln!("\n{link} (median of {RUNS})");
    eprintln!("{:<28} {:>10} {:>10}", "", "gractl", "sshfs");
    for (i, name) in NAMES.iter().enumerate() {
        eprintln!("{name:<28} {:>10.2} {:>10.2}", median(&a, i), median(&b, i));
    }
}

/// gractl's mount, through `connect`.
struct Gractl {
    runtime: tokio::runtime::Runtime,
    root: PathBuf,
    connect: Connect,
    mount: Option<Mount>,
}

impl Gractl {
    fn new(root: &Path, connect: Connect) -> Gractl {
        Gractl {
            runtime: tokio::runtime::Runtime::new().unwrap(),
            root: root.to_owned(),
            connect,
            mount: None,
        }
    }
}

impl Side for Gractl {
    fn mount(&mut self, point: &Path) {
        let options = Options {
            root: self.root.to_str().unwrap().to_owned(),
            ..Options::default()
        };
        let mount = sync::mount(point, Arc::clone(&self.connect), options);
        self.mount = Some(self.runtime.block_on(mount).unwrap());
    }

    fn unmount(&mut self, _point: &Path) {
        if let Some(mount) = self.mount.take() {
            self.runtime.block_on(mount.unmount()).unwrap();
        }
    }
}

/// sshfs with its defaults and extra `-o` options.
struct Sshfs {
    remote: String,
    options: Vec<String>,
}

impl Side for Sshfs {
    fn mount(&mut self, point: &Path) {
        let mut command = Command::new(SSHFS);
        for option in &self.options {
            command.arg("-o").arg(option);
        }
        let status = command.arg(&self.remote).arg(point).status().unwrap();
        assert!(status.success());
    }

    fn unmount(&mut self, point: &Path) {
        let _ = Command::new("fusermount3").arg("-u").arg(point).status();
    }
}

/// `sftp-server` in `root`, on pipes.
fn sftp_server(root: &Path) -> Connect {
    let root = root.to_owned();
    connect_with(move || {
        let root = root.clone();
        async move {
            let mut child = tokio::process::Command::new(SFTP_SERVER)
                .current_dir(&root)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            let (stdin, stdout) = (child.stdin.take().unwrap(), child.stdout.take().unwrap());
            Ok::<_, std::io::Error>(tokio::io::join(stdout, stdin))
        }
    })
}

/// SSH to a fresh `sshd -i` (kept in `sshds` while in use), then its SFTP
/// subsystem, as the workspace sync reaches a runner.
fn over_ssh(
    server: &Arc<common::Server>,
    sshds: &Arc<Mutex<Vec<tokio::process::Child>>>,
) -> Connect {
    let (server, sshds) = (Arc::clone(server), Arc::clone(sshds));
    connect_with(move || {
        let (server, sshds) = (Arc::clone(&server), Arc::clone(&sshds));
        async move {
            let (child, stream) = server.spawn();
            sshds.lock().unwrap().push(child);
            let handle =
                ssh::connect_stream(stream, "bench", &server.host_key, &server.identity, "root")
                    .await?;
            daemon::sftp_stream(handle).await
        }
    })
}

#[test]
#[ignore = "a measurement"]
fn over_sftp_server_pipes_side_by_side_with_sshfs() {
    if !ready() {
        return;
    }
    let remote = tempfile::tempdir_in("/dev/shm").unwrap();
    let root = remote.path().to_owned();
    let mut ours = Gractl::new(&root, sftp_server(&root));
    // sshfs runs this instead of ssh: sftp-server in the remote directory.
    let script = root.join(".fake-ssh");
    fs::write(
        &script,
        format!("#!/bin/sh\ncd {} && exec {SFTP_SERVER}\n", root.display()),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let mut theirs = Sshfs {
        remote: format!("x:{}", root.display()),
        options: vec![format!("ssh_command={}", script.display())],
    };
    compare("over sftp-server on pipes", &mut ours, &mut theirs);
}

#[test]
#[ignore = "a measurement"]
fn over_ssh_side_by_side_with_sshfs() {
    if !ready() {
        return;
    }
    let server = Arc::new(common::Server::new().unwrap());
    let remote = tempfile::tempdir_in("/dev/shm").unwrap();
    let root = remote.path().to_owned();
    let sshds = Arc::new(Mutex::new(Vec::new()));
    let mut ours = Gractl::new(&root, over_ssh(&server, &sshds));
    let mut theirs = Sshfs {
        remote: format!("root@bench:{}", root.display()),
        options: vec![
            format!(
                "ProxyCommand={} -i -f {}",
                common::SSHD,
                server.config.display()
            ),
            format!("IdentityFile={}", server.identity.path().display()),
            "StrictHostKeyChecking=no".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "BatchMode=yes".into(),
            "LogLevel=ERROR".into(),
        ],
    };
    compare("over SSH (sshd -i)", &mut ours, &mut theirs);
}

/// CPU seconds this process has used (all threads).
fn cpu_seconds() -> f64 {
    let stat = fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// Sequential write and read through the mount only, with the CPU time the
/// mount's process spent: what the filesystem costs per byte.
#[test]
#[ignore = "a measurement"]
fn sequential_throughput_and_cpu_of_the_mount() {
    if !ready() {
        return;
    }
    let server = Arc::new(common::Server::new().unwrap());
    let remote = tempfile::tempdir_in("/dev/shm").unwrap();
    let root = remote.path().to_owned();
    let sshds = Arc::new(Mutex::new(Vec::new()));
    for (link, connect) in [
        ("sftp-server on pipes", sftp_server(&root)),
        ("SSH (sshd -i)", over_ssh(&server, &sshds)),
    ] {
        let mut ours = Gractl::new(&root, connect);
        let point = tempfile::tempdir().unwrap();
        let point = point.path();
        ours.mount(point);
        for _ in 0..RUNS {
            let cpu = cpu_seconds();
            let took = timed(
                point,
                "dd if=/dev/zero of=seq.bin bs=1M count=256 conv=fsync 2>/dev/null",
            );
            let write = (268.4 / took.as_secs_f64(), cpu_seconds() - cpu);
            ours.unmount(point);
            ours.mount(point);
            let cpu = cpu_seconds();
            let took = timed(point, "cat seq.bin > /dev/null");
            let read = (268.4 / took.as_secs_f64(), cpu_seconds() - cpu);
            eprintln!(
                "{link}: write {:.0} MB/s ({:.2} s CPU), read {:.0} MB/s ({:.2} s CPU)",
                write.0, write.1, read.0, read.1
            );
        }
        ours.unmount(point);
    }
}

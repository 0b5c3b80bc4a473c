//! The workspace sync's FUSE filesystem, mounted for real, against OpenSSH's
//! own SFTP server: `sftp-server` speaks SFTP on its stdin and stdout, so
//! each mount gets a private server process serving a temporary directory
//! (the "runner's workspace"), with nothing to configure. The tests work
//! through the mount with ordinary file calls and check the directory
//! behind it, and the other way round.
//!
//! Needs /dev/fuse, fusermount3 and Debian's `openssh-server`
//! (`/usr/lib/openssh/sftp-server`); without them the tests skip with a
//! message, unless CI=true.

#![allow(clippy::unwrap_used)] // a panic is the failure report

use std::{
    fs,
    io::{self, Read, Write},
    os::unix::fs::{MetadataExt, PermissionsExt, symlink},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant, UNIX_EPOCH},
};

use gractl::sync::{
    self, Connect, Mount, Options, connect_with,
    daemon::{Change, Daemon},
    state::{self, State},
};
use grad_proto::{Runner, RunnerState};
use sha2::{Digest, Sha256};

const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";
/// Short, so that the tests of changes made behind the mount's back wait little.
const TTL: Duration = Duration::from_millis(500);

/// `None` (after saying why) when this machine cannot mount.
fn prerequisites() -> Option<()> {
    let missing = if !Path::new(SFTP_SERVER).exists() {
        Some(format!(
            "{SFTP_SERVER} is not installed (apt-get install openssh-server)"
        ))
    } else {
        sync::check_prerequisites()
            .err()
            .map(|error| error.to_string())
    };
    match missing {
        None => Some(()),
        Some(why) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true, but {why}"
            );
            eprintln!("skipping: {why}");
            None
        }
    }
}

/// A mount of a temporary directory, served by its own `sftp-server`.
struct Fixture {
    runtime: tokio::runtime::Runtime,
    backing: tempfile::TempDir,
    point: tempfile::TempDir,
    mount: Option<Mount>,
    /// The sftp-server processes started so far (one per connection).
    servers: Arc<Mutex<Vec<u32>>>,
}

/// Starts `sftp-server` in `root` and hands its pipes over as the stream.
fn sftp_server(root: PathBuf, servers: Arc<Mutex<Vec<u32>>>) -> Connect {
    connect_with(move || {
        let (root, servers) = (root.clone(), Arc::clone(&servers));
        async move {
            let mut child = tokio::process::Command::new(SFTP_SERVER)
                .current_dir(&root)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()?;
            servers.lock().unwrap().extend(child.id());
            let stdin = child.stdin.take().ok_or(io::ErrorKind::BrokenPipe)?;
            let stdout = child.stdout.take().ok_or(io::ErrorKind::BrokenPipe)?;
            // The server exits when its stdin closes; tokio reaps it.
            drop(child);
            Ok::<_, io::Error>(tokio::io::join(stdout, stdin))
        }
    })
}

impl Fixture {
    fn new() -> Option<Fixture> {
        Self::with(Options::default())
    }

    fn with(options: Options) -> Option<Fixture> {
        prerequisites()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let backing = tempfile::tempdir().unwrap();
        let point = tempfile::tempdir().unwrap();
        let servers = Arc::new(Mutex::new(Vec::new()));
        let root = backing.path().canonicalize().unwrap();
        let options = Options {
            root: root.to_str().unwrap().to_owned(),
            name: "gractl:test".into(),
            cache_ttl: TTL,
            timeout: Duration::from_secs(10),
            ..options
        };
        let connect = sftp_server(root, Arc::clone(&servers));
        let mount = runtime
            .block_on(sync::mount(point.path(), connect, options))
            .unwrap();
        Some(Fixture {
            runtime,
            backing,
            point,
            mount: Some(mount),
            servers,
        })
    }

    /// A path through the mount.
    fn mnt(&self, path: &str) -> PathBuf {
        self.point.path().join(path)
    }

    /// The same path in the directory behind the mount.
    fn disk(&self, path: &str) -> PathBuf {
        self.backing.path().join(path)
    }

    fn unmount(&mut self) {
        if let Some(mount) = self.mount.take() {
            self.runtime.block_on(mount.unmount()).unwrap();
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(mount) = self.mount.take() {
            let _ = self.runtime.block_on(mount.unmount());
        }
    }
}

/// Waits until `check` holds (changes behind the mount show after the TTL).
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn errno(result: io::Result<impl Sized>) -> Option<i32> {
    result.err().and_then(|error| error.raw_os_error())
}

#[test]
fn files_written_through_the_mount_reach_the_server_and_its_files_show_through() {
    let Some(fx) = Fixture::new() else { return };
    fs::write(fx.mnt("hello.txt"), "hello from the laptop\n").unwrap();
    assert_eq!(
        fs::read_to_string(fx.disk("hello.txt")).unwrap(),
        "hello from the laptop\n"
    );
    assert_eq!(fs::metadata(fx.mnt("hello.txt")).unwrap().len(), 22);

    fs::write(fx.disk("from-runner.txt"), "written on the runner").unwrap();
    eventually("a file made on the server shows through the mount", || {
        fs::read_to_string(fx.mnt("from-runner.txt"))
            .ok()
            .as_deref()
            == Some("written on the runner")
    });

    // A change behind the mount shows after the cache time.
    fs::write(fx.disk("hello.txt"), "changed on the runner, longer now").unwrap();
    eventually("a changed file shows its new contents", || {
        fs::read_to_string(fx.mnt("hello.txt")).ok().as_deref()
            == Some("changed on the runner, longer now")
    });

    // Appends, and reading what was just written on the same handle.
    let mut file = fs::OpenOptions::new()
        .append(true)
        .read(true)
        .open(fx.mnt("hello.txt"))
        .unwrap();
    file.write_all(b"\nand appended").unwrap();
    drop(file);
    assert_eq!(
        fs::read_to_string(fx.disk("hello.txt")).unwrap(),
        "changed on the runner, longer now\nand appended"
    );

    let names: Vec<String> = fs::read_dir(fx.point.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.contains(&"hello.txt".to_owned()), "{names:?}");
    assert!(names.contains(&"from-runner.txt".to_owned()), "{names:?}");
}

#[test]
fn rename_unlink_mkdir_rmdir_and_symlinks_act_on_the_server() {
    let Some(fx) = Fixture::new() else { return };
    fs::create_dir(fx.mnt("code")).unwrap();
    assert!(fx.disk("code").is_dir());
    fs::create_dir_all(fx.mnt("code/pkg/sub")).unwrap();
    fs::write(fx.mnt("code/pkg/sub/train.py"), "print('hi')\n").unwrap();

    // Renaming a directory carries what is below it.
    fs::rename(fx.mnt("code/pkg"), fx.mnt("code/lib")).unwrap();
    assert!(fx.disk("code/lib/sub/train.py").is_file());
    assert!(!fx.disk("code/pkg").exists());
    assert_eq!(
        fs::read_to_string(fx.mnt("code/lib/sub/train.py")).unwrap(),
        "print('hi')\n"
    );
    assert_eq!(errno(fs::metadata(fx.mnt("code/pkg"))), Some(libc::ENOENT));

    // Renaming over an existing file replaces it (editors save this way).
    fs::write(fx.mnt("code/new.txt"), "new").unwrap();
    fs::write(fx.mnt("code/old.txt"), "old").unwrap();
    fs::rename(fx.mnt("code/new.txt"), fx.mnt("code/old.txt")).unwrap();
    assert_eq!(fs::read_to_string(fx.disk("code/old.txt")).unwrap(), "new");
    assert_eq!(fs::read_to_string(fx.mnt("code/old.txt")).unwrap(), "new");
    assert!(!fx.disk("code/new.txt").exists());

    // Symbolic links keep their target as written.
    symlink("lib/sub/train.py", fx.mnt("code/link.py")).unwrap();
    assert_eq!(
        fs::read_link(fx.disk("code/link.py")).unwrap(),
        Path::new("lib/sub/train.py")
    );
    assert_eq!(
        fs::read_link(fx.mnt("code/link.py")).unwrap(),
        Path::new("lib/sub/train.py")
    );
    assert!(
        fs::symlink_metadata(fx.mnt("code/link.py"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        fs::read_to_string(fx.mnt("code/link.py")).unwrap(),
        "print('hi')\n"
    );

    // Removing, with the errors a local filesystem gives.
    assert_eq!(errno(fs::create_dir(fx.mnt("code"))), Some(libc::EEXIST));
    assert_eq!(
        errno(fs::remove_dir(fx.mnt("code/lib"))),
        Some(libc::ENOTEMPTY)
    );
    fs::remove_file(fx.mnt("code/link.py")).unwrap();
    fs::remove_file(fx.mnt("code/lib/sub/train.py")).unwrap();
    assert!(!fx.disk("code/lib/sub/train.py").exists());
    fs::remove_dir(fx.mnt("code/lib/sub")).unwrap();
    fs::remove_dir(fx.mnt("code/lib")).unwrap();
    assert!(!fx.disk("code/lib").exists());
    assert_eq!(
        errno(fs::remove_file(fx.mnt("code/missing"))),
        Some(libc::ENOENT)
    );
    let left: Vec<String> = fs::read_dir(fx.mnt("code"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, ["old.txt"]);

    // Exclusive create refuses an existing file.
    let exclusive = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(fx.mnt("code/old.txt"));
    assert_eq!(errno(exclusive), Some(libc::EEXIST));

    // A hard link is the same file on the server (hardlink@openssh.com);
    // here each path keeps an inode number of its own (and SFTP has no link
    // counts to show).
    fs::hard_link(fx.mnt("code/old.txt"), fx.mnt("code/also.txt")).unwrap();
    assert_eq!(
        fs::metadata(fx.disk("code/also.txt")).unwrap().ino(),
        fs::metadata(fx.disk("code/old.txt")).unwrap().ino()
    );
    assert_eq!(fs::read_to_string(fx.mnt("code/also.txt")).unwrap(), "new");
}

#[test]
fn chmod_truncate_and_utimens_reach_the_server() {
    let Some(fx) = Fixture::new() else { return };
    fs::write(fx.mnt("run.sh"), "#!/bin/sh\necho hi\n").unwrap();

    fs::set_permissions(fx.mnt("run.sh"), fs::Permissions::from_mode(0o751)).unwrap();
    assert_eq!(
        fs::metadata(fx.disk("run.sh")).unwrap().mode() & 0o777,
        0o751
    );
    assert_eq!(
        fs::metadata(fx.mnt("run.sh")).unwrap().mode() & 0o777,
        0o751
    );

    let file = fs::OpenOptions::new()
        .write(true)
        .open(fx.mnt("run.sh"))
        .unwrap();
    file.set_len(4).unwrap();
    drop(file);
    assert_eq!(fs::read(fx.disk("run.sh")).unwrap(), b"#!/b");
    assert_eq!(fs::metadata(fx.mnt("run.sh")).unwrap().len(), 4);
    // Growing fills with zeros.
    let file = fs::OpenOptions::new()
        .write(true)
        .open(fx.mnt("run.sh"))
        .unwrap();
    file.set_len(6).unwrap();
    drop(file);
    assert_eq!(fs::read(fx.mnt("run.sh")).unwrap(), b"#!/b\0\0");

    let when = UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    let file = fs::File::options()
        .write(true)
        .open(fx.mnt("run.sh"))
        .unwrap();
    file.set_times(fs::FileTimes::new().set_modified(when).set_accessed(when))
        .unwrap();
    drop(file);
    assert_eq!(
        fs::metadata(fx.disk("run.sh")).unwrap().mtime(),
        1_600_000_000
    );
    assert_eq!(
        fs::metadata(fx.mnt("run.sh")).unwrap().mtime(),
        1_600_000_000
    );

    // O_TRUNC on open empties the file.
    fs::write(fx.mnt("run.sh"), "x").unwrap();
    assert_eq!(fs::read(fx.disk("run.sh")).unwrap(), b"x");

    // Files show as the mounting user's; giving them away is refused.
    let meta = fs::metadata(fx.mnt("run.sh")).unwrap();
    assert_eq!(meta.uid(), rustix::process::getuid().as_raw());
    let chown = std::os::unix::fs::chown(fx.mnt("run.sh"), Some(meta.uid() + 1), None);
    assert_eq!(errno(chown), Some(libc::EPERM));
}

#[test]
fn a_256_mib_file_round_trips_with_the_same_sha256() {
    let Some(fx) = Fixture::new() else { return };
    const SIZE: usize = 256 << 20;
    let mut block = vec![0u8; 1 << 20];
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut written = Sha256::new();
    let mut file = fs::File::create(fx.mnt("big.bin")).unwrap();
    for _ in 0..SIZE / block.len() {
        for byte in block.iter_mut() {
            // xorshift: incompressible, reproducible.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *byte = seed as u8;
        }
        written.update(&block);
        file.write_all(&block).unwrap();
    }
    file.sync_all().unwrap();
    drop(file);
    let written = written.finalize();

    let on_disk = Sha256::digest(fs::read(fx.disk("big.bin")).unwrap());
    assert_eq!(on_disk, written, "the server's copy differs");
    assert_eq!(fs::metadata(fx.mnt("big.bin")).unwrap().len(), SIZE as u64);

    let mut read = Sha256::new();
    let mut file = fs::File::open(fx.mnt("big.bin")).unwrap();
    let mut buf = vec![0u8; 128 << 10];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        read.update(&buf[..n]);
    }
    assert_eq!(
        read.finalize(),
        written,
        "reading it back through the mount differs"
    );
}

#[test]
fn two_thousand_small_files_are_created_listed_and_read() {
    let Some(fx) = Fixture::new() else { return };
    fs::create_dir(fx.mnt("many")).unwrap();
    for i in 0..2000 {
        fs::write(fx.mnt(&format!("many/f{i:04}.txt")), format!("file {i}\n")).unwrap();
    }
    assert_eq!(fs::read_dir(fx.disk("many")).unwrap().count(), 2000);
    let mut listed: Vec<(String, u64)> = fs::read_dir(fx.mnt("many"))
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            (
                entry.file_name().into_string().unwrap(),
                entry.metadata().unwrap().len(),
            )
        })
        .collect();
    listed.sort();
    assert_eq!(listed.len(), 2000);
    assert_eq!(listed[0], ("f0000.txt".to_owned(), 7));
    assert_eq!(listed[1999], ("f1999.txt".to_owned(), 10));
    for i in (0..2000).step_by(97) {
        assert_eq!(
            fs::read_to_string(fx.mnt(&format!("many/f{i:04}.txt"))).unwrap(),
            format!("file {i}\n")
        );
    }
}

#[test]
fn inode_numbers_stay_with_their_paths_and_follow_renames() {
    let Some(fx) = Fixture::new() else { return };
    fs::write(fx.mnt("a"), "a").unwrap();
    let ino = fs::metadata(fx.mnt("a")).unwrap().ino();
    std::thread::sleep(TTL);
    assert_eq!(fs::metadata(fx.mnt("a")).unwrap().ino(), ino);
    fs::rename(fx.mnt("a"), fx.mnt("b")).unwrap();
    assert_eq!(fs::metadata(fx.mnt("b")).unwrap().ino(), ino);
}

#[test]
fn statfs_reports_the_server_filesystem() {
    let Some(fx) = Fixture::new() else { return };
    let local = rustix::fs::statvfs(fx.backing.path()).unwrap();
    let mounted = rustix::fs::statvfs(fx.point.path()).unwrap();
    assert_eq!(mounted.f_blocks, local.f_blocks);
    assert_eq!(mounted.f_bsize, local.f_bsize);
}

#[test]
fn a_broken_connection_fails_with_eio_and_the_mount_reconnects() {
    let Some(fx) = Fixture::new() else { return };
    fs::write(fx.mnt("before.txt"), "before").unwrap();
    let mut open = fs::File::open(fx.mnt("before.txt")).unwrap();
    for pid in fx.servers.lock().unwrap().drain(..) {
        let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
    }
    // Whatever was in flight fails, and nothing hangs.
    let started = Instant::now();
    let mut buf = String::new();
    let _ = open.read_to_string(&mut buf);
    assert!(started.elapsed() < Duration::from_secs(20));
    eventually("the mount works again on a new connection", || {
        fs::write(fx.mnt("after.txt"), "after").is_ok()
            && fs::read_to_string(fx.disk("after.txt")).is_ok_and(|text| text == "after")
    });
    assert!(fx.mount.as_ref().unwrap().is_connected());
    // A handle opened before the break reads again on the new connection.
    let mut open = fs::File::open(fx.mnt("before.txt")).unwrap();
    let mut text = String::new();
    open.read_to_string(&mut text).unwrap();
    assert_eq!(text, "before");
}

#[test]
fn unmounting_leaves_nothing_mounted() {
    let Some(mut fx) = Fixture::new() else { return };
    assert!(state::is_mounted(fx.point.path()));
    fs::write(fx.mnt("x"), "x").unwrap();
    fx.unmount();
    assert!(!state::is_mounted(fx.point.path()));
    assert!(fs::read_dir(fx.point.path()).unwrap().next().is_none());
    assert!(fx.disk("x").is_file());
}

#[test]
fn a_busy_mount_is_detached_on_unmount() {
    let Some(mut fx) = Fixture::new() else { return };
    fs::write(fx.mnt("open.txt"), "open").unwrap();
    let open = fs::File::open(fx.mnt("open.txt")).unwrap();
    fx.unmount();
    assert!(!state::is_mounted(fx.point.path()));
    drop(open);
}

fn runner(name: &str, state: RunnerState) -> Runner {
    Runner {
        name: name.into(),
        state: state as i32,
        ..Runner::default()
    }
}

#[test]
fn the_daemon_mounts_ready_runners_and_unmounts_paused_and_deleted_ones() {
    if prerequisites().is_none() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let workspace = tempfile::tempdir().unwrap();
    let remote = tempfile::tempdir().unwrap();
    let remote = remote.path().canonicalize().unwrap();
    for name in ["r1", "r2", "r3"] {
        fs::create_dir(remote.join(name)).unwrap();
    }
    fs::write(remote.join("r2/on-r2.txt"), "r2").unwrap();
    let servers = Arc::new(Mutex::new(Vec::new()));
    let connector = {
        let remote = remote.clone();
        move |name: &str| sftp_server(remote.join(name), Arc::clone(&servers))
    };
    // sftp-server's root is its working directory, given as an absolute path.
    let mut daemon = Daemon::new(
        workspace.path(),
        |name: &str| connector(name),
        Options {
            root: ".".into(),
            cache_ttl: TTL,
            ..Options::default()
        },
    );
    let at = |name: &str| workspace.path().join("runners").join(name);

    let runners = [
        runner("r1", RunnerState::Ready),
        runner("r2", RunnerState::Ready),
        runner("r3", RunnerState::Paused),
    ];
    let mut changes = runtime.block_on(daemon.scan(&runners)).unwrap();
    changes.sort_by_key(|change| format!("{change}"));
    assert_eq!(
        changes,
        [
            Change::Mounted {
                runner: "r1".into(),
                path: "runners/r1".into()
            },
            Change::Mounted {
                runner: "r2".into(),
                path: "runners/r2".into()
            },
        ]
    );
    assert_eq!(changes[0].to_string(), "mounted r1 at runners/r1");
    assert!(state::is_mounted(&at("r1")) && state::is_mounted(&at("r2")));
    assert!(!state::is_mounted(&at("r3")));
    assert_eq!(
        fs::read_to_string(at("r2").join("on-r2.txt")).unwrap(),
        "r2"
    );
    fs::write(at("r1").join("from-laptop.txt"), "hi").unwrap();
    assert_eq!(
        fs::read_to_string(remote.join("r1/from-laptop.txt")).unwrap(),
        "hi"
    );

    let state = State::load(workspace.path()).unwrap().unwrap();
    assert_eq!(state.pid, std::process::id());
    assert_eq!(state.scans, 1);
    let names: Vec<&str> = state.mounts.iter().map(|m| m.runner.as_str()).collect();
    assert_eq!(names, ["r1", "r2"]);
    assert!(state.mounts.iter().all(|m| m.connected));

    // A second scan leaves existing mounts alone and mounts new ones.
    let runners = [
        runner("r1", RunnerState::Ready),
        runner("r2", RunnerState::Ready),
        runner("r3", RunnerState::Ready),
    ];
    let changes = runtime.block_on(daemon.scan(&runners)).unwrap();
    assert_eq!(
        changes,
        [Change::Mounted {
            runner: "r3".into(),
            path: "runners/r3".into()
        }]
    );

    // Paused and deleted runners are unmounted.
    let runners = [
        runner("r1", RunnerState::Paused),
        runner("r3", RunnerState::Ready),
    ];
    let changes = runtime.block_on(daemon.prune(&runners)).unwrap();
    assert_eq!(
        changes,
        [
            Change::Unmounted {
                runner: "r1".into(),
                reason: "paused".into()
            },
            Change::Unmounted {
                runner: "r2".into(),
                reason: "deleted".into()
            },
        ]
    );
    assert!(!state::is_mounted(&at("r1")) && !state::is_mounted(&at("r2")));
    assert!(state::is_mounted(&at("r3")));
    let state = State::load(workspace.path()).unwrap().unwrap();
    let names: Vec<&str> = state.mounts.iter().map(|m| m.runner.as_str()).collect();
    assert_eq!(names, ["r3"]);

    // Stopping unmounts the rest and removes the state file.
    let changes = runtime.block_on(daemon.stop());
    assert_eq!(changes.len(), 1);
    assert!(!state::is_mounted(&at("r3")));
    assert_eq!(State::load(workspace.path()).unwrap(), None);
}

#[test]
fn a_write_the_server_refuses_fails_at_close_with_eio() {
    if prerequisites().is_none() {
        return;
    }
    // A 1 MiB filesystem behind the mount: the server runs out of space.
    let small = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(small.path())
        .status()
        .is_ok_and(|status| status.success());
    if !mounted {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true, but cannot mount a tmpfs"
        );
        eprintln!("skipping: cannot mount a tmpfs");
        return;
    }
    let result = std::panic::catch_unwind(|| {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let point = tempfile::tempdir().unwrap();
        let options = Options {
            root: small.path().to_str().unwrap().to_owned(),
            ..Options::default()
        };
        let connect = sftp_server(small.path().to_owned(), Arc::new(Mutex::new(Vec::new())));
        let mount = runtime
            .block_on(sync::mount(point.path(), connect, options))
            .unwrap();
        let mut file = fs::File::create(point.path().join("too-big")).unwrap();
        // Writes are buffered: they succeed until the error comes back.
        let mut written = Ok(());
        for _ in 0..4 {
            written = written.and_then(|()| file.write_all(&[1u8; 1 << 20]));
        }
        let closed = written.and_then(|()| file.sync_all());
        drop(file);
        assert_eq!(errno(closed), Some(libc::EIO));
        // The mount still works.
        fs::remove_file(point.path().join("too-big")).unwrap();
        fs::write(point.path().join("small"), "fits").unwrap();
        assert_eq!(
            fs::read_to_string(small.path().join("small")).unwrap(),
            "fits"
        );
        runtime.block_on(mount.unmount()).unwrap();
    });
    let _ = std::process::Command::new("umount")
        .arg(small.path())
        .status();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

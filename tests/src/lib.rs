//! The end-to-end harness: starts the real `grad` binary on an ephemeral
//! loopback port with a temporary data dir (it spawns real `grad-runner`
//! processes), and hands out clients and `gractl` commands pointed at it.
//!
//! The binaries come from the same target directory as the test binary;
//! `make test` builds them first.

use std::{
    collections::{HashMap, HashSet},
    io::{BufRead, BufReader},
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Mutex, mpsc},
    time::{Duration, Instant},
};

use gractl::client::Client;

/// Where cargo put the workspace's binaries (next to `deps/` of this test).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().expect("deps dir");
    if dir.ends_with("deps") {
        dir.parent().expect("target dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing; build it first (`cargo build --workspace` or `make test`)",
        path.display()
    );
    path
}

/// A fresh database on the PostgreSQL server of `GRAD_TEST_POSTGRES_URL`
/// (`scripts/with_postgres.sh` sets it), or None to use grad's SQLite.
fn postgres_database() -> Option<String> {
    let base = std::env::var("GRAD_TEST_POSTGRES_URL").ok()?;
    Some(create_database(&base))
}

/// Creates a database with a fresh name on the server at `base`; answers
/// its URL.
fn create_database(base: &str) -> String {
    let name = format!("grad_{}", uuid_like());
    let out = Command::new("psql")
        .arg(format!("{base}/postgres"))
        .args([
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            &format!("CREATE DATABASE {name}"),
        ])
        .output()
        .expect("run psql (apt-get install postgresql-client)");
    assert!(
        out.status.success(),
        "creating database {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("{base}/{name}")
}

/// A PostgreSQL server for tests that need one whatever the suite runs on
/// (several grad replicas share one database): `GRAD_TEST_POSTGRES_URL`'s,
/// or a private one (initdb + pg_ctl in a temp dir, as the `postgres` user
/// when run as root), stopped when dropped.
pub struct Postgres {
    pub url: String,
    private: Option<(PathBuf, tempfile::TempDir)>,
}

impl Postgres {
    /// None (after `require`) when neither is available.
    pub fn start() -> Option<Postgres> {
        if let Ok(url) = std::env::var("GRAD_TEST_POSTGRES_URL") {
            return Some(Postgres { url, private: None });
        }
        let bindir = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| {
                versions
                    .filter_map(Result::ok)
                    .map(|v| v.path().join("bin"))
                    .filter(|b| b.join("initdb").exists())
                    .max()
            });
        let psql = Command::new("psql").arg("--version").output().is_ok();
        if !require(
            "PostgreSQL (initdb, pg_ctl, psql: apt-get install postgresql)",
            bindir.is_some() && psql,
        ) {
            return None;
        }
        let bindir = bindir?;
        let tmp = tempfile::Builder::new()
            .prefix("grad-pg")
            .tempdir()
            .expect("temp dir");
        let root = is_root();
        if root {
            let status = Command::new("chown")
                .arg("postgres")
                .arg(tmp.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown postgres {}", tmp.path().display());
        }
        let port = free_port();
        let data = tmp.path().join("data");
        let run = |command: String| {
            let out = match root {
                true => Command::new("su")
                    .args(["postgres", "-s", "/bin/sh", "-c", &command])
                    .output(),
                false => Command::new("sh").args(["-c", &command]).output(),
            }
            .expect("run a PostgreSQL tool");
            assert!(
                out.status.success(),
                "{command}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(format!(
            "{}/initdb -D {} -A trust -U postgres",
            bindir.display(),
            data.display()
        ));
        run(format!(
            "{}/pg_ctl -D {} -l {}/server.log -w -o '-p {port} -k {} -c listen_addresses=127.0.0.1 \
             -c max_connections=500 -c fsync=off' start",
            bindir.display(),
            data.display(),
            tmp.path().display(),
            tmp.path().display()
        ));
        Some(Postgres {
            url: format!("postgres://postgres@127.0.0.1:{port}"),
            private: Some((bindir, tmp)),
        })
    }

    /// A new, empty database on this server; answers its URL.
    pub fn database(&self) -> String {
        create_database(&self.url)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some((bindir, tmp)) = &self.private {
            let command = format!(
                "{}/pg_ctl -D {}/data -m immediate -w stop",
                bindir.display(),
                tmp.path().display()
            );
            let _ = match is_root() {
                true => Command::new("su")
                    .args(["postgres", "-s", "/bin/sh", "-c", &command])
                    .output(),
                false => Command::new("sh").args(["-c", &command]).output(),
            };
        }
    }
}

#[allow(unsafe_code)]
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A TCP port free on loopback right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// 16 random hex digits (from the clock and the process: unique enough for
/// test database names).
fn uuid_like() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    hasher.write_u32(std::process::id());
    format!("{:016x}", hasher.finish())
}

/// Whether a prerequisite is present. Outside CI a missing one skips the test
/// with a message; under CI=true it fails the run.
pub fn require(what: &str, present: bool) -> bool {
    if present {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("prerequisite missing under CI=true: {what}");
    }
    eprintln!("SKIPPED: prerequisite missing: {what}");
    false
}

/// The Python the tests give runners: $GRAD_PYTHON, else python3.
pub fn python() -> String {
    std::env::var("GRAD_PYTHON").unwrap_or_else(|_| "python3".into())
}

pub fn python_has(modules: &str) -> bool {
    Command::new(python())
        .args(["-c", &format!("import {modules}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Waits for `cond` with a deadline; panics naming `what` if it never holds.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Grad {
    pub data_dir: PathBuf,
    /// Set when the suite runs on PostgreSQL (`GRAD_TEST_POSTGRES_URL`):
    /// this grad's own database there.
    pub database_url: Option<String>,
    pub url: String,
    pub admin_token: String,
    child: Option<Child>,
    extra_args: Vec<String>,
    extra_env: Vec<(String, String)>,
    /// Another replica's data dir and database: its runners are the
    /// first grad's to clean up.
    replica: bool,
    _tmp: Option<tempfile::TempDir>,
}

impl Grad {
    /// Starts grad with a fresh data dir and short liveness timeouts.
    pub fn start() -> Grad {
        Grad::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> Grad {
        Grad::start_with_env(args, &[])
    }

    /// Starts grad with extra flags and environment variables (the AWS
    /// SDK's credentials for an S3 blob store, say).
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Grad {
        Grad::start_on(postgres_database(), args, env)
    }

    /// Starts grad on the database at `database_url` (None: its SQLite).
    pub fn start_on(database_url: Option<String>, args: &[&str], env: &[(&str, &str)]) -> Grad {
        Grad::start_listening("127.0.0.1:0", database_url, args, env)
    }

    /// Starts grad listening on `listen` (where something outside this
    /// machine must reach it).
    pub fn start_listening(
        listen: &str,
        database_url: Option<String>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Grad {
        let tmp = tempfile::tempdir().expect("temp dir");
        let data_dir = tmp.path().join("grad");
        let mut grad = Grad {
            data_dir,
            database_url,
            url: String::new(),
            admin_token: String::new(),
            child: None,
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            replica: false,
            _tmp: Some(tmp),
        };
        grad.spawn(listen);
        grad.admin_token = std::fs::read_to_string(grad.data_dir.join("admin.token"))
            .expect("admin.token written at first start")
            .trim()
            .to_string();
        grad
    }

    fn spawn(&mut self, listen: &str) {
        let mut cmd = Command::new(bin("grad"));
        cmd.arg("serve")
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(self.database_args())
            .args(&self.extra_args);
        if !self.extra_args.iter().any(|a| a == "--python") {
            cmd.arg("--python").arg(python());
        }
        let mut child = cmd
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .env_remove("GRAD_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn grad");
        let stderr = child.stderr.take().expect("grad stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[grad] {line}");
                if let Some(addr) = line
                    .contains("grad serving")
                    .then(|| line.split("addr=").nth(1))
                    .flatten()
                    .and_then(|rest| rest.split_whitespace().next())
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("grad did not report its address within 30s");
        self.url = format!("http://{addr}");
        self.child = Some(child);
    }

    /// Another replica of this grad: the same database and data dir (its
    /// keys, its embedded blob store), its own port.
    pub fn replica(&self) -> Grad {
        let mut replica = Grad {
            data_dir: self.data_dir.clone(),
            database_url: self.database_url.clone(),
            url: String::new(),
            admin_token: self.admin_token.clone(),
            child: None,
            extra_args: self.extra_args.clone(),
            extra_env: self.extra_env.clone(),
            replica: true,
            _tmp: None,
        };
        replica.spawn("127.0.0.1:0");
        replica
    }

    /// Kills grad with SIGKILL: no draining, nothing said to anyone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits for grad to exit; returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops grad (SIGTERM) and starts it again on the same port and data
    /// dir; returns how the first one exited.
    pub fn restart_status(&mut self) -> Option<std::process::ExitStatus> {
        let addr = self.url.trim_start_matches("http://").to_string();
        let status = self.stop();
        self.spawn(&addr);
        status
    }

    /// Starts grad and creates the admin's runners `names`, ready to use.
    pub async fn with_runners(names: &[&str]) -> Grad {
        let grad = Grad::start();
        let admin = grad.admin().await;
        for name in names {
            admin
                .create_runner(name, grad_proto::Resources::default(), Vec::new())
                .await
                .expect("create runner");
            let runner = admin
                .wait_runner(
                    name,
                    &[grad_proto::RunnerState::Ready],
                    Duration::from_secs(20),
                )
                .await
                .expect("runner ready");
            assert_eq!(runner.state(), grad_proto::RunnerState::Ready, "{runner:?}");
        }
        grad
    }

    pub async fn client(&self, token: &str) -> Client {
        Client::connect(&self.url, token)
            .await
            .expect("connect to grad")
    }

    pub async fn admin(&self) -> Client {
        self.client(&self.admin_token).await
    }

    /// `--database-url URL` when this grad is on PostgreSQL.
    pub fn database_args(&self) -> Vec<String> {
        match &self.database_url {
            Some(url) => vec!["--database-url".into(), url.clone()],
            None => Vec::new(),
        }
    }

    /// Runs one SQL statement on this grad's database behind its back (to
    /// plant a state no API would make): sqlite3 or psql, whichever it uses.
    pub fn execute_sql(&self, sql: &str) {
        let out = match &self.database_url {
            Some(url) => Command::new("psql")
                .arg(url)
                .args(["-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
                .output()
                .expect("run psql"),
            None => Command::new(python())
                .args([
                    "-c",
                    "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute(sys.argv[2]); c.commit()",
                ])
                .arg(self.data_dir.join("grad.db"))
                .arg(sql)
                .output()
                .expect("run python's sqlite3"),
        };
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The rows of one query on this grad's PostgreSQL database, as psql
    /// prints them unaligned (`|` between columns).
    pub fn query_postgres(&self, sql: &str) -> String {
        let url = self.database_url.as_ref().expect("a grad on PostgreSQL");
        let out = Command::new("psql")
            .arg(url)
            .args(["-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `grad ARGS` on this grad's data dir and database (`grad user ...`).
    pub fn admin_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("grad"));
        cmd.args(args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(self.database_args());
        cmd
    }

    /// Adds a user through `grad user add` and returns their token.
    pub fn add_user(&self, name: &str, extra: &[&str]) -> String {
        let out = self
            .admin_command(&["user", "add", name])
            .args(extra)
            .output()
            .expect("run grad user add");
        assert!(
            out.status.success(),
            "grad user add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf8 token")
            .trim()
            .to_string()
    }

    /// A `gractl` command pointed at this grad with `token`, with its own
    /// config file so the user's real one is never touched.
    pub fn gractl(&self, token: &str) -> Command {
        let mut cmd = Command::new(bin("gractl"));
        cmd.env("GRAD_SERVER", &self.url)
            .env("GRAD_TOKEN", token)
            .env(
                "GRACTL_CONFIG",
                self.data_dir.join("gractl-test-config.yaml"),
            )
            .env_remove("GRAD_WORKSPACE")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `gractl ARGS` as the admin and waits for it.
    pub fn run(&self, args: &[&str]) -> Output {
        self.gractl(&self.admin_token)
            .args(args)
            .output()
            .expect("run gractl")
    }

    /// Runs `gractl ARGS` with `token`, `input` on its stdin, and waits.
    pub fn run_with_input(&self, token: &str, args: &[&str], input: &[u8]) -> Output {
        let mut child = self
            .gractl(token)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run gractl");
        if let Some(mut stdin) = child.stdin.take() {
            // gractl may exit before reading it all; its output says why.
            let _ = std::io::Write::write_all(&mut stdin, input);
        }
        child.wait_with_output().expect("wait for gractl")
    }

    /// The local workspace of `owner`'s runner `name`.
    pub fn workspace(&self, owner: &str, name: &str) -> PathBuf {
        self.data_dir
            .join("runners")
            .join(owner)
            .join(name)
            .join("workspace")
    }

    /// Pids of live grad-runner processes serving this grad's data dir.
    pub fn runner_pids(&self) -> Vec<u32> {
        runner_pids_under(&self.data_dir)
    }
}

impl Drop for Grad {
    fn drop(&mut self) {
        self.kill();
        if self.replica {
            return;
        }
        // Runner processes outlive grad by design; the test's are ours to
        // end: asked first, so they unmount their datasets, then killed.
        for pid in self.runner_pids() {
            signal(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while !self.runner_pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for pid in self.runner_pids() {
            signal(pid, libc::SIGKILL);
        }
        unmount_under(&self.data_dir);
    }
}

/// A `grad-runner agent` (a job worker) of this grad, killed when dropped.
pub struct Agent {
    child: Option<Child>,
    pub name: String,
    pub dir: tempfile::TempDir,
}

impl Agent {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a machine that dies: no goodbye to grad.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and waits for it to exit.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        signal(child.id(), libc::SIGTERM);
        child.wait().ok()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Grad {
    /// Creates worker `name` for `token`'s user (with `create_args`, such as
    /// `--label k=v`) and starts a `grad-runner agent` for it (with
    /// `agent_args`, such as `--gpus 2`).
    pub fn start_agent(
        &self,
        token: &str,
        name: &str,
        create_args: &[&str],
        agent_args: &[&str],
    ) -> Agent {
        self.start_agent_with_env(token, name, create_args, agent_args, &[])
    }

    /// [`Grad::start_agent`] with environment variables for the agent
    /// (`DOCKER_HOST`, say).
    pub fn start_agent_with_env(
        &self,
        token: &str,
        name: &str,
        create_args: &[&str],
        agent_args: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        self.start_agent_at(&self.url, token, name, create_args, agent_args, env)
    }

    /// [`Grad::start_agent_with_env`] dialing `servers` (several replicas'
    /// URLs, comma-separated) rather than this grad alone.
    pub fn start_agent_at(
        &self,
        servers: &str,
        token: &str,
        name: &str,
        create_args: &[&str],
        agent_args: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let dir = tempfile::tempdir().expect("temp dir");
        let token_file = dir.path().join("token");
        let out = self
            .gractl(token)
            .args(["worker", "create", name, "--token-file"])
            .arg(&token_file)
            .args(create_args)
            .output()
            .expect("run gractl worker create");
        assert!(
            out.status.success(),
            "gractl worker create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut child = Command::new(bin("grad-runner"))
            .args(["agent", "--server", servers, "--token-file"])
            .arg(&token_file)
            .arg("--work-dir")
            .arg(dir.path().join("work"))
            .args(agent_args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .env_remove("GRAD_WORKER_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn grad-runner agent");
        let stderr = child.stderr.take().expect("agent stderr");
        let label = format!("[agent {name}]");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{label} {line}");
            }
        });
        Agent {
            child: Some(child),
            name: name.to_owned(),
            dir,
        }
    }
}

/// A private Docker engine (`dockerd` on its own socket, data and exec
/// dirs, no bridge, no iptables) with one small image built here (no
/// registry is reachable): a static busybox. Its PATH holds a stand-in for
/// the NVIDIA Container Toolkit's `nvidia-container-runtime-hook`, so the
/// engine registers its "nvidia" device driver as it does on a GPU machine
/// and turns a job's GPU device request into NVIDIA_VISIBLE_DEVICES in the
/// container (the hook itself, which would mount the driver, just accepts).
pub struct DockerEngine {
    child: Child,
    /// For DOCKER_HOST.
    pub host: String,
    pub dir: tempfile::TempDir,
}

impl DockerEngine {
    pub const IMAGE: &'static str = "grad-test-busybox:1";

    pub fn start() -> Option<DockerEngine> {
        let found = |program: &str| {
            Command::new("sh")
                .args(["-c", &format!("command -v {program}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let root = is_root();
        if !require(
            "dockerd and docker (apt-get install docker.io)",
            found("dockerd") && found("docker"),
        ) || !require(
            "a static busybox (apt-get install busybox-static)",
            Path::new("/bin/busybox").exists(),
        ) || !require("root, to run dockerd", root)
        {
            return None;
        }
        // Short: the engine's sockets live below it.
        let dir = tempfile::Builder::new()
            .prefix("gdk")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).expect("bin dir");
        let hook = bin.join("nvidia-container-runtime-hook");
        std::fs::write(&hook, "#!/bin/sh\ncat >/dev/null\nexit 0\n").expect("hook");
        std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("hook mode");
        let socket = dir.path().join("d.sock");
        let host = format!("unix://{}", socket.display());
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::File::create(dir.path().join("dockerd.log")).expect("log");
        let child = Command::new("dockerd")
            .arg("--data-root")
            .arg(dir.path().join("data"))
            .arg("--exec-root")
            .arg(dir.path().join("x"))
            .arg("--pidfile")
            .arg(dir.path().join("d.pid"))
            .args([
                "-H",
                &host,
                "--bridge=none",
                "--iptables=false",
                "--ip-forward=false",
            ])
            .env("PATH", path)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn dockerd");
        let engine = DockerEngine { child, host, dir };
        wait_until("dockerd answers", Duration::from_secs(30), || {
            engine.docker(&["version"]).status.success()
        });
        let rootfs = engine.dir.path().join("rootfs/bin");
        std::fs::create_dir_all(&rootfs).expect("rootfs");
        std::fs::copy("/bin/busybox", rootfs.join("busybox")).expect("busybox");
        for applet in [
            "sh",
            "echo",
            "cat",
            "ls",
            "sleep",
            "env",
            "sha256sum",
            "printf",
            "mkdir",
            "rm",
            "seq",
            "true",
            "grep",
            "pwd",
        ] {
            std::os::unix::fs::symlink("busybox", rootfs.join(applet)).expect("applet");
        }
        let imported = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "tar -C {} -c . | docker -H {} import - {}",
                engine.dir.path().join("rootfs").display(),
                engine.host,
                Self::IMAGE
            ))
            .output()
            .expect("docker import");
        assert!(
            imported.status.success(),
            "docker import: {}",
            String::from_utf8_lossy(&imported.stderr)
        );
        Some(engine)
    }

    /// Runs the docker CLI against this engine.
    pub fn docker(&self, args: &[&str]) -> Output {
        Command::new("docker")
            .arg("-H")
            .arg(&self.host)
            .args(args)
            .output()
            .expect("run docker")
    }
}

impl Drop for DockerEngine {
    fn drop(&mut self) {
        signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percentiles for the benchmarks (nearest rank), in milliseconds.
pub mod stats {
    use std::time::Duration;

    pub struct Stats {
        pub p50: f64,
        pub p99: f64,
        pub n: usize,
    }

    pub fn of(samples: &[Duration]) -> Stats {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let rank = |p: f64| ms[((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
        Stats {
            p50: rank(0.50),
            p99: rank(0.99),
            n: ms.len(),
        }
    }
}

/// What the `make bench` binaries share.
pub mod bench {
    use std::{
        path::Path,
        time::{Duration, Instant},
    };

    use gractl::client::Client;
    use grad_proto::JobSpec;

    /// A count from the environment (`BENCH_*`), or `default`.
    pub fn env_usize(name: &str, default: usize) -> usize {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    /// Bundles `dir` and uploads it (once); answers its digest.
    pub async fn upload(client: &Client, dir: &Path) -> anyhow::Result<String> {
        let file = tempfile::NamedTempFile::new()?;
        let made = grad_bundle::create(dir, std::io::BufWriter::new(file.reopen()?))?;
        if let Some(put) = client.create_upload(&made.sha256, made.size).await? {
            grad_transfer::Client::new()?
                .put_file(&put, file.path(), 0, made.size, None)
                .await?;
        }
        Ok(made.sha256)
    }

    /// `per` SubmitJob calls on each client, all clients at once: each
    /// call's latency, and how long the whole burst took.
    pub async fn submit_burst(
        clients: Vec<Client>,
        spec: &JobSpec,
        bundle: &str,
        per: usize,
    ) -> anyhow::Result<(Vec<Duration>, Duration)> {
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for client in clients {
            let (spec, bundle) = (spec.clone(), bundle.to_owned());
            tasks.spawn(async move {
                let mut took = Vec::with_capacity(per);
                for _ in 0..per {
                    let t = Instant::now();
                    client.submit_job(spec.clone(), &bundle).await?;
                    took.push(t.elapsed());
                }
                Ok::<_, anyhow::Error>(took)
            });
        }
        let mut latency = Vec::new();
        while let Some(done) = tasks.join_next().await {
            latency.extend(done??);
        }
        Ok((latency, started.elapsed()))
    }
}

/// Every regular file under `dir` whose bytes contain `needle` (to prove a
/// secret is nowhere on disk).
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file()
                && std::fs::read(&path).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            {
                found.push(path);
            }
        }
    }
    found
}

/// Detaches every FUSE mount below `dir` (what a killed process left).
fn unmount_under(dir: &Path) {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    for mountpoint in info.lines().filter_map(|line| line.split(' ').nth(4)) {
        if Path::new(mountpoint).starts_with(&dir) {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(mountpoint)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

pub fn runner_pids_under(dir: &Path) -> Vec<u32> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let is_zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
                .unwrap_or(true);
            !is_zombie
                && cmdline
                    .split(|b| *b == 0)
                    .next()
                    .is_some_and(|a| a.ends_with(b"grad-runner"))
                && cmdline.windows(needle.len()).any(|w| w == needle)
        })
        .collect()
}

#[allow(unsafe_code)]
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) only takes integers.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Output of a finished command, for assertions with context.
pub trait OutputExt {
    fn stdout_str(&self) -> String;
    fn stderr_str(&self) -> String;
    fn code(&self) -> i32;
}

impl OutputExt for Output {
    fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
}

/// `s3s-fs` (an S3-compatible server that checks SigV4 signatures) on a free
/// loopback port, serving a temporary directory with one bucket. `None`
/// (with the reason printed) when it is not installed, unless CI=true.
pub struct S3Server {
    child: Child,
    pub endpoint: String,
    pub root: tempfile::TempDir,
}

impl S3Server {
    pub const ACCESS_KEY: &'static str = "grad-test-access";
    pub const SECRET_KEY: &'static str = "grad-test-secret-key-0123456789";

    pub fn start(bucket: &str) -> Option<S3Server> {
        let present = Command::new("s3s-fs")
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !require(
            "s3s-fs (cargo install s3s-fs --version 0.14.1 --features binary)",
            present,
        ) {
            return None;
        }
        let root = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(root.path().join(bucket)).expect("bucket dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--access-key",
                Self::ACCESS_KEY,
                "--secret-key",
                Self::SECRET_KEY,
            ])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn s3s-fs");
        wait_until("s3s-fs listens", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Some(S3Server {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            root,
        })
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Kubernetes API server double on a free loopback port: kmock's
/// Kubernetes emulator (PyPI `kmock`, by the author of Kopf) run by
/// `tests/kmock/kmock_server.py`, which records every request it gets.
/// `None` (with the reason printed) when kmock is not installed, unless
/// CI=true.
pub struct Kmock {
    child: Child,
    pub url: String,
    /// A kubeconfig pointing at it (for grad's `KUBECONFIG`).
    pub kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

/// The Python with kmock: $GRAD_TEST_KMOCK_PYTHON, else python3.
fn kmock_python() -> String {
    std::env::var("GRAD_TEST_KMOCK_PYTHON").unwrap_or_else(|_| "python3".into())
}

impl Kmock {
    pub fn start() -> Option<Kmock> {
        let present = Command::new(kmock_python())
            .args(["-c", "import kmock"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !require(
            "kmock (python3 -m pip install -r tests/kmock/requirements.txt)",
            present,
        ) {
            return None;
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("kmock/kmock_server.py");
        let mut child = Command::new(kmock_python())
            .arg(&script)
            .arg("0")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn kmock_server.py");
        let stdout = child.stdout.take().expect("kmock stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("kmock's port line");
        let port: u16 = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("kmock_server.py said {line:?}, not PORT <n>"));
        let url = format!("http://127.0.0.1:{port}");
        let dir = tempfile::tempdir().expect("temp dir");
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: kmock\n  cluster:\n    server: {url}\n\
                 users:\n- name: grad\n  user:\n    token: test-token\n\
                 contexts:\n- name: kmock\n  context:\n    cluster: kmock\n    user: grad\n    namespace: default\n\
                 current-context: kmock\n"
            ),
        )
        .expect("write kubeconfig");
        Some(Kmock {
            child,
            url,
            kubeconfig,
            _dir: dir,
        })
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &serde_json::Value)>,
    ) -> serde_json::Value {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-X", method, &format!("{}{path}", self.url)]);
        if let Some((content_type, body)) = body {
            cmd.args([
                "-H",
                &format!("content-type: {content_type}"),
                "--data-binary",
                &body.to_string(),
            ]);
        }
        let out = cmd.output().expect("curl");
        assert!(
            out.status.success(),
            "curl {method} {path}: {}",
            out.stderr_str()
        );
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// GET of an API path (`/api/v1/namespaces/ns/pods`).
    pub fn get(&self, path: &str) -> serde_json::Value {
        self.call("GET", path, None)
    }

    pub fn delete(&self, path: &str) -> serde_json::Value {
        self.call("DELETE", path, None)
    }

    pub fn post(&self, path: &str, object: &serde_json::Value) -> serde_json::Value {
        self.call("POST", path, Some(("application/json", object)))
    }

    /// Merges `status` into a Pod's status, as the kubelet would report it.
    pub fn set_pod_status(&self, namespace: &str, pod: &str, status: serde_json::Value) {
        self.call(
            "PATCH",
            &format!("/api/v1/namespaces/{namespace}/pods/{pod}/status"),
            Some((
                "application/merge-patch+json",
                &serde_json::json!({ "status": status }),
            )),
        );
    }

    /// Every request kmock got, in order, but the tests' own (status
    /// patches and reads through this struct come with curl's user agent).
    pub fn requests(&self) -> Vec<serde_json::Value> {
        let all = self.get("/_kmock/requests");
        all.as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| {
                !r["headers"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .any(|(k, v)| {
                        k.eq_ignore_ascii_case("user-agent")
                            && v.as_str().is_some_and(|v| v.starts_with("curl/"))
                    })
            })
            .collect()
    }
}

impl Drop for Kmock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A kubelet double for the Pods grad makes in kmock: it runs a Pod's one
/// container as a local `grad-runner` process — its args and env, its
/// volumes mapped to directories (a claim's `subPath`s under one directory
/// per claim, so a new Pod on the same claim finds the files; a Secret's
/// keys as files) — reports it Running, reports its exit as the kubelet
/// would (phase Failed/Succeeded with the container's exit code), and kills
/// it when its Pod is deleted. With `auto` it runs every Pod that appears;
/// otherwise only those named with [`Kubelet::run`].
pub struct Kubelet {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    wanted: std::sync::Arc<Mutex<HashSet<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub root: tempfile::TempDir,
}

struct RunningPod {
    uid: String,
    child: Child,
}

impl Kubelet {
    pub fn start(kmock: &Kmock, namespace: &str, auto: bool) -> Kubelet {
        let root = tempfile::tempdir().expect("temp dir");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let wanted = std::sync::Arc::new(Mutex::new(HashSet::new()));
        let api = KubeletApi {
            url: kmock.url.clone(),
            namespace: namespace.to_owned(),
            root: root.path().to_owned(),
        };
        let (stop2, wanted2) = (stop.clone(), wanted.clone());
        let thread = std::thread::spawn(move || {
            let mut running: HashMap<String, RunningPod> = HashMap::new();
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                api.sync(&mut running, auto, &wanted2);
                std::thread::sleep(Duration::from_millis(100));
            }
            for (_, mut pod) in running {
                let _ = pod.child.kill();
                let _ = pod.child.wait();
            }
        });
        Kubelet {
            stop,
            wanted,
            thread: Some(thread),
            root,
        }
    }

    /// Runs the Pod `name` once it exists.
    pub fn run(&self, name: &str) {
        self.wanted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned());
    }

    /// The directory that stands for a claim's volume.
    pub fn claim_dir(&self, claim: &str) -> PathBuf {
        self.root.path().join("claims").join(claim)
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct KubeletApi {
    url: String,
    namespace: String,
    root: PathBuf,
}

impl KubeletApi {
    fn curl(&self, args: &[&str]) -> Option<serde_json::Value> {
        let out = Command::new("curl").arg("-sS").args(args).output().ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    fn pods_path(&self) -> String {
        format!("{}/api/v1/namespaces/{}/pods", self.url, self.namespace)
    }

    fn status(&self, pod: &str, status: serde_json::Value) {
        let _ = self.curl(&[
            "-X",
            "PATCH",
            "-H",
            "content-type: application/merge-patch+json",
            &format!("{}/{pod}/status", self.pods_path()),
            "--data-binary",
            &serde_json::json!({ "status": status }).to_string(),
        ]);
    }

    fn sync(
        &self,
        running: &mut HashMap<String, RunningPod>,
        auto: bool,
        wanted: &Mutex<HashSet<String>>,
    ) {
        let Some(list) = self.curl(&[&self.pods_path()]) else {
            return;
        };
        let pods: HashMap<String, serde_json::Value> = list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p["metadata"]["name"].as_str()?.to_owned(), p.clone())))
            .collect();
        // Deleted (or replaced) Pods: their process goes.
        running.retain(|name, pod| {
            let same = pods
                .get(name)
                .is_some_and(|p| p["metadata"]["uid"].as_str() == Some(pod.uid.as_str()));
            if !same {
                let _ = pod.child.kill();
                let _ = pod.child.wait();
            }
            same
        });
        // Exits, reported as the kubelet would.
        for (name, pod) in running.iter_mut() {
            if let Ok(Some(status)) = pod.child.try_wait() {
                let code = status.code().unwrap_or(128 + status.signal().unwrap_or(9));
                let phase = if code == 0 { "Succeeded" } else { "Failed" };
                self.status(
                    name,
                    serde_json::json!({
                        "phase": phase,
                        "containerStatuses": [{
                            "name": "runner", "ready": false, "restartCount": 0,
                            "image": "", "imageID": "",
                            "state": { "terminated": { "exitCode": code, "reason": "Error" } }
                        }]
                    }),
                );
                pod.uid.clear();
            }
        }
        running
            .retain(|_, pod| !pod.uid.is_empty() || pod.child.try_wait().ok().flatten().is_none());
        for (name, pod) in &pods {
            let phase = pod["status"]["phase"].as_str().unwrap_or("Pending");
            let asked = auto
                || wanted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(name);
            if running.contains_key(name) || !asked || phase != "Pending" {
                continue;
            }
            if pod["metadata"]["deletionTimestamp"].is_string() {
                continue;
            }
            match self.spawn(pod) {
                Ok(child) => {
                    running.insert(
                        name.clone(),
                        RunningPod {
                            uid: pod["metadata"]["uid"]
                                .as_str()
                                .unwrap_or_default()
                                .to_owned(),
                            child,
                        },
                    );
                    self.status(
                        name,
                        serde_json::json!({
                            "phase": "Running",
                            "containerStatuses": [{
                                "name": "runner", "ready": true, "restartCount": 0,
                                "image": "", "imageID": "",
                                "state": { "running": {} }
                            }]
                        }),
                    );
                }
                Err(e) => eprintln!("[kubelet] cannot run pod {name}: {e}"),
            }
        }
    }

    /// The host directory for each of the container's mount paths.
    fn volumes(
        &self,
        pod: &serde_json::Value,
        container: &serde_json::Value,
    ) -> Result<Vec<(String, PathBuf)>, String> {
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let volumes = pod["spec"]["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut mapped = Vec::new();
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let path = mount["mountPath"].as_str().unwrap_or_default().to_owned();
            let volume = volumes
                .iter()
                .find(|v| v["name"] == mount["name"])
                .ok_or_else(|| format!("mount {path}: no volume {}", mount["name"]))?;
            let host = if let Some(claim) = volume["persistentVolumeClaim"]["claimName"].as_str() {
                let mut dir = self.root.join("claims").join(claim);
                if let Some(sub) = mount["subPath"].as_str() {
                    dir = dir.join(sub);
                }
                dir
            } else if let Some(secret) = volume["secret"]["secretName"].as_str() {
                let dir = self.root.join("secrets").join(name).join(secret);
                std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                let object = self
                    .curl(&[&format!(
                        "{}/api/v1/namespaces/{}/secrets/{secret}",
                        self.url, self.namespace
                    )])
                    .ok_or("reading the secret")?;
                for (key, value) in object["stringData"].as_object().into_iter().flatten() {
                    std::fs::write(dir.join(key), value.as_str().unwrap_or_default())
                        .map_err(|e| e.to_string())?;
                }
                dir
            } else if volume["emptyDir"].is_object() {
                self.root
                    .join("empty")
                    .join(name)
                    .join(volume["name"].as_str().unwrap_or_default())
            } else {
                // /dev/fuse and the like: the host's own.
                PathBuf::from(&path)
            };
            std::fs::create_dir_all(&host).ok();
            mapped.push((path, host));
        }
        Ok(mapped)
    }

    /// A container's command line with its paths mapped to the host: its
    /// volumes, and the runner image's grad-runner.
    fn command(
        &self,
        pod: &serde_json::Value,
        container: &serde_json::Value,
    ) -> Result<Command, String> {
        let mut volumes = self.volumes(pod, container)?;
        volumes.push(("/usr/local/bin/grad-runner".into(), bin("grad-runner")));
        // Longest first, so /workspace/x maps before /workspace.
        volumes.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        // Word by word (a `sh -c` line too): a word that is a mount path or
        // below one.
        let map_word = |word: &str| -> String {
            for (path, host) in &volumes {
                if word == path {
                    return host.display().to_string();
                }
                if let Some(rest) = word.strip_prefix(&format!("{path}/")) {
                    return host.join(rest).display().to_string();
                }
            }
            word.to_owned()
        };
        let map = |value: &str| -> String {
            value.split(' ').map(map_word).collect::<Vec<_>>().join(" ")
        };
        let strings = |key: &str| -> Vec<String> {
            container[key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a.as_str())
                .map(map)
                .collect()
        };
        let mut line = strings("command");
        if line.is_empty() {
            // The image's entrypoint.
            line.push(bin("grad-runner").display().to_string());
        }
        line.extend(strings("args"));
        let mut cmd = Command::new(&line[0]);
        cmd.args(&line[1..])
            // The image's own environment (runner-image/Dockerfile).
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", std::env::var("HOME").unwrap_or_default())
            .env("GRAD_PYTHON", python())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for var in container["env"].as_array().into_iter().flatten() {
            if let (Some(name), Some(value)) = (var["name"].as_str(), var["value"].as_str()) {
                cmd.env(name, map(value));
            }
        }
        if let Some(dir) = container["workingDir"].as_str() {
            cmd.current_dir(map(dir));
        }
        Ok(cmd)
    }

    /// Runs the Pod's init containers to the end, then starts its container.
    fn spawn(&self, pod: &serde_json::Value) -> Result<Child, String> {
        for init in pod["spec"]["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let status = self
                .command(pod, init)?
                .status()
                .map_err(|e| e.to_string())?;
            if !status.success() {
                return Err(format!("init container {}: {status}", init["name"]));
            }
        }
        self.command(pod, &pod["spec"]["containers"][0])?
            .spawn()
            .map_err(|e| e.to_string())
    }
}

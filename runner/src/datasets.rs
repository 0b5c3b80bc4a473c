//! Datasets: S3 buckets (or a prefix in one) mounted read-only at
//! `data/<name>` with s3fs (s3fs-fuse), as grad asks after each registration
//! (`MountDatasets`). A dataset's keys go only to a 0600 file in the state
//! dir (outside the workspace), which is removed when the dataset is
//! unmounted. s3fs runs in the foreground as our child: its exit before the
//! mount appears is a failure, reported with s3fs's own words.

use std::{
    collections::HashMap,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use grad_proto::{Dataset, DatasetStatus};
use tokio::{io::AsyncReadExt, process::Child, sync::Mutex};

/// How long a mount may take to appear.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(20);

struct Mounted {
    /// The dataset as mounted: a different one is mounted afresh.
    dataset: Dataset,
    mountpoint: PathBuf,
    passwd: Option<PathBuf>,
    child: Child,
}

pub struct Mounts {
    data: PathBuf,
    secrets: PathBuf,
    s3fs: String,
    mounted: Mutex<HashMap<String, Mounted>>,
}

impl Mounts {
    /// Mounts under `workspace/data`, keys under `state_dir/s3fs`.
    pub fn new(workspace: &Path, state_dir: &Path) -> Mounts {
        Mounts {
            data: workspace.join("data"),
            secrets: state_dir.join("s3fs"),
            s3fs: std::env::var("GRAD_S3FS").unwrap_or_else(|_| "s3fs".into()),
            mounted: Mutex::new(HashMap::new()),
        }
    }

    /// Makes the mounts those of `datasets`: unmounts the others, keeps the
    /// unchanged ones that are still up, mounts the rest. Returns the
    /// status of each dataset asked for.
    pub async fn apply(&self, datasets: Vec<Dataset>) -> Vec<DatasetStatus> {
        let mut mounted = self.mounted.lock().await;
        let wanted: Vec<&str> = datasets.iter().map(|d| d.name.as_str()).collect();
        let gone: Vec<String> = mounted
            .keys()
            .filter(|name| !wanted.contains(&name.as_str()))
            .cloned()
            .collect();
        for name in gone {
            if let Some(old) = mounted.remove(&name) {
                unmount(old).await;
            }
        }
        let mut statuses = Vec::with_capacity(datasets.len());
        for dataset in datasets {
            let source = source(&dataset);
            let keep = mounted
                .get_mut(&dataset.name)
                .is_some_and(|m| m.dataset == dataset && matches!(m.child.try_wait(), Ok(None)));
            if keep {
                statuses.push(status(&dataset.name, source, Ok(())));
                continue;
            }
            if let Some(old) = mounted.remove(&dataset.name) {
                unmount(old).await;
            }
            let name = dataset.name.clone();
            match self.mount(dataset).await {
                Ok(m) => {
                    tracing::info!(dataset = %name, %source, "dataset mounted");
                    mounted.insert(name.clone(), m);
                    statuses.push(status(&name, source, Ok(())));
                }
                Err(why) => {
                    tracing::warn!(dataset = %name, %source, error = %why, "dataset not mounted");
                    statuses.push(status(&name, source, Err(why)));
                }
            }
        }
        statuses
    }

    /// Unmounts every dataset (the runner is stopping).
    pub async fn unmount_all(&self) {
        let mut mounted = self.mounted.lock().await;
        for (_, m) in mounted.drain() {
            unmount(m).await;
        }
    }

    async fn mount(&self, dataset: Dataset) -> Result<Mounted, String> {
        std::fs::create_dir_all(&self.data)
            .map_err(|e| format!("creating {}: {e}", self.data.display()))?;
        // As /proc/self/mountinfo will name it.
        let data = self
            .data
            .canonicalize()
            .unwrap_or_else(|_| self.data.clone());
        let mountpoint = data.join(&dataset.name);
        // What a runner killed before it could unmount left behind (a dead
        // mount fails even a stat, so this comes first).
        if is_mounted(&mountpoint) {
            fusermount_unmount(&mountpoint, true).await;
        }
        std::fs::create_dir_all(&mountpoint)
            .map_err(|e| format!("creating {}: {e}", mountpoint.display()))?;
        let passwd = match &dataset.credentials {
            Some(keys) => Some(
                self.write_passwd(
                    &dataset.name,
                    &format!("{}:{}", keys.access_key_id, keys.secret_access_key),
                )
                .map_err(|e| format!("writing the credentials file: {e}"))?,
            ),
            None => None,
        };
        // Errors, not chatter, in what it prints.
        let mut options = vec!["ro".to_string(), "dbglevel=err".to_string()];
        match &passwd {
            Some(file) => options.push(format!("passwd_file={}", file.display())),
            None => options.push("public_bucket=1".into()),
        }
        if !dataset.endpoint.is_empty() {
            options.push(format!("url={}", dataset.endpoint));
        }
        if !dataset.region.is_empty() {
            options.push(format!("endpoint={}", dataset.region));
        }
        if dataset.path_style {
            options.push("use_path_request_style".into());
        }
        let bucket = match dataset.prefix.trim_matches('/') {
            "" => dataset.bucket.clone(),
            prefix => format!("{}:/{prefix}", dataset.bucket),
        };
        let spawned = tokio::process::Command::new(&self.s3fs)
            .arg(&bucket)
            .arg(&mountpoint)
            .arg("-f")
            .arg("-o")
            .arg(options.join(","))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                remove(passwd.as_deref());
                return Err(format!(
                    "cannot run {}: {e} (install s3fs: apt-get install s3fs)",
                    self.s3fs
                ));
            }
        };
        let deadline = tokio::time::Instant::now() + MOUNT_TIMEOUT;
        loop {
            if is_mounted(&mountpoint) {
                // s3fs's later complaints go to our log.
                let name = dataset.name.clone();
                let output = take_output(&mut child);
                tokio::spawn(async move {
                    let text = output.await;
                    if !text.trim().is_empty() {
                        tracing::info!(dataset = %name, s3fs = %text.trim(), "s3fs");
                    }
                });
                return Ok(Mounted {
                    dataset,
                    mountpoint,
                    passwd,
                    child,
                });
            }
            // s3fs exits (even with status 0) when it cannot mount.
            if let Ok(Some(exit)) = child.try_wait() {
                let text = take_output(&mut child).await;
                remove(passwd.as_deref());
                return Err(s3fs_error(&text, &exit.to_string()));
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.kill().await;
                remove(passwd.as_deref());
                return Err(format!(
                    "s3fs did not mount within {}s",
                    MOUNT_TIMEOUT.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn write_passwd(&self, name: &str, content: &str) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.secrets)?;
        let path = self.secrets.join(format!("{name}.passwd"));
        let _ = std::fs::remove_file(&path);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        file.write_all(content.as_bytes())?;
        Ok(path)
    }
}

fn source(dataset: &Dataset) -> String {
    format!("s3://{}/{}", dataset.bucket, dataset.prefix)
}

fn status(name: &str, source: String, result: Result<(), String>) -> DatasetStatus {
    DatasetStatus {
        name: name.to_owned(),
        source,
        mounted: result.is_ok(),
        error: result.err().unwrap_or_default(),
    }
}

/// Everything `child` prints on stdout and stderr (s3fs uses both), once it
/// closes them.
fn take_output(child: &mut Child) -> impl Future<Output = String> + use<> {
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    async move {
        let mut text = String::new();
        if let Some(mut out) = stdout {
            let _ = out.read_to_string(&mut text).await;
        }
        if let Some(mut err) = stderr {
            let _ = err.read_to_string(&mut text).await;
        }
        text
    }
}

/// s3fs's reason, from what it printed: its critical lines (`[CRT]`, e.g.
/// "invalid credentials"), then the S3 error codes of its `[ERR]` lines.
fn s3fs_error(output: &str, exit: &str) -> String {
    // "2026-11-23T21:06:10.985Z [CRT] s3fs.cpp:s3fs_check_service(3590): invalid credentials..."
    let message = |line: &str, level: &str| -> Option<String> {
        let (_, rest) = line.split_once(level)?;
        let rest = rest.trim();
        let text = match rest.split_once("): ") {
            Some((_, text)) => text,
            None => rest,
        };
        Some(text.trim().to_owned())
    };
    let mut why: Vec<String> = Vec::new();
    for line in output.lines() {
        if let Some(text) = message(line, "[CRT]")
            && !text.contains("retry to connect")
            && !text.contains("change debug level")
            && !why.contains(&text)
        {
            why.push(text);
        }
    }
    let mut codes: Vec<&str> = Vec::new();
    for line in output.lines().filter(|l| l.contains("[ERR]")) {
        if let Some((_, rest)) = line.split_once("<Code>")
            && let Some((code, _)) = rest.split_once("</Code>")
            && !codes.contains(&code)
        {
            codes.push(code);
        }
    }
    if !codes.is_empty() {
        why.push(format!("S3 said {}", codes.join(", ")));
    }
    if why.is_empty() {
        // Something else went wrong: its last lines.
        let lines: Vec<&str> = output
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        why = lines
            .iter()
            .rev()
            .take(3)
            .rev()
            .map(|l| (*l).to_owned())
            .collect();
    }
    if why.is_empty() {
        why.push("no output".into());
    }
    format!("s3fs exited ({exit}): {}", why.join("; "))
}

async fn unmount(mut m: Mounted) {
    fusermount_unmount(&m.mountpoint, false).await;
    if tokio::time::timeout(Duration::from_secs(5), m.child.wait())
        .await
        .is_err()
    {
        let _ = m.child.kill().await;
        fusermount_unmount(&m.mountpoint, true).await;
    }
    remove(m.passwd.as_deref());
    tracing::info!(dataset = %m.dataset.name, "dataset unmounted");
}

async fn fusermount_unmount(mountpoint: &Path, lazy: bool) {
    for tool in ["fusermount3", "fusermount"] {
        let mut command = tokio::process::Command::new(tool);
        command.arg(if lazy { "-uz" } else { "-u" }).arg(mountpoint);
        let done = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        if done.is_ok() {
            return;
        }
    }
}

fn remove(path: Option<&Path>) {
    if let Some(path) = path {
        let _ = std::fs::remove_file(path);
    }
}

/// Whether something is mounted at `path` (per /proc/self/mountinfo).
fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.to_string_lossy().replace(' ', "\\040");
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mountpoint| mountpoint == wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3fs_errors_keep_its_critical_lines_and_the_s3_error_codes() {
        let output = "\
2026-11-23T21:06:10.983Z [INF] s3fs version 1.90(unknown) : s3fs -f
2026-11-23T21:06:10.985Z [ERR] curl.cpp:RequestPerform(2363): HTTP response code 403, returning EPERM. Body Text: <?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code></Error>
2026-11-23T21:06:10.985Z [CRT] s3fs.cpp:s3fs_check_service(3575): Failed to connect by sigv4, so retry to connect by signature version 2.
2026-11-23T21:06:10.985Z [CRT] s3fs.cpp:s3fs_check_service(3590): invalid credentials(host=http://127.0.0.1:9555) - result of checking service.
2026-11-23T21:06:10.985Z [ERR] s3fs.cpp:s3fs_exit_fuseloop(3372): Exiting FUSE event loop due to errors
";
        assert_eq!(
            s3fs_error(output, "exit status: 0"),
            "s3fs exited (exit status: 0): invalid credentials(host=http://127.0.0.1:9555) - \
             result of checking service.; S3 said SignatureDoesNotMatch"
        );
        assert_eq!(
            s3fs_error("", "signal: 9"),
            "s3fs exited (signal: 9): no output"
        );
        assert_eq!(
            s3fs_error(
                "s3fs: unable to access MOUNTPOINT /x: No such file\n",
                "exit status: 1"
            ),
            "s3fs exited (exit status: 1): s3fs: unable to access MOUNTPOINT /x: No such file"
        );
    }
}

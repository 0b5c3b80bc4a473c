//! Jobs with an `image`: run in an ephemeral Docker container through the
//! Docker Engine API (bollard). The job's directory is mounted at `/job`
//! (its working directory); CPU and memory limits become the container's;
//! GPUs are NVIDIA device requests — the convention of the NVIDIA Container
//! Toolkit, what `docker run --gpus '"device=0,1"'` sends: no driver, the
//! worker's chosen device ids, capabilities `[["gpu"]]`. The container is
//! removed afterwards, whatever happened.
//!
//! Secrets never enter the container's configuration (Docker keeps that on
//! disk, and `docker inspect` shows it): they go into a 0600 file on tmpfs
//! (`/dev/shm`), mounted read-only at `/run/grad/secrets.env` and sourced by
//! the shell that starts the command, and the file goes with the container.

use std::{
    collections::HashMap,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bollard::{
    container::LogOutput,
    models::{ContainerCreateBody, DeviceRequest, HostConfig},
    query_parameters::{
        CreateContainerOptionsBuilder, CreateImageOptionsBuilder, LogsOptionsBuilder,
        RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
    },
};
use grad_proto::{ClaimedJob, LogStream};
use tokio_stream::StreamExt;

use super::{
    logs::Log,
    run::{Ended, Lines, Stops, job_variables},
};

/// Where secrets are inside the container.
const SECRETS_IN_CONTAINER: &str = "/run/grad/secrets.env";
/// Sources the secrets, then runs the command ($GRAD_COMMAND) as `sh -c` would.
const WRAPPER: &str = "set -a; . /run/grad/secrets.env; set +a; exec sh -c \"$GRAD_COMMAND\"";

pub struct Docker {
    client: bollard::Docker,
}

/// `'value'` for a POSIX shell.
fn quoted(value: &str) -> String {
    format!("'{}'", value.replace('\'', "'\\''"))
}

impl Docker {
    /// The engine at DOCKER_HOST (or the default socket), if it answers.
    pub async fn connect() -> Option<Docker> {
        let answered = async {
            let client = bollard::Docker::connect_with_defaults()?
                .negotiate_version()
                .await?;
            client.ping().await?;
            Ok::<_, bollard::errors::Error>(client)
        };
        match answered.await {
            Ok(client) => {
                tracing::info!("Docker engine found: jobs with an image run in containers");
                Some(Docker { client })
            }
            Err(e) => {
                tracing::info!(error = %e, "no Docker engine: jobs with an image will not come here");
                None
            }
        }
    }

    /// The image, pulled if this engine lacks it.
    async fn ensure_image(&self, image: &str) -> Result<(), String> {
        if self.client.inspect_image(image).await.is_ok() {
            return Ok(());
        }
        let options = CreateImageOptionsBuilder::default()
            .from_image(image)
            .build();
        let mut pull = self.client.create_image(Some(options), None, None);
        while let Some(step) = pull.next().await {
            step.map_err(|e| {
                format!("image {image} is not on this worker and could not be pulled: {e}")
            })?;
        }
        Ok(())
    }

    /// Writes the secrets file on tmpfs (0600); answers its directory.
    fn secrets_file(job: &ClaimedJob, scratch: &Path) -> std::io::Result<PathBuf> {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            shm.join(format!("grad-{}-{}", job.id, job.attempt))
        } else {
            scratch.join("secrets")
        };
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("secrets.env");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        let mut names: Vec<&String> = job.secrets.keys().collect();
        names.sort();
        for name in names {
            writeln!(file, "{name}={}", quoted(&job.secrets[name]))?;
        }
        Ok(dir)
    }

    /// Runs the job in a container; the container is gone afterwards.
    pub(super) async fn run(
        &self,
        job: &ClaimedJob,
        scratch: &Path,
        dir: &Path,
        log: &Arc<Log>,
        gpus: &[usize],
        stops: &Stops<'_>,
    ) -> Ended {
        let Some(spec) = &job.spec else {
            return Ended::Error("grad sent no spec".into());
        };
        if let Err(why) = self.ensure_image(&spec.image).await {
            return Ended::Error(why);
        }
        let secrets_dir = match Self::secrets_file(job, scratch) {
            Ok(dir) => dir,
            Err(e) => return Ended::Error(format!("writing the secrets file: {e}")),
        };
        let name = format!("grad-{}-{}", job.id, job.attempt);
        let ended = self
            .run_container(job, &name, dir, &secrets_dir, log, gpus, stops)
            .await;
        let remove = RemoveContainerOptionsBuilder::default().force(true).build();
        if let Err(e) = self.client.remove_container(&name, Some(remove)).await {
            tracing::debug!(container = %name, error = %e, "removing the container");
        }
        let _ = std::fs::remove_dir_all(&secrets_dir);
        ended
    }

    #[allow(clippy::too_many_arguments)] // one container's pieces
    async fn run_container(
        &self,
        job: &ClaimedJob,
        name: &str,
        dir: &Path,
        secrets_dir: &Path,
        log: &Arc<Log>,
        gpus: &[usize],
        stops: &Stops<'_>,
    ) -> Ended {
        let Some(spec) = &job.spec else {
            return Ended::Error("grad sent no spec".into());
        };
        let mut env: HashMap<String, String> = job_variables(job);
        env.insert("GRAD_COMMAND".into(), spec.command.clone());
        let env: Vec<String> = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        let device_requests = (!gpus.is_empty()).then(|| {
            vec![DeviceRequest {
                driver: None,
                count: None,
                device_ids: Some(gpus.iter().map(ToString::to_string).collect()),
                capabilities: Some(vec![vec!["gpu".to_owned()]]),
                options: None,
            }]
        });
        let host_config = HostConfig {
            binds: Some(vec![
                format!("{}:/job", dir.display()),
                format!(
                    "{}:{}:ro",
                    secrets_dir.join("secrets.env").display(),
                    SECRETS_IN_CONTAINER
                ),
            ]),
            nano_cpus: (spec.cpu_millis > 0).then(|| i64::from(spec.cpu_millis) * 1_000_000),
            memory: (spec.memory_bytes > 0).then_some(spec.memory_bytes as i64),
            device_requests,
            // An init reaps zombies and passes signals on.
            init: Some(true),
            ..Default::default()
        };
        let labels = HashMap::from([
            ("dev.grad.job".to_owned(), job.id.clone()),
            ("dev.grad.attempt".to_owned(), job.attempt.to_string()),
        ]);
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: Some(vec!["sh".into(), "-c".into(), WRAPPER.into()]),
            env: Some(env),
            working_dir: Some("/job".into()),
            labels: Some(labels),
            host_config: Some(host_config),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default().name(name).build();
        if let Err(e) = self.client.create_container(Some(options), body).await {
            return Ended::Error(format!("creating the container: {e}"));
        }
        if let Err(e) = self.client.start_container(name, None).await {
            return Ended::Error(format!("starting the container: {e}"));
        }
        let follow = LogsOptionsBuilder::default()
            .follow(true)
            .stdout(true)
            .stderr(true)
            .build();
        let mut output = self.client.logs(name, Some(follow));
        let reader = {
            let log = log.clone();
            async move {
                let (mut out, mut err) = (Lines::default(), Lines::default());
                while let Some(Ok(chunk)) = output.next().await {
                    match chunk {
                        LogOutput::StdErr { message } => {
                            err.feed(&message, &log, LogStream::Stderr)
                        }
                        LogOutput::StdOut { message } | LogOutput::Console { message } => {
                            out.feed(&message, &log, LogStream::Stdout)
                        }
                        LogOutput::StdIn { .. } => {}
                    }
                }
                out.finish(&log, LogStream::Stdout);
                err.finish(&log, LogStream::Stderr);
            }
        };
        let reader = tokio::spawn(reader);
        let mut wait = self.client.wait_container(name, None);
        let ended = tokio::select! {
            status = wait.next() => match status {
                Some(Ok(response)) => Ended::Exited(response.status_code as i32),
                Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
                    Ended::Exited(code as i32)
                }
                Some(Err(e)) => Ended::Error(format!("waiting for the container: {e}")),
                None => Ended::Error("the container's wait ended without a status".into()),
            },
            ended = stops.fired() => {
                let stop = StopContainerOptionsBuilder::default().t(5).build();
                if let Err(e) = self.client.stop_container(name, Some(stop)).await {
                    tracing::warn!(container = %name, error = %e, "stopping the container");
                }
                ended
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
        ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_quoted_for_the_shell() {
        assert_eq!(quoted("plain"), "'plain'");
        assert_eq!(quoted("it's $HOME"), "'it'\\''s $HOME'");
    }
}

//! grad's command line and environment: one `Config`, validated before any
//! port is bound.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "grad",
    version,
    about = "grad: the control plane for remote runners"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format (logs go to stderr; RUST_LOG sets the level, default info).
    #[arg(long, global = true, env = "GRAD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve gRPC and HTTP on one port, with local or Kubernetes runners.
    Serve(Box<Config>),
    /// Manage users and their tokens (works on the data dir directly).
    #[command(subcommand)]
    User(UserCommand),
}

#[derive(Debug, Clone, Args)]
pub struct Store {
    /// Where grad keeps its database, signing key, admin token and runner workspaces.
    #[arg(long, env = "GRAD_DATA_DIR", default_value = ".grad")]
    pub data_dir: PathBuf,
    /// Database URL (default: the SQLite file grad.db in the data dir).
    #[arg(long, env = "GRAD_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

impl Store {
    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("grad.db").display()
            )
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct Config {
    #[command(flatten)]
    pub store: Store,
    /// Address to listen on for gRPC and HTTP.
    #[arg(long, env = "GRAD_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// URL runners dial to reach grad (default: http://<listen address>).
    #[arg(long, env = "GRAD_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// The grad-runner binary for local runners (default: next to grad, else PATH).
    #[arg(long, env = "GRAD_RUNNER_BIN")]
    pub runner_bin: Option<PathBuf>,
    /// The Python interpreter runners use (default: python3).
    #[arg(long, env = "GRAD_PYTHON")]
    pub python: Option<String>,
    /// How often runners send heartbeats.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// A ready runner silent for this long is marked failed.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub heartbeat_timeout: Duration,
    /// A starting runner that has not registered within this long is marked
    /// failed (default: 30s for local runners, 5m on Kubernetes, where
    /// image pulls and scheduling come first).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub start_timeout: Option<Duration>,
    /// A ready runner nobody has used for this long (no execution, no
    /// tunnel, no job) is paused, its outputs collected first; 0: never.
    #[arg(long, env = "GRAD_IDLE_PAUSE", default_value = "0s", value_parser = humantime::parse_duration)]
    pub idle_pause: Duration,
    /// A job attempt whose worker does not renew its lease for this long is
    /// lost (queued again, or failed once its retries are used up).
    #[arg(long, env = "GRAD_JOB_LEASE", default_value = "15s", value_parser = humantime::parse_duration)]
    pub job_lease: Duration,
    /// The key that seals secrets at rest (at least 32 bytes); it must
    /// exist. Default: <data-dir>/secrets.key, made at first start.
    #[arg(long, env = "GRAD_SECRETS_KEY_FILE", value_name = "FILE")]
    pub secrets_key_file: Option<PathBuf>,
    #[command(flatten)]
    pub blobs: Blobs,
    #[command(flatten)]
    pub kubernetes: KubernetesArgs,
}

/// Where runners live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// `grad-runner` processes on this machine (the embedded default).
    Local,
    /// A Pod per runner, through the Kubernetes API (in-cluster, or the
    /// kubeconfig in KUBECONFIG / ~/.kube/config).
    Kubernetes,
}

#[derive(Debug, Clone, Args)]
pub struct KubernetesArgs {
    /// Where runners live: `local` processes or `kubernetes` pods.
    #[arg(long, env = "GRAD_BACKEND", value_enum, default_value_t = BackendKind::Local)]
    pub backend: BackendKind,
    /// With --backend kubernetes: the namespace of the runners' pods,
    /// claims and secrets.
    #[arg(long, env = "GRAD_NAMESPACE", default_value = "grad-runners")]
    pub namespace: String,
    /// With --backend kubernetes: the runner image (grad-runner with
    /// Python, pandas, DuckDB and s3fs; runner-image/Dockerfile).
    #[arg(long, env = "GRAD_RUNNER_IMAGE", default_value = "grad-runner:dev")]
    pub runner_image: String,
    /// With --backend kubernetes: the runner pods' image pull policy
    /// (Always, IfNotPresent or Never; default: Kubernetes').
    #[arg(long, env = "GRAD_IMAGE_PULL_POLICY", value_parser = ["Always", "IfNotPresent", "Never"])]
    pub image_pull_policy: Option<String>,
    /// With --backend kubernetes: the storage class of the runners'
    /// workspace claims (empty: the cluster's default).
    #[arg(long, env = "GRAD_STORAGE_CLASS", default_value = "")]
    pub storage_class: String,
    /// With --backend kubernetes: each runner's ephemeral-storage request
    /// and limit (a Kubernetes quantity; empty: none).
    #[arg(long, env = "GRAD_RUNNER_EPHEMERAL_STORAGE", default_value = "10Gi")]
    pub runner_ephemeral_storage: String,
    /// With --backend kubernetes: the URL runner pods dial, the Service in
    /// front of every replica (default: --advertise-url).
    #[arg(long, env = "GRAD_SERVICE_URL")]
    pub service_url: Option<String>,
    /// With --backend kubernetes: run queued jobs as their own pods (jobs
    /// that name no runner and ask for no worker labels).
    #[arg(long, env = "GRAD_JOB_PODS")]
    pub job_pods: bool,
    /// How long a queued job waits for a standing worker before it gets
    /// its own pod.
    #[arg(long, env = "GRAD_JOB_POD_DELAY", default_value = "2s", value_parser = humantime::parse_duration)]
    pub job_pod_delay: Duration,
    /// How often grad looks for pods, claims and secrets no runner owns.
    #[arg(long, env = "GRAD_LEFTOVER_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub leftover_interval: Duration,
}

/// Where blobs (outputs, bundles, logs) are kept.
#[derive(Debug, Clone, Args)]
pub struct Blobs {
    /// `dir`: a directory in the data dir, served by grad itself; `s3`: an
    /// S3-compatible bucket (credentials the AWS SDK's way: AWS_ACCESS_KEY_ID
    /// and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/credentials).
    #[arg(long, env = "GRAD_BLOB_STORE", value_enum, default_value_t = BlobStoreKind::Dir)]
    pub blob_store: BlobStoreKind,
    /// The bucket, with --blob-store s3.
    #[arg(long, env = "GRAD_S3_BUCKET")]
    pub s3_bucket: Option<String>,
    /// Prepended to every object key in the bucket (e.g. `grad/`).
    #[arg(long, env = "GRAD_S3_PREFIX", default_value = "")]
    pub s3_prefix: String,
    /// An S3-compatible endpoint such as http://127.0.0.1:9000 (default: AWS).
    #[arg(long, env = "GRAD_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// The bucket's region (default: the AWS SDK's, else us-east-1).
    #[arg(long, env = "GRAD_S3_REGION")]
    pub s3_region: Option<String>,
    /// Path-style URLs (http://host/bucket/key), which most S3-compatible
    /// servers need.
    #[arg(long, env = "GRAD_S3_PATH_STYLE")]
    pub s3_path_style: bool,
    /// Objects at least this large (bytes; Ki, Mi, Gi suffixes) go to S3 in
    /// parts, several at once; S3 takes at most 5Gi in one PUT.
    #[arg(long, env = "GRAD_S3_MULTIPART_THRESHOLD", default_value = "1Gi", value_parser = parse_bytes)]
    pub s3_multipart_threshold: u64,
}

/// A byte count: a number with an optional Ki, Mi or Gi suffix, 5Mi to 5Gi.
fn parse_bytes(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, ""),
    };
    let scale: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => return Err(format!("'{text}': expected bytes like 64Mi or 1Gi")),
    };
    let bytes = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("'{text}': expected bytes like 64Mi or 1Gi"))?;
    if !(5 << 20..=5 << 30).contains(&bytes) {
        return Err(format!(
            "'{text}': must be between 5Mi and 5Gi (S3's part sizes)"
        ));
    }
    Ok(bytes)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BlobStoreKind {
    Dir,
    S3,
}

impl Config {
    /// Checks what clap cannot, before any port is bound.
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat_timeout <= self.heartbeat_interval {
            return Err(format!(
                "--heartbeat-timeout ({}) must be longer than --heartbeat-interval ({})",
                humantime::format_duration(self.heartbeat_timeout),
                humantime::format_duration(self.heartbeat_interval)
            ));
        }
        if self.job_lease < Duration::from_millis(300) {
            return Err("--job-lease must be at least 300ms".into());
        }
        if self.heartbeat_interval < Duration::from_millis(10) {
            return Err("--heartbeat-interval must be at least 10ms".into());
        }
        if let Some(url) = &self.advertise_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(format!(
                "--advertise-url '{url}': expected a URL like http://10.0.0.5:7070"
            ));
        }
        if self.kubernetes.backend == BackendKind::Kubernetes {
            crate::names::dns_label("--namespace", &self.kubernetes.namespace, 63)
                .map_err(|e| e.to_string())?;
            if self.kubernetes.runner_image.trim().is_empty() {
                return Err(
                    "--runner-image is empty: name the runner image, e.g. grad-runner:dev".into(),
                );
            }
        }
        if self.kubernetes.job_pods && self.kubernetes.backend != BackendKind::Kubernetes {
            return Err("--job-pods needs --backend kubernetes".into());
        }
        if let Some(url) = &self.kubernetes.service_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(format!(
                "--service-url '{url}': expected a URL like http://grad.grad.svc.cluster.local:7070"
            ));
        }
        if let Some(bad) = self
            .kubernetes
            .runner_ephemeral_storage
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '.'))
        {
            return Err(format!(
                "--runner-ephemeral-storage '{}': '{bad}' is not part of a Kubernetes \
                 quantity such as 10Gi",
                self.kubernetes.runner_ephemeral_storage
            ));
        }
        let blobs = &self.blobs;
        if blobs.blob_store == BlobStoreKind::S3 && blobs.s3_bucket.is_none() {
            return Err("--blob-store s3 needs --s3-bucket (or GRAD_S3_BUCKET)".into());
        }
        if let Some(url) = &blobs.s3_endpoint
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(format!(
                "--s3-endpoint '{url}': expected a URL like http://127.0.0.1:9000"
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user and print a token for them.
    Add {
        /// User name: 1-32 lowercase letters, digits, '-', '_' or '.'.
        name: String,
        /// Make the user an admin (sees every user's resources).
        #[arg(long)]
        admin: bool,
        /// Plan: pro may request GPUs.
        #[arg(long, default_value = "free", value_parser = ["free", "pro"])]
        plan: String,
        /// How long the token is valid.
        #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[command(flatten)]
        store: Store,
    },
    /// Set a user's plan (pro may run GPU jobs and runners); it applies at
    /// once, to tokens already issued too.
    Plan {
        name: String,
        #[arg(value_parser = ["free", "pro"])]
        plan: String,
        #[command(flatten)]
        store: Store,
    },
    /// Print a new token for an existing user.
    Token {
        name: String,
        #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[command(flatten)]
        store: Store,
    },
}

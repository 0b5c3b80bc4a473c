//! Runners' datasets: S3 buckets (or a prefix in one) that grad-runner mounts
//! read-only at `data/<name>` with s3fs. They arrive with `CreateRunner`;
//! grad keeps their descriptions and mount status with the runner (no
//! secrets) and their credentials sealed ([`crate::sealed`]), and hands both
//! to the runner's agent after every registration (`MountDatasets`), so the
//! mounts come back after a pause or a restart.

use std::collections::BTreeMap;

use grad_proto::{self as pb, AgentCommand, MountDatasets, agent_command::Command};
use serde::{Deserialize, Serialize};

use crate::{
    blobs::{
        S3Store,
        s3::{self, Probe, ProbeError},
    },
    error::{Error, Result},
    sealed::Sealer,
    secrets::Secrets,
    store,
};

/// At most this many datasets per runner.
const MAX_DATASETS: usize = 32;

/// A dataset as grad keeps it with its runner: no credentials.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dataset {
    pub name: String,
    pub bucket: String,
    pub prefix: String,
    pub endpoint: String,
    pub region: String,
    pub path_style: bool,
    /// No credentials: a public bucket.
    pub public: bool,
    pub mounted: bool,
    /// Why it is not mounted (s3fs's words), once the runner has tried.
    pub error: String,
}

impl Dataset {
    pub fn source(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    pub fn to_status(&self) -> pb::DatasetStatus {
        pb::DatasetStatus {
            name: self.name.clone(),
            source: self.source(),
            mounted: self.mounted,
            error: self.error.clone(),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Keys {
    access_key_id: String,
    secret_access_key: String,
}

/// Checks one dataset's fields, naming the one that is wrong.
fn validate(dataset: &pb::Dataset) -> Result<()> {
    let field = |what: &str| format!("dataset '{}': {what}", dataset.name);
    crate::runners::validate_name(&dataset.name).map_err(|_| {
        Error::InvalidArgument(format!(
            "dataset name '{}': use 1-63 lowercase letters, digits and '-', starting with a letter",
            dataset.name
        ))
    })?;
    let bucket_ok = (3..=63).contains(&dataset.bucket.len())
        && dataset
            .bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    if !bucket_ok {
        return Err(Error::InvalidArgument(field(&format!(
            "bucket '{}': 3-63 lowercase letters, digits, '.' and '-'",
            dataset.bucket
        ))));
    }
    if dataset.prefix.starts_with('/')
        || dataset.prefix.split('/').any(|s| s == "..")
        || dataset.prefix.chars().any(char::is_control)
    {
        return Err(Error::InvalidArgument(field(&format!(
            "prefix '{}': a path in the bucket, without a leading '/' or '..'",
            dataset.prefix
        ))));
    }
    let url = |s: &str| s.starts_with("http://") || s.starts_with("https://");
    if !(dataset.endpoint.is_empty() || url(&dataset.endpoint)) {
        return Err(Error::InvalidArgument(field(&format!(
            "endpoint '{}': expected a URL like http://127.0.0.1:9000",
            dataset.endpoint
        ))));
    }
    if let Some(credentials) = &dataset.credentials
        && (credentials.access_key_id.is_empty() || credentials.secret_access_key.is_empty())
    {
        return Err(Error::InvalidArgument(field(
            "credentials: both the access key id and the secret access key are needed",
        )));
    }
    Ok(())
}

/// Datasets whose keys are a grad secret (`credentials_secret`) get them
/// from `owner_id`'s secret, whose value is `ACCESS_KEY_ID:SECRET_ACCESS_KEY`.
pub async fn with_secret_keys(
    mut datasets: Vec<pb::Dataset>,
    secrets: &Secrets,
    owner_id: &str,
) -> Result<Vec<pb::Dataset>> {
    for dataset in &mut datasets {
        if dataset.credentials_secret.is_empty() {
            continue;
        }
        let field = format!(
            "dataset '{}': credentials.secret '{}'",
            dataset.name, dataset.credentials_secret
        );
        if dataset.credentials.is_some() {
            return Err(Error::InvalidArgument(format!(
                "{field}: give keys or a secret, not both"
            )));
        }
        crate::secrets::validate_name(&dataset.credentials_secret)?;
        let value = secrets
            .value(owner_id, &dataset.credentials_secret)
            .await?
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "{field}: you have no such secret; set it with `gractl secret set {}` \
                     (value ACCESS_KEY_ID:SECRET_ACCESS_KEY)",
                    dataset.credentials_secret
                ))
            })?;
        let keys = value
            .trim()
            .split_once(':')
            .filter(|(id, key)| !id.is_empty() && !key.is_empty());
        let Some((access_key_id, secret_access_key)) = keys else {
            return Err(Error::FailedPrecondition(format!(
                "{field}: the secret must hold ACCESS_KEY_ID:SECRET_ACCESS_KEY"
            )));
        };
        dataset.credentials = Some(pb::S3Credentials {
            access_key_id: access_key_id.to_owned(),
            secret_access_key: secret_access_key.to_owned(),
        });
        dataset.credentials_secret.clear();
    }
    Ok(datasets)
}

/// How many keys a test lists.
const TEST_SAMPLE: i32 = 10;

/// Lists a few objects of `dataset` with its own credentials (anonymously
/// when it has none, never with grad's): can a runner mount it? A failure
/// to list is the answer's `Err`; a malformed dataset is the outer error.
pub async fn test(dataset: pb::Dataset) -> Result<std::result::Result<Probe, ProbeError>> {
    validate(&dataset)?;
    let non_empty = |s: String| (!s.is_empty()).then_some(s);
    let settings = s3::Settings {
        bucket: dataset.bucket,
        prefix: String::new(),
        endpoint: non_empty(dataset.endpoint),
        region: non_empty(dataset.region),
        path_style: dataset.path_style,
        anonymous: dataset.credentials.is_none(),
        credentials: dataset.credentials.map(|c| s3::Credentials {
            access_key_id: c.access_key_id,
            secret_access_key: c.secret_access_key,
        }),
    };
    let store = S3Store::new(&settings).await?;
    Ok(store.probe(&dataset.prefix, TEST_SAMPLE).await)
}

/// Checks the datasets of a new runner; returns what to keep with it and its
/// credentials sealed for `runner_id` ("" when there are none).
pub fn accept(
    datasets: Vec<pb::Dataset>,
    sealer: &Sealer,
    runner_id: &str,
) -> Result<(Vec<Dataset>, String)> {
    if datasets.len() > MAX_DATASETS {
        return Err(Error::InvalidArgument(format!(
            "datasets: at most {MAX_DATASETS} per runner, not {}",
            datasets.len()
        )));
    }
    let mut kept = Vec::with_capacity(datasets.len());
    let mut keys = BTreeMap::new();
    for dataset in datasets {
        validate(&dataset)?;
        if kept.iter().any(|d: &Dataset| d.name == dataset.name) {
            return Err(Error::InvalidArgument(format!(
                "dataset '{}': named twice",
                dataset.name
            )));
        }
        let public = match dataset.credentials {
            None => true,
            Some(credentials) => {
                keys.insert(
                    dataset.name.clone(),
                    Keys {
                        access_key_id: credentials.access_key_id,
                        secret_access_key: credentials.secret_access_key,
                    },
                );
                false
            }
        };
        kept.push(Dataset {
            name: dataset.name,
            bucket: dataset.bucket,
            prefix: dataset.prefix,
            endpoint: dataset.endpoint,
            region: dataset.region,
            path_style: dataset.path_style,
            public,
            mounted: false,
            error: String::new(),
        });
    }
    let sealed = if keys.is_empty() {
        String::new()
    } else {
        let json = serde_json::to_vec(&keys)
            .map_err(|e| Error::FailedPrecondition(format!("encoding credentials: {e}")))?;
        sealer.seal(&json, runner_id)?
    };
    Ok((kept, sealed))
}

/// The command that has the runner's agent mount its datasets, credentials
/// unsealed.
pub fn mount_command(runner: &store::Runner, sealer: &Sealer) -> Result<AgentCommand> {
    let mut keys: BTreeMap<String, Keys> = if runner.dataset_credentials.is_empty() {
        BTreeMap::new()
    } else {
        let json = sealer.open(&runner.dataset_credentials, &runner.id)?;
        serde_json::from_slice(&json).map_err(|e| {
            Error::FailedPrecondition(format!("the credentials of runner {}: {e}", runner.name))
        })?
    };
    let datasets = runner
        .datasets
        .iter()
        .map(|d| pb::Dataset {
            name: d.name.clone(),
            bucket: d.bucket.clone(),
            prefix: d.prefix.clone(),
            endpoint: d.endpoint.clone(),
            region: d.region.clone(),
            path_style: d.path_style,
            credentials: keys.remove(&d.name).map(|k| pb::S3Credentials {
                access_key_id: k.access_key_id,
                secret_access_key: k.secret_access_key,
            }),
            credentials_secret: String::new(),
        })
        .collect();
    Ok(AgentCommand {
        command: Some(Command::MountDatasets(MountDatasets { datasets })),
    })
}

/// The runner's report merged into what grad keeps: statuses of datasets it
/// does not know are ignored.
pub fn with_statuses(mut datasets: Vec<Dataset>, statuses: &[pb::DatasetStatus]) -> Vec<Dataset> {
    for dataset in &mut datasets {
        if let Some(status) = statuses.iter().find(|s| s.name == dataset.name) {
            dataset.mounted = status.mounted;
            dataset.error = status.error.clone();
        }
    }
    datasets
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(name: &str) -> pb::Dataset {
        pb::Dataset {
            name: name.into(),
            bucket: "nyc-taxi".into(),
            prefix: "2024/".into(),
            endpoint: "http://127.0.0.1:9000".into(),
            region: "us-east-1".into(),
            path_style: true,
            credentials: Some(pb::S3Credentials {
                access_key_id: "AK".into(),
                secret_access_key: "SECRET-KEY".into(),
            }),
            credentials_secret: String::new(),
        }
    }

    fn runner(datasets: Vec<Dataset>, sealed: String) -> store::Runner {
        store::Runner {
            id: "id-1".into(),
            owner_id: "u".into(),
            owner_name: "u".into(),
            name: "r1".into(),
            state: store::State::Ready,
            reason: String::new(),
            resources: store::Resources {
                cpu_millis: 1000,
                memory_bytes: 1 << 30,
                storage_bytes: 1 << 30,
                gpus: 0,
            },
            backend: "local".into(),
            workspace: String::new(),
            token_id: String::new(),
            pid: None,
            host_key: String::new(),
            created_at: 0,
            updated_at: 0,
            datasets,
            dataset_credentials: sealed,
        }
    }

    #[test]
    fn credentials_are_sealed_apart_and_come_back_only_in_the_mount_command() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = Sealer::load_or_create(&dir.path().join("secrets.key")).unwrap();
        let mut public = dataset("public");
        public.credentials = None;
        let (kept, sealed) = accept(vec![dataset("taxi"), public], &sealer, "id-1").unwrap();
        assert!(!sealed.contains("SECRET-KEY"));
        assert!(!serde_json::to_string(&kept).unwrap().contains("SECRET-KEY"));
        assert_eq!(
            (kept[0].public, kept[1].public, kept[0].source()),
            (false, true, "s3://nyc-taxi/2024/".to_string())
        );
        let command = mount_command(&runner(kept, sealed.clone()), &sealer).unwrap();
        let Some(Command::MountDatasets(mount)) = command.command else {
            panic!("not a mount command");
        };
        assert_eq!(
            mount.datasets[0]
                .credentials
                .as_ref()
                .unwrap()
                .secret_access_key,
            "SECRET-KEY"
        );
        assert!(mount.datasets[1].credentials.is_none());
        // Sealed for another runner, they do not open.
        let mut other = runner(Vec::new(), sealed);
        other.id = "id-2".into();
        assert!(mount_command(&other, &sealer).is_err());
    }

    #[test]
    fn bad_datasets_are_refused_with_the_field_named() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = Sealer::load_or_create(&dir.path().join("secrets.key")).unwrap();
        let cases: Vec<(pb::Dataset, &str)> = vec![
            (
                pb::Dataset {
                    name: "Bad Name".into(),
                    ..dataset("x")
                },
                "dataset name 'Bad Name'",
            ),
            (
                pb::Dataset {
                    bucket: "NO".into(),
                    ..dataset("x")
                },
                "bucket 'NO'",
            ),
            (
                pb::Dataset {
                    prefix: "../up".into(),
                    ..dataset("x")
                },
                "prefix '../up'",
            ),
            (
                pb::Dataset {
                    endpoint: "ftp://x".into(),
                    ..dataset("x")
                },
                "endpoint 'ftp://x'",
            ),
            (
                pb::Dataset {
                    credentials: Some(pb::S3Credentials::default()),
                    ..dataset("x")
                },
                "credentials",
            ),
        ];
        for (bad, expected) in cases {
            let err = accept(vec![bad], &sealer, "id").unwrap_err().to_string();
            assert!(err.contains(expected), "{expected}: {err}");
        }
        let err = accept(vec![dataset("a"), dataset("a")], &sealer, "id")
            .unwrap_err()
            .to_string();
        assert!(err.contains("named twice"), "{err}");
    }
}

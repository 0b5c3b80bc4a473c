//! A job's spec as grad keeps it (JSON in the store), and its checks: the
//! same rules gractl applies to job.yaml, enforced again here because the
//! API is open to any client.

use std::collections::BTreeMap;

use grad_proto as pb;
use serde::{Deserialize, Serialize};

use crate::{
    error::{Error, Result},
    store::Plan,
};

const MAX_COMMAND: usize = 64 << 10;
const MAX_ENV: usize = 256;
const MAX_VALUE: usize = 32 << 10;
const MAX_SECRETS: usize = 64;
const MAX_LABELS: usize = 32;
pub const MAX_RETRIES: u32 = 10;
const MAX_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;
const MAX_GPUS: u32 = 8;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    pub name: String,
    pub command: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    #[serde(default)]
    pub gpus: u32,
    #[serde(default)]
    pub cpu_millis: u32,
    #[serde(default)]
    pub memory_bytes: u64,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub secrets: Vec<String>,
    #[serde(default)]
    pub outputs: String,
    #[serde(default)]
    pub retries: u32,
    #[serde(default)]
    pub timeout_ms: u64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub runner: String,
}

/// What environment variable names may be: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_env_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_label_part(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 63
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
}

/// A DNS label, like runner names, up to 63 characters.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    crate::names::dns_label(what, name, 63)
}

/// Labels as workers and jobs carry them.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    if labels.len() > MAX_LABELS {
        return Err(Error::InvalidArgument(format!(
            "labels: at most {MAX_LABELS}, not {}",
            labels.len()
        )));
    }
    for (key, value) in labels {
        if !is_label_part(key) || !(value.is_empty() || is_label_part(value)) {
            return Err(Error::InvalidArgument(format!(
                "label '{key}={value}': keys and values are up to 63 letters, digits, '.', '_', \
                 '-' or '/'"
            )));
        }
    }
    Ok(())
}

fn invalid(field: &str, why: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("{field}: {why}"))
}

impl Spec {
    /// Checks a submitted spec for a user on `plan`.
    pub fn from_pb(spec: pb::JobSpec, plan: Plan) -> Result<Spec> {
        validate_name("job name", &spec.name)?;
        if spec.command.trim().is_empty() {
            return Err(invalid("command", "is empty"));
        }
        if spec.command.len() > MAX_COMMAND {
            return Err(invalid(
                "command",
                format!("longer than {MAX_COMMAND} bytes"),
            ));
        }
        let image_ok = spec.image.len() <= 255
            && spec
                .image
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-_/:@".contains(c));
        if !image_ok {
            return Err(invalid(
                "image",
                format!("'{}' is not a Docker image reference", spec.image),
            ));
        }
        if spec.gpus > MAX_GPUS {
            return Err(invalid(
                "gpus",
                format!("at most {MAX_GPUS}, not {}", spec.gpus),
            ));
        }
        if spec.gpus > 0 && plan != Plan::Pro {
            return Err(Error::PermissionDenied(format!(
                "GPU jobs need the pro plan; your plan is {plan} (an admin can change it: \
                 `grad user plan NAME pro`)"
            )));
        }
        if spec.cpu_millis > 64_000 {
            return Err(invalid("resources.cpu", "at most 64 cores"));
        }
        if spec.memory_bytes > 512 << 30 {
            return Err(invalid("resources.memory", "at most 512Gi"));
        }
        if spec.env.len() > MAX_ENV {
            return Err(invalid("env", format!("at most {MAX_ENV} variables")));
        }
        for (name, value) in &spec.env {
            if !is_env_name(name) || name.starts_with("GRAD_") {
                return Err(invalid(
                    "env",
                    format!(
                        "'{name}' is not a variable name ([A-Za-z_][A-Za-z0-9_]*, not GRAD_...)"
                    ),
                ));
            }
            if value.len() > MAX_VALUE {
                return Err(invalid(
                    "env",
                    format!("{name}: longer than {MAX_VALUE} bytes"),
                ));
            }
        }
        if spec.secrets.len() > MAX_SECRETS {
            return Err(invalid("secrets", format!("at most {MAX_SECRETS}")));
        }
        for name in &spec.secrets {
            if !is_env_name(name) || name.starts_with("GRAD_") {
                return Err(invalid(
                    "secrets",
                    format!("'{name}' cannot be an environment variable ([A-Za-z_][A-Za-z0-9_]*)"),
                ));
            }
            if spec.env.contains_key(name) {
                return Err(invalid(
                    "secrets",
                    format!("{name} is also in env: give it one way"),
                ));
            }
        }
        let outputs = spec.outputs.trim_end_matches('/');
        if outputs.starts_with('/')
            || outputs
                .split('/')
                .any(|part| part == ".." || part == "." && outputs != ".")
        {
            return Err(invalid(
                "outputs",
                format!("'{}' must be a directory inside the job's", spec.outputs),
            ));
        }
        if spec.retries > MAX_RETRIES {
            return Err(invalid("retries", format!("at most {MAX_RETRIES}")));
        }
        if spec.timeout_ms > MAX_TIMEOUT_MS {
            return Err(invalid("timeout", "at most 7 days"));
        }
        let labels: BTreeMap<String, String> = spec.labels.into_iter().collect();
        validate_labels(&labels)?;
        if !spec.runner.is_empty() {
            validate_name("runner", &spec.runner)?;
        }
        Ok(Spec {
            outputs: if outputs.is_empty() {
                "outputs".into()
            } else {
                outputs.into()
            },
            name: spec.name,
            command: spec.command,
            image: spec.image,
            gpus: spec.gpus,
            cpu_millis: spec.cpu_millis,
            memory_bytes: spec.memory_bytes,
            env: spec.env.into_iter().collect(),
            secrets: spec.secrets,
            retries: spec.retries,
            timeout_ms: spec.timeout_ms,
            labels,
            runner: spec.runner,
        })
    }

    pub fn to_pb(&self) -> pb::JobSpec {
        pb::JobSpec {
            name: self.name.clone(),
            command: self.command.clone(),
            image: self.image.clone(),
            gpus: self.gpus,
            cpu_millis: self.cpu_millis,
            memory_bytes: self.memory_bytes,
            env: self.env.clone().into_iter().collect(),
            secrets: self.secrets.clone(),
            outputs: self.outputs.clone(),
            retries: self.retries,
            timeout_ms: self.timeout_ms,
            labels: self.labels.clone().into_iter().collect(),
            runner: self.runner.clone(),
        }
    }

    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self)
            .map_err(|e| Error::FailedPrecondition(format!("encoding a job spec: {e}")))
    }

    pub fn from_json(json: &str) -> Result<Spec> {
        serde_json::from_str(json)
            .map_err(|e| Error::FailedPrecondition(format!("a job's spec in the store: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> pb::JobSpec {
        pb::JobSpec {
            name: "train".into(),
            command: "python train.py".into(),
            ..Default::default()
        }
    }

    fn refused(edit: impl FnOnce(&mut pb::JobSpec), plan: Plan) -> String {
        let mut s = spec();
        edit(&mut s);
        Spec::from_pb(s, plan)
            .map(|s| format!("accepted: {s:?}"))
            .unwrap_or_else(|e| e.to_string())
    }

    #[test]
    fn a_minimal_spec_gets_the_defaults() {
        let s = Spec::from_pb(spec(), Plan::Free).unwrap_or_default();
        assert_eq!(s.outputs, "outputs");
        assert_eq!(s.retries, 0);
        let back = Spec::from_json(&s.to_json().unwrap_or_default()).unwrap_or_default();
        assert_eq!(back, s);
    }

    #[test]
    fn each_bad_field_is_named() {
        type Edit = Box<dyn FnOnce(&mut pb::JobSpec)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|s| s.name = "Train".into()),
                "invalid job name 'Train'",
            ),
            (Box::new(|s| s.command = " ".into()), "command: is empty"),
            (Box::new(|s| s.image = "bad image".into()), "image:"),
            (Box::new(|s| s.gpus = 9), "gpus: at most 8"),
            (
                Box::new(|s| {
                    s.env.insert("1X".into(), "v".into());
                }),
                "env: '1X'",
            ),
            (
                Box::new(|s| {
                    s.env.insert("GRAD_JOB".into(), "v".into());
                }),
                "env: 'GRAD_JOB'",
            ),
            (
                Box::new(|s| s.secrets = vec!["taxi-s3".into()]),
                "secrets: 'taxi-s3'",
            ),
            (Box::new(|s| s.outputs = "../x".into()), "outputs: '../x'"),
            (Box::new(|s| s.outputs = "/abs".into()), "outputs: '/abs'"),
            (Box::new(|s| s.retries = 11), "retries: at most 10"),
            (
                Box::new(|s| s.timeout_ms = u64::MAX),
                "timeout: at most 7 days",
            ),
            (
                Box::new(|s| {
                    s.labels.insert("k k".into(), "v".into());
                }),
                "label 'k k=v'",
            ),
        ];
        for (edit, want) in cases {
            let got = refused(edit, Plan::Pro);
            assert!(got.contains(want), "want {want:?}, got {got:?}");
        }
    }

    #[test]
    fn gpu_jobs_need_the_pro_plan() {
        let got = refused(|s| s.gpus = 1, Plan::Free);
        assert!(got.starts_with("GPU jobs need the pro plan"), "{got}");
        assert!(refused(|s| s.gpus = 1, Plan::Pro).starts_with("accepted"));
    }
}

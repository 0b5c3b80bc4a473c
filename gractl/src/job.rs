//! `job.yaml`, the description of a batch job in the project directory:
//!
//! ```yaml
//! name: train
//! command: python train.py --epochs 3
//! image: python:3.12-slim        # optional: in a Docker container; else a process
//! gpu: true                      # or gpus: 2 (the pro plan)
//! resources: { cpu: 4, memory: 16Gi }
//! env: { LR: "0.01" }
//! secrets: [WANDB_API_KEY]
//! outputs: outputs/              # collected when the job ends
//! retries: 1
//! timeout: 2h
//! labels: { zone: eu }           # run only on workers with these labels
//! runner: r1                     # run on this runner of yours
//! ```
//!
//! Unknown keys are errors, and every error names the file, the line where
//! known, and the field.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer, de};

use crate::{
    config::{ConfigError, parse_yaml},
    quantity::{Cpu, Size, parse_duration},
};

/// The job file's name in a project directory.
pub const FILE: &str = "job.yaml";

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    pub name: String,
    pub command: String,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub gpu: Option<bool>,
    #[serde(default)]
    pub gpus: Option<u32>,
    #[serde(default)]
    pub resources: Option<Resources>,
    #[serde(default)]
    pub env: BTreeMap<String, Scalar>,
    #[serde(default)]
    pub secrets: Vec<String>,
    #[serde(default)]
    pub outputs: Option<String>,
    #[serde(default)]
    pub retries: Option<u32>,
    #[serde(default)]
    pub timeout: Option<Timeout>,
    #[serde(default)]
    pub labels: BTreeMap<String, Scalar>,
    #[serde(default)]
    pub runner: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default)]
    pub cpu: Option<Cpu>,
    #[serde(default)]
    pub memory: Option<Size>,
}

/// A YAML scalar taken as text, so `LR: 0.01` and `LR: "0.01"` mean the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// `timeout: 2h`, `90s`, or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout(pub Duration);

impl<'de> Deserialize<'de> for Timeout {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Checked inside the visitor, so the error carries the field's position.
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Timeout;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration like 30s, 2m or 1h")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Timeout, E> {
                parse_duration(text)
                    .map(Timeout)
                    .map_err(|e| E::custom(format!("invalid value {text:?}: {e}")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Timeout, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Timeout, E> {
                self.visit_str(&v.to_string())
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// The first line (1-based) where `key:` starts, for errors about a field.
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|line| {
            let line = line.trim_start();
            line.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
        })
        .map(|i| i + 1)
}

fn env_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl JobFile {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<JobFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        JobFile::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<JobFile, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            line: line_of(text, key),
            message,
        };
        let job: JobFile = parse_yaml(text, path)?.ok_or_else(|| {
            invalid(
                "",
                "the file is empty: give at least name and command".into(),
            )
        })?;
        let name_ok = (1..=63).contains(&job.name.len())
            && job.name.starts_with(|c: char| c.is_ascii_lowercase())
            && !job.name.ends_with('-')
            && job
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !name_ok {
            return Err(invalid(
                "name",
                format!(
                    "name: '{}' must be 1-63 lowercase letters, digits and '-', starting with a \
                     letter",
                    job.name
                ),
            ));
        }
        if job.command.trim().is_empty() {
            return Err(invalid(
                "command",
                "command: give the command line to run, e.g. `python train.py`".into(),
            ));
        }
        if job.gpu.is_some() && job.gpus.is_some() {
            return Err(invalid(
                "gpus",
                "gpu and gpus: give one of them (gpu: true is gpus: 1)".into(),
            ));
        }
        if job.gpus.is_some_and(|n| n > 8) {
            return Err(invalid("gpus", "gpus: at most 8".into()));
        }
        for name in job.env.keys() {
            if !env_name(name) || name.starts_with("GRAD_") {
                return Err(invalid(
                    name,
                    format!(
                        "env: '{name}' is not a variable name ([A-Za-z_][A-Za-z0-9_]*, not GRAD_...)"
                    ),
                ));
            }
        }
        for name in &job.secrets {
            if !env_name(name) {
                return Err(invalid(
                    "secrets",
                    format!(
                        "secrets: '{name}' cannot be an environment variable name \
                         ([A-Za-z_][A-Za-z0-9_]*)"
                    ),
                ));
            }
        }
        if let Some(outputs) = &job.outputs
            && (outputs.starts_with('/') || outputs.split('/').any(|p| p == ".."))
        {
            return Err(invalid(
                "outputs",
                format!("outputs: '{outputs}' must be a directory inside the project"),
            ));
        }
        if job.retries.is_some_and(|n| n > 10) {
            return Err(invalid("retries", "retries: at most 10".into()));
        }
        Ok(job)
    }

    pub fn gpus(&self) -> u32 {
        match (self.gpu, self.gpus) {
            (_, Some(n)) => n,
            (Some(true), None) => 1,
            _ => 0,
        }
    }

    /// The spec as SubmitJob carries it.
    pub fn to_proto(&self) -> grad_proto::JobSpec {
        let resources = self.resources.unwrap_or_default();
        grad_proto::JobSpec {
            name: self.name.clone(),
            command: self.command.clone(),
            image: self.image.clone().unwrap_or_default(),
            gpus: self.gpus(),
            cpu_millis: resources.cpu.map_or(0, Cpu::millis),
            memory_bytes: resources.memory.map_or(0, Size::bytes),
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.0.clone()))
                .collect(),
            secrets: self.secrets.clone(),
            outputs: self.outputs.clone().unwrap_or_default(),
            retries: self.retries.unwrap_or(0),
            timeout_ms: self.timeout.map_or(0, |t| t.0.as_millis() as u64),
            labels: self
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.0.clone()))
                .collect(),
            runner: self.runner.clone().unwrap_or_default(),
        }
    }
}

/// `DIR/job.yaml`, or the file given.
pub fn file_in(dir: &Path, file: Option<&Path>) -> PathBuf {
    match file {
        Some(file) => file.to_owned(),
        None => dir.join(FILE),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(text: &str) -> Result<JobFile, String> {
        JobFile::parse(text, Path::new("/p/job.yaml")).map_err(|e| e.to_string())
    }

    #[test]
    fn the_issue_example_parses() {
        let job = parse(
            "name: train\n\
             command: python train.py --epochs 3\n\
             image: python:3.12-slim\n\
             gpu: true\n\
             resources: { cpu: 4, memory: 16Gi }\n\
             env: { LR: \"0.01\", EPOCHS: 3 }\n\
             secrets: [WANDB_API_KEY]\n\
             outputs: outputs/\n\
             retries: 1\n\
             timeout: 2h\n",
        )
        .unwrap();
        let spec = job.to_proto();
        assert_eq!(spec.gpus, 1);
        assert_eq!(spec.cpu_millis, 4000);
        assert_eq!(spec.memory_bytes, 16 << 30);
        assert_eq!(spec.env["LR"], "0.01");
        assert_eq!(spec.env["EPOCHS"], "3");
        assert_eq!(spec.timeout_ms, 2 * 3600 * 1000);
        assert_eq!(spec.retries, 1);
        assert_eq!(spec.image, "python:3.12-slim");
    }

    #[test]
    fn errors_name_the_file_line_and_field() {
        let err = parse("name: train\ncommand: x\nretrys: 2\n").unwrap_err();
        assert!(
            err.starts_with("/p/job.yaml: line 3: unknown field `retrys`"),
            "{err}"
        );
        let err = parse("name: train\ncommand: x\ntimeout: soon\n").unwrap_err();
        assert!(err.contains("line 3") && err.contains("timeout"), "{err}");
        let err = parse("name: Train\ncommand: x\n").unwrap_err();
        assert!(
            err.starts_with("/p/job.yaml: line 1: name: 'Train'"),
            "{err}"
        );
        let err = parse("name: t\ncommand: \"\"\n").unwrap_err();
        assert!(err.contains("line 2: command:"), "{err}");
        let err = parse("name: t\ncommand: x\ngpu: true\ngpus: 2\n").unwrap_err();
        assert!(err.contains("line 4: gpu and gpus"), "{err}");
        let err = parse("name: t\ncommand: x\nenv:\n  1BAD: x\n").unwrap_err();
        assert!(err.contains("line 4: env: '1BAD'"), "{err}");
        let err = parse("name: t\ncommand: x\nresources: { cpu: lots }\n").unwrap_err();
        assert!(err.contains("line 3") && err.contains("cpu"), "{err}");
        let err = parse("# nothing\n").unwrap_err();
        assert!(err.contains("the file is empty"), "{err}");
        let err = parse("name: t\n").unwrap_err();
        assert!(err.contains("missing field `command`"), "{err}");
    }
}

//! Dataset descriptions: `datasets/<name>.yaml` in a workspace.
//!
//! ```yaml
//! name: taxi                      # must match the file name
//! s3:
//!   bucket: nyc-taxi
//!   prefix: 2024/                 # optional
//!   endpoint: http://127.0.0.1:9000   # optional (AWS when absent)
//!   region: us-east-1             # optional
//!   path_style: true              # optional (default: true with an endpoint)
//! credentials:                    # optional (a public bucket when absent); one of:
//!   env: { access_key_id: TAXI_AK, secret_access_key: TAXI_SK }
//!   profile: default
//!   secret: taxi-s3
//! ```
//!
//! The file names where the keys are, never the keys: they are read when a
//! runner is created with the dataset and travel to grad with the request.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, parse_yaml};

/// One `datasets/<name>.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dataset {
    pub name: String,
    pub s3: S3,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Credentials>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3 {
    pub bucket: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_style: Option<bool>,
}

/// Where the keys are: exactly one of the three.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<EnvKeys>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
}

/// The names of the environment variables holding the keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvKeys {
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// The keys themselves, once read; Debug hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

pub const DIR: &str = "datasets";

impl Dataset {
    /// `s3://bucket/prefix`.
    pub fn source(&self) -> String {
        format!("s3://{}/{}", self.s3.bucket, self.s3.prefix)
    }

    pub fn path_style(&self) -> bool {
        self.s3.path_style.unwrap_or(self.s3.endpoint.is_some())
    }

    /// What kind of credentials: `public`, `env`, `profile` or `secret`.
    pub fn credentials_kind(&self) -> &'static str {
        match &self.credentials {
            None => "public",
            Some(c) if c.env.is_some() => "env",
            Some(c) if c.profile.is_some() => "profile",
            Some(_) => "secret",
        }
    }

    /// Parses and checks the text of `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Dataset, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            line: None,
            message,
        };
        let dataset: Dataset =
            parse_yaml(text, path)?.ok_or_else(|| invalid("the file is empty".into()))?;
        dataset.check().map_err(invalid)?;
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if stem != dataset.name {
            return Err(invalid(format!(
                "name: '{}' must match the file name ({stem}.yaml)",
                dataset.name
            )));
        }
        Ok(dataset)
    }

    /// The checks YAML cannot express; the message names the field.
    pub fn check(&self) -> Result<(), String> {
        let name_ok = (1..=63).contains(&self.name.len())
            && self.name.starts_with(|c: char| c.is_ascii_lowercase())
            && !self.name.ends_with('-')
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !name_ok {
            return Err(format!(
                "name: '{}' must be 1-63 lowercase letters, digits and '-', starting with a letter",
                self.name
            ));
        }
        let bucket_ok =
            (3..=63).contains(&self.s3.bucket.len())
                && self.s3.bucket.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-'
                });
        if !bucket_ok {
            return Err(format!(
                "s3.bucket: '{}' must be 3-63 lowercase letters, digits, '.' and '-'",
                self.s3.bucket
            ));
        }
        if self.s3.prefix.starts_with('/') || self.s3.prefix.split('/').any(|s| s == "..") {
            return Err(format!(
                "s3.prefix: '{}' must be a path in the bucket, without a leading '/' or '..'",
                self.s3.prefix
            ));
        }
        if let Some(url) = &self.s3.endpoint
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(format!(
                "s3.endpoint: '{url}' must be a URL like http://127.0.0.1:9000"
            ));
        }
        if let Some(credentials) = &self.credentials {
            let given = [
                credentials.secret.is_some(),
                credentials.env.is_some(),
                credentials.profile.is_some(),
            ]
            .iter()
            .filter(|g| **g)
            .count();
            if given != 1 {
                return Err(
                    "credentials: give exactly one of secret, env or profile (or leave \
                     credentials out for a public bucket)"
                        .into(),
                );
            }
            if let Some(env) = &credentials.env
                && (env.access_key_id.is_empty() || env.secret_access_key.is_empty())
            {
                return Err(
                    "credentials.env: name the variables holding access_key_id and \
                     secret_access_key"
                        .into(),
                );
            }
        }
        Ok(())
    }

    /// Reads the keys the dataset names; `None` for a public bucket or keys
    /// in a grad secret (which grad reads). `path` (the dataset's file) is
    /// named in errors.
    pub fn keys(&self, path: &Path) -> Result<Option<Keys>, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            line: None,
            message,
        };
        let Some(credentials) = &self.credentials else {
            return Ok(None);
        };
        if let Some(env) = &credentials.env {
            let var = |name: &str| {
                std::env::var(name)
                    .ok()
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| {
                        invalid(format!(
                            "credentials.env: the environment variable {name} is not set"
                        ))
                    })
            };
            return Ok(Some(Keys {
                access_key_id: var(&env.access_key_id)?,
                secret_access_key: var(&env.secret_access_key)?,
            }));
        }
        if let Some(profile) = &credentials.profile {
            let file = shared_credentials_file().ok_or_else(|| {
                invalid("credentials.profile: no HOME or AWS_SHARED_CREDENTIALS_FILE".into())
            })?;
            let text = fs::read_to_string(&file).map_err(|e| {
                invalid(format!(
                    "credentials.profile: cannot read {}: {e}",
                    file.display()
                ))
            })?;
            let sections = ini(&text);
            let keys = sections.get(profile.as_str()).and_then(|section| {
                Some(Keys {
                    access_key_id: section.get("aws_access_key_id")?.clone(),
                    secret_access_key: section.get("aws_secret_access_key")?.clone(),
                })
            });
            return keys.map(Some).ok_or_else(|| {
                invalid(format!(
                    "credentials.profile: {} has no profile [{profile}] with \
                     aws_access_key_id and aws_secret_access_key",
                    file.display()
                ))
            });
        }
        // A grad secret: grad reads it (see `secret`).
        Ok(None)
    }

    /// The grad secret holding the keys, if that is where they are.
    pub fn secret(&self) -> Option<&str> {
        self.credentials.as_ref()?.secret.as_deref()
    }

    /// The dataset as `CreateRunner` carries it, keys included.
    pub fn to_proto(&self, path: &Path) -> Result<grad_proto::Dataset, ConfigError> {
        Ok(grad_proto::Dataset {
            name: self.name.clone(),
            bucket: self.s3.bucket.clone(),
            prefix: self.s3.prefix.clone(),
            endpoint: self.s3.endpoint.clone().unwrap_or_default(),
            region: self.s3.region.clone().unwrap_or_default(),
            path_style: self.path_style(),
            credentials: self.keys(path)?.map(|k| grad_proto::S3Credentials {
                access_key_id: k.access_key_id,
                secret_access_key: k.secret_access_key,
            }),
            credentials_secret: self.secret().unwrap_or_default().to_owned(),
        })
    }

    /// The YAML text of the dataset, with a comment on where keys go.
    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        Ok(format!(
            "# A dataset: mounted read-only at data/{name} in runners created with\n\
             # `gractl runner create NAME --dataset {name}`. Keys never go in this file:\n\
             # credentials name a grad secret, environment variables or an AWS profile.\n{}",
            serde_yaml::to_string(self)?,
            name = self.name
        ))
    }
}

/// `AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`.
fn shared_credentials_file() -> Option<PathBuf> {
    if let Some(file) = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE").filter(|f| !f.is_empty()) {
        return Some(PathBuf::from(file));
    }
    std::env::var_os("HOME").map(|home| Path::new(&home).join(".aws/credentials"))
}

/// The sections of an INI file: `[name]` then `key = value` lines; `#` and
/// `;` start comments.
fn ini(text: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut sections: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut current = None;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim().trim_start_matches("profile ").trim().to_owned();
            sections.entry(name.clone()).or_default();
            current = Some(name);
        } else if let (Some(section), Some((key, value))) = (&current, line.split_once('=')) {
            sections
                .entry(section.clone())
                .or_default()
                .insert(key.trim().to_owned(), value.trim().to_owned());
        }
    }
    sections
}

/// The file of dataset `name` in the workspace at `root`.
pub fn path(root: &Path, name: &str) -> PathBuf {
    root.join(DIR).join(format!("{name}.yaml"))
}

/// Reads `path`.
pub fn load(path: &Path) -> Result<Dataset, ConfigError> {
    let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    Dataset::parse(&text, path)
}

/// Every dataset of the workspace at `root`, by name.
pub fn load_all(root: &Path) -> Result<Vec<(PathBuf, Dataset)>, ConfigError> {
    let dir = root.join(DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ConfigError::Read { path: dir, source }),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|source| ConfigError::Read {
                path: dir.clone(),
                source,
            })?
            .path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let dataset = load(&path)?;
            found.push((path, dataset));
        }
    }
    found.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Dataset, String> {
        Dataset::parse(text, Path::new("/ws/datasets/taxi.yaml")).map_err(|e| e.to_string())
    }

    const GOOD: &str = "\
name: taxi
s3:
  bucket: nyc-taxi
  prefix: 2024/
  endpoint: http://127.0.0.1:9000
credentials:
  env: { access_key_id: TAXI_AK, secret_access_key: TAXI_SK }
";

    #[test]
    fn a_good_file_parses_and_round_trips() {
        let dataset = parse(GOOD).unwrap();
        assert_eq!(dataset.source(), "s3://nyc-taxi/2024/");
        assert!(dataset.path_style(), "an endpoint defaults to path style");
        assert_eq!(dataset.credentials_kind(), "env");
        let again = parse(&dataset.to_yaml().unwrap()).unwrap();
        assert_eq!(again, dataset);
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_field() {
        let err = parse("name: taxi\ns3:\n  bucket: nyc-taxi\n  secret_key: x\n").unwrap_err();
        assert!(
            err.starts_with("/ws/datasets/taxi.yaml: line 4: s3: unknown field `secret_key`"),
            "{err}"
        );
        let err = parse("name: taxi\ns3:\n  bucket: NYC\n").unwrap_err();
        assert!(
            err.starts_with("/ws/datasets/taxi.yaml: s3.bucket: 'NYC' must be"),
            "{err}"
        );
        let err = parse("name: other\ns3:\n  bucket: nyc-taxi\n").unwrap_err();
        assert!(
            err.contains("name: 'other' must match the file name (taxi.yaml)"),
            "{err}"
        );
        let err =
            parse("name: taxi\ns3:\n  bucket: nyc-taxi\ncredentials:\n  profile: a\n  secret: b\n")
                .unwrap_err();
        assert!(err.contains("credentials: give exactly one of"), "{err}");
        let err = parse("name: taxi\ns3:\n  bucket: b\n  endpoint: ftp://x\n").unwrap_err();
        assert!(err.contains("s3.bucket"), "{err}");
        let err = parse("name: taxi\ns3:\n  bucket: bbb\n  endpoint: ftp://x\n").unwrap_err();
        assert!(err.contains("s3.endpoint: 'ftp://x'"), "{err}");
    }

    #[test]
    fn profiles_are_read_from_the_shared_credentials_file() {
        let sections = ini(
            "# comment\n[default]\naws_access_key_id = AK1\naws_secret_access_key = SK1\n\
             [profile team]\naws_access_key_id=AK2\naws_secret_access_key=SK2\n",
        );
        assert_eq!(sections["default"]["aws_access_key_id"], "AK1");
        assert_eq!(sections["team"]["aws_secret_access_key"], "SK2");
        let keys = Keys {
            access_key_id: "AK".into(),
            secret_access_key: "hidden".into(),
        };
        assert!(!format!("{keys:?}").contains("hidden"));
    }

    #[test]
    fn a_missing_variable_is_a_clear_error_and_a_grad_secret_travels_by_name() {
        let dataset = parse(
            "name: taxi\ns3:\n  bucket: nyc-taxi\ncredentials:\n  env: { access_key_id: \
             GRACTL_TEST_SURELY_UNSET_AK, secret_access_key: GRACTL_TEST_SURELY_UNSET_SK }\n",
        )
        .unwrap();
        let err = dataset
            .keys(Path::new("/ws/datasets/taxi.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "credentials.env: the environment variable GRACTL_TEST_SURELY_UNSET_AK is not set"
            ),
            "{err}"
        );
        let dataset =
            parse("name: taxi\ns3:\n  bucket: nyc-taxi\ncredentials:\n  secret: taxi-s3\n")
                .unwrap();
        let proto = dataset
            .to_proto(Path::new("/ws/datasets/taxi.yaml"))
            .unwrap();
        assert_eq!(proto.credentials, None);
        assert_eq!(proto.credentials_secret, "taxi-s3");
    }
}

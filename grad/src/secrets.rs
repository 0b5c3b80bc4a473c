//! Users' secrets: named values (API keys, S3 keys) that only their owner's
//! runners and jobs receive. grad keeps them sealed under its secrets key,
//! each bound to its owner and name, and never answers a value to a client:
//! they leave grad only towards the owner's runners (a dataset's keys, for
//! now).

use crate::{
    auth::UserCaller,
    error::{Error, Result},
    sealed::Sealer,
    store::{Secret, Store},
};

/// The largest value kept.
pub const MAX_VALUE: usize = 64 << 10;
const MAX_NAME: usize = 128;

/// Checks a secret name: what an environment variable or a file name can be.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid secret name '{}': use 1-{MAX_NAME} letters, digits, '_', '-' or '.', \
             starting with a letter or '_'",
            name.escape_debug()
        )))
    }
}

/// The sealed value is bound to this: moved to another row, it does not open.
fn context(owner_id: &str, name: &str) -> String {
    format!("secret:{owner_id}/{name}")
}

#[derive(Clone)]
pub struct Secrets {
    store: Store,
    sealer: Sealer,
}

impl Secrets {
    pub fn new(store: Store, sealer: Sealer) -> Secrets {
        Secrets { store, sealer }
    }

    pub async fn set(&self, caller: &UserCaller, name: &str, value: &str) -> Result<Secret> {
        validate_name(name)?;
        if value.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "secret {name}: the value is empty"
            )));
        }
        if value.len() > MAX_VALUE {
            return Err(Error::InvalidArgument(format!(
                "secret {name}: the value is {} bytes; at most {MAX_VALUE}",
                value.len()
            )));
        }
        let sealed = self
            .sealer
            .seal(value.as_bytes(), &context(&caller.id, name))?;
        let secret = self.store.set_secret(&caller.id, name, &sealed).await?;
        tracing::info!(user = %caller.name, secret = %name, "secret set");
        Ok(secret)
    }

    pub async fn list(&self, caller: &UserCaller) -> Result<Vec<Secret>> {
        self.store.secrets(&caller.id).await
    }

    pub async fn delete(&self, caller: &UserCaller, name: &str) -> Result<Secret> {
        validate_name(name)?;
        let secret = self
            .store
            .secret(&caller.id, name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("secret '{name}' not found")))?;
        self.store.delete_secret(&caller.id, name).await?;
        tracing::info!(user = %caller.name, secret = %name, "secret deleted");
        Ok(secret)
    }

    /// The value of `owner_id`'s secret `name`, for that owner's runners.
    pub async fn value(&self, owner_id: &str, name: &str) -> Result<Option<String>> {
        let Some(secret) = self.store.secret(owner_id, name).await? else {
            return Ok(None);
        };
        let plain = self.sealer.open(&secret.sealed, &context(owner_id, name))?;
        String::from_utf8(plain)
            .map(Some)
            .map_err(|_| Error::FailedPrecondition(format!("secret {name} is not UTF-8")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_like_variable_or_file_names() {
        for good in ["WANDB_API_KEY", "taxi-s3", "_x", "a.b"] {
            validate_name(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in ["", "1abc", "-a", "a b", "a/b", "é", &"a".repeat(129)] {
            let err = validate_name(bad).unwrap_err().to_string();
            assert!(err.contains("invalid secret name"), "{bad}: {err}");
        }
    }
}

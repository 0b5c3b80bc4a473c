//! Authentication: HS256 JWTs signed with a key kept in the data dir. Users
//! and runner agents get different kinds of token; one interceptor verifies
//! the token on every call and puts the [`Caller`] into the request extensions.

use std::{fs, io::Write, os::unix::fs::OpenOptionsExt, path::Path, sync::Arc, time::Duration};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tonic::{Request, Status};

use crate::{
    error::{Error, Result},
    store::{Plan, Role, User},
};

/// Who is calling, as proven by their token.
#[derive(Debug, Clone)]
pub enum Caller {
    User(UserCaller),
    Runner { runner_id: String, token_id: String },
    Worker { worker_id: String, token_id: String },
}

#[derive(Debug, Clone)]
pub struct UserCaller {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub plan: Plan,
}

impl UserCaller {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// User id, or runner id for runner tokens.
    sub: String,
    /// "user" or "runner".
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    plan: Option<String>,
    jti: String,
    iat: u64,
    exp: u64,
}

/// The signing key and the rules tokens are checked against.
#[derive(Clone)]
pub struct Keys {
    encoding: Arc<EncodingKey>,
    decoding: Arc<DecodingKey>,
    validation: Arc<Validation>,
}

const RUNNER_TOKEN_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl Keys {
    pub fn from_secret(secret: &[u8]) -> Keys {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Keys {
            encoding: Arc::new(EncodingKey::from_secret(secret)),
            decoding: Arc::new(DecodingKey::from_secret(secret)),
            validation: Arc::new(validation),
        }
    }

    /// Loads the key at `path`, creating a random one (mode 0600) if absent.
    pub fn load_or_create(path: &Path) -> Result<Keys> {
        Ok(Keys::from_secret(&load_or_create_secret(
            path,
            "the JWT signing key",
        )?))
    }

    fn sign(&self, claims: &Claims) -> Result<String> {
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &self.encoding,
        )?)
    }

    pub fn issue_user(&self, user: &User, ttl: Duration) -> Result<String> {
        let now = unix_now();
        self.sign(&Claims {
            sub: user.id.clone(),
            kind: "user".into(),
            name: Some(user.name.clone()),
            role: Some(user.role.as_str().into()),
            plan: Some(user.plan.as_str().into()),
            jti: uuid::Uuid::new_v4().to_string(),
            iat: now,
            exp: now + ttl.as_secs(),
        })
    }

    /// A token that lets one runner's agent attach; revoked by changing the
    /// runner's stored token id.
    pub fn issue_runner(&self, runner_id: &str, token_id: &str) -> Result<String> {
        let now = unix_now();
        self.sign(&Claims {
            sub: runner_id.to_string(),
            kind: "runner".into(),
            name: None,
            role: None,
            plan: None,
            jti: token_id.to_string(),
            iat: now,
            exp: now + RUNNER_TOKEN_TTL.as_secs(),
        })
    }

    /// A token for a standing worker (`grad-runner agent`); revoked by
    /// deleting the worker.
    pub fn issue_worker(&self, worker_id: &str, token_id: &str) -> Result<String> {
        let now = unix_now();
        self.sign(&Claims {
            sub: worker_id.to_string(),
            kind: "worker".into(),
            name: None,
            role: None,
            plan: None,
            jti: token_id.to_string(),
            iat: now,
            exp: now + RUNNER_TOKEN_TTL.as_secs(),
        })
    }

    pub fn verify(&self, token: &str) -> Result<Caller, Status> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => Status::unauthenticated(
                    "token expired; ask an admin for a new one (`grad user token NAME`)",
                ),
                ErrorKind::InvalidSignature => {
                    Status::unauthenticated("invalid token: bad signature")
                }
                _ => Status::unauthenticated(format!("invalid token: {e}")),
            })?;
        let c = data.claims;
        match c.kind.as_str() {
            "user" => {
                let role = c.role.as_deref().unwrap_or("user").parse();
                let plan = c.plan.as_deref().unwrap_or("free").parse();
                match (role, plan) {
                    (Ok(role), Ok(plan)) => Ok(Caller::User(UserCaller {
                        id: c.sub,
                        name: c.name.unwrap_or_default(),
                        role,
                        plan,
                    })),
                    _ => Err(Status::unauthenticated("invalid token: bad role or plan")),
                }
            }
            "runner" => Ok(Caller::Runner {
                runner_id: c.sub,
                token_id: c.jti,
            }),
            "worker" => Ok(Caller::Worker {
                worker_id: c.sub,
                token_id: c.jti,
            }),
            other => Err(Status::unauthenticated(format!(
                "invalid token: unknown kind '{other}'"
            ))),
        }
    }

    /// The tonic interceptor: every call must carry `authorization: Bearer <jwt>`.
    pub fn interceptor(
        &self,
    ) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + use<> {
        let keys = self.clone();
        move |mut req: Request<()>| {
            let header = req.metadata().get("authorization").ok_or_else(|| {
                Status::unauthenticated(
                    "missing token; log in with `gractl login --server URL --token-file FILE`",
                )
            })?;
            let token = header
                .to_str()
                .ok()
                .and_then(|h| h.strip_prefix("Bearer "))
                .ok_or_else(|| {
                    Status::unauthenticated(
                        "malformed authorization header: expected 'Bearer <token>'",
                    )
                })?;
            let caller = keys.verify(token.trim())?;
            req.extensions_mut().insert(caller);
            Ok(req)
        }
    }
}

/// Writes `bytes` to a new file readable only by its owner.
/// A secret of at least 32 bytes kept in `path` (0600), made at first use;
/// `what` names it in errors.
pub fn load_or_create_secret(path: &Path, what: &str) -> Result<Vec<u8>> {
    match fs::read(path) {
        Ok(secret) if secret.len() >= 32 => return Ok(secret),
        Ok(_) => {
            return Err(Error::FailedPrecondition(format!(
                "{}: {what} must be at least 32 bytes",
                path.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("reading {}", path.display()))(e)),
    }
    let mut secret = vec![0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    write_private(path, &secret)?;
    Ok(secret)
}

pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(Error::io(format!("creating {}", path.display())))?;
    file.write_all(bytes)
        .map_err(Error::io(format!("writing {}", path.display())))
}

/// The user calling a user-facing method; runner tokens are refused.
pub fn user<T>(req: &Request<T>) -> Result<&UserCaller, Status> {
    match req.extensions().get::<Caller>() {
        Some(Caller::User(user)) => Ok(user),
        Some(Caller::Runner { .. } | Caller::Worker { .. }) => Err(Status::permission_denied(
            "runner and worker tokens cannot call user methods",
        )),
        None => Err(Status::unauthenticated("missing token")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> User {
        User {
            id: "u1".into(),
            name: "alice".into(),
            role: Role::User,
            plan: Plan::Free,
        }
    }

    #[test]
    fn a_token_verifies_with_its_own_key_only() {
        let keys = Keys::from_secret(&[7; 32]);
        let token = keys.issue_user(&alice(), Duration::from_secs(60)).unwrap();
        match keys.verify(&token).unwrap() {
            Caller::User(u) => assert_eq!((u.id.as_str(), u.name.as_str()), ("u1", "alice")),
            other => panic!("{other:?}"),
        }
        let other = Keys::from_secret(&[8; 32]);
        let err = other.verify(&token).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("signature"), "{}", err.message());
    }

    #[test]
    fn an_expired_token_is_refused_with_a_clear_message() {
        let keys = Keys::from_secret(&[7; 32]);
        let token = keys.issue_user(&alice(), Duration::ZERO).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        let err = keys.verify(&token).unwrap_err();
        assert!(err.message().contains("expired"), "{}", err.message());
    }

    #[test]
    fn runner_tokens_name_their_runner() {
        let keys = Keys::from_secret(&[7; 32]);
        let token = keys.issue_runner("r-id", "tok-1").unwrap();
        match keys.verify(&token).unwrap() {
            Caller::Runner {
                runner_id,
                token_id,
            } => {
                assert_eq!((runner_id.as_str(), token_id.as_str()), ("r-id", "tok-1"))
            }
            other => panic!("{other:?}"),
        }
    }
}

//! Workers as their owners manage them (create with a token, list, delete),
//! and who a worker-side call comes from: a standing worker's token, or a
//! runner's (a runner runs its owner's jobs).

use std::collections::BTreeMap;

use grad_proto as pb;

use super::{
    Runs,
    spec::{validate_labels, validate_name},
};
use crate::{
    auth::{Caller, Keys, UserCaller},
    error::{Error, Result},
    store::{self, Store, now_ms},
};

#[derive(Clone)]
pub struct Workers {
    store: Store,
    keys: Keys,
}

impl Workers {
    pub fn new(store: Store, keys: Keys) -> Workers {
        Workers { store, keys }
    }

    /// A new worker of the caller's and its token.
    pub async fn create(
        &self,
        caller: &UserCaller,
        name: &str,
        labels: BTreeMap<String, String>,
        shared: bool,
    ) -> Result<(store::Worker, String)> {
        validate_name("worker name", name)?;
        validate_labels(&labels)?;
        if shared && !caller.is_admin() {
            return Err(Error::PermissionDenied(
                "only admins can make shared workers (ones that run every user's jobs)".into(),
            ));
        }
        let worker = store::Worker {
            id: uuid::Uuid::new_v4().to_string(),
            owner_id: caller.id.clone(),
            owner_name: caller.name.clone(),
            name: name.to_owned(),
            shared,
            labels,
            token_id: uuid::Uuid::new_v4().to_string(),
            created_at: now_ms(),
            last_seen_at: 0,
        };
        self.store.insert_worker(&worker).await?;
        let token = self.keys.issue_worker(&worker.id, &worker.token_id)?;
        tracing::info!(worker = %name, owner = %caller.name, shared, "worker created");
        Ok((worker, token))
    }

    pub async fn list(&self, caller: &UserCaller) -> Result<Vec<store::Worker>> {
        let owner = (!caller.is_admin()).then_some(caller.id.as_str());
        self.store.list_workers(owner).await
    }

    pub async fn delete(&self, caller: &UserCaller, name: &str) -> Result<store::Worker> {
        let worker = self
            .store
            .worker_by_name(&caller.id, name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("worker '{name}' not found")))?;
        self.store.delete_worker(&worker.id).await?;
        tracing::info!(worker = %name, owner = %caller.name, "worker deleted");
        Ok(worker)
    }

    /// Who is asking for work: a worker whose token is still its current
    /// one, or a runner (as a worker of its owner's, named after it).
    pub async fn runs(
        &self,
        caller: &Caller,
        capabilities: pb::WorkerCapabilities,
    ) -> Result<Runs> {
        let runner = matches!(caller, Caller::Runner { .. });
        let worker = match caller {
            Caller::Worker {
                worker_id,
                token_id,
            } => {
                let worker = self
                    .store
                    .worker(worker_id)
                    .await?
                    .filter(|w| &w.token_id == token_id)
                    .ok_or_else(|| {
                        Error::Unauthenticated(
                            "this worker was deleted or its token replaced".into(),
                        )
                    })?;
                let now = now_ms();
                // One write every few seconds per worker is plenty for "last seen".
                if now - worker.last_seen_at > 5_000 {
                    self.store.worker_seen(&worker.id, now).await?;
                }
                worker
            }
            Caller::Runner {
                runner_id,
                token_id,
            } => {
                let runner = self
                    .store
                    .runner_by_id(runner_id)
                    .await?
                    .filter(|r| &r.token_id == token_id)
                    .ok_or_else(|| {
                        Error::Unauthenticated("this runner token has been replaced".into())
                    })?;
                store::Worker {
                    id: runner.id,
                    owner_id: runner.owner_id,
                    owner_name: runner.owner_name,
                    name: format!("runner/{}", runner.name),
                    shared: false,
                    labels: BTreeMap::new(),
                    token_id: runner.token_id,
                    created_at: runner.created_at,
                    last_seen_at: now_ms(),
                }
            }
            Caller::User(_) => {
                return Err(Error::PermissionDenied(
                    "only worker and runner tokens can run jobs; make a worker with \
                     `gractl worker create NAME`"
                        .into(),
                ));
            }
        };
        Ok(Runs {
            worker,
            capabilities,
            runner,
        })
    }
}

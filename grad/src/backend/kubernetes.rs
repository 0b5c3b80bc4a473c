//! The `kubernetes` backend: a Pod per runner in one namespace, its
//! workspace on a PersistentVolumeClaim (so pause, which deletes the Pod,
//! keeps the files, and resume starts a new Pod on the same claim), its
//! agent token in a Secret. Everything is written with server-side apply
//! under one field manager, `grad`, and labelled
//! `app.kubernetes.io/managed-by=grad` plus the runner's id.
//!
//! A watcher on those Pods (kube-runtime) keeps what grad knows true to the
//! cluster: it is level-triggered — every (re)list re-states every Pod —
//! so a grad restart or a dropped watch heals itself. What it sees becomes
//! [`Event`]s: a Pod that cannot start (image pull errors, a bad config),
//! one that ended (OOMKilled, evicted, the runner exiting) or vanished
//! makes the runner fail with that reason; a Pod waiting to be scheduled
//! puts the scheduler's words on the runner. Pods, claims and Secrets no
//! runner in the store owns are found by [`Backend::leftovers`].

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::{
        AppArmorProfile, Capabilities, Container, ContainerStatus, EmptyDirVolumeSource, EnvVar,
        HostPathVolumeSource, PersistentVolumeClaim, PersistentVolumeClaimSpec,
        PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, ResourceRequirements,
        Secret, SecretVolumeSource, SecurityContext, Toleration, Volume, VolumeMount,
        VolumeResourceRequirements,
    },
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::ObjectMeta},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{Backend, BoxFuture, Error, Event, Spec};
use crate::{lock, store};

/// The one field manager grad applies with.
pub const FIELD_MANAGER: &str = "grad";
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const RUNNER_ID: &str = "grad.dev/runner-id";
pub const RUNNER_NAME: &str = "grad.dev/runner";
pub const OWNER_ID: &str = "grad.dev/owner-id";
pub const OWNER_NAME: &str = "grad.dev/owner";
/// The annotation naming the runner token a Pod was made with.
pub const TOKEN_ID: &str = "grad.dev/token-id";
/// Runner objects: grad's, and not a job's (`backend::job_pods`).
const SELECTOR: &str = "app.kubernetes.io/managed-by=grad,!grad.dev/job-id";

/// Where things are inside a runner's Pod.
const WORKSPACE: &str = "/workspace";
const STATE_DIR: &str = "/var/lib/grad-runner";
pub(crate) const TOKEN_DIR: &str = "/var/run/grad";
/// The runner image's user (`runner-image/Dockerfile`).
const RUNNER_UID: i64 = 1000;
/// How long a runner has to stop before the kubelet kills it.
const STOP_GRACE_SECONDS: i64 = 10;
/// How long grad waits for a deleted Pod to be gone.
const GONE_TIMEOUT: Duration = Duration::from_secs(STOP_GRACE_SECONDS as u64 + 50);

/// Waiting reasons that do not get better by waiting: the runner fails
/// with the kubelet's message. (`ErrImagePull` is retried by the kubelet
/// and becomes `ImagePullBackOff` when it keeps failing.)
const HOPELESS: &[&str] = &[
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
];

#[derive(Debug, Clone)]
pub struct Settings {
    /// The namespace runners live in.
    pub namespace: String,
    /// The runner image (grad-runner, Python with pandas and DuckDB, s3fs).
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never`; None: Kubernetes' default.
    pub image_pull_policy: Option<String>,
    /// The PVCs' storage class; None: the cluster's default.
    pub storage_class: Option<String>,
    /// The URL runners dial (the Service in front of grad's replicas).
    pub server_url: String,
    /// Each runner container's ephemeral-storage request and limit.
    pub ephemeral_storage: Option<String>,
}

/// What the watcher last saw of a runner's Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Created, not running yet; maybe with the scheduler's or kubelet's words.
    Waiting(String),
    Running,
    /// It cannot start, and waiting will not help (an image that cannot be
    /// pulled, a bad config): why.
    Stuck(String),
    /// It ended: why.
    Ended(String),
    /// Being deleted.
    Terminating,
}

#[derive(Debug, Clone)]
struct Observed {
    uid: String,
    /// The runner token the Pod was made with: news about a Pod made for
    /// an earlier start is no news (the store knows the current token).
    token_id: String,
    seen: Seen,
}

pub struct Kubernetes {
    client: Client,
    settings: Settings,
    events: mpsc::Sender<Event>,
    /// Runner id -> its Pod as last seen (after the first full list).
    pods: Mutex<HashMap<String, Observed>>,
    synced: watch::Sender<bool>,
}

pub(crate) fn kube_error(context: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let context = context.into();
    move |source| Error::Kube {
        context,
        message: describe(&source),
    }
}

/// The API server's own words where it gave some.
fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) if !status.message.is_empty() => {
            format!("{} ({})", status.message, status.code)
        }
        other => other.to_string(),
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 404)
}

pub fn pod_name(runner_id: &str) -> String {
    format!("runner-{runner_id}")
}

pub fn claim_name(runner_id: &str) -> String {
    format!("runner-{runner_id}-workspace")
}

pub fn secret_name(runner_id: &str) -> String {
    format!("runner-{runner_id}-token")
}

pub(crate) fn quantity(v: impl std::fmt::Display) -> Quantity {
    Quantity(v.to_string())
}

/// Labels and annotations every object of a runner's carries.
fn metadata(name: String, runner: &store::Runner, namespace: &str) -> ObjectMeta {
    let labels = BTreeMap::from([
        (MANAGED_BY.to_owned(), "grad".to_owned()),
        (
            "app.kubernetes.io/name".to_owned(),
            "grad-runner".to_owned(),
        ),
        (RUNNER_ID.to_owned(), runner.id.clone()),
        (RUNNER_NAME.to_owned(), runner.name.clone()),
        (OWNER_ID.to_owned(), runner.owner_id.clone()),
    ]);
    // User names may end in '.' or '_', which label values may not.
    let annotations = BTreeMap::from([(OWNER_NAME.to_owned(), runner.owner_name.clone())]);
    ObjectMeta {
        name: Some(name),
        namespace: Some(namespace.to_owned()),
        labels: Some(labels),
        annotations: Some(annotations),
        ..Default::default()
    }
}

/// The Secret holding the runner's agent token (mounted as a file, never
/// in the Pod's env or args).
pub fn secret(spec: &Spec, settings: &Settings) -> Secret {
    let r = &spec.runner;
    Secret {
        metadata: metadata(secret_name(&r.id), r, &settings.namespace),
        string_data: Some(BTreeMap::from([("token".to_owned(), spec.token.clone())])),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// The runner's workspace claim: `resources.storage_bytes`, read-write by
/// one node.
pub fn claim(runner: &store::Runner, settings: &Settings) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: metadata(claim_name(&runner.id), runner, &settings.namespace),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: settings.storage_class.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    quantity(runner.resources.storage_bytes),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The runner's Pod. Least privilege: no service account token, non-root,
/// no capabilities — except that a runner with datasets gets what s3fs
/// needs to mount: the `/dev/fuse` device and `CAP_SYS_ADMIN` (mount(2)
/// itself; s3fs mounts through the setuid `fusermount3`, so privilege
/// escalation stays allowed), with AppArmor unconfined because the
/// runtime's default profile denies mount.
pub fn pod(spec: &Spec, settings: &Settings) -> Pod {
    let r = &spec.runner;
    let fuse = !r.datasets.is_empty();
    let mut limits = BTreeMap::from([
        (
            "cpu".to_owned(),
            quantity(format!("{}m", r.resources.cpu_millis)),
        ),
        ("memory".to_owned(), quantity(r.resources.memory_bytes)),
    ]);
    if let Some(size) = &settings.ephemeral_storage {
        limits.insert("ephemeral-storage".into(), quantity(size));
    }
    if r.resources.gpus > 0 {
        // The NVIDIA device plugin's resource; it sets the visible devices.
        limits.insert("nvidia.com/gpu".into(), quantity(r.resources.gpus));
    }
    let mount = |name: &str, path: &str, sub_path: Option<&str>, read_only: bool| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        sub_path: sub_path.map(Into::into),
        read_only: read_only.then_some(true),
        ..Default::default()
    };
    let mut mounts = vec![
        mount("workspace", WORKSPACE, Some("workspace"), false),
        // Beside the workspace, not in it: the SSH host key and dataset
        // keys are not the user's to edit.
        mount("workspace", STATE_DIR, Some("state"), false),
        mount("token", TOKEN_DIR, None, true),
        mount("tmp", "/tmp", None, false),
    ];
    let mut volumes = vec![
        Volume {
            name: "workspace".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim_name(&r.id),
                read_only: None,
            }),
            ..Default::default()
        },
        Volume {
            name: "token".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret_name(&r.id)),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
    ];
    let security = if fuse {
        mounts.push(mount("fuse", "/dev/fuse", None, false));
        volumes.push(Volume {
            name: "fuse".into(),
            host_path: Some(HostPathVolumeSource {
                path: "/dev/fuse".into(),
                type_: Some("CharDevice".into()),
            }),
            ..Default::default()
        });
        SecurityContext {
            capabilities: Some(Capabilities {
                add: Some(vec!["SYS_ADMIN".into()]),
                drop: None,
            }),
            app_armor_profile: Some(AppArmorProfile {
                type_: "Unconfined".into(),
                localhost_profile: None,
            }),
            ..Default::default()
        }
    } else {
        SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                add: None,
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }
    };
    let args = [
        "--server",
        &settings.server_url,
        "--runner-id",
        &r.id,
        "--name",
        &r.name,
        "--workspace",
        WORKSPACE,
        "--state-dir",
        STATE_DIR,
    ];
    let container = Container {
        name: "runner".into(),
        image: Some(settings.image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        args: Some(args.iter().map(|a| a.to_string()).collect()),
        env: Some(vec![EnvVar {
            name: "GRAD_RUNNER_TOKEN_FILE".into(),
            value: Some(format!("{TOKEN_DIR}/token")),
            ..Default::default()
        }]),
        // Requests equal to limits: the runner gets what it asked for.
        resources: Some(ResourceRequirements {
            requests: Some(limits.clone()),
            limits: Some(limits),
            ..Default::default()
        }),
        security_context: Some(security),
        volume_mounts: Some(mounts),
        working_dir: Some(WORKSPACE.into()),
        ..Default::default()
    };
    let tolerations = gpu_tolerations(r.resources.gpus);
    let mut meta = metadata(pod_name(&r.id), r, &settings.namespace);
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.insert(TOKEN_ID.into(), r.token_id.clone());
    }
    Pod {
        metadata: meta,
        spec: Some(PodSpec {
            containers: vec![container],
            // The runner ending is news for grad (like a local process
            // exiting), not something to hide by restarting it.
            restart_policy: Some("Never".into()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(STOP_GRACE_SECONDS),
            security_context: Some(PodSecurityContext {
                run_as_user: Some(RUNNER_UID),
                run_as_group: Some(RUNNER_UID),
                run_as_non_root: Some(true),
                fs_group: Some(RUNNER_UID),
                // Not a recursive chown of a large claim at every start.
                fs_group_change_policy: Some("OnRootMismatch".into()),
                ..Default::default()
            }),
            tolerations,
            volumes: Some(volumes),
            ..Default::default()
        }),
        status: None,
    }
}

/// With GPUs: a toleration for the `nvidia.com/gpu` taint GPU node pools
/// commonly carry.
pub(crate) fn gpu_tolerations(gpus: u32) -> Option<Vec<Toleration>> {
    (gpus > 0).then(|| {
        vec![Toleration {
            key: Some("nvidia.com/gpu".into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        }]
    })
}

/// What a Pod's status says, in a user's words.
pub(crate) fn seen(pod: &Pod) -> Seen {
    if pod.metadata.deletion_timestamp.is_some() {
        return Seen::Terminating;
    }
    let Some(status) = &pod.status else {
        return Seen::Waiting(String::new());
    };
    // An init container (a job's, copying grad-runner in) that cannot
    // start or failed says more than the container waiting behind it.
    for init in status.init_container_statuses.iter().flatten() {
        let state = init.state.as_ref();
        if let Some(waiting) = state.and_then(|s| s.waiting.as_ref())
            && let Some(reason) = waiting.reason.as_deref().filter(|r| HOPELESS.contains(r))
        {
            return Seen::Stuck(format!(
                "its pod cannot start: init container {}: {reason}: {}",
                init.name,
                waiting.message.as_deref().unwrap_or("")
            ));
        }
        if let Some(t) = state.and_then(|s| s.terminated.as_ref())
            && t.exit_code != 0
        {
            return Seen::Ended(format!(
                "its pod's init container {} failed (exit code {})",
                init.name, t.exit_code
            ));
        }
    }
    let containers: &[ContainerStatus] = status.container_statuses.as_deref().unwrap_or_default();
    let terminated = containers
        .iter()
        .find_map(|c| c.state.as_ref()?.terminated.as_ref());
    match status.phase.as_deref() {
        Some("Failed") | Some("Succeeded") => {
            let reason = match (status.reason.as_deref(), terminated) {
                // Evicted, DeadlineExceeded, …: the Pod's own reason.
                (Some(reason), _) => format!(
                    "its pod was stopped by Kubernetes: {reason}{}",
                    status
                        .message
                        .as_deref()
                        .map(|m| format!(" ({m})"))
                        .unwrap_or_default()
                ),
                (None, Some(t)) if t.reason.as_deref() == Some("OOMKilled") => format!(
                    "its container ran out of memory (OOMKilled at its {} limit)",
                    status_memory(pod)
                ),
                (None, Some(t)) => format!(
                    "its container exited (exit code {}{})",
                    t.exit_code,
                    t.reason
                        .as_deref()
                        .map(|r| format!(", {r}"))
                        .unwrap_or_default()
                ),
                (None, None) => "its pod ended".to_owned(),
            };
            return Seen::Ended(reason);
        }
        Some("Running") => {
            if let Some(t) = terminated {
                return Seen::Ended(format!("its container exited (exit code {})", t.exit_code));
            }
            return Seen::Running;
        }
        _ => {}
    }
    // Pending: the kubelet's reason for a container that waits, else the
    // scheduler's.
    if let Some(waiting) = containers
        .iter()
        .find_map(|c| c.state.as_ref()?.waiting.as_ref())
    {
        let reason = waiting.reason.clone().unwrap_or_default();
        let words = match &waiting.message {
            Some(message) => format!("{reason}: {message}"),
            None => reason.clone(),
        };
        if HOPELESS.contains(&reason.as_str()) {
            return Seen::Stuck(format!("its pod cannot start: {words}"));
        }
        return Seen::Waiting(words);
    }
    let unscheduled = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False");
    match unscheduled {
        Some(c) => Seen::Waiting(format!(
            "waiting to be scheduled: {}",
            c.message
                .as_deref()
                .or(c.reason.as_deref())
                .unwrap_or("no reason given")
        )),
        None => Seen::Waiting(String::new()),
    }
}

fn status_memory(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| {
            c.resources
                .as_ref()?
                .limits
                .as_ref()?
                .get("memory")
                .cloned()
        })
        .map(|q| q.0)
        .unwrap_or_else(|| "memory".into())
}

fn token_id_of(pod: &Pod) -> String {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(TOKEN_ID).cloned())
        .unwrap_or_default()
}

fn runner_id_of<K: Resource>(object: &K) -> Option<String> {
    object.meta().labels.as_ref()?.get(RUNNER_ID).cloned()
}

impl Kubernetes {
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn new(client: Client, settings: Settings, events: mpsc::Sender<Event>) -> Kubernetes {
        Kubernetes {
            client,
            settings,
            events,
            pods: Mutex::new(HashMap::new()),
            synced: watch::channel(false).0,
        }
    }

    pub(crate) fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.settings.namespace)
    }

    pub(crate) async fn apply<K>(&self, name: &str, object: &K) -> Result<K, Error>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + Serialize
            + DeserializeOwned
            + std::fmt::Debug,
        <K as Resource>::DynamicType: Default,
    {
        let kind = K::kind(&Default::default()).to_string();
        self.api::<K>()
            .patch(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(object),
            )
            .await
            .map_err(kube_error(format!("applying {kind} {name}")))
    }

    /// Deletes `name` (gone already is fine).
    pub(crate) async fn delete<K>(&self, name: &str, params: &DeleteParams) -> Result<(), Error>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
        <K as Resource>::DynamicType: Default,
    {
        let kind = K::kind(&Default::default()).to_string();
        match self.api::<K>().delete(name, params).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(kube_error(format!("deleting {kind} {name}"))(e)),
        }
    }

    /// Deletes the runner's Pod and waits until it is gone.
    async fn delete_pod(&self, runner_id: &str) -> Result<(), Error> {
        let name = pod_name(runner_id);
        let params = DeleteParams {
            grace_period_seconds: Some(STOP_GRACE_SECONDS as u32),
            ..Default::default()
        };
        self.delete::<Pod>(&name, &params).await?;
        let pods = self.api::<Pod>();
        let mut deadline = Instant::now() + GONE_TIMEOUT;
        let mut forced = false;
        loop {
            match pods.get_opt(&name).await {
                Ok(None) => return Ok(()),
                Ok(Some(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await
                }
                Ok(Some(_)) if !forced => {
                    // Its node may be gone (the kubelet never confirms):
                    // once more, without a grace period.
                    forced = true;
                    let now = DeleteParams {
                        grace_period_seconds: Some(0),
                        ..Default::default()
                    };
                    self.delete::<Pod>(&name, &now).await?;
                    deadline = Instant::now() + Duration::from_secs(30);
                }
                Ok(Some(_)) => {
                    return Err(Error::Kube {
                        context: format!("deleting Pod {name}"),
                        message: format!("still there {}s after a forced delete", 30),
                    });
                }
                Err(e) => return Err(kube_error(format!("reading Pod {name}"))(e)),
            }
        }
    }

    async fn start_pod(&self, spec: &Spec) -> Result<Option<u32>, Error> {
        let id = &spec.runner.id;
        self.apply(&secret_name(id), &secret(spec, &self.settings))
            .await?;
        // Made once: a claim's class and size are not changed under it (a
        // new --storage-class applies to new runners).
        let claim_exists = self
            .api::<PersistentVolumeClaim>()
            .get_opt(&claim_name(id))
            .await
            .map_err(kube_error(format!(
                "reading PersistentVolumeClaim {}",
                claim_name(id)
            )))?
            .is_some();
        if !claim_exists {
            self.apply(&claim_name(id), &claim(&spec.runner, &self.settings))
                .await?;
        }
        // A Pod's spec cannot change: a Pod left from before (failed, or
        // with the last token) makes way for the new one.
        let existing = self.api::<Pod>().get_opt(&pod_name(id)).await;
        if existing
            .map_err(kube_error(format!("reading Pod {}", pod_name(id))))?
            .is_some()
        {
            self.delete_pod(id).await?;
        }
        let made = self
            .apply(&pod_name(id), &pod(spec, &self.settings))
            .await?;
        let uid = made.uid().unwrap_or_default();
        tracing::info!(runner = %spec.runner.name, pod = %pod_name(id), %uid, "runner pod applied");
        Ok(None)
    }

    async fn stop_pod(&self, runner: &store::Runner) -> Result<(), Error> {
        self.delete_pod(&runner.id).await
    }

    async fn remove_all(&self, runner_id: &str) -> Result<(), Error> {
        self.delete_pod(runner_id).await?;
        let params = DeleteParams::default();
        self.delete::<PersistentVolumeClaim>(&claim_name(runner_id), &params)
            .await?;
        self.delete::<Secret>(&secret_name(runner_id), &params)
            .await?;
        lock(&self.pods).remove(runner_id);
        Ok(())
    }

    /// Runner ids of every labelled Pod, claim and Secret in the namespace.
    async fn labelled(&self) -> Result<Vec<String>, Error> {
        let params = ListParams::default().labels(SELECTOR);
        let context = |kind: &str| format!("listing {kind}s in {}", self.settings.namespace);
        let mut ids: Vec<String> = Vec::new();
        let pods = self.api::<Pod>().list(&params).await;
        ids.extend(
            pods.map_err(kube_error(context("Pod")))?
                .iter()
                .filter_map(runner_id_of),
        );
        let claims = self.api::<PersistentVolumeClaim>().list(&params).await;
        ids.extend(
            claims
                .map_err(kube_error(context("PersistentVolumeClaim")))?
                .iter()
                .filter_map(runner_id_of),
        );
        let secrets = self.api::<Secret>().list(&params).await;
        ids.extend(
            secrets
                .map_err(kube_error(context("Secret")))?
                .iter()
                .filter_map(runner_id_of),
        );
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// Records what was seen of one Pod and tells the runners about it when
    /// it is the runner's current Pod and something changed.
    async fn saw(&self, pod: &Pod, announce: bool) {
        let Some(runner_id) = runner_id_of(pod) else {
            return;
        };
        let observed = Observed {
            uid: pod.uid().unwrap_or_default(),
            token_id: token_id_of(pod),
            seen: seen(pod),
        };
        let changed = {
            let mut pods = lock(&self.pods);
            let before = pods.insert(runner_id.clone(), observed.clone());
            before.is_none_or(|b| b.seen != observed.seen || b.uid != observed.uid)
        };
        if announce && changed {
            self.tell(&runner_id, &observed).await;
        }
    }

    async fn tell(&self, runner_id: &str, observed: &Observed) {
        let token_id = Some(observed.token_id.clone());
        let event = match &observed.seen {
            Seen::Ended(reason) | Seen::Stuck(reason) => Event::Gone {
                runner_id: runner_id.to_owned(),
                token_id,
                reason: reason.clone(),
            },
            Seen::Waiting(reason) if !reason.is_empty() => Event::Waiting {
                runner_id: runner_id.to_owned(),
                token_id,
                reason: reason.clone(),
            },
            _ => return,
        };
        let _ = self.events.send(event).await;
    }

    /// A runner's Pod is gone (deleted, or not in a fresh list).
    async fn vanished(&self, runner_id: String) {
        let Some(was) = lock(&self.pods).remove(&runner_id) else {
            return;
        };
        let _ = self
            .events
            .send(Event::Gone {
                runner_id,
                token_id: Some(was.token_id),
                reason: "its pod was deleted".into(),
            })
            .await;
    }

    /// Watches the runners' Pods until `shutdown`; re-lists (and so
    /// re-states every Pod) whenever the watch has to start over.
    pub async fn watch(&self, shutdown: CancellationToken) {
        let config = watcher::Config::default().labels(SELECTOR);
        let stream = watcher(self.api::<Pod>(), config).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut listing: HashMap<String, Pod> = HashMap::new();
        loop {
            let event = tokio::select! {
                e = stream.next() => e,
                _ = shutdown.cancelled() => return,
            };
            match event {
                None => return,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, namespace = %self.settings.namespace, "watching runner pods");
                }
                Some(Ok(watcher::Event::Init)) => listing.clear(),
                Some(Ok(watcher::Event::InitApply(pod))) => {
                    if let Some(id) = runner_id_of(&pod) {
                        listing.insert(id, pod);
                    }
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    // Pods that went while the watch was down.
                    let vanished: Vec<String> = lock(&self.pods)
                        .keys()
                        .filter(|id| !listing.contains_key(*id))
                        .cloned()
                        .collect();
                    for id in vanished {
                        self.vanished(id).await;
                    }
                    let announce = *self.synced.borrow();
                    for pod in std::mem::take(&mut listing).into_values() {
                        // The first listing is what grad starts from
                        // (`alive`); later ones may carry news.
                        self.saw(&pod, announce).await;
                    }
                    self.synced.send_replace(true);
                }
                Some(Ok(watcher::Event::Apply(pod))) => self.saw(&pod, true).await,
                Some(Ok(watcher::Event::Delete(pod))) => {
                    if let Some(id) = runner_id_of(&pod) {
                        self.vanished(id).await;
                    }
                }
            }
        }
    }
}

impl Backend for Kubernetes {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn workspace(&self, _owner: &str, _name: &str) -> PathBuf {
        PathBuf::from(WORKSPACE)
    }

    fn start<'a>(&'a self, spec: &'a Spec) -> BoxFuture<'a, Result<Option<u32>, Error>> {
        Box::pin(self.start_pod(spec))
    }

    fn stop<'a>(&'a self, runner: &'a store::Runner) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.stop_pod(runner))
    }

    fn remove<'a>(&'a self, runner: &'a store::Runner) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.remove_all(&runner.id))
    }

    fn alive(&self, runner: &store::Runner) -> bool {
        lock(&self.pods)
            .get(&runner.id)
            .is_some_and(|p| matches!(p.seen, Seen::Waiting(_) | Seen::Running))
    }

    fn why_gone(&self, runner: &store::Runner) -> Option<String> {
        match lock(&self.pods).get(&runner.id).map(|p| p.seen.clone()) {
            Some(Seen::Ended(reason) | Seen::Stuck(reason)) => Some(reason),
            Some(Seen::Terminating) => Some("its pod was being deleted".into()),
            Some(_) => None,
            None => Some("its pod was gone".into()),
        }
    }

    fn ready(&self) -> BoxFuture<'_, ()> {
        let mut synced = self.synced.subscribe();
        Box::pin(async move {
            let _ = synced.wait_for(|s| *s).await;
        })
    }

    fn leftovers(&self) -> BoxFuture<'_, Result<Vec<String>, Error>> {
        Box::pin(self.labelled())
    }

    fn remove_leftover<'a>(&'a self, runner_id: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.remove_all(runner_id))
    }
}

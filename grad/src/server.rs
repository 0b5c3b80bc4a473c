//! `serve`: wires the store, auth, backend and runners together and serves
//! gRPC (with health and reflection) and plain HTTP on one listener.

use std::{
    fs,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use axum::{http::StatusCode, routing::get};
use grad_proto::{
    FILE_DESCRIPTOR_SET, datasets_server::DatasetsServer, exec_server::ExecServer,
    jobs_server::JobsServer, outputs_server::OutputsServer, runner_agent_server::RunnerAgentServer,
    runners_server::RunnersServer, secrets_server::SecretsServer, tunnels_server::TunnelsServer,
    users_server::UsersServer, worker_agent_server::WorkerAgentServer,
    workers_server::WorkersServer,
};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::service::Routes;

use crate::{
    agents::Agents,
    api::Api,
    auth::{self, Keys},
    backend::{self, Backend, Local},
    blobs::{BlobStore, DirStore, S3Store, s3},
    config::{BackendKind, BlobStoreKind, Config},
    error::{Error, Result},
    jobs::{Jobs, Workers},
    outputs::Outputs,
    replicas::Replicas,
    runners::{Runners, Timing},
    sealed::Sealer,
    store::{Plan, Role, Store},
    tunnel::Tunnels,
};

/// Admin tokens written at first start are valid this long.
pub const ADMIN_TOKEN_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// Rich outputs (figures, tables) can exceed tonic's 4 MiB default.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// How long grad waits at start for the first list of runner pods.
const KUBE_LIST_DEADLINE: Duration = Duration::from_secs(60);

/// Opens the data dir: creates it, the database, and the signing key.
pub async fn open(data_dir: &Path, database_url: &str) -> Result<(Store, Keys)> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(Error::io(format!(
            "creating data dir {}",
            data_dir.display()
        )))?;
    let store = Store::connect(database_url).await?;
    let keys = Keys::load_or_create(&data_dir.join("jwt.key"))?;
    Ok((store, keys))
}

/// On first start: creates the admin user and writes its token (mode 0600).
async fn bootstrap_admin(store: &Store, keys: &Keys, data_dir: &Path) -> Result<()> {
    if store.user_by_name("admin").await?.is_some() {
        return Ok(());
    }
    let admin = store.insert_user("admin", Role::Admin, Plan::Pro).await?;
    let token = keys.issue_user(&admin, ADMIN_TOKEN_TTL)?;
    let path = data_dir.join("admin.token");
    auth::write_private(&path, format!("{token}\n").as_bytes())?;
    tracing::info!(path = %path.display(), "created the admin user; its token is in this file");
    Ok(())
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(Error::io(format!("resolving {}", path.display())))
}

fn default_runner_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("grad-runner")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("grad-runner"))
}

/// The configured blob store, and the HTTP routes it serves on grad's port
/// (the embedded store's signed URLs; none for S3).
async fn open_blobs(
    config: &crate::config::Blobs,
    data_dir: &Path,
    server_url: &str,
) -> Result<(Arc<dyn BlobStore>, axum::Router)> {
    match config.blob_store {
        BlobStoreKind::Dir => {
            let store = Arc::new(DirStore::open(
                &data_dir.join("blobs"),
                &data_dir.join("blob.key"),
                server_url,
            )?);
            Ok((store.clone(), store.router()))
        }
        BlobStoreKind::S3 => {
            let store = S3Store::new(&s3::Settings {
                bucket: config.s3_bucket.clone().unwrap_or_default(),
                prefix: config.s3_prefix.clone(),
                endpoint: config.s3_endpoint.clone(),
                region: config.s3_region.clone(),
                path_style: config.s3_path_style,
                credentials: None,
                anonymous: false,
            })
            .await?;
            Ok((Arc::new(store), axum::Router::new()))
        }
    }
}

/// Serves on an already-bound listener until `shutdown` is cancelled, then
/// drains: health NOT_SERVING, agent streams closed, tasks joined with a
/// deadline. Runner processes are left running; they reconnect to the next grad.
pub async fn serve(
    listener: TcpListener,
    config: &Config,
    shutdown: CancellationToken,
) -> Result<()> {
    // A key given but missing stops grad before it touches anything.
    let sealer = match &config.secrets_key_file {
        Some(path) => Some(Sealer::load(path)?),
        None => None,
    };
    let (store, keys) = open(&config.store.data_dir, &config.store.database_url()).await?;
    // Runners work in their own directories: hand them absolute paths.
    let data_dir = absolute(&config.store.data_dir)?;
    let python = config.python.as_ref().map(|p| {
        if p.contains('/') {
            absolute(Path::new(p)).map_or_else(|_| p.clone(), |a| a.display().to_string())
        } else {
            p.clone()
        }
    });
    bootstrap_admin(&store, &keys, &data_dir).await?;

    let addr = listener
        .local_addr()
        .map_err(Error::io("reading the listener's address"))?;
    let server_url = config.advertise_url.clone().unwrap_or_else(|| {
        let ip = if addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            addr.ip().to_string()
        };
        format!("http://{ip}:{}", addr.port())
    });

    let replicas = Replicas::new(store.clone(), &server_url);
    replicas.register().await?;
    let (blobs, blob_routes) = open_blobs(&config.blobs, &data_dir, &server_url).await?;
    tracing::info!(store = blobs.kind(), "blob store ready");

    let tracker = TaskTracker::new();
    let (events_tx, events_rx) = mpsc::channel(64);
    let (backend, kube): (Arc<dyn Backend>, Option<Arc<backend::Kubernetes>>) = match config
        .kubernetes
        .backend
    {
        BackendKind::Local => {
            let local = Local::new(
                backend::local::Settings {
                    data_dir: data_dir.clone(),
                    runner_bin: match &config.runner_bin {
                        Some(bin) => absolute(bin)?,
                        None => default_runner_bin(),
                    },
                    server_url: server_url.clone(),
                    python,
                },
                events_tx,
                tracker.clone(),
                shutdown.clone(),
            );
            (Arc::new(local), None)
        }
        BackendKind::Kubernetes => {
            let k = &config.kubernetes;
            let client = kube::Client::try_default().await.map_err(|e| {
                Error::Unavailable(format!(
                    "--backend kubernetes: no Kubernetes API to talk to ({e}); \
                         run grad in a pod or set KUBECONFIG"
                ))
            })?;
            let settings = backend::kubernetes::Settings {
                namespace: k.namespace.clone(),
                image: k.runner_image.clone(),
                image_pull_policy: k.image_pull_policy.clone(),
                storage_class: (!k.storage_class.is_empty()).then(|| k.storage_class.clone()),
                server_url: k.service_url.clone().unwrap_or_else(|| server_url.clone()),
                ephemeral_storage: (!k.runner_ephemeral_storage.is_empty())
                    .then(|| k.runner_ephemeral_storage.clone()),
            };
            tracing::info!(namespace = %settings.namespace, image = %settings.image, "runners are Kubernetes pods");
            let kube = Arc::new(backend::Kubernetes::new(client, settings, events_tx));
            (kube.clone(), Some(kube))
        }
    };
    let start_timeout = config.start_timeout.unwrap_or(match kube {
        Some(_) => Duration::from_secs(300),
        None => Duration::from_secs(30),
    });
    let agents = Arc::new(Agents::default());
    let sealer = match sealer {
        Some(sealer) => sealer,
        None => Sealer::load_or_create(&data_dir.join("secrets.key"))?,
    };
    let runners = Runners::new(
        store.clone(),
        backend,
        keys.clone(),
        agents.clone(),
        sealer,
        Timing {
            heartbeat_interval: config.heartbeat_interval,
            heartbeat_timeout: config.heartbeat_timeout,
            start_timeout,
            idle_pause: (!config.idle_pause.is_zero()).then_some(config.idle_pause),
        },
        replicas.clone(),
        tracker.clone(),
        shutdown.clone(),
    );
    tracker.spawn(replicas.clone().run(shutdown.clone()));
    tracker.spawn(
        replicas
            .bus()
            .clone()
            .share(store.clone(), shutdown.clone()),
    );
    tracker.spawn(runners.clone().run_key_pushes());
    if let Some(kube) = &kube {
        let (watcher, stop) = (kube.clone(), shutdown.clone());
        tracker.spawn(async move { watcher.watch(stop).await });
        // What exists in the cluster must be known before the store is
        // reconciled with it.
        tokio::time::timeout(KUBE_LIST_DEADLINE, kube.ready())
            .await
            .map_err(|_| {
                Error::Unavailable(format!(
                    "the Kubernetes API did not list the runner pods within {}s \
                     (see the warnings above)",
                    KUBE_LIST_DEADLINE.as_secs()
                ))
            })?;
    }
    if let Some(kube) = kube.clone().filter(|_| config.kubernetes.job_pods) {
        let pods = backend::job_pods::JobPods::new(
            kube,
            store.clone(),
            keys.clone(),
            replicas.bus().clone(),
            config.kubernetes.job_pod_delay,
        );
        tracker.spawn(pods.run(shutdown.clone()));
    }
    runners.reconcile().await?;
    tracker.spawn(
        runners
            .clone()
            .run_leftover_collection(config.kubernetes.leftover_interval),
    );
    tracker.spawn(runners.clone().run_backend_events(events_rx));
    tracker.spawn(runners.clone().run_monitor());

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<RunnersServer<Api>>().await;
    health.set_serving::<ExecServer<Api>>().await;
    health.set_serving::<UsersServer<Api>>().await;
    health.set_serving::<TunnelsServer<Api>>().await;
    health.set_serving::<OutputsServer<Api>>().await;
    health.set_serving::<DatasetsServer<Api>>().await;
    health.set_serving::<SecretsServer<Api>>().await;
    health.set_serving::<WorkerAgentServer<Api>>().await;
    health.set_serving::<WorkersServer<Api>>().await;
    health.set_serving::<JobsServer<Api>>().await;
    health.set_serving::<RunnerAgentServer<Api>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::FailedPrecondition(format!("gRPC reflection: {e}")))?;

    let outputs = Outputs::new(
        store.clone(),
        blobs.clone(),
        runners.clone(),
        config.blobs.s3_multipart_threshold,
    );
    let jobs = Jobs::new(
        store.clone(),
        blobs.clone(),
        runners.secrets().clone(),
        crate::jobs::Timing {
            lease: config.job_lease,
        },
        replicas.bus().clone(),
        shutdown.clone(),
    );
    tracker.spawn(jobs.clone().run_monitor());
    let api = Api {
        runners: runners.clone(),
        tunnels: Arc::new(Tunnels::default()),
        blobs,
        outputs,
        jobs,
        workers: Workers::new(store.clone(), keys.clone()),
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
    };
    let auth = keys.interceptor();
    let routes = Routes::new(health_service)
        .add_service(RunnersServer::with_interceptor(api.clone(), auth.clone()))
        .add_service(ExecServer::with_interceptor(api.clone(), auth.clone()))
        .add_service(UsersServer::with_interceptor(api.clone(), auth.clone()))
        .add_service(TunnelsServer::with_interceptor(api.clone(), auth.clone()))
        .add_service(OutputsServer::with_interceptor(api.clone(), auth.clone()))
        .add_service(DatasetsServer::with_interceptor(api.clone(), auth.clone()))
        .add_service(SecretsServer::with_interceptor(api.clone(), auth.clone()))
        .add_service(JobsServer::with_interceptor(api.clone(), auth.clone()))
        .add_service(WorkersServer::with_interceptor(api.clone(), auth.clone()))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            WorkerAgentServer::new(api.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            RunnerAgentServer::new(api.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            reflection, auth,
        ));
    let healthz_shutdown = shutdown.clone();
    let router = routes.into_axum_router().merge(blob_routes).route(
        "/healthz",
        get(move || {
            let stopping = healthz_shutdown.is_cancelled();
            async move {
                if stopping {
                    (StatusCode::SERVICE_UNAVAILABLE, "stopping\n")
                } else {
                    (StatusCode::OK, "ok\n")
                }
            }
        }),
    );

    tracing::info!(%addr, data_dir = %data_dir.display(), "grad serving gRPC and HTTP");
    let signal = {
        let shutdown = shutdown.clone();
        let agents = agents.clone();
        let health = health.clone();
        async move {
            shutdown.cancelled().await;
            tracing::info!("shutting down");
            health.set_not_serving::<RunnersServer<Api>>().await;
            health.set_not_serving::<ExecServer<Api>>().await;
            health.set_not_serving::<UsersServer<Api>>().await;
            health.set_not_serving::<TunnelsServer<Api>>().await;
            health.set_not_serving::<OutputsServer<Api>>().await;
            health.set_not_serving::<DatasetsServer<Api>>().await;
            health.set_not_serving::<SecretsServer<Api>>().await;
            health.set_not_serving::<WorkerAgentServer<Api>>().await;
            health.set_not_serving::<WorkersServer<Api>>().await;
            health.set_not_serving::<JobsServer<Api>>().await;
            health.set_not_serving::<RunnerAgentServer<Api>>().await;
            agents.close_all();
        }
    };
    // Small request/response messages: latency matters more than batching,
    // so no Nagle. Tunnels carry bulk SSH traffic: large HTTP/2 windows.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tonic::transport::Server::builder()
        .accept_http1(true)
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(8 << 20)
        .max_frame_size(256 << 10)
        .add_routes(Routes::from(router))
        .serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(server);
    let drained = tokio::select! {
        r = &mut server => r.map(|_| true),
        _ = async {
            shutdown.cancelled().await;
            tokio::time::sleep(DRAIN_DEADLINE).await;
        } => Ok(false),
    };
    match drained {
        Ok(true) => {}
        Ok(false) => tracing::warn!("connections did not drain within the deadline"),
        Err(e) => return Err(Error::Serve(e)),
    }
    tracker.close();
    if tokio::time::timeout(DRAIN_DEADLINE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("background tasks did not finish within the deadline");
    }
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

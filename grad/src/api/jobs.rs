//! The `Jobs`, `Workers` and `WorkerAgent` services.

use std::time::Duration;

use grad_proto::{
    self as pb, jobs_server::Jobs as JobsRpc, worker_agent_server::WorkerAgent,
    workers_server::Workers as WorkersRpc,
};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use super::{Api, RpcResult, timestamp};
use crate::{
    auth::{self, Caller},
    jobs::{Outcome, Runs, Spec, UploadedLog},
    outputs::Collecting,
    store::{self, JobState},
};

fn state_to_pb(state: JobState) -> pb::JobState {
    match state {
        JobState::Queued => pb::JobState::Queued,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

fn job_to_pb(job: store::Job) -> Result<pb::Job, Status> {
    let spec = Spec::from_json(&job.spec)?;
    Ok(pb::Job {
        id: job.id,
        owner: job.owner_name,
        spec: Some(spec.to_pb()),
        state: state_to_pb(job.state) as i32,
        reason: job.reason,
        exit_code: job.exit_code,
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        worker: job.worker_name,
        bundle_sha256: job.bundle_sha256,
        bundle_size: job.bundle_size,
        create_time: Some(timestamp(job.created_at)),
        start_time: job.started_at.map(timestamp),
        finish_time: job.finished_at.map(timestamp),
    })
}

fn worker_to_pb(worker: store::Worker) -> pb::Worker {
    pb::Worker {
        name: worker.name,
        owner: worker.owner_name,
        shared: worker.shared,
        labels: worker.labels.into_iter().collect(),
        create_time: Some(timestamp(worker.created_at)),
        last_seen_time: (worker.last_seen_at > 0).then(|| timestamp(worker.last_seen_at)),
    }
}

type LogStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::LogChunk, Status>> + Send + 'static>,
>;

#[tonic::async_trait]
impl JobsRpc for Api {
    type StreamLogsStream = LogStream;

    async fn create_upload(
        &self,
        req: Request<pb::CreateUploadRequest>,
    ) -> RpcResult<pb::CreateUploadResponse> {
        let caller = auth::user(&req)?;
        let msg = req.get_ref();
        let upload = self
            .jobs
            .create_upload(caller, &msg.sha256, msg.size)
            .await?;
        Ok(Response::new(pb::CreateUploadResponse {
            upload: upload.as_ref().map(Into::into),
        }))
    }

    async fn submit_job(&self, req: Request<pb::SubmitJobRequest>) -> RpcResult<pb::Job> {
        let caller = auth::user(&req)?.clone();
        let msg = req.into_inner();
        let job = self
            .jobs
            .submit(&caller, msg.spec.unwrap_or_default(), &msg.bundle_sha256)
            .await?;
        Ok(Response::new(job_to_pb(job)?))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> RpcResult<pb::Job> {
        let caller = auth::user(&req)?;
        let job = self.jobs.get(caller, &req.get_ref().id).await?;
        Ok(Response::new(job_to_pb(job)?))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> RpcResult<pb::ListJobsResponse> {
        let caller = auth::user(&req)?;
        let msg = req.get_ref();
        let jobs = self.jobs.list(caller, msg.all_users, msg.limit).await?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.into_iter().map(job_to_pb).collect::<Result<_, _>>()?,
        }))
    }

    async fn cancel_job(&self, req: Request<pb::CancelJobRequest>) -> RpcResult<pb::Job> {
        let caller = auth::user(&req)?;
        let job = self.jobs.cancel(caller, &req.get_ref().id).await?;
        Ok(Response::new(job_to_pb(job)?))
    }

    async fn wait_job(&self, req: Request<pb::WaitJobRequest>) -> RpcResult<pb::Job> {
        let caller = auth::user(&req)?;
        let msg = req.get_ref();
        let timeout = match msg.timeout_ms {
            0 => Duration::from_secs(60),
            ms => Duration::from_millis(ms.into()),
        };
        let job = self.jobs.wait(caller, &msg.id, timeout).await?;
        Ok(Response::new(job_to_pb(job)?))
    }

    async fn get_job_outputs(
        &self,
        req: Request<pb::GetJobOutputsRequest>,
    ) -> RpcResult<pb::OutputSet> {
        let caller = auth::user(&req)?;
        let msg = req.get_ref();
        let job = self.jobs.get(caller, &msg.id).await?;
        let found = self.outputs.of_job(&job).await?;
        let urls = match msg.download_urls {
            true => Some(self.outputs.download_urls(&found).await?),
            false => None,
        };
        Ok(Response::new(super::outputs::set_to_pb(
            &found.set,
            &found.files,
            urls.as_ref(),
        )))
    }

    async fn stream_logs(&self, req: Request<pb::StreamLogsRequest>) -> RpcResult<LogStream> {
        let caller = auth::user(&req)?;
        let msg = req.get_ref();
        let job = self.jobs.get(caller, &msg.id).await?;
        let (tx, rx) = mpsc::channel(16);
        self.tracker.spawn(
            self.jobs
                .clone()
                .stream_logs(job, msg.after_seq, msg.follow, tx),
        );
        let stream = ReceiverStream::new(rx).map(|chunk| chunk.map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }
}

#[tonic::async_trait]
impl WorkersRpc for Api {
    async fn create_worker(
        &self,
        req: Request<pb::CreateWorkerRequest>,
    ) -> RpcResult<pb::CreateWorkerResponse> {
        let caller = auth::user(&req)?.clone();
        let msg = req.into_inner();
        let (worker, token) = self
            .workers
            .create(
                &caller,
                &msg.name,
                msg.labels.into_iter().collect(),
                msg.shared,
            )
            .await?;
        Ok(Response::new(pb::CreateWorkerResponse {
            worker: Some(worker_to_pb(worker)),
            token,
        }))
    }

    async fn list_workers(
        &self,
        req: Request<pb::ListWorkersRequest>,
    ) -> RpcResult<pb::ListWorkersResponse> {
        let caller = auth::user(&req)?;
        let workers = self.workers.list(caller).await?;
        Ok(Response::new(pb::ListWorkersResponse {
            workers: workers.into_iter().map(worker_to_pb).collect(),
        }))
    }

    async fn delete_worker(&self, req: Request<pb::DeleteWorkerRequest>) -> RpcResult<pb::Worker> {
        let caller = auth::user(&req)?;
        let worker = self.workers.delete(caller, &req.get_ref().name).await?;
        Ok(Response::new(worker_to_pb(worker)))
    }
}

impl Api {
    /// The output set of the worker's running attempt `id`/`attempt`.
    async fn job_set<T>(
        &self,
        req: &Request<T>,
        id: &str,
        attempt: u32,
    ) -> Result<Collecting, Status> {
        let runs = self.runs(req, Default::default()).await?;
        let job = self.jobs.attempt_of(&runs, id, attempt).await?;
        Ok(Collecting::job(&job))
    }

    /// The worker (or runner) making a worker-side call.
    async fn runs<T>(
        &self,
        req: &Request<T>,
        capabilities: pb::WorkerCapabilities,
    ) -> Result<Runs, Status> {
        let caller = req
            .extensions()
            .get::<Caller>()
            .ok_or_else(|| Status::unauthenticated("missing token"))?;
        Ok(self.workers.runs(caller, capabilities).await?)
    }
}

#[tonic::async_trait]
impl WorkerAgent for Api {
    async fn claim_job(
        &self,
        req: Request<pb::ClaimJobRequest>,
    ) -> RpcResult<pb::ClaimJobResponse> {
        let msg = req.get_ref();
        let runs = self
            .runs(&req, msg.capabilities.clone().unwrap_or_default())
            .await?;
        let wait = Duration::from_millis(msg.wait_ms.into());
        let only = (!msg.job_id.is_empty()).then_some(msg.job_id.as_str());
        let claimed = self.jobs.claim(&runs, only, wait).await?;
        Ok(Response::new(pb::ClaimJobResponse {
            job: claimed.map(|c| pb::ClaimedJob {
                id: c.job.id,
                attempt: c.job.attempt,
                spec: Some(c.spec.to_pb()),
                bundle: Some((&c.bundle).into()),
                bundle_sha256: c.job.bundle_sha256,
                bundle_size: c.job.bundle_size,
                secrets: c.secrets,
                renew_interval_ms: c.renew_every.as_millis() as u32,
                owner: c.job.owner_name,
            }),
        }))
    }

    async fn renew_lease(
        &self,
        req: Request<pb::RenewLeaseRequest>,
    ) -> RpcResult<pb::RenewLeaseResponse> {
        let runs = self.runs(&req, Default::default()).await?;
        let msg = req.get_ref();
        let cancelled_by = self.jobs.renew(&runs, &msg.id, msg.attempt).await?;
        Ok(Response::new(pb::RenewLeaseResponse {
            cancel: cancelled_by.is_some(),
            reason: cancelled_by
                .map(|by| format!("cancelled by {by}"))
                .unwrap_or_default(),
        }))
    }

    async fn append_logs(
        &self,
        req: Request<pb::AppendLogsRequest>,
    ) -> RpcResult<pb::AppendLogsResponse> {
        let runs = self.runs(&req, Default::default()).await?;
        let msg = req.into_inner();
        let last_line = self
            .jobs
            .append_logs(&runs, &msg.id, msg.attempt, msg.lines)
            .await?;
        Ok(Response::new(pb::AppendLogsResponse { last_line }))
    }

    async fn create_log_upload(
        &self,
        req: Request<pb::CreateLogUploadRequest>,
    ) -> RpcResult<pb::CreateUploadResponse> {
        let runs = self.runs(&req, Default::default()).await?;
        let msg = req.get_ref();
        let upload = self
            .jobs
            .create_log_upload(&runs, &msg.id, msg.attempt, &msg.sha256)
            .await?;
        Ok(Response::new(pb::CreateUploadResponse {
            upload: upload.as_ref().map(Into::into),
        }))
    }

    async fn plan_job_outputs(&self, req: Request<pb::JobOutputs>) -> RpcResult<pb::OutputUploads> {
        let set = self
            .job_set(&req, &req.get_ref().id, req.get_ref().attempt)
            .await?;
        let manifest = req.into_inner().manifest.unwrap_or_default();
        let uploads = self.outputs.plan(&set, manifest).await?;
        Ok(Response::new(pb::OutputUploads {
            uploads: uploads
                .into_iter()
                .map(super::outputs::upload_to_pb)
                .collect(),
        }))
    }

    async fn begin_job_part_upload(
        &self,
        req: Request<pb::JobPartUpload>,
    ) -> RpcResult<pb::PartUpload> {
        let set = self
            .job_set(&req, &req.get_ref().id, req.get_ref().attempt)
            .await?;
        let upload = req.into_inner().upload.unwrap_or_default();
        let multipart = self.outputs.begin_parts(&set, upload).await?;
        Ok(Response::new(pb::PartUpload {
            upload_id: multipart.upload_id,
            parts: multipart.parts.iter().map(Into::into).collect(),
        }))
    }

    async fn commit_job_outputs(
        &self,
        req: Request<pb::JobOutputsCommit>,
    ) -> RpcResult<pb::OutputSet> {
        let set = self
            .job_set(&req, &req.get_ref().id, req.get_ref().attempt)
            .await?;
        let commit = req.into_inner().commit.unwrap_or_default();
        let recorded = self.outputs.commit(&set, commit).await?;
        Ok(Response::new(super::outputs::set_to_pb(
            &recorded,
            &[],
            None,
        )))
    }

    async fn finish_job(&self, req: Request<pb::FinishJobRequest>) -> RpcResult<pb::Job> {
        let runs = self.runs(&req, Default::default()).await?;
        let msg = req.into_inner();
        let outcome = match msg.outcome() {
            pb::JobOutcome::Exited => Outcome::Exited(msg.exit_code),
            pb::JobOutcome::TimedOut => Outcome::TimedOut,
            pb::JobOutcome::Cancelled => Outcome::Cancelled,
            pb::JobOutcome::Error => Outcome::Error(msg.error.clone()),
            pb::JobOutcome::Unspecified => {
                return Err(Status::invalid_argument(
                    "outcome: say how the attempt ended",
                ));
            }
        };
        let log = (!msg.log_sha256.is_empty()).then(|| UploadedLog {
            sha256: msg.log_sha256.clone(),
            size: msg.log_size,
            lines: msg.log_lines,
        });
        let job = self
            .jobs
            .finish(&runs, &msg.id, msg.attempt, outcome, log)
            .await?;
        Ok(Response::new(job_to_pb(job)?))
    }
}

//! The `Outputs` service, and the conversions the runners' side of output
//! collection shares with it.

use std::collections::HashMap;

use grad_proto::{
    self as pb, outputs_client::OutputsClient, outputs_server::Outputs as OutputsRpc,
};
use tonic::{Request, Response};

use super::{Api, RpcResult, timestamp};
use crate::{
    auth,
    blobs::Presigned,
    outputs::{Found, How, Upload},
    replicas::Origin,
    store::OutputSet,
};

pub(super) fn presigned_to_pb(p: &Presigned) -> pb::PresignedRequest {
    p.into()
}

pub(super) fn upload_to_pb(upload: Upload) -> pb::BlobUpload {
    pb::BlobUpload {
        sha256: upload.sha256.to_string(),
        size: upload.size,
        how: Some(match &upload.how {
            How::Put(put) => pb::blob_upload::How::Put(presigned_to_pb(put)),
            How::Parts(bytes) => pb::blob_upload::How::PartBytes(*bytes),
        }),
    }
}

/// A set as the API shows it; `found` adds its files, with download URLs
/// when `urls` has them.
pub(super) fn set_to_pb(
    set: &OutputSet,
    files: &[crate::store::OutputFile],
    urls: Option<&HashMap<String, Presigned>>,
) -> pb::OutputSet {
    pb::OutputSet {
        runner: set.runner_name.clone(),
        runner_id: set.runner_id.clone(),
        owner: set.owner_name.clone(),
        runner_deleted: set.deleted_at.is_some(),
        collect_time: (set.collected_at > 0).then(|| timestamp(set.collected_at)),
        file_count: set.file_count as u32,
        total_bytes: set.total_bytes,
        files: files
            .iter()
            .map(|f| pb::OutputFile {
                path: f.path.clone(),
                size: f.size,
                sha256: f.sha256.clone(),
                modify_time: Some(timestamp(f.modified_at)),
                download: urls.and_then(|u| u.get(&f.sha256)).map(presigned_to_pb),
            })
            .collect(),
        uploaded_files: 0,
        uploaded_bytes: 0,
        skipped: set.skipped.clone(),
    }
}

fn found_to_pb(found: &Found, urls: Option<&HashMap<String, Presigned>>) -> pb::OutputSet {
    set_to_pb(&found.set, &found.files, urls)
}

#[tonic::async_trait]
impl OutputsRpc for Api {
    async fn collect_outputs(
        &self,
        req: Request<pb::CollectOutputsRequest>,
    ) -> RpcResult<pb::OutputSet> {
        let name = &req.get_ref().runner;
        if let Some(answer) = self
            .forward_if_elsewhere(&req, name, |channel, req| async move {
                OutputsClient::new(channel).collect_outputs(req).await
            })
            .await?
        {
            return Ok(answer);
        }
        let caller = auth::user(&req)?;
        let origin = Origin::of(&req);
        let (found, report) = self.outputs.collect(caller, name, &origin).await?;
        let mut set = found_to_pb(&found, None);
        set.uploaded_files = report.uploaded_files;
        set.uploaded_bytes = report.uploaded_bytes;
        Ok(Response::new(set))
    }

    async fn get_outputs(&self, req: Request<pb::GetOutputsRequest>) -> RpcResult<pb::OutputSet> {
        let caller = auth::user(&req)?;
        let msg = req.get_ref();
        let found = self.outputs.find(caller, &msg.runner).await?;
        let urls = match msg.download_urls {
            true => Some(self.outputs.download_urls(&found).await?),
            false => None,
        };
        Ok(Response::new(found_to_pb(&found, urls.as_ref())))
    }

    async fn list_outputs(
        &self,
        req: Request<pb::ListOutputsRequest>,
    ) -> RpcResult<pb::ListOutputsResponse> {
        let caller = auth::user(&req)?;
        let sets = self.outputs.list(caller, req.get_ref().all_users).await?;
        Ok(Response::new(pb::ListOutputsResponse {
            outputs: sets.iter().map(|s| set_to_pb(s, &[], None)).collect(),
        }))
    }

    async fn delete_outputs(
        &self,
        req: Request<pb::DeleteOutputsRequest>,
    ) -> RpcResult<pb::OutputSet> {
        let caller = auth::user(&req)?;
        let set = self.outputs.delete(caller, &req.get_ref().runner).await?;
        Ok(Response::new(set_to_pb(&set, &[], None)))
    }
}

//! `grad-presign`: prints a presigned request made by grad's S3 blob store,
//! for `scripts/bench_datasets.sh` to send with curl: the method, then the
//! URL, then one `Name: value` header per line.
//!
//! Usage: grad-presign put|get ENDPOINT BUCKET KEY [SHA256]
//! (keys from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, path-style, us-east-1)

use std::time::Duration;

use grad::blobs::{BlobStore, Key, S3Store, Sha256, s3};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [method, endpoint, bucket, key, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: grad-presign put|get ENDPOINT BUCKET KEY [SHA256]");
    };
    let store = S3Store::new(&s3::Settings {
        bucket: bucket.clone(),
        endpoint: Some(endpoint.clone()),
        region: Some("us-east-1".into()),
        path_style: true,
        ..Default::default()
    })
    .await?;
    let key = Key::new(key.as_str())?;
    let expires = Duration::from_secs(600);
    let presigned = match (method.as_str(), rest) {
        ("put", [sha256]) => {
            store
                .presign_put(&key, Sha256::parse(sha256)?, expires)
                .await?
        }
        ("get", []) => store.presign_get(&key, expires).await?,
        _ => anyhow::bail!("usage: grad-presign put|get ENDPOINT BUCKET KEY [SHA256]"),
    };
    println!("{}", presigned.method.as_str());
    println!("{}", presigned.url);
    for (name, value) in presigned.headers {
        println!("{name}: {value}");
    }
    Ok(())
}

//! Where a repository's objects live, through the `object_store` crate: a local directory
//! (the default, nothing to set up) or an S3-API object store (AWS S3, Ceph RGW, MinIO,
//! s3s-fs). This layer is a thin, blocking driver over the crate's async API with every call
//! bounded in time; what the objects mean is [`crate::repo`]'s business.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

/// Longest any one store call may take, retries included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist.
    #[error("{0} is not in the repository")]
    NotFound(String),
    /// A create-only write found the object there already.
    #[error("{0} already exists in the repository")]
    Exists(String),
    /// The store did not answer in time.
    #[error("the repository did not answer within {}s ({op} {key})", CALL_TIMEOUT.as_secs())]
    Timeout {
        /// What.
        op: &'static str,
        /// Which object.
        key: String,
    },
    /// Anything else the store reported (unreachable, refused, malformed).
    #[error("{op} {key}: {why}")]
    Failed {
        /// What.
        op: &'static str,
        /// Which object.
        key: String,
        /// The store's innermost cause (its error chains repeat themselves).
        why: String,
    },
    /// The repository location could not be opened.
    #[error("opening the repository {url}: {why}")]
    Open {
        /// The location.
        url: String,
        /// Why.
        why: String,
    },
}

/// The last error of `e`'s chain, as text.
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e;
    while let Some(s) = last.source() {
        last = s;
    }
    last.to_string()
}

/// A repository's object store.
#[derive(Debug)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: Option<ObjPath>,
    url: String,
    rt: tokio::runtime::Runtime,
}

impl Store {
    /// Opens `url`: a directory path (created if missing) or `file:///DIR`, or
    /// `s3://BUCKET[/PREFIX]` configured from the standard AWS environment (`AWS_ENDPOINT`,
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`; an `http://` endpoint is
    /// allowed as given).
    pub fn open(url: &str) -> Result<Store, StoreError> {
        let open_err = |why: String| StoreError::Open { url: url.to_string(), why };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("livemig-repo")
            .enable_all()
            .build()
            .map_err(|e| open_err(format!("starting the I/O runtime: {e}")))?;
        let (inner, prefix): (Arc<dyn ObjectStore>, Option<ObjPath>) = if let Some(rest) = url.strip_prefix("s3://") {
            #[cfg(not(feature = "s3"))]
            {
                let _ = rest;
                return Err(open_err("this livemig was built without S3 support (feature `s3`)".into()));
            }
            #[cfg(feature = "s3")]
            {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(open_err("no bucket in s3://BUCKET[/PREFIX]".into()));
                }
                let endpoint = std::env::var("AWS_ENDPOINT").or_else(|_| std::env::var("AWS_ENDPOINT_URL")).ok();
                let plain_http = endpoint.as_deref().is_some_and(|e| e.starts_with("http://"));
                let mut client = object_store::ClientOptions::new()
                    .with_timeout(Duration::from_secs(30))
                    .with_connect_timeout(Duration::from_secs(5));
                if plain_http {
                    // Over plain HTTP a connection costs little, and a reused one can stall
                    // each small response on the server's Nagle until the client's delayed
                    // ACK (measured with s3s-fs: 78 s -> 52 s to read 512 MiB lazily).
                    client = client.with_pool_max_idle_per_host(0);
                }
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_conditional_put(object_store::aws::S3ConditionalPut::ETagMatch)
                    .with_client_options(client)
                    .with_retry(object_store::RetryConfig {
                        max_retries: 3,
                        retry_timeout: Duration::from_secs(30),
                        backoff: Default::default(),
                    });
                if let Some(e) = &endpoint {
                    b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
                }
                let s = b.build().map_err(|e| open_err(e.to_string()))?;
                let prefix = prefix.trim_matches('/');
                (Arc::new(s), (!prefix.is_empty()).then(|| ObjPath::from(prefix)))
            }
        } else {
            let dir = url.strip_prefix("file://").unwrap_or(url);
            if dir.is_empty() {
                return Err(open_err("an empty path".into()));
            }
            std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
            let s = object_store::local::LocalFileSystem::new_with_prefix(dir)
                .map_err(|e| open_err(e.to_string()))?
                .with_automatic_cleanup(true);
            (Arc::new(s), None)
        };
        Ok(Store { inner, prefix, url: url.to_string(), rt })
    }

    /// The location it was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, key: &str) -> ObjPath {
        match &self.prefix {
            Some(p) => ObjPath::from(format!("{p}/{key}")),
            None => ObjPath::from(key),
        }
    }

    fn run<T>(
        &self,
        op: &'static str,
        key: &str,
        f: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<T, StoreError> {
        match self.rt.block_on(async { tokio::time::timeout(CALL_TIMEOUT, f).await }) {
            Err(_) => Err(StoreError::Timeout { op, key: key.to_string() }),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(object_store::Error::NotFound { .. })) => Err(StoreError::NotFound(key.to_string())),
            Ok(Err(object_store::Error::AlreadyExists { .. })) | Ok(Err(object_store::Error::Precondition { .. })) => {
                Err(StoreError::Exists(key.to_string()))
            }
            Ok(Err(e)) => Err(StoreError::Failed { op, key: key.to_string(), why: innermost(&e) }),
        }
    }

    /// The whole object `key`.
    pub fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let p = self.path(key);
        self.run("reading", key, async {
            let r = self.inner.get(&p).await?;
            Ok(r.bytes().await?.to_vec())
        })
    }

    /// Bytes `range` of the object `key` (exactly that many, or an error).
    pub fn get_range(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>, StoreError> {
        let p = self.path(key);
        let want = range.end - range.start;
        let b = self.run("reading", key, self.inner.get_range(&p, range.clone()))?;
        if b.len() as u64 != want {
            return Err(StoreError::Failed {
                op: "reading",
                key: key.to_string(),
                why: format!("asked for {want} bytes at {}, got {}", range.start, b.len()),
            });
        }
        Ok(b.to_vec())
    }

    /// Writes `data` as `key`; with `create_only`, fails with [`StoreError::Exists`] if the
    /// object is there (atomic on stores with conditional writes: local directories, AWS S3,
    /// MinIO, Ceph RGW).
    pub fn put(&self, key: &str, data: Vec<u8>, create_only: bool) -> Result<(), StoreError> {
        let p = self.path(key);
        let mode = if create_only { PutMode::Create } else { PutMode::Overwrite };
        let opts = PutOptions { mode, ..Default::default() };
        self.run("writing", key, self.inner.put_opts(&p, PutPayload::from(data), opts)).map(|_| ())
    }

    /// Deletes `key` (absent is fine).
    pub fn delete(&self, key: &str) -> Result<(), StoreError> {
        let p = self.path(key);
        match self.run("deleting", key, self.inner.delete(&p)) {
            Err(StoreError::NotFound(_)) => Ok(()),
            r => r,
        }
    }

    /// Keys (relative to the repository) and sizes of the objects under `prefix` (a `dir/`
    /// form), sorted by key.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let p = self.path(prefix.trim_end_matches('/'));
        let strip = self.prefix.as_ref().map(|p| format!("{p}/"));
        self.run("listing", prefix, async {
            let mut out = Vec::new();
            let mut s = self.inner.list(Some(&p));
            while let Some(m) = s.next().await {
                let m = m?;
                let loc = m.location.to_string();
                let key = match &strip {
                    Some(s) => loc.strip_prefix(s.as_str()).unwrap_or(&loc).to_string(),
                    None => loc,
                };
                out.push((key, m.size));
            }
            out.sort();
            Ok(out)
        })
    }

    /// The names one level under `prefix` (a `dir/` form): sub-"directories" and objects.
    pub fn list_dir(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let p = self.path(prefix.trim_end_matches('/'));
        self.run("listing", prefix, async {
            let r = self.inner.list_with_delimiter(Some(&p)).await?;
            let mut out: Vec<String> = r
                .common_prefixes
                .iter()
                .chain(r.objects.iter().map(|o| &o.location))
                .filter_map(|x| x.filename().map(str::to_string))
                .collect();
            out.sort();
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_store_writes_reads_lists_and_refuses_a_second_create() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path().to_str().unwrap()).unwrap();
        s.put("images/a/v1.json", b"one".to_vec(), true).unwrap();
        assert!(matches!(s.put("images/a/v1.json", b"two".to_vec(), true), Err(StoreError::Exists(_))));
        assert_eq!(s.get("images/a/v1.json").unwrap(), b"one");
        s.put("packs/p", b"0123456789".to_vec(), false).unwrap();
        assert_eq!(s.get_range("packs/p", 2..5).unwrap(), b"234");
        assert!(s.get_range("packs/p", 8..12).is_err(), "a short read is an error");
        assert!(matches!(s.get("packs/q"), Err(StoreError::NotFound(_))));
        assert_eq!(s.list("images/").unwrap(), vec![("images/a/v1.json".to_string(), 3)]);
        assert_eq!(s.list_dir("images/").unwrap(), vec!["a".to_string()]);
        assert!(s.list("nothing/").unwrap().is_empty());
        s.delete("packs/p").unwrap();
        s.delete("packs/p").unwrap();
    }
}

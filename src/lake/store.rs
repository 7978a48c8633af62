//! Where the lake lives: `storage.url` turned into an object store and a prefix inside it.
//!
//! `file://` is the local filesystem (a write goes to a staging file that is renamed into place,
//! and Sluice fsyncs the file and its folder before it counts the write as durable); `s3://`,
//! `gs://` and `az://` read their credentials and endpoints from the usual environment variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, `GOOGLE_SERVICE_ACCOUNT`,
//! `AZURE_STORAGE_ACCOUNT_NAME`, ...), with path-style S3 requests unless
//! `AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true`; `memory://` is for tests.

use std::path::PathBuf;
use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use url::Url;

/// The lake's object store, with the prefix every table lives under.
#[derive(Clone, Debug)]
pub struct LakeStore {
    pub store: Arc<dyn ObjectStore>,
    /// The URL the store was built from, without the prefix (`file:///`, `s3://bucket`), for
    /// registering the store with DataFusion.
    pub root_url: Url,
    pub prefix: Path,
    /// For `file://`: the folder that `prefix` maps to, so that writes can be fsynced.
    local_root: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage.url `{url}`: {reason}")]
    Url { url: String, reason: String },
    #[error("storage: {0}")]
    ObjectStore(#[from] object_store::Error),
    #[error("storage: making {path} durable: {source}")]
    Sync {
        path: String,
        source: std::io::Error,
    },
}

impl LakeStore {
    /// Builds the store for `url` (already resolved by the config: `file://` paths are absolute).
    pub fn from_url(url: &str) -> Result<LakeStore, StoreError> {
        let bad = |reason: String| StoreError::Url {
            url: url.to_string(),
            reason,
        };
        let parsed = Url::parse(url).map_err(|e| bad(e.to_string()))?;
        match parsed.scheme() {
            "file" => {
                let dir = parsed
                    .to_file_path()
                    .map_err(|_| bad("not an absolute file path".into()))?;
                std::fs::create_dir_all(&dir)
                    .map_err(|e| bad(format!("cannot create {}: {e}", dir.display())))?;
                // Rooted at `/` with the folder as the prefix, as DataFusion expects of `file://`.
                Ok(LakeStore {
                    store: Arc::new(LocalFileSystem::new()),
                    root_url: Url::parse("file:///").expect("valid"),
                    prefix: Path::from_absolute_path(&dir).map_err(|e| bad(e.to_string()))?,
                    local_root: Some(PathBuf::from("/")),
                })
            }
            "memory" => Ok(LakeStore {
                store: Arc::new(InMemory::new()),
                root_url: Url::parse("memory://lake/").unwrap(),
                prefix: Path::from(parsed.path().trim_matches('/')),
                local_root: None,
            }),
            scheme @ ("s3" | "gs" | "az") => {
                let bucket = parsed
                    .host_str()
                    .ok_or_else(|| bad("no bucket in the URL".into()))?;
                let root = format!("{scheme}://{bucket}");
                let store: Arc<dyn ObjectStore> = match scheme {
                    "s3" => Arc::new(
                        AmazonS3Builder::from_env()
                            .with_url(&root)
                            .build()
                            .map_err(|e| bad(e.to_string()))?,
                    ),
                    "gs" => Arc::new(
                        GoogleCloudStorageBuilder::from_env()
                            .with_url(&root)
                            .build()
                            .map_err(|e| bad(e.to_string()))?,
                    ),
                    _ => Arc::new(
                        MicrosoftAzureBuilder::from_env()
                            .with_url(&root)
                            .build()
                            .map_err(|e| bad(e.to_string()))?,
                    ),
                };
                Ok(LakeStore {
                    store,
                    root_url: Url::parse(&format!("{root}/")).map_err(|e| bad(e.to_string()))?,
                    prefix: Path::from(parsed.path().trim_matches('/')),
                    local_root: None,
                })
            }
            other => Err(bad(format!("unsupported scheme `{other}`"))),
        }
    }

    #[cfg(test)]
    /// An in-memory lake, for tests.
    pub fn in_memory() -> LakeStore {
        Self::from_url("memory:///").expect("memory URLs are valid")
    }

    /// `relative` under the lake's prefix.
    pub fn path(&self, relative: &str) -> Path {
        let mut parts: Vec<String> = self
            .prefix
            .parts()
            .map(|p| p.as_ref().to_string())
            .collect();
        parts.extend(
            relative
                .split('/')
                .filter(|p| !p.is_empty())
                .map(str::to_string),
        );
        Path::from_iter(parts)
    }

    /// The URL of a table's folder, as DataFusion and other engines address it.
    pub fn table_url(&self, table: &str) -> String {
        let prefix = self.prefix.as_ref();
        if prefix.is_empty() {
            format!("{}{table}/", self.root_url)
        } else {
            format!("{}{prefix}/{table}/", self.root_url)
        }
    }

    /// Writes a whole object so that it appears at once, and returns only when it is durable.
    pub async fn put_durable(&self, path: &Path, bytes: bytes::Bytes) -> Result<(), StoreError> {
        if let Some(root) = &self.local_root {
            let file = root.join(path.as_ref());
            return write_in_steps(&file, &bytes).map_err(|source| StoreError::Sync {
                path: file.display().to_string(),
                source,
            });
        }
        self.store.put(path, PutPayload::from(bytes)).await?;
        Ok(())
    }

    /// Makes an object just written durable: a no-op for object stores (a completed write is),
    /// an fsync of the file and its folder for `file://`.
    pub fn make_durable(&self, path: &Path) -> Result<(), StoreError> {
        if let Some(root) = &self.local_root {
            let file = root.join(path.as_ref());
            let sync = |p: &std::path::Path| std::fs::File::open(p).and_then(|f| f.sync_all());
            let synced = sync(&file).and_then(|()| sync(file.parent().unwrap_or(root)));
            synced.map_err(|source| StoreError::Sync {
                path: file.display().to_string(),
                source,
            })?;
        }
        Ok(())
    }
}

/// Bytes of a `file://` lake file written out to the disk at a time. A flush is tens of MB: synced
/// in one go, it filled the disk's queue, and the intake log's syncs, which every `/v1/batch`
/// waits for, waited behind it (the batch p99 crossed 10 ms at each flush). Written out a step at
/// a time, the log's syncs get in between.
const WRITE_STEP: usize = 1 << 20;

/// Writes `bytes` to a staging file beside `file`, a step at a time, each step on the disk before
/// the next (`sync_file_range`, data only), then syncs it whole and renames it into place, and
/// syncs the folder. A crash leaves at most the staging file (`*.partial`, which no table reads
/// and the same write replaces when it is done again).
fn write_in_steps(file: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let folder = file.parent().unwrap_or(std::path::Path::new("/"));
    std::fs::create_dir_all(folder)?;
    let mut staging = file.as_os_str().to_owned();
    staging.push(".partial");
    let staging = std::path::PathBuf::from(staging);
    let mut out = std::fs::File::create(&staging)?;
    let mut written = 0usize;
    for step in bytes.chunks(WRITE_STEP) {
        out.write_all(step)?;
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: a plain syscall on a file descriptor this function owns.
        let done = unsafe {
            libc::sync_file_range(
                out.as_raw_fd(),
                written as libc::off64_t,
                step.len() as libc::off64_t,
                flags,
            )
        };
        if done != 0 {
            return Err(std::io::Error::last_os_error());
        }
        written += step.len();
    }
    out.sync_all()?;
    drop(out);
    std::fs::rename(&staging, file)?;
    std::fs::File::open(folder)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_urls_write_durable_files_under_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/lake", dir.path().display());
        let lake = LakeStore::from_url(&url).unwrap();
        let path = lake.path("events/date=2026-01-01/x.parquet");
        lake.put_durable(&path, bytes::Bytes::from_static(b"data"))
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("lake/events/date=2026-01-01/x.parquet")).unwrap(),
            b"data"
        );
        assert_eq!(
            lake.table_url("events"),
            format!("file://{}/lake/events/", dir.path().display())
        );
    }

    #[tokio::test]
    async fn a_file_of_many_steps_is_written_whole_and_a_redo_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let lake = LakeStore::from_url(&format!("file://{}", dir.path().display())).unwrap();
        let path = lake.path("events/date=2026-01-01/0-9.parquet");
        let big: Vec<u8> = (0..(3 * WRITE_STEP + 12_345)).map(|i| i as u8).collect();
        let on_disk = dir.path().join("events/date=2026-01-01/0-9.parquet");
        // A crash left a staging file behind: the write done again replaces it.
        std::fs::create_dir_all(on_disk.parent().unwrap()).unwrap();
        std::fs::write(on_disk.with_extension("parquet.partial"), b"torn").unwrap();
        lake.put_durable(&path, bytes::Bytes::from(big.clone()))
            .await
            .unwrap();
        assert_eq!(std::fs::read(&on_disk).unwrap(), big);
        let names: Vec<_> = std::fs::read_dir(on_disk.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["0-9.parquet"]);
    }

    #[test]
    fn prefixes_and_schemes() {
        let lake = LakeStore::from_url("memory:///some/prefix").unwrap();
        assert_eq!(lake.path("events/a").as_ref(), "some/prefix/events/a");
        assert_eq!(
            lake.table_url("events"),
            "memory://lake/some/prefix/events/"
        );
        let s3 = LakeStore::from_url("s3://bucket/lake").unwrap();
        assert_eq!(s3.table_url("quarantine"), "s3://bucket/lake/quarantine/");
        assert!(LakeStore::from_url("ftp://x/y").is_err());
        assert!(LakeStore::from_url("s3:///nobucket").is_err());
    }
}

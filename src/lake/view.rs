//! The lake as readers should see it: an object store wrapper whose listings leave out files that
//! compaction has superseded.
//!
//! Compaction writes a merged file named after the union of its inputs' log ranges, then deletes
//! the inputs. Between those two steps, and after a crash between them, a partition holds both;
//! a file whose range lies inside another file's range (in the same folder) is therefore hidden
//! from listings, so a query never counts a row twice. Everything but listing passes straight
//! through.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::stream::{self, BoxStream, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

use super::writer::parse_file_name;

/// Which of `files` (one folder's objects) are superseded by a wider file in the same folder.
pub fn superseded(files: &[ObjectMeta]) -> Vec<bool> {
    let ranges: Vec<Option<(&str, u64, u64)>> = files
        .iter()
        .map(|f| {
            let name = f.location.filename()?;
            let folder = f.location.as_ref().strip_suffix(name)?;
            let (start, end) = parse_file_name(name)?;
            Some((folder, start, end))
        })
        .collect();
    ranges
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let Some((folder, start, end)) = r else {
                return false;
            };
            ranges.iter().enumerate().any(|(j, other)| {
                matches!(other, Some((f, s, e))
                    if j != i && f == folder && s <= start && end <= e && (s, e) != (start, end))
            })
        })
        .collect()
}

fn visible(files: Vec<ObjectMeta>) -> Vec<ObjectMeta> {
    let hidden = superseded(&files);
    files
        .into_iter()
        .zip(hidden)
        .filter_map(|(f, h)| (!h).then_some(f))
        .collect()
}

/// The wrapper; see the module doc.
#[derive(Debug)]
pub struct CompactedView {
    inner: Arc<dyn ObjectStore>,
}

impl CompactedView {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        CompactedView { inner }
    }
}

impl fmt::Display for CompactedView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CompactedView({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for CompactedView {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> Result<Vec<bytes::Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let all = self.inner.list(prefix);
        stream::once(async move { all.try_collect::<Vec<_>>().await })
            .map_ok(|files| stream::iter(visible(files).into_iter().map(Ok)))
            .try_flatten()
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let mut result = self.inner.list_with_delimiter(prefix).await?;
        result.objects = visible(result.objects);
        Ok(result)
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(path: &str) -> ObjectMeta {
        ObjectMeta {
            location: Path::from(path),
            last_modified: chrono::Utc::now(),
            size: 1,
            e_tag: None,
            version: None,
        }
    }

    fn name(start: u64, end: u64) -> String {
        format!("{start:020}-{end:020}.parquet")
    }

    #[test]
    fn a_file_inside_a_wider_one_in_its_folder_is_superseded() {
        let files = vec![
            meta(&format!("events/date=2026-01-01/{}", name(0, 10))),
            meta(&format!("events/date=2026-01-01/{}", name(10, 20))),
            meta(&format!("events/date=2026-01-01/{}", name(0, 20))),
            meta(&format!("events/date=2026-01-02/{}", name(10, 20))),
            meta(&format!("events/date=2026-01-01/{}", name(20, 30))),
            meta("events/date=2026-01-01/not-ours.parquet"),
        ];
        assert_eq!(
            superseded(&files),
            vec![true, true, false, false, false, false]
        );
    }
}

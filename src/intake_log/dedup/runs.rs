//! Ids on disk: *runs*, files of sorted 128-bit keys, each covering the ids accepted in a span of
//! time. Written whole (a temporary file, fsynced, renamed), never changed; merged into bigger
//! ones; deleted once every id in them is older than the window.
//!
//! ```text
//! <log dir>/dedup/<lo:016x>-<hi:016x>.run
//!   "SLDDRUN1"  first µs (i64)  last µs (i64)  count (u64)  lo (u64)  hi (u64)
//!   count × key (u128, little-endian, ascending)
//!   CRC-32 of all the above
//! ```
//!
//! `lo..=hi` are the numbers of the runs it holds: a merged run holds several. After a crash
//! between writing a merged run and deleting what it replaced, the replaced ones are found inside
//! it by their numbers and deleted then.
//!
//! A run keeps in memory only every [`SPARSE`]th key: finding a key reads one block of the file.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"SLDDRUN1";
const HEADER: usize = 8 + 8 * 5;
/// Keys between two kept in memory: one block of 4 KB is read to find a key.
const SPARSE: usize = 256;

/// One run file, open.
#[derive(Debug)]
pub struct Run {
    pub path: PathBuf,
    /// Receive times (µs) of its oldest and newest id.
    pub first: i64,
    pub last: i64,
    pub count: u64,
    /// The run numbers it holds.
    pub lo: u64,
    pub hi: u64,
    /// Every [`SPARSE`]th key, from the first.
    index: Vec<u128>,
    file: File,
}

pub fn dir(log_dir: &Path) -> PathBuf {
    log_dir.join("dedup")
}

fn name(lo: u64, hi: u64) -> String {
    format!("{lo:016x}-{hi:016x}.run")
}

/// Writes the `count` `keys` (ascending) as the run numbered `lo..=hi`, durably.
pub fn write(
    dir: &Path,
    (lo, hi): (u64, u64),
    (first, last): (i64, i64),
    count: u64,
    keys: impl Iterator<Item = io::Result<u128>>,
) -> io::Result<Run> {
    fs::create_dir_all(dir)?;
    let path = dir.join(name(lo, hi));
    let tmp = path.with_extension("tmp");
    let mut out = CrcWriter {
        inner: BufWriter::with_capacity(1 << 20, File::create(&tmp)?),
        crc: crc32fast::Hasher::new(),
    };
    out.write_all(MAGIC)?;
    for n in [first as u64, last as u64, count, lo, hi] {
        out.write_all(&n.to_le_bytes())?;
    }
    let mut index = Vec::with_capacity(count as usize / SPARSE + 1);
    let mut written = 0;
    let mut previous = 0;
    for key in keys {
        let key = key?;
        if key < previous {
            return Err(io::Error::other("dedup run keys out of order"));
        }
        previous = key;
        if written % SPARSE == 0 {
            index.push(key);
        }
        written += 1;
        out.write_all(&key.to_le_bytes())?;
    }
    if written as u64 != count {
        return Err(io::Error::other("dedup run: fewer keys than announced"));
    }
    let crc = out.crc.clone().finalize();
    let mut file = out.inner.into_inner().map_err(|e| e.into_error())?;
    file.write_all(&crc.to_le_bytes())?;
    file.sync_all()?;
    fs::rename(&tmp, &path)?;
    crate::intake_log::segment::sync_dir(dir)?;
    Ok(Run {
        file: File::open(&path)?,
        path,
        first,
        last,
        count,
        lo,
        hi,
        index,
    })
}

/// Opens every run in `dir`, oldest first, reading each whole to check it; deletes the runs that
/// a merged run holds, and leftover temporary files. A run that does not check is an error.
pub fn open_all(dir: &Path) -> io::Result<Vec<Run>> {
    let mut runs = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(runs),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("run") => runs.push(open(&path)?),
            Some("tmp") => fs::remove_file(&path)?,
            _ => {}
        }
    }
    // Widest first among those that start together, so that what a merged run holds follows it.
    runs.sort_by_key(|r| (r.lo, std::cmp::Reverse(r.hi)));
    let mut kept: Vec<Run> = Vec::with_capacity(runs.len());
    for run in runs {
        match kept.last() {
            Some(holder) if run.hi <= holder.hi => {
                tracing::info!(run = %run.path.display(), "deleting a run that a merged run holds");
                fs::remove_file(&run.path)?;
            }
            _ => kept.push(run),
        }
    }
    Ok(kept)
}

fn open(path: &Path) -> io::Result<Run> {
    let corrupt = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("dedup run {} is corrupt", path.display()),
        )
    };
    let file = File::open(path)?;
    let size = file.metadata()?.len() as usize;
    if size < HEADER + 4 {
        return Err(corrupt());
    }
    let mut reader = BufReader::with_capacity(1 << 20, &file);
    let mut crc = crc32fast::Hasher::new();
    let mut header = [0u8; HEADER];
    reader.read_exact(&mut header)?;
    crc.update(&header);
    if &header[..8] != MAGIC {
        return Err(corrupt());
    }
    let field = |i: usize| u64::from_le_bytes(header[8 + 8 * i..16 + 8 * i].try_into().unwrap());
    let (first, last, count, lo, hi) = (
        field(0) as i64,
        field(1) as i64,
        field(2),
        field(3),
        field(4),
    );
    if (size - HEADER - 4) as u64 != count.checked_mul(16).ok_or_else(corrupt)? {
        return Err(corrupt());
    }
    let mut index = Vec::with_capacity(count as usize / SPARSE + 1);
    let mut key = [0u8; 16];
    for i in 0..count as usize {
        reader.read_exact(&mut key)?;
        crc.update(&key);
        if i % SPARSE == 0 {
            index.push(u128::from_le_bytes(key));
        }
    }
    let mut stored = [0u8; 4];
    reader.read_exact(&mut stored)?;
    if crc.finalize().to_le_bytes() != stored {
        return Err(corrupt());
    }
    drop(reader);
    Ok(Run {
        path: path.to_path_buf(),
        first,
        last,
        count,
        lo,
        hi,
        index,
        file,
    })
}

impl Run {
    /// Whether the run holds `key`: one read of the block it would be in.
    pub fn contains(&self, key: u128) -> io::Result<bool> {
        let block = match self.index.partition_point(|k| *k <= key) {
            0 => return Ok(false),
            after => after - 1,
        };
        let keys = self.block(block)?;
        Ok(keys.binary_search(&key).is_ok())
    }

    /// The keys of block `b` (the [`SPARSE`] keys from the `b`-th kept in memory).
    fn block(&self, b: usize) -> io::Result<Vec<u128>> {
        let start = b * SPARSE;
        let n = SPARSE.min(self.count as usize - start);
        let mut bytes = vec![0u8; n * 16];
        self.file
            .read_exact_at(&mut bytes, (HEADER + start * 16) as u64)?;
        Ok(bytes
            .chunks_exact(16)
            .map(|c| u128::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }

    /// Calls `f` with each key in `start..=end`, in order.
    pub fn each_in(&self, start: u128, end: u128, mut f: impl FnMut(u128)) -> io::Result<()> {
        let first_block = self
            .index
            .partition_point(|k| *k <= start)
            .saturating_sub(1);
        for b in first_block..self.index.len() {
            if self.index[b] > end {
                break;
            }
            for key in self.block(b)? {
                if key > end {
                    return Ok(());
                }
                if key >= start {
                    f(key);
                }
            }
        }
        Ok(())
    }

    /// Every key, in order.
    pub fn each(&self, f: impl FnMut(u128)) -> io::Result<()> {
        self.each_in(0, u128::MAX, f)
    }

    /// Memory it keeps.
    pub fn index_bytes(&self) -> usize {
        self.index.len() * 16
    }
}

/// Merges `runs` (consecutive, oldest first) into one run file: all their keys in order, read and
/// written as streams (a key in two of them stays twice, as it is twice in the filter).
pub fn merge(dir: &Path, runs: &[&Run]) -> io::Result<Run> {
    let mut readers = runs
        .iter()
        .map(|r| KeyReader::open(r))
        .collect::<io::Result<Vec<_>>>()?;
    let mut heads = std::collections::BinaryHeap::new();
    for (i, reader) in readers.iter_mut().enumerate() {
        if let Some(key) = reader.next_key()? {
            heads.push(std::cmp::Reverse((key, i)));
        }
    }
    let keys = std::iter::from_fn(|| {
        let std::cmp::Reverse((key, i)) = heads.pop()?;
        match readers[i].next_key() {
            Ok(Some(next)) => heads.push(std::cmp::Reverse((next, i))),
            Ok(None) => {}
            Err(e) => return Some(Err(e)),
        }
        Some(Ok(key))
    });
    let first = runs.iter().map(|r| r.first).min().unwrap_or_default();
    let last = runs.iter().map(|r| r.last).max().unwrap_or_default();
    let lo = runs.iter().map(|r| r.lo).min().unwrap_or_default();
    let hi = runs.iter().map(|r| r.hi).max().unwrap_or_default();
    let count = runs.iter().map(|r| r.count).sum();
    write(dir, (lo, hi), (first, last), count, keys)
}

/// A run's keys read in order from the start.
struct KeyReader {
    reader: BufReader<File>,
    left: u64,
}

impl KeyReader {
    fn open(run: &Run) -> io::Result<KeyReader> {
        let mut file = File::open(&run.path)?;
        io::Seek::seek(&mut file, io::SeekFrom::Start(HEADER as u64))?;
        Ok(KeyReader {
            reader: BufReader::with_capacity(64 << 10, file),
            left: run.count,
        })
    }

    fn next_key(&mut self) -> io::Result<Option<u128>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let mut key = [0u8; 16];
        self.reader.read_exact(&mut key)?;
        Ok(Some(u128::from_le_bytes(key)))
    }
}

struct CrcWriter<W: Write> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: u64, step: u128) -> Vec<u128> {
        (1..=n).map(|i| u128::from(i) * step).collect()
    }

    /// Run `number` of `keys`, its ids received from `first` to `last`.
    fn run_of(dir: &Path, number: u64, (first, last): (i64, i64), keys: &[u128]) -> Run {
        let count = keys.len() as u64;
        write(
            dir,
            (number, number),
            (first, last),
            count,
            keys.iter().map(|k| Ok(*k)),
        )
        .unwrap()
    }

    #[test]
    fn a_run_finds_its_keys_after_it_is_opened_again() {
        let dir = tempfile::tempdir().unwrap();
        let held = keys(1_000, 7 << 100);
        let run = run_of(dir.path(), 3, (10, 20), &held);
        assert!(held.iter().all(|k| run.contains(*k).unwrap()));
        assert!(!run.contains(5).unwrap() && !run.contains(u128::MAX).unwrap());
        let again = open_all(dir.path()).unwrap();
        assert_eq!(again.len(), 1);
        let run = &again[0];
        assert_eq!(
            (run.first, run.last, run.count, run.lo, run.hi),
            (10, 20, 1_000, 3, 3)
        );
        assert!(held.iter().all(|k| run.contains(*k).unwrap()));
        let mut listed = Vec::new();
        run.each_in(held[300], held[700], |k| listed.push(k))
            .unwrap();
        assert_eq!(listed, held[300..=700]);
    }

    #[test]
    fn a_merged_run_replaces_what_it_holds_even_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let a = run_of(dir.path(), 1, (0, 5), &keys(10, 3));
        let b = run_of(dir.path(), 2, (6, 9), &keys(10, 5));
        let merged = merge(dir.path(), &[&a, &b]).unwrap();
        assert_eq!(
            (merged.lo, merged.hi, merged.first, merged.last),
            (1, 2, 0, 9)
        );
        assert_eq!(merged.count, 20, "15 and 30 are in both, and stay twice");
        let mut all = Vec::new();
        merged.each(|k| all.push(k)).unwrap();
        let mut expected: Vec<u128> = keys(10, 3).into_iter().chain(keys(10, 5)).collect();
        expected.sort();
        assert_eq!(all, expected);
        // The crash: a and b were not deleted yet.
        let runs = open_all(dir.path()).unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].lo, runs[0].hi), (1, 2));
        assert!(!a.path.exists() && !b.path.exists());
    }

    #[test]
    fn a_corrupt_run_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let run = run_of(dir.path(), 1, (0, 0), &keys(100, 9));
        let mut bytes = fs::read(&run.path).unwrap();
        bytes[HEADER + 40] ^= 1;
        fs::write(&run.path, bytes).unwrap();
        assert!(open_all(dir.path()).is_err());
    }
}

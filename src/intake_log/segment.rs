//! The on-disk format of one segment file, and recovery of a segment after a crash.
//!
//! A segment is named after the offset of its first record (`00000000000000001234.log`, twenty
//! digits so that names sort like offsets) and holds:
//!
//! ```text
//! header   8 bytes magic "SLUICE01", 8 bytes base offset (little-endian)
//! record   4 bytes payload length, 4 bytes CRC-32 of (length ‖ payload), payload
//! record   ...
//! ```
//!
//! Offsets are implicit: the n-th record of a segment has offset `base + n`. A record is valid
//! when its length is within bounds and its checksum matches; the first invalid record of the
//! newest segment marks a torn tail, which recovery cuts off.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"SLUICE01";
pub const HEADER_LEN: u64 = 16;
pub const RECORD_HEADER_LEN: usize = 8;
/// Larger records than this are never written, so a larger length field means corruption.
pub const MAX_RECORD_LEN: usize = 16 << 20;

/// A segment file's place in the log.
#[derive(Debug, Clone)]
pub struct SegmentFile {
    pub base: u64,
    pub path: PathBuf,
    /// Bytes in the file, header included.
    pub size: u64,
}

pub fn file_name(base: u64) -> String {
    format!("{base:020}.log")
}

fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Appends one framed record (header and payload) to `buf`, writing the payload with `write`.
pub fn frame_into(buf: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; RECORD_HEADER_LEN]);
    write(buf);
    let len = (buf.len() - start - RECORD_HEADER_LEN) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    let crc = checksum(&buf[start..start + 4], &buf[start + RECORD_HEADER_LEN..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn checksum(len: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(len);
    h.update(payload);
    h.finalize()
}

/// Creates a new, empty segment starting at `base` and makes it durable (file and directory
/// entry).
pub fn create(dir: &Path, base: u64) -> io::Result<(SegmentFile, File)> {
    let path = dir.join(file_name(base));
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    let mut header = [0u8; HEADER_LEN as usize];
    header[..8].copy_from_slice(MAGIC);
    header[8..].copy_from_slice(&base.to_le_bytes());
    file.write_all(&header)?;
    file.sync_all()?;
    sync_dir(dir)?;
    Ok((
        SegmentFile {
            base,
            path,
            size: HEADER_LEN,
        },
        file,
    ))
}

/// Makes a directory's entries (created, renamed or removed files) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The segment files in `dir`, oldest first.
pub fn list(dir: &Path) -> io::Result<Vec<SegmentFile>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(base) = name.to_str().and_then(parse_file_name) else {
            continue;
        };
        out.push(SegmentFile {
            base,
            path: entry.path(),
            size: entry.metadata()?.len(),
        });
    }
    out.sort_by_key(|s| s.base);
    Ok(out)
}

/// What recovery found in the newest segment.
#[derive(Debug)]
pub struct Recovered {
    pub records: u64,
    /// Bytes of valid content, header included; anything past it was cut off.
    pub valid_len: u64,
    pub cut_bytes: u64,
}

/// Scans the newest segment, cuts off a torn tail and makes the cut durable.
pub fn recover_tail(segment: &SegmentFile) -> io::Result<Recovered> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&segment.path)?;
    let actual_len = file.metadata()?.len();
    let mut reader = RecordReader::new(file.try_clone()?, segment.base)?;
    let mut records = 0;
    while let Next::Record(..) = reader.next(actual_len)? {
        records += 1;
    }
    let valid_len = reader.position();
    let cut_bytes = actual_len - valid_len;
    if cut_bytes > 0 {
        file.set_len(valid_len)?;
        file.sync_all()?;
    }
    Ok(Recovered {
        records,
        valid_len,
        cut_bytes,
    })
}

/// What [`RecordReader::next`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Record(u64, Vec<u8>),
    /// No complete record before the limit.
    End,
    /// A complete record whose length or checksum is wrong.
    Corrupt,
}

/// Reads the records of one segment in order with positioned reads, never past a byte limit that
/// the caller gives on each call: the durable length for a live segment (so bytes that might yet be
/// cut off after a failed write are never seen), the file length for recovery.
pub struct RecordReader {
    file: File,
    /// File position of `buf[0]`.
    buf_pos: u64,
    buf: Vec<u8>,
    /// File position of the next record.
    position: u64,
    next_offset: u64,
}

const READ_CHUNK: usize = 256 << 10;

impl RecordReader {
    pub fn open(path: &Path, base: u64) -> io::Result<Self> {
        Self::new(File::open(path)?, base)
    }

    pub fn new(file: File, base: u64) -> io::Result<Self> {
        let mut header = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut header, 0).map_err(|e| {
            io::Error::new(e.kind(), format!("segment {base}: header unreadable: {e}"))
        })?;
        if &header[..8] != MAGIC || header[8..] != base.to_le_bytes() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("segment {base}: bad header"),
            ));
        }
        Ok(RecordReader {
            file,
            buf_pos: HEADER_LEN,
            buf: Vec::new(),
            position: HEADER_LEN,
            next_offset: base,
        })
    }

    /// File position of the next record.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Offset of the next record.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// The next record that ends at or before byte `limit`.
    pub fn next(&mut self, limit: u64) -> io::Result<Next> {
        if !self.fill(RECORD_HEADER_LEN, limit)? {
            return Ok(Next::End);
        }
        let at = (self.position - self.buf_pos) as usize;
        let header: [u8; RECORD_HEADER_LEN] =
            self.buf[at..at + RECORD_HEADER_LEN].try_into().unwrap();
        let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
        if len > MAX_RECORD_LEN {
            return Ok(Next::Corrupt);
        }
        if !self.fill(RECORD_HEADER_LEN + len, limit)? {
            return Ok(Next::End);
        }
        let at = (self.position - self.buf_pos) as usize;
        let payload = &self.buf[at + RECORD_HEADER_LEN..at + RECORD_HEADER_LEN + len];
        let crc = u32::from_le_bytes(header[4..].try_into().unwrap());
        if crc != checksum(&header[..4], payload) {
            return Ok(Next::Corrupt);
        }
        let record = Next::Record(self.next_offset, payload.to_vec());
        self.position += (RECORD_HEADER_LEN + len) as u64;
        self.next_offset += 1;
        Ok(record)
    }

    /// Makes at least `need` bytes from `position` available in `buf`; `false` when they would
    /// reach past `limit`.
    fn fill(&mut self, need: usize, limit: u64) -> io::Result<bool> {
        if self.position + need as u64 > limit {
            return Ok(false);
        }
        let buffered_end = self.buf_pos + self.buf.len() as u64;
        if buffered_end >= self.position + need as u64 {
            return Ok(true);
        }
        // Drop what was consumed, then read up to a chunk more, never past the limit.
        let consumed = (self.position - self.buf_pos) as usize;
        self.buf.drain(..consumed);
        self.buf_pos = self.position;
        let want = need.max(READ_CHUNK).min((limit - self.position) as usize);
        let have = self.buf.len();
        self.buf.resize(want, 0);
        let mut filled = have;
        while filled < want {
            let n = self
                .file
                .read_at(&mut self.buf[filled..], self.buf_pos + filled as u64)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        self.buf.truncate(filled);
        Ok(filled >= need)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_records(file: &mut File, payloads: &[&[u8]]) {
        let mut buf = Vec::new();
        for p in payloads {
            frame_into(&mut buf, |b| b.extend_from_slice(p));
        }
        file.write_all(&buf).unwrap();
    }

    #[test]
    fn names_sort_like_offsets() {
        assert_eq!(file_name(42), "00000000000000000042.log");
        assert_eq!(parse_file_name("00000000000000000042.log"), Some(42));
        assert_eq!(parse_file_name("42.log"), None);
        assert_eq!(parse_file_name("00000000000000000042.tmp"), None);
    }

    #[test]
    fn reads_back_what_was_framed() {
        let dir = tempfile::tempdir().unwrap();
        let (seg, mut file) = create(dir.path(), 7).unwrap();
        write_records(&mut file, &[b"one", b"", b"three"]);
        let end = file.metadata().unwrap().len();
        let mut r = RecordReader::open(&seg.path, 7).unwrap();
        assert_eq!(r.next(end).unwrap(), Next::Record(7, b"one".to_vec()));
        assert_eq!(r.next(end).unwrap(), Next::Record(8, Vec::new()));
        assert_eq!(r.next(end).unwrap(), Next::Record(9, b"three".to_vec()));
        assert_eq!(r.next(end).unwrap(), Next::End);
        assert_eq!(
            r.next(end + 100).unwrap(),
            Next::End,
            "a limit past the file is not an error"
        );
    }

    #[test]
    fn recovery_cuts_a_torn_tail_at_every_possible_byte() {
        let dir = tempfile::tempdir().unwrap();
        let (seg, mut file) = create(dir.path(), 0).unwrap();
        write_records(&mut file, &[b"first", b"second"]);
        let two_records = file.metadata().unwrap().len();
        write_records(&mut file, &[b"third record"]);
        let full = file.metadata().unwrap().len();
        drop(file);
        let bytes = fs::read(&seg.path).unwrap();
        for cut in two_records..full {
            fs::write(&seg.path, &bytes[..cut as usize]).unwrap();
            let rec = recover_tail(&seg).unwrap();
            assert_eq!(rec.records, 2, "cut at {cut}");
            assert_eq!(rec.valid_len, two_records);
            assert_eq!(fs::metadata(&seg.path).unwrap().len(), two_records);
        }
    }

    #[test]
    fn recovery_stops_at_a_corrupt_record() {
        let dir = tempfile::tempdir().unwrap();
        let (seg, mut file) = create(dir.path(), 0).unwrap();
        write_records(&mut file, &[b"good", b"flipped"]);
        drop(file);
        let mut bytes = fs::read(&seg.path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&seg.path, &bytes).unwrap();
        let rec = recover_tail(&seg).unwrap();
        assert_eq!(rec.records, 1);
        assert!(rec.cut_bytes > 0);
    }

    #[test]
    fn never_reads_past_the_limit_and_resumes_when_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let (seg, mut file) = create(dir.path(), 0).unwrap();
        write_records(&mut file, &[b"aaaa"]);
        let one = file.metadata().unwrap().len();
        write_records(&mut file, &[b"bbbb"]);
        let two = file.metadata().unwrap().len();
        let mut r = RecordReader::open(&seg.path, 0).unwrap();
        assert_eq!(r.next(one).unwrap(), Next::Record(0, b"aaaa".to_vec()));
        assert_eq!(r.next(one).unwrap(), Next::End);
        assert_eq!(r.next(two - 1).unwrap(), Next::End);
        assert_eq!(r.next(two).unwrap(), Next::Record(1, b"bbbb".to_vec()));
    }

    #[test]
    fn a_bad_header_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file_name(0));
        fs::write(&path, b"not a segment at all").unwrap();
        assert!(RecordReader::open(&path, 0).is_err());
    }
}

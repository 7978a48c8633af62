//! The profile store's workload on two embedded stores, redb (a copy-on-write B-tree, what Sluice
//! uses) and fjall (an LSM tree), so that the choice between them rests on figures (issue 19).
//!
//! `sluice-storebench ENGINE DIR --keys N --value BYTES --saves S --per-save K --reads R`
//!
//! 1. Fill: N keys (u64, big-endian) with values of about BYTES, in large transactions.
//! 2. Saves: S transactions, each rewriting K keys drawn uniformly from the N and committing
//!    durably (what the profile saver does every `save_interval`).
//! 3. Reads: R point reads of random keys from one consistent view (a profile load on a cache
//!    miss).
//!
//! Each phase prints its wall time and the process's CPU time (every thread, the LSM's flush and
//! compaction workers included; after the saves it waits until they are idle), per operation. Run
//! it pinned to one core (`taskset -c 1`), as the server is: CPU is what the stages share.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Options {
    engine: String,
    dir: PathBuf,
    keys: u64,
    value: usize,
    saves: usize,
    per_save: usize,
    reads: usize,
    cache_mb: u64,
}

fn options() -> Result<Options> {
    let mut args = std::env::args().skip(1);
    let engine = args
        .next()
        .ok_or("usage: sluice-storebench redb|fjall DIR [--keys N] ...")?;
    let dir = PathBuf::from(args.next().ok_or("missing DIR")?);
    let mut o = Options {
        engine,
        dir,
        keys: 1_000_000,
        value: 400,
        saves: 10,
        per_save: 20_000,
        reads: 100_000,
        cache_mb: 64,
    };
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--keys" => o.keys = value.parse()?,
            "--value" => o.value = value.parse()?,
            "--saves" => o.saves = value.parse()?,
            "--per-save" => o.per_save = value.parse()?,
            "--reads" => o.reads = value.parse()?,
            "--cache-mb" => o.cache_mb = value.parse()?,
            _ => return Err(format!("unknown option {flag}").into()),
        }
    }
    Ok(o)
}

/// What a store must do for the profile store.
trait Store {
    /// Writes `pairs` in one transaction; `durable` commits to disk before returning.
    fn write(
        &mut self,
        pairs: &mut dyn Iterator<Item = (u64, Vec<u8>)>,
        durable: bool,
    ) -> Result<()>;
    /// Reads every key of `keys` from one consistent view; returns the bytes read.
    fn read(&self, keys: &[u64]) -> Result<usize>;
    /// Waits until background work (flushes, compactions) is done.
    fn settle(&self) {}
}

struct Redb(redb::Database);
const TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("profiles");

impl Store for Redb {
    fn write(
        &mut self,
        pairs: &mut dyn Iterator<Item = (u64, Vec<u8>)>,
        durable: bool,
    ) -> Result<()> {
        let mut w = self.0.begin_write()?;
        if !durable {
            w.set_durability(redb::Durability::None)?;
        }
        {
            let mut t = w.open_table(TABLE)?;
            for (k, v) in pairs {
                t.insert(k, v.as_slice())?;
            }
        }
        w.commit()?;
        Ok(())
    }

    fn read(&self, keys: &[u64]) -> Result<usize> {
        use redb::ReadableDatabase;
        let r = self.0.begin_read()?;
        let t = r.open_table(TABLE)?;
        let mut bytes = 0;
        for &k in keys {
            bytes += t.get(k)?.map_or(0, |v| v.value().len());
        }
        Ok(bytes)
    }
}

struct Fjall {
    db: fjall::Database,
    profiles: fjall::Keyspace,
}

impl Store for Fjall {
    fn write(
        &mut self,
        pairs: &mut dyn Iterator<Item = (u64, Vec<u8>)>,
        durable: bool,
    ) -> Result<()> {
        let mut batch = self.db.batch();
        for (k, v) in pairs {
            batch.insert(&self.profiles, k.to_be_bytes(), v);
        }
        batch.commit()?;
        if durable {
            self.db.persist(fjall::PersistMode::SyncAll)?;
        }
        Ok(())
    }

    fn read(&self, keys: &[u64]) -> Result<usize> {
        use fjall::Readable;
        let view = self.db.snapshot();
        let mut bytes = 0;
        for &k in keys {
            bytes += view
                .get(&self.profiles, k.to_be_bytes())?
                .map_or(0, |v| v.len());
        }
        Ok(bytes)
    }

    fn settle(&self) {
        while self.db.outstanding_flushes() > 0 || self.db.active_compactions() > 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn open(o: &Options) -> Result<Box<dyn Store>> {
    std::fs::create_dir_all(&o.dir)?;
    let cache = o.cache_mb << 20;
    Ok(match o.engine.as_str() {
        "redb" => {
            let db = redb::Database::builder()
                .set_cache_size(cache as usize)
                .create(o.dir.join("profiles.redb"))?;
            Box::new(Redb(db))
        }
        "fjall" => {
            let db = fjall::Database::builder(&o.dir)
                .cache_size(cache)
                .manual_journal_persist(true)
                .open()?;
            let profiles = db.keyspace("profiles", fjall::KeyspaceCreateOptions::default)?;
            Box::new(Fjall { db, profiles })
        }
        other => return Err(format!("unknown engine {other}: redb or fjall").into()),
    })
}

/// splitmix64: a fast, well-mixed stream from a counter.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A value shaped like an encoded profile: small integers and short strings that repeat across
/// profiles (names, trait keys), so it compresses about as well.
fn value(key: u64, version: u64, bytes: usize) -> Vec<u8> {
    const WORDS: [&[u8]; 8] = [
        b"Page Viewed",
        b"Product Viewed",
        b"Order Completed",
        b"email",
        b"plan",
        b"pro",
        b"Signed Up",
        b"country",
    ];
    let mut out = Vec::with_capacity(bytes + 16);
    let mut state = key ^ version.rotate_left(32);
    while out.len() < bytes {
        state = mix(state);
        match state % 4 {
            0 => out.extend_from_slice(WORDS[(state >> 8) as usize % WORDS.len()]),
            _ => out.extend_from_slice(&(state >> 16).to_le_bytes()[..3]),
        }
    }
    out.truncate(bytes);
    out
}

/// Process CPU time (user + system, all threads).
fn cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

struct Phase {
    wall: Instant,
    cpu: Duration,
}

impl Phase {
    fn start() -> Phase {
        Phase {
            wall: Instant::now(),
            cpu: cpu(),
        }
    }

    fn report(&self, name: &str, ops: usize) {
        let wall = self.wall.elapsed();
        let cpu = cpu() - self.cpu;
        let per = |d: Duration| d.as_secs_f64() * 1e6 / ops.max(1) as f64;
        println!(
            "{name:<7} {ops:>10} ops  wall {:>8.2} s  cpu {:>8.2} s  per op: wall {:>7.2} µs  cpu {:>7.2} µs",
            wall.as_secs_f64(),
            cpu.as_secs_f64(),
            per(wall),
            per(cpu),
        );
    }
}

fn disk_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        total += if meta.is_dir() {
            disk_bytes(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

fn main() -> Result<()> {
    let o = options()?;
    let mut store = open(&o)?;
    println!(
        "{}: {} keys, {} B values, {} saves of {}, {} reads, {} MiB cache",
        o.engine, o.keys, o.value, o.saves, o.per_save, o.reads, o.cache_mb
    );

    let phase = Phase::start();
    const FILL_BATCH: u64 = 200_000;
    let mut start = 0;
    while start < o.keys {
        let end = (start + FILL_BATCH).min(o.keys);
        let mut pairs = (start..end).map(|k| (k, value(k, 0, o.value)));
        store.write(&mut pairs, end == o.keys)?;
        start = end;
    }
    store.settle();
    phase.report("fill", o.keys as usize);
    println!("on disk after fill: {} MB", disk_bytes(&o.dir) / 1_000_000);

    let phase = Phase::start();
    let mut save_walls = Vec::new();
    for save in 0..o.saves {
        let began = Instant::now();
        let mut pairs = (0..o.per_save).map(|i| {
            let k = mix((save * o.per_save + i) as u64 ^ 0x5AFE) % o.keys;
            (k, value(k, save as u64 + 1, o.value))
        });
        store.write(&mut pairs, true)?;
        save_walls.push(began.elapsed().as_secs_f64());
    }
    store.settle();
    phase.report("saves", o.saves * o.per_save);
    save_walls.sort_by(f64::total_cmp);
    println!(
        "one save's wall time, s: median {:.2}, max {:.2}",
        save_walls[save_walls.len() / 2],
        save_walls[save_walls.len() - 1]
    );
    println!("on disk after saves: {} MB", disk_bytes(&o.dir) / 1_000_000);

    let keys: Vec<u64> = (0..o.reads)
        .map(|i| mix(i as u64 ^ 0xBEEF) % o.keys)
        .collect();
    let phase = Phase::start();
    let bytes = store.read(&keys)?;
    phase.report("reads", o.reads);
    println!("read {} MB", bytes / 1_000_000);
    Ok(())
}

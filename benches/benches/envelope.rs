//! Envelope codec throughput, single-threaded, next to raw zstd on the same bytes.
//!
//! Data: real PostgreSQL files made by `benches/prepare-data.sh` in `target/bench-data`
//! (override with `WALFERRY_BENCH_DATA`), cut into 1 MiB units (the default block size).
//! Every iteration processes the same sample of units spread evenly over the whole file
//! (32 MiB by default, `WALFERRY_BENCH_UNITS` to change), so the working set is larger
//! than the caches, as it is in a real backup, and the content is representative of the
//! whole file rather than of one lucky unit. Throughput counts plaintext bytes for both
//! directions. MB = 10^6 bytes.
//!
//! A fourth dataset, `random` (incompressible, generated in memory, level 3 only), covers
//! the store-as-is path.
//!
//! Groups are `<data>-zstd<level>` with functions `seal`, `zstd-compress`, `open`,
//! `zstd-decompress`; `primitives` holds AES-256-GCM (aes-gcm, which the envelope uses,
//! and aws-lc-rs), crc32 and a plain copy, for scale.
//! After a `cargo bench` run the bench prints a summary table built from criterion's
//! results in `target/criterion` (rows not measured in this run are marked stale).
//!
//! `WALFERRY_BENCH_CLOCK=cpu` measures the bench thread's on-CPU time instead of wall
//! time, for machines busy with other work.
//!
//! Run: `bash benches/prepare-data.sh && cargo bench -p walferry-benches --bench envelope`

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use aes_gcm::aead::{AeadInPlace, KeyInit, Nonce};
use aes_gcm::Aes256Gcm;
use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{Criterion, SamplingMode, Throughput};
use walferry_formats::envelope::{Kind, Opener, Sealer};
use walferry_formats::keyring::{DataKeyMaterial, Keyring};

const UNIT: usize = 1 << 20;
const LEVELS: [i32; 2] = [1, 3];
const DEFAULT_UNITS: usize = 32;
const FILES: [(&str, &str); 3] = [
    (
        "heap-pgbench",
        "pgbench_accounts main fork after pgbench -i",
    ),
    ("heap-mixed", "table of random-ish rows, ~3x with zstd -3"),
    ("wal", "WAL segments from a TPC-B run after a CHECKPOINT"),
];

struct Dataset {
    /// Group-name prefix; synthetic data says so in its name.
    name: String,
    /// zstd levels to measure on it.
    levels: &'static [i32],
    /// The whole file in 1 MiB units (for the compression ratio).
    all: Vec<Vec<u8>>,
    /// Indexes into `all` of the units every iteration processes.
    sample: Vec<usize>,
}

impl Dataset {
    fn new(name: String, bytes: &[u8], want: usize) -> Self {
        let all: Vec<Vec<u8>> = bytes.chunks_exact(UNIT).map(<[u8]>::to_vec).collect();
        assert!(!all.is_empty(), "{name}: less than one 1 MiB unit of data");
        let n = want.clamp(1, all.len());
        let sample = (0..n).map(|i| i * all.len() / n).collect();
        Dataset {
            name,
            levels: &LEVELS,
            all,
            sample,
        }
    }

    fn units(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.sample.iter().map(|&i| self.all[i].as_slice())
    }

    fn sample_bytes(&self) -> u64 {
        (self.sample.len() * UNIT) as u64
    }
}

fn data_dir() -> PathBuf {
    match std::env::var_os("WALFERRY_BENCH_DATA") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-data"),
    }
}

fn load_datasets() -> Vec<Dataset> {
    let want = std::env::var("WALFERRY_BENCH_UNITS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_UNITS);
    let dir = data_dir();
    let mut out = Vec::new();
    let mut missing = Vec::new();
    for (name, what) in FILES {
        let path = dir.join(format!("{name}.bin"));
        match std::fs::read(&path) {
            Ok(bytes) if bytes.len() >= UNIT => {
                eprintln!(
                    "bench data: {name}: {} ({what}), {} MiB",
                    path.display(),
                    bytes.len() >> 20
                );
                out.push(Dataset::new(name.to_string(), &bytes, want));
            }
            _ => missing.push(path),
        }
    }
    if !missing.is_empty() {
        let bar = "#".repeat(78);
        eprintln!("\n{bar}");
        eprintln!("#  REAL BENCH DATA MISSING:");
        for p in &missing {
            eprintln!("#    {}", p.display());
        }
        eprintln!("#  Run:  bash benches/prepare-data.sh   (needs PostgreSQL server binaries)");
        eprintln!("#  Falling back to SYNTHETIC data; its numbers say little about real data.");
        eprintln!("{bar}\n");
        if out.is_empty() {
            out.push(Dataset::new(
                "SYNTHETIC-heap-pgbench".into(),
                &synthetic_pgbench(96 << 20),
                want,
            ));
            out.push(Dataset::new(
                "SYNTHETIC-heap-mixed".into(),
                &synthetic_mixed(96 << 20),
                want,
            ));
        }
    }
    // Incompressible units take the store-as-is path (zstd runs, then its output is
    // dropped); already-compressed TOAST or encrypted columns look like this.
    let mut rng = Rng(7);
    let random: Vec<u8> = (0..(want.max(1) * UNIT) / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    let mut incompressible = Dataset::new("random".into(), &random, want);
    incompressible.levels = &[3];
    out.push(incompressible);
    out
}

/// A small deterministic PRNG for synthetic data (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// 8 KiB pages of pgbench-like rows: a few integers and 84 blanks of filler.
fn synthetic_pgbench(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut aid = 0u32;
    while out.len() < len {
        let mut page = vec![0u8; 8192];
        let mut at = 24;
        while at + 121 <= page.len() {
            aid += 1;
            page[at..at + 4].copy_from_slice(&aid.to_le_bytes());
            page[at + 4..at + 8].copy_from_slice(&(aid / 100_000 + 1).to_le_bytes());
            page[at + 12..at + 96].fill(b' ');
            at += 121;
        }
        out.extend_from_slice(&page);
    }
    out.truncate(len);
    out
}

/// Rows of numbers, hex and words that compress roughly 3x.
fn synthetic_mixed(len: usize) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "order",
        "delayed",
        "customer",
        "refund",
        "gift",
        "express",
        "shipping",
        "address",
        "warehouse",
        "north",
        "invoice",
        "paid",
        "card",
        "voucher",
        "note",
        "sent",
    ];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut out = Vec::with_capacity(len + 256);
    let mut id = 0u64;
    while out.len() < len {
        id += 1;
        let r = rng.next();
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(format!("{:012x}", r >> 16).as_bytes());
        out.extend_from_slice(&(rng.next() % 10_000_000).to_le_bytes()[..4]);
        out.extend_from_slice(
            &(1_700_000_000_000_000 + rng.next() % 35_000_000_000_000).to_le_bytes(),
        );
        for _ in 0..5 + r % 10 {
            out.extend_from_slice(WORDS[(rng.next() % 16) as usize].as_bytes());
            out.push(b' ');
        }
    }
    out.truncate(len);
    out
}

fn keyring() -> Keyring {
    Keyring::from_materials(&[DataKeyMaterial::generate(1)], 1).expect("keyring")
}

fn bench_codec<M: Measurement>(c: &mut Criterion<M>, ds: &Dataset, level: i32, keys: &Keyring) {
    let ids: Vec<[u8; 32]> = ds.units().map(|u| keys.block_id(u)).collect();
    let units: Vec<&[u8]> = ds.units().collect();

    let mut sealer = Sealer::new(level).expect("sealer");
    let sealed: Vec<Vec<u8>> = units
        .iter()
        .zip(&ids)
        .map(|(u, id)| sealer.seal(Kind::Block, id, u, keys).expect("seal"))
        .collect();
    let mut raw = zstd::bulk::Compressor::new(level).expect("zstd compressor");
    let compressed: Vec<Vec<u8>> = units
        .iter()
        .map(|u| raw.compress(u).expect("compress"))
        .collect();

    let mut g = c.benchmark_group(format!("{}-zstd{level}", ds.name));
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Bytes(ds.sample_bytes()));

    g.bench_function("seal", |b| {
        b.iter(|| {
            for (u, id) in units.iter().zip(&ids) {
                black_box(sealer.seal(Kind::Block, id, u, keys).expect("seal"));
            }
        })
    });
    let mut buf: Vec<u8> = Vec::with_capacity(zstd::zstd_safe::compress_bound(UNIT));
    g.bench_function("zstd-compress", |b| {
        b.iter(|| {
            for u in &units {
                buf.clear();
                black_box(raw.compress_to_buffer(u, &mut buf).expect("compress"));
            }
        })
    });
    let mut opener = Opener::new().expect("opener");
    g.bench_function("open", |b| {
        b.iter(|| {
            for (s, id) in sealed.iter().zip(&ids) {
                black_box(opener.open(s, Kind::Block, id, keys).expect("open"));
            }
        })
    });
    let mut dec = zstd::bulk::Decompressor::new().expect("zstd decompressor");
    let mut out: Vec<u8> = Vec::with_capacity(UNIT);
    g.bench_function("zstd-decompress", |b| {
        b.iter(|| {
            for z in &compressed {
                out.clear();
                black_box(dec.decompress_to_buffer(z, &mut out).expect("decompress"));
            }
        })
    });
    g.finish();
}

/// The fixed costs every envelope pays, on 32 x 1 MiB units, for scale.
fn bench_primitives<M: Measurement>(c: &mut Criterion<M>) {
    let mut rng = Rng(42);
    let units: Vec<Vec<u8>> = (0..DEFAULT_UNITS)
        .map(|_| {
            (0..UNIT / 8)
                .flat_map(|_| rng.next().to_le_bytes())
                .collect()
        })
        .collect();
    let bytes = (units.len() * UNIT) as u64;
    let cipher = Aes256Gcm::new(&[7u8; 32].into());
    let nonce = [9u8; 12];
    let mut scratch: Vec<Vec<u8>> = units.clone();

    let mut g = c.benchmark_group("primitives");
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("aes256gcm-encrypt", |b| {
        b.iter(|| {
            for u in scratch.iter_mut() {
                black_box(
                    cipher
                        .encrypt_in_place_detached(
                            Nonce::<Aes256Gcm>::from_slice(&nonce),
                            b"aad",
                            u,
                        )
                        .expect("encrypt"),
                );
            }
        })
    });
    // The same cipher from AWS-LC (byte-identical output), for comparison.
    let lc = aws_lc_rs::aead::LessSafeKey::new(
        aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &[7u8; 32])
            .expect("aws-lc key"),
    );
    g.bench_function("aws-lc-rs-aes256gcm-encrypt", |b| {
        b.iter(|| {
            for u in scratch.iter_mut() {
                let tag = lc
                    .seal_in_place_separate_tag(
                        aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
                        aws_lc_rs::aead::Aad::from(b"aad"),
                        u,
                    )
                    .expect("encrypt");
                black_box(tag.as_ref());
            }
        })
    });
    g.bench_function("crc32", |b| {
        b.iter(|| {
            for u in &units {
                black_box(crc32fast::hash(u));
            }
        })
    });
    g.bench_function("copy-to-vec", |b| {
        b.iter(|| {
            for u in &units {
                black_box(u.to_vec());
            }
        })
    });
    g.finish();
}

// ---------------------------------------------------------------------------------------
// Clock

/// On-CPU time of the measuring thread, from `/proc/thread-self/schedstat` (ns).
///
/// With `WALFERRY_BENCH_CLOCK=cpu`: on a machine where other jobs compete for the cores,
/// wall time counts the time the bench sat preempted; this clock does not (cache and
/// memory-bandwidth contention still show). Values are nanoseconds, as with wall time,
/// so reports and the summary read the same.
struct ThreadCpuTime {
    wall: WallTime,
}

impl ThreadCpuTime {
    fn now_ns() -> u64 {
        std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .expect("/proc/thread-self/schedstat (Linux with schedstats) is needed for WALFERRY_BENCH_CLOCK=cpu")
    }
}

impl Measurement for ThreadCpuTime {
    type Intermediate = u64;
    type Value = Duration;

    fn start(&self) -> u64 {
        Self::now_ns()
    }
    fn end(&self, start: u64) -> Duration {
        Duration::from_nanos(Self::now_ns().saturating_sub(start))
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, v: &Duration) -> f64 {
        v.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        self.wall.formatter()
    }
}

// ---------------------------------------------------------------------------------------
// Summary table, read back from criterion's own results.

fn criterion_home() -> PathBuf {
    if let Some(p) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(p).join("criterion");
    }
    // Same fallback as criterion: ask cargo where the target dir is.
    if let Some(cargo) = std::env::var_os("CARGO") {
        if let Ok(out) = std::process::Command::new(cargo)
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .output()
        {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                if let Some(t) = v["target_directory"].as_str() {
                    return PathBuf::from(t).join("criterion");
                }
            }
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/criterion")
}

/// MB/s from criterion's median time per iteration; `None` if absent. The flag says
/// whether the result predates this run.
fn measured(home: &Path, group: &str, func: &str, since: SystemTime) -> Option<(f64, bool)> {
    let dir = home.join(group).join(func).join("new");
    let est: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("estimates.json")).ok()?).ok()?;
    let bench: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("benchmark.json")).ok()?).ok()?;
    let ns = est["median"]["point_estimate"].as_f64()?;
    let bytes = bench["throughput"]["Bytes"].as_f64()?;
    let stale = std::fs::metadata(dir.join("estimates.json"))
        .and_then(|m| m.modified())
        .map(|t| t < since)
        .unwrap_or(true);
    Some((bytes / ns * 1e3, stale))
}

fn cell(v: Option<(f64, bool)>) -> String {
    match v {
        Some((mbs, false)) => format!("{mbs:.0}"),
        Some((mbs, true)) => format!("{mbs:.0} (stale)"),
        None => "-".into(),
    }
}

fn ratio(a: Option<(f64, bool)>, b: Option<(f64, bool)>) -> String {
    match (a, b) {
        (Some((a, _)), Some((b, _))) => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

/// Compression ratios over every 1 MiB unit of the file: raw zstd, and whole envelopes.
fn ratios(ds: &Dataset, level: i32, keys: &Keyring) -> (f64, f64) {
    let mut raw = zstd::bulk::Compressor::new(level).expect("zstd compressor");
    let mut sealer = Sealer::new(level).expect("sealer");
    let (mut plain, mut z, mut env) = (0usize, 0usize, 0usize);
    for u in &ds.all {
        plain += u.len();
        z += raw.compress(u).expect("compress").len();
        env += sealer
            .seal(Kind::Block, &keys.block_id(u), u, keys)
            .expect("seal")
            .len();
    }
    (plain as f64 / z as f64, plain as f64 / env as f64)
}

fn print_summary(data: &[Dataset], keys: &Keyring, since: SystemTime, cpu_clock: bool) {
    let home = criterion_home();
    let clock = if cpu_clock {
        "on-CPU time"
    } else {
        "wall time"
    };
    println!("\nwalferry envelope vs raw zstd, one thread, 1 MiB units, MB/s of plaintext (MB = 10^6 B), criterion medians, {clock}");
    println!("results: {}", home.display());
    println!();
    println!("| data | level | zstd ratio | envelope ratio | seal | zstd compress | seal/zstd | open | zstd decompress | open/zstd |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for ds in data {
        for &level in ds.levels {
            let g = format!("{}-zstd{level}", ds.name);
            let m = |f: &str| measured(&home, &g, f, since);
            let (seal, comp, open, dec) = (
                m("seal"),
                m("zstd-compress"),
                m("open"),
                m("zstd-decompress"),
            );
            let (rz, re) = ratios(ds, level, keys);
            println!(
                "| {} | {level} | {rz:.2}x | {re:.2}x | {} | {} | {} | {} | {} | {} |",
                ds.name,
                cell(seal),
                cell(comp),
                ratio(seal, comp),
                cell(open),
                cell(dec),
                ratio(open, dec),
            );
        }
    }
    println!();
    println!("| primitive (32 x 1 MiB) | MB/s |");
    println!("|---|---|");
    for f in [
        "aes256gcm-encrypt",
        "aws-lc-rs-aes256gcm-encrypt",
        "crc32",
        "copy-to-vec",
    ] {
        println!(
            "| {f} | {} |",
            cell(measured(&home, "primitives", f, since))
        );
    }
}

fn main() {
    let since = SystemTime::now();
    let args: Vec<String> = std::env::args().collect();
    let bench_mode =
        args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test" || a == "--list");
    let data = load_datasets();
    let keys = keyring();
    let cpu_clock = std::env::var("WALFERRY_BENCH_CLOCK").is_ok_and(|v| v == "cpu");
    if cpu_clock {
        eprintln!("clock: on-CPU time of the bench thread (WALFERRY_BENCH_CLOCK=cpu)");
        run(
            configure(Criterion::default().with_measurement(ThreadCpuTime { wall: WallTime })),
            &data,
            &keys,
        );
    } else {
        run(configure(Criterion::default()), &data, &keys);
    }
    if bench_mode {
        print_summary(&data, &keys, since, cpu_clock);
    }
}

fn configure<M: Measurement>(c: Criterion<M>) -> Criterion<M> {
    c.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .nresamples(20_000)
        .configure_from_args()
}

fn run<M: Measurement>(mut c: Criterion<M>, data: &[Dataset], keys: &Keyring) {
    bench_primitives(&mut c);
    for ds in data {
        for &level in ds.levels {
            bench_codec(&mut c, ds, level, keys);
        }
    }
    c.final_summary();
}

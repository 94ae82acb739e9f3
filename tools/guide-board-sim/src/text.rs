//! Text content: append-only logs, per-run metrics, per-case JSON results, and the static
//! configuration files, script and calibration data that every run carries unchanged.

use std::fmt::Write as _;
use std::io::{self, Write};

use rand::{Rng, RngCore};
use rand_chacha::ChaCha8Rng;

use crate::seed::{rng, tag};

/// 2026-01-01T00:00:00Z in seconds since the Unix epoch. Run `i` starts `i` hours later.
pub const EPOCH_2026: i64 = 1_767_225_600;

const T_LOG: u64 = tag("log-chunk");
const T_METRICS_CSV: u64 = tag("metrics-csv");
const T_SAMPLES: u64 = tag("metrics-jsonl");
const T_CASE: u64 = tag("case");
const T_CASE_STATIC: u64 = tag("case-static");
const T_CONFIG: u64 = tag("config");

/// Text is built in a `String` and handed to the writer in pieces of about this size.
const FLUSH: usize = 64 * 1024;

/// Start of run `run`, in milliseconds since the Unix epoch.
pub fn run_start_ms(run: u64) -> i64 {
    (EPOCH_2026 + run as i64 * 3600) * 1000
}

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Appends an RFC 3339 UTC timestamp with milliseconds.
pub fn push_ts(out: &mut String, ms: i64) {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    );
}

/// Appends `milli / 1000` with three decimals.
fn push_fixed3(out: &mut String, milli: i64) {
    let sign = if milli < 0 { "-" } else { "" };
    let a = milli.unsigned_abs();
    let _ = write!(out, "{sign}{}.{:03}", a / 1000, a % 1000);
}

fn pick<T: Copy>(r: &mut ChaCha8Rng, items: &[T]) -> T {
    items[r.random_range(0..items.len())]
}

/// Number of boards attached in runs of `seed` (2..=4), each with a `logs/device-<n>.log`.
pub fn device_count(seed: u64) -> u32 {
    2 + (seed / 2 % 3) as u32
}

/// Counts what a text generator wrote and flushes its buffer in pieces.
struct TextSink<'a, W: Write> {
    w: &'a mut W,
    buf: String,
    written: u64,
}

impl<'a, W: Write> TextSink<'a, W> {
    fn new(w: &'a mut W) -> Self {
        Self {
            w,
            buf: String::with_capacity(FLUSH + 4096),
            written: 0,
        }
    }

    /// Bytes produced so far, flushed or not.
    fn len(&self) -> u64 {
        self.written + self.buf.len() as u64
    }

    fn maybe_flush(&mut self) -> io::Result<()> {
        if self.buf.len() >= FLUSH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.w.write_all(self.buf.as_bytes())?;
        self.written += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    fn finish(mut self) -> io::Result<u64> {
        self.flush()?;
        Ok(self.written)
    }
}

// ---------------------------------------------------------------------------------------------
// Logs

/// Which log a [`LogSpec`] describes.
#[derive(Clone, Copy, Debug)]
pub enum LogKind {
    /// `logs/harness.log`: the test harness, with RFC 3339 timestamps and levels.
    Harness,
    /// `logs/device-<n>.log`: a board's console, with seconds since boot.
    Device(u32),
}

/// An append-only log: run `r` holds the chunks of runs `0..=r`, each a pure function of the
/// seed, the log and the chunk's run, so every run's log is a prefix of the next one's.
#[derive(Clone, Debug)]
pub struct LogSpec {
    pub kind: LogKind,
    /// Target size of run 0's content.
    pub initial: u64,
    /// Target size of what each later run appends.
    pub append: u64,
}

impl LogSpec {
    fn key(&self) -> u64 {
        match self.kind {
            LogKind::Harness => tag("harness.log"),
            LogKind::Device(n) => tag("device.log") ^ u64::from(n),
        }
    }

    /// Writes the log as of `run`; returns the number of bytes.
    pub fn write_to<W: Write>(&self, seed: u64, run: u64, w: &mut W) -> io::Result<u64> {
        let mut sink = TextSink::new(w);
        for chunk in 0..=run {
            let target = if chunk == 0 {
                self.initial
            } else {
                self.append
            };
            let end = sink.len() + target;
            let mut r = rng(&[seed, T_LOG, self.key(), chunk]);
            match self.kind {
                LogKind::Harness => harness_chunk(&mut sink, &mut r, seed, chunk, end)?,
                LogKind::Device(n) => device_chunk(&mut sink, &mut r, seed, n, chunk, end)?,
            }
        }
        sink.finish()
    }
}

const STEPS: &[&str] = &[
    "setup",
    "flash",
    "reset",
    "handshake",
    "stimulus",
    "measure",
    "verify",
    "teardown",
];
/// Power rails and their nominal voltage in mV.
const RAILS: &[(&str, i64)] = &[
    ("VCC_3V3", 3300),
    ("VCC_1V8", 1800),
    ("VCC_5V0", 5000),
    ("VBAT", 3700),
    ("VCORE", 1100),
];
const REASONS: &[&str] = &[
    "timeout waiting for ack",
    "crc mismatch",
    "unexpected reset",
    "value out of range",
    "device busy",
];
/// Sensor channels and their units.
const CHANNELS: &[(&str, &str)] = &[
    ("temp", "degC"),
    ("vbus", "mV"),
    ("ibus", "mA"),
    ("accel_x", "g"),
    ("accel_y", "g"),
    ("accel_z", "g"),
    ("gyro_z", "dps"),
    ("pressure", "kPa"),
];
const SUITES: &[&str] = &[
    "uart", "i2c", "spi", "power", "motor", "sensor", "can", "boot",
];

fn harness_chunk<W: Write>(
    sink: &mut TextSink<'_, W>,
    r: &mut ChaCha8Rng,
    seed: u64,
    run: u64,
    end: u64,
) -> io::Result<()> {
    let devices = device_count(seed);
    let mut ms = run_start_ms(run) + r.random_range(0..1000);
    let mut seq: u64 = r.random_range(0..1 << 20);
    let b = &mut sink.buf;
    push_ts(b, ms);
    let _ = writeln!(
        b,
        " INFO  [harness] === run {run:04} started (seed {seed}, harness 4.2.{}) ===",
        seed % 17
    );
    while sink.len() < end {
        ms += r.random_range(0..20);
        seq += 1;
        let b = &mut sink.buf;
        push_ts(b, ms);
        let dev = r.random_range(0..devices);
        let case = r.random_range(0..5000);
        let roll = r.random_range(0..100);
        let _ = match roll {
            0..=24 => writeln!(
                b,
                " DEBUG [transport] tx frame dev=gb-{dev} seq={seq} len={} crc=0x{:08x}",
                r.random_range(8..256),
                r.next_u32()
            ),
            25..=49 => writeln!(
                b,
                " DEBUG [transport] rx frame dev=gb-{dev} seq={seq} len={} crc=0x{:08x} latency_us={}",
                r.random_range(8..256),
                r.next_u32(),
                r.random_range(40..900)
            ),
            50..=64 => writeln!(
                b,
                " INFO  [harness] case=case-{case:05} step={} status=ok elapsed_ms={}",
                pick(r, STEPS),
                r.random_range(1..5000)
            ),
            65..=74 => writeln!(
                b,
                " INFO  [scheduler] dispatch case=case-{case:05} dev=gb-{dev} queue_depth={}",
                r.random_range(0..32)
            ),
            75..=84 => {
                let (rail, nominal) = pick(r, RAILS);
                writeln!(
                    b,
                    " INFO  [power] rail {rail} set to {nominal} mV (measured {} mV)",
                    nominal + r.random_range(-40..=40)
                )
            }
            85..=92 => {
                let raw = r.random_range(0..4096);
                let _ = write!(
                    b,
                    " DEBUG [sensor] sample dev=gb-{dev} ch={} raw={raw} scaled=",
                    pick(r, CHANNELS).0
                );
                push_fixed3(b, raw * 805 / 1000 - 100);
                writeln!(b)
            }
            93..=97 => writeln!(
                b,
                " WARN  [harness] retrying case=case-{case:05} step={} attempt={}/3 reason=\"{}\"",
                pick(r, STEPS),
                r.random_range(1..=3),
                pick(r, REASONS)
            ),
            _ => writeln!(
                b,
                " ERROR [harness] case=case-{case:05} failed at step={}: {}",
                pick(r, STEPS),
                pick(r, REASONS)
            ),
        };
        sink.maybe_flush()?;
    }
    Ok(())
}

fn device_chunk<W: Write>(
    sink: &mut TextSink<'_, W>,
    r: &mut ChaCha8Rng,
    seed: u64,
    dev: u32,
    run: u64,
    end: u64,
) -> io::Result<()> {
    let mut us: u64 = 0;
    let _ = writeln!(
        sink.buf,
        "[    0.000000] gb{dev}: === boot (run {run:04}, seed {seed}) ===\n\
         [    0.000112] gb{dev}: guide-board fw 3.{}.{} rev C, {} MHz",
        seed % 9,
        run % 50,
        [48, 64, 80][dev as usize % 3]
    );
    while sink.len() < end {
        us += r.random_range(1..4000);
        let b = &mut sink.buf;
        let _ = write!(b, "[{:5}.{:06}] gb{dev}: ", us / 1_000_000, us % 1_000_000);
        let roll = r.random_range(0..100);
        let _ = match roll {
            0..=29 => writeln!(b, "uart0: rx {} bytes", r.random_range(1..512)),
            30..=44 => writeln!(
                b,
                "adc: ch{} = {}",
                r.random_range(0..8),
                r.random_range(0..4096)
            ),
            45..=59 => writeln!(
                b,
                "dma{}: transfer complete, {} bytes",
                r.random_range(0..4),
                r.random_range(1..64) * 64
            ),
            60..=74 => writeln!(
                b,
                "gpio: pin {} -> {}",
                r.random_range(0..48),
                r.random_range(0..2)
            ),
            75..=86 => writeln!(
                b,
                "watchdog: kick (period {} ms)",
                [250, 500, 1000][dev as usize % 3]
            ),
            87..=95 => writeln!(
                b,
                "i2c-1: addr 0x{:02x} nack, retry {}",
                r.random_range(0x08..0x78),
                r.random_range(1..4)
            ),
            _ => writeln!(
                b,
                "motor: step target={} pos={} err={}",
                r.random_range(0..100_000),
                r.random_range(0..100_000),
                r.random_range(0..64) as i64 - 32
            ),
        };
        sink.maybe_flush()?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// `metrics/metrics.csv` of `run`, about `target` bytes.
pub fn write_metrics_csv<W: Write>(seed: u64, run: u64, target: u64, w: &mut W) -> io::Result<u64> {
    let mut r = rng(&[seed, T_METRICS_CSV, run]);
    let mut sink = TextSink::new(w);
    sink.buf
        .push_str("timestamp_ms,device,channel,sample,value,min,max,mean,status\n");
    let mut ms = run_start_ms(run);
    let mut sample: u64 = 0;
    while sink.len() < target {
        ms += r.random_range(0..5);
        sample += 1;
        let center: i64 = r.random_range(-5_000..50_000);
        let spread: i64 = r.random_range(1..2_000);
        let b = &mut sink.buf;
        let _ = write!(
            b,
            "{ms},gb-{},{},{sample},",
            r.random_range(0..device_count(seed)),
            pick(&mut r, CHANNELS).0
        );
        for v in [
            center + r.random_range(-spread..=spread),
            center - spread,
            center + spread,
            center + r.random_range(-spread / 4..=spread / 4),
        ] {
            push_fixed3(b, v);
            b.push(',');
        }
        b.push_str(if r.random_range(0..50) == 0 {
            "warn\n"
        } else {
            "ok\n"
        });
        sink.maybe_flush()?;
    }
    sink.finish()
}

/// `metrics/samples.jsonl` of `run`, about `target` bytes.
pub fn write_samples_jsonl<W: Write>(
    seed: u64,
    run: u64,
    target: u64,
    w: &mut W,
) -> io::Result<u64> {
    let mut r = rng(&[seed, T_SAMPLES, run]);
    let mut sink = TextSink::new(w);
    let mut ms = run_start_ms(run);
    while sink.len() < target {
        ms += r.random_range(1..50);
        let n = r.random_range(4..=16);
        let base: i64 = r.random_range(0..60_000);
        let b = &mut sink.buf;
        let _ = write!(
            b,
            "{{\"t\":{ms},\"run\":{run},\"dev\":\"gb-{}\",\"ch\":\"{}\",\"n\":{n},\"v\":[",
            r.random_range(0..device_count(seed)),
            pick(&mut r, CHANNELS).0
        );
        for i in 0..n {
            if i > 0 {
                b.push(',');
            }
            let _ = write!(b, "{}", base + r.random_range(-300..=300));
        }
        let flag = if r.random_range(0..40) == 0 {
            "saturated"
        } else {
            "ok"
        };
        let _ = writeln!(b, "],\"flags\":[\"{flag}\"]}}");
        sink.maybe_flush()?;
    }
    sink.finish()
}

// ---------------------------------------------------------------------------------------------
// Results

/// Whether case `id` is a golden case whose result is identical in every run (about 1 in 5).
pub fn case_is_static(seed: u64, id: u64) -> bool {
    rng(&[seed, T_CASE_STATIC, id]).random_range(0..5) == 0
}

/// `results/cases/case-<id>.json` of `run`: pretty JSON of about `avg / 3 ..= 5 * avg / 3`
/// bytes. Golden cases do not depend on `run`.
pub fn case_json(seed: u64, run: u64, id: u64, avg: u64) -> Vec<u8> {
    let golden = case_is_static(seed, id);
    let mut r = if golden {
        rng(&[seed, T_CASE, id, u64::MAX])
    } else {
        rng(&[seed, T_CASE, id, run])
    };
    let target = (avg as f64 * r.random_range(0.33..1.67)) as usize;
    let suite = SUITES[(id % SUITES.len() as u64) as usize];
    let status = match r.random_range(0..40) {
        0 => "fail",
        1 => "skip",
        _ => "pass",
    };
    let mut s = String::with_capacity(target + 256);
    let _ = write!(
        s,
        "{{\n  \"case_id\": \"case-{id:05}\",\n  \"suite\": \"{suite}\",\n  \"golden\": {golden},\n"
    );
    if !golden {
        let _ = writeln!(s, "  \"run\": {run},");
    }
    let _ = write!(
        s,
        "  \"status\": \"{status}\",\n  \"device\": \"gb-{}\",\n  \"duration_ms\": {},\n  \
         \"parameters\": {{\n    \"baud\": {},\n    \"frames\": {},\n    \"retries\": {}\n  }},\n  \
         \"measurements\": [",
        r.random_range(0..device_count(seed)),
        r.random_range(5..60_000),
        [9600, 115_200, 921_600][r.random_range(0..3)],
        r.random_range(1..4096),
        r.random_range(0..3)
    );
    let mut first = true;
    while first || s.len() + 8 < target {
        s.push_str(if first { "\n" } else { ",\n" });
        first = false;
        let (name, unit) = pick(&mut r, CHANNELS);
        let _ = write!(s, "    {{ \"name\": \"{name}\", \"value\": ");
        push_fixed3(&mut s, r.random_range(-20_000..200_000));
        let _ = write!(
            s,
            ", \"unit\": \"{unit}\", \"within_limits\": {} }}",
            r.random_range(0..30) != 0
        );
    }
    s.push_str("\n  ]\n}\n");
    s.into_bytes()
}

// ---------------------------------------------------------------------------------------------
// Files identical in every run

/// Configuration files (`config/...`) as (relative path, content); they depend only on the seed.
pub fn config_files(seed: u64) -> Vec<(String, String)> {
    let mut r = rng(&[seed, T_CONFIG]);
    let mut harness = String::from("# guide-board harness configuration\nharness:\n");
    let _ = write!(
        harness,
        "  version: 4.2.{}\n  parallel_cases: {}\n  default_timeout_ms: {}\n  retries: 3\n  \
         artifact_dir: ./results\n  log_level: debug\nsteps:\n",
        seed % 17,
        r.random_range(1..9),
        r.random_range(1..30) * 1000
    );
    for step in STEPS {
        let _ = writeln!(
            harness,
            "  - name: {step}\n    timeout_ms: {}",
            r.random_range(1..60) * 500
        );
    }

    let mut devices = String::from("# boards attached to this harness\ndevices:\n");
    let rails: Vec<&str> = RAILS.iter().map(|(name, _)| *name).collect();
    for d in 0..device_count(seed) {
        let _ = write!(
            devices,
            "  - id: gb-{d}\n    serial: GB{:08X}\n    port: /dev/ttyUSB{d}\n    baud: 921600\n    \
             firmware: bin/firmware-0.bin\n    rails: [{}]\n",
            r.next_u32(),
            rails.join(", ")
        );
    }

    let logging =
        "# logging\nlogging:\n  harness: logs/harness.log\n  devices: logs/device-{n}.log\n  \
                   format: text\n  rotate: never\n  timestamps: utc\n"
            .to_string();

    let mut limits = String::from("{\n  \"limits\": {\n");
    for (i, (rail, nominal)) in RAILS.iter().enumerate() {
        let tolerance = nominal * r.random_range(3..=8) / 100;
        let _ = writeln!(
            limits,
            "    \"{rail}\": {{ \"min_mv\": {}, \"max_mv\": {} }}{}",
            nominal - tolerance,
            nominal + tolerance,
            if i + 1 < RAILS.len() { "," } else { "" }
        );
    }
    limits.push_str("  }\n}\n");

    let mut channels = String::from("{\n  \"channels\": [\n");
    for (i, (ch, unit)) in CHANNELS.iter().enumerate() {
        let _ = writeln!(
            channels,
            "    {{ \"name\": \"{ch}\", \"unit\": \"{unit}\", \"rate_hz\": {}, \"scale\": 0.{:03}, \"offset\": {} }}{}",
            [10, 100, 1000][r.random_range(0..3)],
            r.random_range(1..1000),
            r.random_range(0..64),
            if i + 1 < CHANNELS.len() { "," } else { "" }
        );
    }
    channels.push_str("  ]\n}\n");

    vec![
        ("config/harness.yaml".into(), harness),
        ("config/devices.yaml".into(), devices),
        ("config/logging.yaml".into(), logging),
        ("config/limits.json".into(), limits),
        ("config/channels.json".into(), channels),
    ]
}

/// The harness launch script at the top of every run (mode 0755).
pub fn run_script() -> String {
    "#!/bin/sh\n\
     # Launches the guide-board harness for one run; artifacts land next to this script.\n\
     set -eu\n\
     cd \"$(dirname \"$0\")\"\n\
     exec guide-board-harness \\\n\
     \x20   --config config/harness.yaml \\\n\
     \x20   --devices config/devices.yaml \\\n\
     \x20   --results results \\\n\
     \x20   --log logs/harness.log \\\n\
     \x20   \"$@\"\n"
        .to_string()
}

/// Calibration coefficients stored deep in the fixtures tree; depends only on the seed.
pub fn calibration_json(seed: u64) -> String {
    let mut r = rng(&[seed, T_CONFIG, tag("calibration")]);
    let mut s =
        String::from("{\n  \"sensor\": \"imu\",\n  \"axis\": \"z\",\n  \"coefficients\": [");
    for i in 0..16 {
        if i > 0 {
            s.push_str(", ");
        }
        push_fixed3(&mut s, r.random_range(-5_000..5_000));
    }
    s.push_str("],\n  \"valid_from\": \"2025-11-03\"\n}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        let mut s = String::new();
        push_ts(&mut s, run_start_ms(0));
        assert_eq!(s, "2026-01-01T00:00:00.000Z");
        s.clear();
        push_ts(&mut s, run_start_ms(24 * 59 + 5) + 61_042);
        assert_eq!(s, "2026-03-01T05:01:01.042Z");
    }

    #[test]
    fn fixed_point() {
        let mut s = String::new();
        for v in [0, 5, -5, 1234, -1234, 100_000] {
            push_fixed3(&mut s, v);
            s.push(' ');
        }
        assert_eq!(s, "0.000 0.005 -0.005 1.234 -1.234 100.000 ");
    }

    #[test]
    fn generated_json_is_valid() {
        for id in 0..50 {
            let v: serde_json::Value = serde_json::from_slice(&case_json(3, 1, id, 1500)).unwrap();
            assert_eq!(v["case_id"], format!("case-{id:05}"));
        }
        for (path, content) in config_files(3) {
            if path.ends_with(".json") {
                serde_json::from_str::<serde_json::Value>(&content).unwrap();
            }
        }
        serde_json::from_str::<serde_json::Value>(&calibration_json(3)).unwrap();
        let mut jsonl = Vec::new();
        write_samples_jsonl(3, 2, 20_000, &mut jsonl).unwrap();
        for line in std::str::from_utf8(&jsonl).unwrap().lines() {
            serde_json::from_str::<serde_json::Value>(line).unwrap();
        }
    }

    #[test]
    fn logs_are_append_only_and_sized() {
        let spec = LogSpec {
            kind: LogKind::Harness,
            initial: 100_000,
            append: 10_000,
        };
        let mut prev = Vec::new();
        for run in 0..4 {
            let mut cur = Vec::new();
            let n = spec.write_to(5, run, &mut cur).unwrap();
            assert_eq!(n, cur.len() as u64);
            let want = 100_000 + 10_000 * run;
            assert!(cur.len() as u64 >= want && (cur.len() as u64) < want + 1000 * (run + 1));
            assert!(cur.starts_with(&prev));
            prev = cur;
        }
        let dev = LogSpec {
            kind: LogKind::Device(1),
            ..spec
        };
        let mut a = Vec::new();
        let mut b = Vec::new();
        dev.write_to(5, 0, &mut a).unwrap();
        dev.write_to(5, 1, &mut b).unwrap();
        assert!(b.starts_with(&a) && b.len() > a.len());
    }
}

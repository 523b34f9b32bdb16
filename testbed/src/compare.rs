//! `ephemerald-testbed compare`: two agent binaries side by side in one run
//! (for example main's and a branch's), on the bench's scale run — the fake
//! CRI over a unix socket and a fresh local API server with N pods bound to
//! the node, so what is measured is the agent's own cost. The binaries
//! alternate round by round (A B, B A, …) so drift on the machine hits both;
//! medians and the ratio B / A come from the same run. It reports the
//! stripped size of each binary, process start → `/readyz`, and resident
//! memory once settled and at its peak.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::bench::{self, BenchError, BenchOpts, Scale};
use crate::cli::CompareArgs;

/// The medians of one binary at one pod count.
#[derive(Debug, Clone, PartialEq)]
pub struct Medians {
    /// Process start → `/readyz` 200, ms.
    pub start_to_ready_ms: f64,
    /// RSS once settled, MiB.
    pub rss_mib: f64,
    /// Peak RSS (VmHWM) after a few debug containers under churn, MiB.
    pub rss_peak_mib: f64,
}

/// Runs `rounds` scale runs of each binary per pod count, alternating.
pub async fn run(
    bins: [&Path; 2],
    pods: &[usize],
    rounds: usize,
    dir: &Path,
) -> Result<Vec<(usize, [Medians; 2])>, BenchError> {
    let mut out = Vec::new();
    for &n in pods {
        let mut runs: [Vec<Scale>; 2] = [Vec::new(), Vec::new()];
        for round in 0..rounds.max(1) {
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                eprintln!("compare: {n} pods, round {round}, {}", bins[i].display());
                let opts = BenchOpts {
                    // A short idle and three debug containers: enough to
                    // settle and to reach the peak; CPU is not compared here.
                    idle: Duration::from_secs(1),
                    rounds: 3,
                    churn_per_sec: 50,
                    ..BenchOpts::quick(bins[i].to_path_buf(), dir.join(format!("bin{i}")))
                };
                runs[i].push(bench::scale_run(&opts, n).await?);
            }
        }
        out.push((n, [medians(&runs[0]), medians(&runs[1])]));
    }
    Ok(out)
}

fn medians(runs: &[Scale]) -> Medians {
    let median = |f: fn(&Scale) -> f64| {
        let v: Vec<f64> = runs.iter().map(f).collect();
        bench::Stats::of(&v).map_or(f64::NAN, |s| s.p50)
    };
    Medians {
        start_to_ready_ms: median(|s| s.start_to_ready_ms),
        rss_mib: median(|s| s.rss_mib),
        rss_peak_mib: median(|s| s.rss_peak_mib),
    }
}

/// The table: one line per pod count and measurement, A, B and B / A.
pub fn table(
    bins: [&Path; 2],
    sizes: [u64; 2],
    rounds: usize,
    rows: &[(usize, [Medians; 2])],
) -> String {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let mut t = format!(
        "A: {}\nB: {}\nmedians of {rounds} scale runs each (fake CRI), alternated\n\n",
        bins[0].display(),
        bins[1].display()
    );
    t += "| measurement | A | B | B / A |\n| --- | --- | --- | --- |\n";
    let _ = writeln!(
        t,
        "| binary size, MiB (stripped) | {:.1} | {:.1} | {:.2} |",
        mib(sizes[0]),
        mib(sizes[1]),
        sizes[1] as f64 / sizes[0] as f64
    );
    for (n, [a, b]) in rows {
        for (what, x, y) in [
            (
                "start → ready, ms",
                a.start_to_ready_ms,
                b.start_to_ready_ms,
            ),
            ("RSS settled, MiB", a.rss_mib, b.rss_mib),
            ("peak RSS, MiB", a.rss_peak_mib, b.rss_peak_mib),
        ] {
            let _ = writeln!(t, "| {n} pods: {what} | {x:.1} | {y:.1} | {:.2} |", y / x);
        }
    }
    t
}

/// `ephemerald-testbed compare`.
pub async fn run_cli(args: CompareArgs) -> Result<(), BenchError> {
    let [a, b] = [&args.a, &args.b].map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()));
    let size = |p: &PathBuf| {
        std::fs::metadata(p)
            .map(|m| m.len())
            .map_err(|source| BenchError::Io {
                what: format!("stat {}", p.display()),
                source,
            })
    };
    let sizes = [size(&a)?, size(&b)?];
    let dir = std::path::absolute(&args.dir).unwrap_or_else(|_| args.dir.clone());
    let rows = run([&a, &b], &args.pods, args.rounds, &dir).await?;
    println!("{}", table([&a, &b], sizes, args.rounds, &rows));
    Ok(())
}

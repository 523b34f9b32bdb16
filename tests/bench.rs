//! Smoke test of the benchmark harness (`ephemerald-testbed bench --quick`): every
//! section runs on the real containerd testbed and the fake CRI with tiny
//! counts, and the results hold every section with coherent values. It
//! checks the harness, not the speed: no timing thresholds here.
//!
//! It lives with the agent's tests, not the lab's, because what it runs is
//! the agent's binary (`CARGO_BIN_EXE_ephemerald` exists only for this
//! package's tests).

use std::path::PathBuf;

use ephemerald_testbed::bench::{self, BenchOpts, Stats};

fn coherent(what: &str, s: &Stats, n: usize) {
    assert_eq!(s.n, n, "{what}: samples");
    assert!(s.min > 0.0, "{what}: positive ({s:?})");
    assert!(
        s.min <= s.p50 && s.p50 <= s.p95 && s.p95 <= s.p99 && s.p99 <= s.max,
        "{what}: ordered ({s:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_run_reports_every_section() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = BenchOpts::quick(
        PathBuf::from(env!("CARGO_BIN_EXE_ephemerald")),
        tmp.path().join("work"),
    );
    let r = bench::run(&opts).await.unwrap_or_else(|e| {
        let mut why = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            why = format!("{why}: {c}");
            cause = c.source();
        }
        panic!("the harness failed (needs root and the testbed: scripts/install-deps.sh): {why}")
    });

    assert!(r.machine.cpus > 0 && r.machine.runtime.starts_with("containerd"));
    assert!(r.binary.bytes > 0);
    coherent(
        "start to ready",
        &r.binary.start_to_ready_ms,
        opts.start_samples,
    );

    let e = &r.end_to_end;
    coherent("direct", &e.direct_ms, opts.rounds);
    coherent("end to end", &e.end_to_end_ms, opts.rounds);
    assert_eq!(e.ratio_p50, e.end_to_end_ms.p50 / e.direct_ms.p50);
    assert_eq!(e.ratio_p95, e.end_to_end_ms.p95 / e.direct_ms.p95);

    let levels: Vec<usize> = r.overhead.iter().map(|o| o.other_pods).collect();
    assert_eq!(levels, opts.other_pods);
    for o in &r.overhead {
        coherent("overhead", &o.event_to_create_ms, opts.rounds);
    }

    coherent(
        "exit to status",
        &r.exit_detection.exit_to_status_ms,
        opts.rounds,
    );
    coherent(
        "exit to watch",
        &r.exit_detection.exit_to_watch_ms,
        opts.rounds,
    );

    let b = &r.burst;
    assert_eq!(b.pods, opts.burst_pods);
    coherent("burst via agent", &b.agent_ms, opts.burst_rounds);
    coherent("burst direct", &b.direct_ms, opts.burst_rounds);
    assert_eq!(b.ratio_p50, b.agent_ms.p50 / b.direct_ms.p50);

    let sizes: Vec<usize> = r.scale.iter().map(|s| s.pods).collect();
    assert_eq!(sizes, opts.scale_pods);
    for s in &r.scale {
        assert!(s.start_to_ready_ms > 0.0, "{s:?}");
        assert!(s.rss_mib > 0.0 && s.rss_peak_mib >= s.rss_mib, "{s:?}");
        assert!(s.idle_cpu_s_per_min >= 0.0, "{s:?}");
        assert!(s.churn_updates_per_s > 0.0, "{s:?}");
        coherent("scale event to create", &s.event_to_create_ms, opts.rounds);
    }

    // The quick run lacks the 1,000-pod measurements: those targets say so
    // instead of pretending.
    assert!(r.quick);
    let unmeasured: Vec<&str> = r
        .targets
        .iter()
        .filter(|t| t.met.is_none())
        .map(|t| t.what.as_str())
        .collect();
    assert!(
        unmeasured.contains(&"agent overhead p99, 1,000 other pods"),
        "{unmeasured:?}"
    );
    assert!(r.targets.iter().any(|t| t.met.is_some()));

    // The JSON written is what was measured, and the table shows it.
    let out = tmp.path().join("bench/results.json");
    bench::write_results(&r, &out).unwrap();
    let back: bench::Results =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(back.end_to_end.direct_ms.p50, e.direct_ms.p50);
    let table = bench::table(&r);
    for row in [
        "direct CRI create+start",
        "exit detection",
        "burst of 5",
        "| 100 |",
    ] {
        assert!(table.contains(row), "{row} missing from\n{table}");
    }
}

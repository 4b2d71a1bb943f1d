//! Every benchmark runs with tiny parameters and returns sane figures (no timing assertions).

use roam_bench::{Bench, Params, Report, NAMES};

fn check(b: &Bench) {
    assert!(!b.rows.is_empty(), "{}: no rows", b.name);
    for r in &b.rows {
        let what = format!("{} / {}", b.name, r.name);
        for s in std::iter::once(r.roam).chain(r.baseline) {
            assert!(s.n > 0, "{what}: no samples");
            assert!(
                s.median.is_finite() && s.lo.is_finite() && s.hi.is_finite(),
                "{what}"
            );
            assert!(s.lo <= s.median && s.median <= s.hi, "{what}: {s:?}");
            // Memory growth and loss may legitimately be zero; everything else is positive.
            if r.unit == "KiB/end" || r.unit == "%" {
                assert!(s.median >= 0.0, "{what}: {s:?}");
            } else {
                assert!(s.median > 0.0, "{what}: {s:?}");
            }
        }
        if let Some(x) = r.ratio {
            assert!(x.is_finite() && x > 0.0, "{what}: ratio {x}");
        }
    }
    assert!(b.table().contains(&b.name));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_benchmark_runs_tiny() {
    let p = Params::tiny();
    let mut benches = Vec::new();
    for name in NAMES {
        let b = roam_bench::run(name, &p)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(b.name, name);
        check(&b);
        benches.push(b);
    }
    // Throughput, latency and UDP throughput have baselines and ratios.
    let by_name = |n: &str| benches.iter().find(|b| b.name == n).expect("ran");
    for n in ["throughput", "latency"] {
        assert!(by_name(n).rows.iter().all(|r| r.ratio.is_some()), "{n}");
    }
    assert!(by_name("udp").rows[0].ratio.is_some());
    let report = Report {
        machine: roam_bench::Machine::detect(),
        quick: true,
        params: p,
        benches,
    };
    let json = report.to_json();
    assert!(json.contains("\"throughput\"") && json.contains("\"cpus\""));
    assert!(roam_bench::run("nope", &Params::tiny()).await.is_err());
}

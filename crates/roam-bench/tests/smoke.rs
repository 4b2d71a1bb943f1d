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
        if r.baseline.is_some() {
            assert!(!r.against.is_empty(), "{what}: baseline without a name");
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
    // The TLS and quinn baselines ran: throughput of plaintext roam against raw TCP, of
    // encrypted roam and roam ChaCha20 against TLS, of encrypted roam against quinn; latency of
    // plaintext and encrypted roam against raw TCP and of plaintext roam against quinn (p50
    // and p99 each); migration against quinn's rebind.
    let against =
        |n: &str| -> Vec<String> { by_name(n).rows.iter().map(|r| r.against.clone()).collect() };
    assert_eq!(
        against("throughput"),
        ["raw TCP", "TLS 1.3/TCP", "TLS 1.3/TCP", "quinn"]
    );
    assert_eq!(
        against("latency"),
        ["raw TCP", "raw TCP", "raw TCP", "raw TCP", "quinn", "quinn"]
    );
    let migration = by_name("migration");
    let rebind: Vec<_> = migration
        .rows
        .iter()
        .filter(|r| r.against == "quinn rebind")
        .collect();
    assert_eq!(rebind.len(), 2, "0 B p50 and p99 against quinn rebind");
    assert!(rebind.iter().all(|r| r.ratio.is_some()));
    // Four in-flight cases, p50 and p99 each, all placed for the chart.
    assert_eq!(migration.rows.len(), 8);
    assert!(migration.rows.iter().all(|r| r.point.is_some()));
    let svg = roam_bench::migration_chart(migration, "tiny").expect("chart");
    assert!(svg.starts_with("<svg") && svg.contains("</svg>"), "{svg}");
    assert!(
        svg.contains("quinn") && svg.contains("64 KiB"),
        "labels drawn"
    );
    let path = std::env::temp_dir().join(format!("roam-bench-{}.svg", std::process::id()));
    roam_bench::write_migration_chart(&benches, &path, "").expect("write chart");
    assert!(std::fs::metadata(&path).is_ok_and(|m| m.len() > 0));
    let _ = std::fs::remove_file(&path);
    let report = Report {
        machine: roam_bench::Machine::detect(),
        quick: true,
        params: p,
        benches,
    };
    let json = report.to_json();
    assert!(json.contains("\"throughput\"") && json.contains("\"cpus\""));
    assert!(json.contains("\"against\": \"TLS 1.3/TCP\"") && json.contains("\"quinn rebind\""));
    assert!(roam_bench::run("nope", &Params::tiny()).await.is_err());
}

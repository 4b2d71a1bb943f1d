//! `roam bench`: runs the suite in `roam-bench` and prints a table per benchmark (standard
//! output, or standard error with `--json`, which writes the JSON report on standard output).

use roam_bench::{Machine, Params, Report, NAMES};

use crate::BenchArgs;

/// Run the selected benchmarks; the first failing one ends the run with its error.
pub async fn run(args: BenchArgs) -> Result<(), roam_bench::BoxError> {
    let params = if args.quick {
        Params::quick()
    } else {
        Params::full()
    };
    let machine = Machine::detect();
    let print = |s: &str| {
        if args.json {
            eprintln!("{s}");
        } else {
            say!("{s}");
        }
    };
    print(&format!(
        "roam bench{}: {} cpus, {}",
        if args.quick { " --quick" } else { "" },
        machine.cpus,
        machine.kernel
    ));
    print(
        "each figure: median over repeated runs, [lo .. hi] its spread; ratio = roam / baseline\n",
    );
    let mut benches = Vec::new();
    for name in NAMES {
        if args.only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let bench = roam_bench::run(name, &params)
            .await
            .map_err(|e| format!("{name}: {e}"))?;
        print(&bench.table());
        benches.push(bench);
    }
    if let Some(path) = &args.chart {
        let note = format!(
            "{} CPUs, kernel {}{}",
            machine.cpus,
            machine.kernel,
            if args.quick { ", --quick" } else { "" }
        );
        roam_bench::write_migration_chart(&benches, path, &note)
            .map_err(|e| format!("chart {}: {e}", path.display()))?;
        print(&format!("chart written to {}\n", path.display()));
    }
    if args.json {
        let report = Report {
            machine,
            quick: args.quick,
            params,
            benches,
        };
        say!("{}", report.to_json());
    }
    Ok(())
}

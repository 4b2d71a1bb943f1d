//! Run the migration benchmark and write its chart:
//! `cargo run --release -p roam-bench --example migration_chart -- [--quick] PATH [NOTE]`
//! (what `docs/migration.svg` is made with). NOTE is printed under the chart after the
//! machine; the benchmark's table is printed too.

use roam_bench::{BoxError, Machine, Params};

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), BoxError> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    args.retain(|a| a != "--quick");
    let path = args
        .first()
        .ok_or("usage: migration_chart [--quick] PATH [NOTE]")?;
    let p = if quick {
        Params::quick()
    } else {
        Params::full()
    };
    let b = roam_bench::run("migration", &p).await?;
    print!("{}", b.table());
    let m = Machine::detect();
    let kernel = m.kernel.split_whitespace().nth(2).unwrap_or("?");
    let mut note = format!(
        "{}{} cpus, Linux {kernel}",
        if quick { "--quick, " } else { "" },
        m.cpus
    );
    if let Some(extra) = args.get(1) {
        note = format!("{note}; {extra}");
    }
    roam_bench::write_migration_chart(&[b], std::path::Path::new(path), &note)?;
    println!("chart written to {path}");
    Ok(())
}

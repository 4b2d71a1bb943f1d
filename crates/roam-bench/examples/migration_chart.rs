//! Run the migration benchmark and write its chart:
//! `cargo run --release -p roam-bench --example migration_chart -- [--quick] PATH`
//! (what `docs/migration.svg` is made with). Prints the benchmark's table too.

use roam_bench::{BoxError, Params};

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let path = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .ok_or("usage: migration_chart [--quick] PATH")?;
    let p = if quick {
        Params::quick()
    } else {
        Params::full()
    };
    let b = roam_bench::run("migration", &p).await?;
    print!("{}", b.table());
    roam_bench::write_migration_chart(&[b], std::path::Path::new(path))?;
    println!("chart written to {path}");
    Ok(())
}

//! The migration chart: roam's migration time (p50 and p99) against bytes in flight, quinn's
//! rebind as reference lines, drawn as SVG with plotters (SVG backend, its built-in text: no
//! font files or system libraries).

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

use crate::{Bench, BoxError};

/// Chart size in pixels.
const SIZE: (u32, u32) = (760, 460);

/// Bytes as a short label: `0 B`, `64 KiB`, `8 MiB`.
fn bytes_label(b: f64) -> String {
    let b = b as u64;
    if b == 0 {
        "0 B".into()
    } else if b >= 1 << 20 {
        format!("{} MiB", b >> 20)
    } else if b >= 1 << 10 {
        format!("{} KiB", b >> 10)
    } else {
        format!("{b} B")
    }
}

/// Log-scale ticks 1, 2, 5 × 10^k covering `lo..hi`.
fn key_points(lo: f64, hi: f64) -> Vec<f64> {
    let mut v = Vec::new();
    let mut decade = 10f64.powi(lo.log10().floor() as i32);
    // Bounded: at most 12 decades.
    for _ in 0..12 {
        for m in [1.0, 2.0, 5.0] {
            let t = m * decade;
            if t >= lo && t <= hi {
                v.push(t);
            }
        }
        decade *= 10.0;
        if decade > hi {
            break;
        }
    }
    v
}

/// The SVG chart of a [`crate::migration`] result: one x position per bytes-in-flight case
/// (evenly spaced, labelled), migration time in ms on a log scale, roam's p50 and p99 as lines
/// with points, and quinn's rebind p50 and p99 (the baseline of the 0-byte rows) as dashed
/// horizontal lines. `note` (e.g. where and how it was measured) is printed under the chart
/// with the counts.
pub fn migration_chart(b: &Bench, note: &str) -> Result<String, BoxError> {
    let series = |name: &str| -> Vec<(f64, f64)> {
        b.rows
            .iter()
            .filter_map(|r| {
                let p = r.point.as_ref()?;
                (p.series == name).then_some((p.x, r.roam.median))
            })
            .collect()
    };
    let (p50, p99) = (series("p50"), series("p99"));
    if p50.is_empty() {
        return Err(format!("{}: no migration rows to chart", b.name).into());
    }
    let mut xs: Vec<f64> = p50.iter().map(|&(x, _)| x).collect();
    xs.sort_by(|a, b| a.total_cmp(b));
    xs.dedup();
    let index = |x: f64| xs.iter().position(|&v| v == x).unwrap_or(0) as i32;
    let quinn: Vec<(&str, f64)> = b
        .rows
        .iter()
        .filter(|r| r.against.contains("quinn"))
        .filter_map(|r| Some((r.point.as_ref()?.series.as_str(), r.baseline?.median)))
        .collect();

    let values = p50
        .iter()
        .chain(&p99)
        .map(|&(_, y)| y)
        .chain(quinn.iter().map(|&(_, y)| y))
        .filter(|y| *y > 0.0);
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let (lo, hi) = if lo <= hi {
        (lo / 2.0, hi * 2.0)
    } else {
        (0.01, 100.0)
    };
    let n = xs.len() as i32;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "roam: one-stream migration time vs bytes in flight",
                ("sans-serif", 20),
            )
            .margin(16)
            .margin_bottom(40)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(
                // An i32 range includes its end: one segment per case.
                (0..n - 1).into_segmented(),
                (lo..hi).log_scale().with_key_points(key_points(lo, hi)),
            )?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc("bytes in flight at freeze")
            .y_desc("ms (log scale)")
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => xs
                    .get(*i as usize)
                    .map(|&x| bytes_label(x))
                    .unwrap_or_default(),
                SegmentValue::Last => String::new(),
            })
            .y_label_formatter(&|y| format!("{y}"))
            .label_style(("sans-serif", 13))
            .draw()?;

        let styles = [("p50", BLUE), ("p99", RED)];
        for (name, color) in styles {
            let pts: Vec<(SegmentValue<i32>, f64)> = series(name)
                .into_iter()
                .map(|(x, y)| (SegmentValue::CenterOf(index(x)), y))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                .label(format!("roam migration {name}"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart.draw_series(
                pts.iter()
                    .map(|p| Circle::new(p.clone(), 4, color.filled())),
            )?;
            chart.draw_series(pts.into_iter().map(|(x, y)| {
                let label = format!("{y:.2}");
                EmptyElement::at((x, y))
                    + Text::new(
                        label,
                        (8, -14),
                        ("sans-serif", 12).into_font().color(&color),
                    )
            }))?;
        }
        for (name, y) in &quinn {
            let color = if *name == "p50" { BLUE } else { RED };
            let line = vec![(SegmentValue::Exact(0), *y), (SegmentValue::Last, *y)];
            chart
                .draw_series(DashedLineSeries::new(line, 6, 4, color.mix(0.6).into()))?
                .label(format!("quinn Endpoint::rebind {name} (nothing in flight)"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.mix(0.6)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        let counts: Vec<String> = b
            .rows
            .iter()
            .filter(|r| r.point.as_ref().is_some_and(|p| p.series == "p50"))
            .filter_map(|r| Some(format!("{} {}", bytes_label(r.point.as_ref()?.x), r.roam.n)))
            .collect();
        root.draw_text(
            &format!(
                "migrations per case: {}; quinn rebinds: {}; loopback 127.0.0.x",
                counts.join(", "),
                b.rows.iter().find_map(|r| r.baseline).map_or(0, |s| s.n)
            ),
            &("sans-serif", 11).into_font().color(&BLACK.mix(0.6)),
            (12, SIZE.1 as i32 - 30),
        )?;
        root.draw_text(
            note,
            &("sans-serif", 11).into_font().color(&BLACK.mix(0.6)),
            (12, SIZE.1 as i32 - 16),
        )?;
        root.present()?;
    }
    Ok(svg)
}

/// Write the chart of the `migration` benchmark among `benches` to `path`, with `note`.
pub fn write_migration_chart(
    benches: &[Bench],
    path: &std::path::Path,
    note: &str,
) -> Result<(), BoxError> {
    let b = benches
        .iter()
        .find(|b| b.name == "migration")
        .ok_or("the chart needs the migration benchmark (it did not run)")?;
    std::fs::write(path, migration_chart(b, note)?)
        .map_err(|e| format!("writing {}: {e}", path.display()).into())
}

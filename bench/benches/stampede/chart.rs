//! The stampede chart (SVG): on the left the distribution of caller latency
//! per strategy (cumulative, log-scale latency), on the right the loader runs
//! per strategy (log scale), with the same colours.

use std::path::Path;

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

use crate::common::percentile;
use crate::{Options, Run, Strategy};

const COLOURS: [RGBColor; 7] = [
    RGBColor(214, 39, 40),  // red: no protection
    RGBColor(255, 127, 14), // orange
    RGBColor(188, 189, 34), // olive
    RGBColor(31, 119, 180), // blue
    RGBColor(44, 160, 44),  // green
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

/// Short name for the bar chart's axis.
fn short(run: &Run) -> String {
    match run.strategy {
        Strategy::NoProtection => "none".to_owned(),
        Strategy::PollingOnly => format!("poll/{}", run.masters),
        Strategy::AllOn => format!("all/{}", run.masters),
    }
}

/// Round latencies (ms) between `lo` and `hi` to label the log axis with.
fn key_points(lo: f64, hi: f64) -> Vec<f64> {
    let mut points = Vec::new();
    let mut decade = 0.01;
    while decade <= hi {
        for m in [1.0, 2.0, 3.0, 5.0] {
            let v = decade * m;
            if v >= lo && v <= hi {
                points.push(v);
            }
        }
        decade *= 10.0;
    }
    points
}

/// Writes the chart for the cold-key runs to `path`.
pub fn latency_cdf(path: &Path, runs: &[&Run], o: &Options, date: &str) {
    draw(path, runs, o, date).unwrap_or_else(|e| panic!("chart {}: {e}", path.display()));
}

fn draw(
    path: &Path,
    runs: &[&Run],
    o: &Options,
    date: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1100, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "{} callers ({} processes × {} tasks) on one cold key, loader {} ms — {date}",
        o.processes * o.tasks,
        o.processes,
        o.tasks,
        o.load_ms
    );
    let root = root.titled(&title, ("sans-serif", 20))?;
    let (left, right) = root.split_horizontally(760);

    // Latency distribution.
    let curves: Vec<Vec<f64>> = runs
        .iter()
        .map(|r| {
            r.latencies()
                .iter()
                .map(|&us| f64::from(us) / 1000.0)
                .collect()
        })
        .collect();
    let lo = curves
        .iter()
        .filter_map(|c| c.first().copied())
        .fold(f64::INFINITY, f64::min);
    let hi = curves
        .iter()
        .filter_map(|c| c.last().copied())
        .fold(0.0, f64::max);
    let (lo, hi) = if lo.is_finite() && hi > 0.0 {
        // Room on the right for the legend.
        ((lo / 1.3).max(0.05), hi * 2.5)
    } else {
        (0.1, 1000.0)
    };
    let mut chart = ChartBuilder::on(&left)
        .caption("caller latency (cumulative)", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(
            (lo..hi).log_scale().with_key_points(key_points(lo, hi)),
            0f64..100f64,
        )?;
    chart
        .configure_mesh()
        .x_desc("latency, ms (log scale)")
        .y_desc("callers done, %")
        .light_line_style(BLACK.mix(0.04))
        .x_label_formatter(&|v| format!("{v}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    let load = o.load_ms as f64;
    if load > lo && load < hi {
        chart
            .draw_series(LineSeries::new(
                vec![(load, 0.0), (load, 100.0)],
                BLACK.mix(0.35).stroke_width(1),
            ))?
            .label(format!("loader time ({} ms)", o.load_ms))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.35)));
    }
    for (i, (run, curve)) in runs.iter().zip(&curves).enumerate() {
        let n = curve.len().max(1) as f64;
        let mut points = Vec::with_capacity(curve.len() * 2 + 1);
        let mut previous = 0.0;
        for (j, &x) in curve.iter().enumerate() {
            points.push((x, previous));
            previous = 100.0 * (j + 1) as f64 / n;
            points.push((x, previous));
        }
        let p99 = percentile(&run.latencies(), 99.0);
        let style = colour(i).stroke_width(2);
        chart
            .draw_series(LineSeries::new(points, style))?
            .label(format!(
                "{}: {} load{}, p99 {:.0} ms",
                run.label(),
                run.loader_runs,
                if run.loader_runs == 1 { "" } else { "s" },
                f64::from(p99) / 1000.0
            ))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 13))
        .draw()?;

    // Loader runs.
    let most = runs.iter().map(|r| r.loader_runs).max().unwrap_or(1).max(1) as f64;
    let names: Vec<String> = runs.iter().map(|r| short(r)).collect();
    let mut bars = ChartBuilder::on(&right)
        .caption("loader runs (log scale)", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(
            (0..runs.len()).into_segmented(),
            (0.5f64..most * 3.0).log_scale(),
        )?;
    bars.configure_mesh()
        .disable_x_mesh()
        .x_labels(runs.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                names.get(*i).cloned().unwrap_or_default()
            }
            SegmentValue::Last => String::new(),
        })
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    for (i, run) in runs.iter().enumerate() {
        let runs = (run.loader_runs as f64).max(0.5);
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.5),
                (SegmentValue::Exact(i + 1), runs),
            ],
            colour(i).filled(),
        );
        bar.set_margin(0, 0, 8, 8);
        bars.draw_series(std::iter::once(bar))?;
        bars.draw_series(std::iter::once(Text::new(
            run.loader_runs.to_string(),
            (SegmentValue::CenterOf(i), runs * 1.25),
            ("sans-serif", 14),
        )))?;
    }
    root.present()?;
    Ok(())
}

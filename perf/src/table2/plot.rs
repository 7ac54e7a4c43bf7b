//! SVG plots of a table2 run (plotters' SVG backend: text is written as
//! `<text>` elements, so no font library is needed to draw them).

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::Options;
use super::report::Row;
use super::scenario::{Config, Direction, paper, rate_name};
use super::stats::{Cells, Measured};
use crate::BenchError;

fn failed<E: std::fmt::Debug>(path: &Path) -> impl Fn(E) -> BenchError + '_ {
    move |e| BenchError::Setup(format!("cannot draw {}: {e:?}", path.display()))
}

/// Writes every plot into `dir` and returns their paths.
pub(super) fn write_all(
    dir: &Path,
    rows: &[Row],
    cells: &Cells,
    options: &Options,
) -> Result<Vec<PathBuf>, BenchError> {
    let throughput = dir.join("table2-throughput.svg");
    draw_throughput(&throughput, cells, options)?;
    let ratios = dir.join("table2-ratio.svg");
    draw_ratios(&ratios, rows)?;
    let hold = dir.join("table2-held-output.svg");
    draw_hold(&hold, cells, options)?;
    Ok(vec![throughput, ratios, hold])
}

/// A bar with whiskers: label, (median, min, max), colour index.
struct Bar {
    label: String,
    value: (f64, f64, f64),
    colour: usize,
}

fn bar_chart(
    path: &Path,
    caption: &str,
    y_desc: &str,
    bars: &[Bar],
    references: &[(String, usize, f64)],
) -> Result<(), BenchError> {
    let fail = failed(path);
    let n = i32::try_from(bars.len()).unwrap_or(i32::MAX).max(1);
    let top = bars
        .iter()
        .map(|b| b.value.2)
        .chain(references.iter().map(|r| r.2))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.15;
    let root = SVGBackend::new(path, (200 + 110 * bars.len() as u32, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(&fail)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        // Discrete ranges are inclusive: 0..n-1 makes n segments.
        .build_cartesian_2d((0..n - 1).into_segmented(), 0f64..top)
        .map_err(&fail)?;
    let labels: Vec<String> = bars.iter().map(|b| b.label.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => usize::try_from(*i)
                .ok()
                .and_then(|i| labels.get(i))
                .cloned()
                .unwrap_or_default(),
            _ => String::new(),
        })
        .y_label_formatter(&|y| {
            if top > 10.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.2}")
            }
        })
        .y_desc(y_desc)
        .draw()
        .map_err(&fail)?;
    chart
        .draw_series(
            Histogram::vertical(&chart)
                .margin(14)
                .style_func(|x, _| {
                    let index = match x {
                        SegmentValue::Exact(i) | SegmentValue::CenterOf(i) => *i,
                        SegmentValue::Last => 0,
                    };
                    let colour = usize::try_from(index)
                        .ok()
                        .and_then(|i| bars.get(i))
                        .map_or(0, |b| b.colour);
                    Palette99::pick(colour).mix(0.8).filled()
                })
                .data(
                    bars.iter()
                        .enumerate()
                        .filter(|(_, b)| b.value.0.is_finite())
                        .map(|(i, b)| (i32::try_from(i).unwrap_or(0), b.value.0)),
                ),
        )
        .map_err(&fail)?;
    chart
        .draw_series(
            bars.iter()
                .enumerate()
                .filter(|(_, b)| b.value.0.is_finite())
                .map(|(i, b)| {
                    ErrorBar::new_vertical(
                        SegmentValue::CenterOf(i32::try_from(i).unwrap_or(0)),
                        b.value.1,
                        b.value.0,
                        b.value.2,
                        BLACK.stroke_width(2),
                        14,
                    )
                }),
        )
        .map_err(&fail)?;
    // Say so where a configuration produced no figure.
    chart
        .draw_series(
            bars.iter()
                .enumerate()
                .filter(|(_, b)| !b.value.0.is_finite())
                .map(|(i, _)| {
                    Text::new(
                        "failed",
                        (
                            SegmentValue::CenterOf(i32::try_from(i).unwrap_or(0)),
                            top * 0.03,
                        ),
                        ("sans-serif", 14).into_font().color(&RED),
                    )
                }),
        )
        .map_err(&fail)?;
    // Reference marks over single bars (paper figures, goal).
    for (label, colour) in dedup_labels(references) {
        let style = Palette99::pick(colour).stroke_width(3);
        let marks: Vec<(usize, f64)> = references
            .iter()
            .filter(|r| r.0 == label && r.2.is_finite())
            .enumerate()
            .map(|(bar, r)| (bar, r.2))
            .collect();
        chart
            .draw_series(marks.iter().map(|(bar, y)| {
                let bar = i32::try_from(*bar).unwrap_or(0);
                PathElement::new(
                    vec![
                        (SegmentValue::Exact(bar), *y),
                        (SegmentValue::Exact(bar + 1), *y),
                    ],
                    style,
                )
            }))
            .map_err(&fail)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    if !references.is_empty() {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(&fail)?;
    }
    root.present().map_err(&fail)?;
    Ok(())
}

/// Distinct reference labels in order of appearance, with their colours.
fn dedup_labels(references: &[(String, usize, f64)]) -> Vec<(String, usize)> {
    let mut labels: Vec<(String, usize)> = Vec::new();
    for (label, colour, _) in references {
        if !labels.iter().any(|(l, _)| l == label) {
            labels.push((label.clone(), *colour));
        }
    }
    labels
}

fn draw_throughput(path: &Path, cells: &Cells, options: &Options) -> Result<(), BenchError> {
    let mut bars = Vec::new();
    for direction in Direction::ALL {
        for (index, scenario) in options.scenarios.iter().enumerate() {
            for (colour, config) in scenario.configs().into_iter().enumerate() {
                let s = cells.values(index, config, direction, |m| m.mbit_s);
                let link = scenario
                    .client_mbit
                    .map_or_else(|| "unshaped".to_string(), rate_name);
                bars.push(Bar {
                    label: format!("{} {link} {}", direction.name(), config.label()),
                    value: (s.median, s.min, s.max),
                    colour,
                });
            }
        }
    }
    bar_chart(
        path,
        &format!(
            "Guest TCP throughput (median, min..max of {} rounds)",
            options.rounds
        ),
        "Mbit/s",
        &bars,
        &[],
    )
}

fn draw_ratios(path: &Path, rows: &[Row]) -> Result<(), BenchError> {
    let bars: Vec<Bar> = rows
        .iter()
        .map(|row| Bar {
            label: row.key.clone(),
            value: (row.ratio.median, row.ratio.min, row.ratio.max),
            colour: if row.variant.transport == super::scenario::Transport::Shm {
                2
            } else {
                1
            },
        })
        .collect();
    // One reference per bar and label, in bar order (the chart places the
    // i-th reference of a label over bar i).
    let mut references = Vec::new();
    references.extend(
        rows.iter()
            .map(|row| ("goal".to_string(), 3, row.variant.goal())),
    );
    for row in rows {
        references.push((
            "paper, same logging link".to_string(),
            5,
            row.paper_ft()
                .map_or(f64::NAN, |(ft, _)| ft / paper(row.direction).ft_off),
        ));
    }
    bar_chart(
        path,
        "FT on / FT off (paired per round; median, min..max)",
        "ratio",
        &bars,
        &references,
    )
}

fn draw_hold(path: &Path, cells: &Cells, options: &Options) -> Result<(), BenchError> {
    let fail = failed(path);
    // nines: p50 = 0.3, p90 = 1, p99 = 2, p99.9 = 3.
    let nines = |q: f64| -(1.0 - q).log10();
    let mut curves: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for direction in Direction::ALL {
        for (index, scenario) in options.scenarios.iter().enumerate() {
            for &variant in &scenario.variants {
                let config = Config::FtOn(variant);
                let mut quantiles: Vec<f64> = cells
                    .ok(index, config, direction)
                    .flat_map(|m: &Measured| m.hold_us.iter().map(|(q, _)| *q))
                    .filter(|q| *q < 1.0)
                    .collect();
                quantiles.sort_by(f64::total_cmp);
                quantiles.dedup();
                let points: Vec<(f64, f64)> = quantiles
                    .into_iter()
                    .map(|q| {
                        (
                            nines(q),
                            cells
                                .values(index, config, direction, |m| m.hold_at(q))
                                .median,
                        )
                    })
                    .filter(|(_, us)| us.is_finite() && *us > 0.0)
                    .collect();
                if !points.is_empty() {
                    curves.push((scenario.key(direction, variant), points));
                }
            }
        }
    }
    let top = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(10.0f64, f64::max)
        * 2.0;
    let bottom = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(top, f64::min)
        .clamp(0.1, 10.0)
        / 2.0;
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(&fail)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Held output: time from the guest's send to release (FT on)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..3.3, (bottom..top).log_scale())
        .map_err(&fail)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("µs (log scale)")
        .x_labels(8)
        .x_label_formatter(&|x| {
            // Label whole nines only: p0, p90, p99, p99.9.
            if (x - x.round()).abs() > 1e-6 {
                return String::new();
            }
            let percent = 100.0 * (1.0 - 10f64.powf(-x.round()));
            format!("p{}", (percent * 1000.0).round() / 1000.0)
        })
        .draw()
        .map_err(&fail)?;
    for (index, (label, points)) in curves.iter().enumerate() {
        let style = Palette99::pick(index + 1).stroke_width(2);
        chart
            .draw_series(LineSeries::new(points.iter().copied(), style))
            .map_err(&fail)?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        chart
            .draw_series(
                points
                    .iter()
                    .map(|&(x, y)| Circle::new((x, y), 4, Palette99::pick(index + 1).filled())),
            )
            .map_err(&fail)?;
    }
    if !curves.is_empty() {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(&fail)?;
    }
    root.present().map_err(&fail)?;
    Ok(())
}

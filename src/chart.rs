//! `avex compare --chart FILE.svg`: one SVG drawn with `plotters` (SVG backend
//! only, its own text metrics: no system fonts or libraries needed). On top, VM
//! exits per guest and run (every mode, coalesced runs included), log scale;
//! below, one panel per guest with the distance between consecutive exits
//! (Agesen et al., Figure 5): the share of gaps in each log2 bucket of guest
//! instructions, a line per run. The numbers drawn are also listed in the SVG's
//! `<desc>`, for readers and tests.

use avex_core::distance::ExitDistance;
use avex_core::exit::Mode;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::backend::variant_name;
use crate::compare::Row;
use crate::record::RunRecord;

/// One colour per run, in the order runs first appear (off, dynamic, aot,
/// aot+dynamic, then the coalesced ones).
const COLORS: [RGBColor; 6] = [
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xc7, 0xc7, 0xc7),
    RGBColor(0x98, 0xdf, 0x8a),
];

const WIDTH: u32 = 1100;
const EXITS_HEIGHT: u32 = 380;
const PANEL_HEIGHT: u32 = 220;
const PANELS_PER_ROW: usize = 3;

struct Layout<'a> {
    guests: Vec<&'a str>,
    runs: Vec<(Mode, bool)>,
}

impl<'a> Layout<'a> {
    fn of(rows: &'a [Row]) -> Layout<'a> {
        let mut guests: Vec<&str> = Vec::new();
        let mut runs: Vec<(Mode, bool)> = Vec::new();
        for r in rows {
            if !guests.contains(&r.guest.as_str()) {
                guests.push(&r.guest);
            }
            if !runs.contains(&(r.mode, r.coalesced)) {
                runs.push((r.mode, r.coalesced));
            }
        }
        Layout { guests, runs }
    }

    fn record(&self, rows: &'a [Row], guest: &str, run: (Mode, bool)) -> Option<&'a RunRecord> {
        rows.iter()
            .find(|r| r.guest == guest && (r.mode, r.coalesced) == run)
            .and_then(|r| r.result.as_ref().ok())
    }

    fn color(&self, run: (Mode, bool)) -> RGBColor {
        let i = self.runs.iter().position(|&r| r == run).unwrap_or(0);
        COLORS[i % COLORS.len()]
    }
}

type DrawResult<T> = Result<T, String>;

fn err<E: std::fmt::Debug>(e: E) -> String {
    format!("{e:?}")
}

/// The chart as an SVG document.
pub fn chart_svg(rows: &[Row]) -> anyhow::Result<String> {
    let l = Layout::of(rows);
    let panel_rows = l.guests.len().div_ceil(PANELS_PER_ROW).max(1);
    let height = EXITS_HEIGHT + PANEL_HEIGHT * panel_rows as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        draw(&root, rows, &l, panel_rows).map_err(|e| anyhow::anyhow!("drawing the chart: {e}"))?;
        root.present()
            .map_err(|e| anyhow::anyhow!("drawing the chart: {e:?}"))?;
    }
    Ok(with_desc(svg, &description(rows, &l)))
}

fn draw(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    rows: &[Row],
    l: &Layout<'_>,
    panel_rows: usize,
) -> DrawResult<()> {
    root.fill(&WHITE).map_err(err)?;
    let (top, bottom) = root.split_vertically(EXITS_HEIGHT);
    draw_exits(&top, rows, l)?;
    let panels = bottom.split_evenly((panel_rows, PANELS_PER_ROW));
    for (g, area) in l.guests.iter().zip(panels.iter()) {
        draw_distance(area, rows, l, g)?;
    }
    Ok(())
}

/// Grouped bars: exits per guest, one bar per run, log scale.
fn draw_exits(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    rows: &[Row],
    l: &Layout<'_>,
) -> DrawResult<()> {
    let max = rows
        .iter()
        .filter_map(|r| r.result.as_ref().ok().map(|x| x.exits))
        .max()
        .unwrap_or(1)
        .max(10);
    let n = l.guests.len().max(1) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption("VM exits per guest and run (log scale)", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(25)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..n, (1u64..max * 50).log_scale())
        .map_err(err)?;
    let guests = l.guests.clone();
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .disable_x_mesh()
        .x_labels(l.guests.len() * 2 + 1)
        .x_label_formatter(&move |x| {
            // Label each group at its centre only.
            let i = x.floor();
            if (x - i - 0.5).abs() < 1e-6 {
                guests
                    .get(i as usize)
                    .map_or(String::new(), |g| g.to_string())
            } else {
                String::new()
            }
        })
        .y_desc("exits")
        .draw()
        .map_err(err)?;
    let bar = 0.8 / l.runs.len().max(1) as f64;
    for (ri, &run) in l.runs.iter().enumerate() {
        let color = l.color(run);
        let bars: Vec<Rectangle<(f64, u64)>> = l
            .guests
            .iter()
            .enumerate()
            .filter_map(|(gi, g)| {
                let rec = l.record(rows, g, run)?;
                let x0 = gi as f64 + 0.1 + ri as f64 * bar;
                Some(Rectangle::new(
                    [(x0, 1), (x0 + bar * 0.9, rec.exits.max(1))],
                    color.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(err)?
            .label(variant_name(run.0, run.1))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}

/// One guest's exit distance: per run, the share of gaps in each log2 bucket.
fn draw_distance(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    rows: &[Row],
    l: &Layout<'_>,
    guest: &str,
) -> DrawResult<()> {
    let hists: Vec<((Mode, bool), &ExitDistance)> = l
        .runs
        .iter()
        .filter_map(|&run| {
            let d = l.record(rows, guest, run)?.stats.exit_distance.as_ref()?;
            (d.gaps > 0).then_some((run, d))
        })
        .collect();
    let buckets = hists
        .iter()
        .map(|(_, d)| d.log2_buckets.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let caption = if hists.is_empty() {
        format!("{guest}: exit distance not measured")
    } else {
        format!("{guest}: guest instructions between exits (log2 buckets)")
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 13))
        .margin(8)
        .x_label_area_size(20)
        .y_label_area_size(40)
        .build_cartesian_2d(0f64..buckets as f64, 0f64..100f64)
        .map_err(err)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_labels(buckets.min(12))
        .x_label_formatter(&|x| ExitDistance::bucket_label(x.round().max(0.0) as usize))
        .y_labels(5)
        .y_label_formatter(&|y| format!("{y:.0}"))
        .y_desc("% of gaps")
        .draw()
        .map_err(err)?;
    for (run, d) in hists {
        let color = l.color(run);
        let points: Vec<(f64, f64)> = (0..buckets)
            .map(|i| {
                let c = d.log2_buckets.get(i).copied().unwrap_or(0);
                (i as f64, c as f64 * 100.0 / d.gaps as f64)
            })
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(err)?;
    }
    Ok(())
}

/// What the chart shows, as text: each run's exits and its distance buckets.
fn description(rows: &[Row], l: &Layout<'_>) -> String {
    let mut lines = Vec::new();
    for g in &l.guests {
        for &run in &l.runs {
            let Some(rec) = l.record(rows, g, run) else {
                continue;
            };
            let mut line = format!("{g} {}: {} exits", variant_name(run.0, run.1), rec.exits);
            if let Some(d) = &rec.stats.exit_distance {
                line += &format!("; gaps by log2 bucket {:?}", d.log2_buckets);
            }
            lines.push(line);
        }
    }
    lines.join("\n")
}

/// `svg` with a `<desc>` (escaped `text`) as the root element's first child.
fn with_desc(svg: String, text: &str) -> String {
    let esc = text
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    match svg
        .find("<svg")
        .and_then(|i| svg[i..].find('>').map(|j| i + j + 1))
    {
        Some(at) => format!("{}\n<desc>{esc}</desc>{}", &svg[..at], &svg[at..]),
        None => svg,
    }
}

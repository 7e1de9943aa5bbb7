//! Line charts for the experiments' results, drawn as PNG with `plotters`: one or more charts side
//! by side, each with lines through the means, vertical error bars (low..high) and a legend.
//!
//! Text is rendered with a TrueType font read at run time (pure Rust, no fontconfig): pass its
//! path to [`draw_png`]; [`find_font`] looks for DejaVu Sans (Debian: `fonts-dejavu-core`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context};
use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// One line: a label and points (x, mean, low, high) — drawn as a line through the means with a
/// vertical error bar from low to high at each point (skip the bar when low == high).
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Points `(x, mean, low, high)`, in the order the line joins them.
    pub points: Vec<(f64, f64, f64, f64)>,
}

/// A chart.
pub struct Chart<'a> {
    /// Caption above the chart.
    pub title: &'a str,
    /// Description under the x axis.
    pub x_label: &'a str,
    /// Description left of the y axis.
    pub y_label: &'a str,
    /// Logarithmic x axis (x must be > 0; other points are left out), with a tick at every x
    /// value of the data when there are few of them.
    pub log_x: bool,
    /// The y axis, `(bottom, top)`; error bars are clipped to it.
    pub y_range: (f64, f64),
    /// The lines, each with its own color and legend entry.
    pub series: &'a [Series],
}

/// Width of one chart in pixels; the PNG is this times the number of charts.
const CHART_WIDTH: u32 = 700;
/// Height of the PNG in pixels.
const HEIGHT: u32 = 480;
/// The family name under which the font is registered with plotters.
const FAMILY: &str = "sans-serif";

/// Series colors, in order (Tableau 10).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The font file registered with plotters so far (registration leaks the font's bytes, so it is
/// done once per distinct file).
static REGISTERED: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Draws `charts` side by side (one row) into a PNG of width 700·len × height 480 at `path`, with
/// the font at `font` (a .ttf file). Errors (missing font, I/O) as anyhow errors naming the file.
pub fn draw_png(path: &Path, font: &Path, charts: &[Chart<'_>]) -> anyhow::Result<()> {
    if charts.is_empty() {
        bail!("{}: no charts to draw", path.display());
    }
    for c in charts {
        let (lo, hi) = c.y_range;
        if !(lo.is_finite() && hi.is_finite() && lo < hi) {
            bail!(
                "{}: chart {:?} has an invalid y range {lo}..{hi}",
                path.display(),
                c.title
            );
        }
    }
    use_font(font)?;
    let failed = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    let width = u32::try_from(charts.len())
        .ok()
        .and_then(|n| n.checked_mul(CHART_WIDTH))
        .ok_or_else(|| anyhow!("{}: too many charts ({})", path.display(), charts.len()))?;
    let root = BitMapBackend::new(path, (width, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| failed(&e))?;
    let areas = root.split_evenly((1, charts.len()));
    for (area, chart) in areas.iter().zip(charts) {
        draw_chart(area, chart).map_err(|e| failed(&e))?;
    }
    root.present().map_err(|e| failed(&e))?;
    Ok(())
}

/// The first existing file among the usual locations of DejaVu Sans (Debian's fonts-dejavu-core:
/// /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf, and a few other common paths), or None.
pub fn find_font() -> Option<PathBuf> {
    const CANDIDATES: [&str; 7] = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", // Debian, Ubuntu
        "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf", // Fedora
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",          // older Fedora, Alpine
        "/usr/share/fonts/TTF/DejaVuSans.ttf",             // Arch
        "/usr/share/fonts/truetype/DejaVuSans.ttf",
        "/usr/local/share/fonts/DejaVuSans.ttf",
        "/usr/local/share/fonts/dejavu/DejaVuSans.ttf", // FreeBSD
    ];
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let user = home.iter().flat_map(|h| {
        [
            h.join(".local/share/fonts/DejaVuSans.ttf"),
            h.join(".fonts/DejaVuSans.ttf"),
        ]
    });
    CANDIDATES
        .iter()
        .map(PathBuf::from)
        .chain(user)
        .find(|p| p.is_file())
}

/// Registers the font at `font` as plotters' sans-serif font, unless it already is.
fn use_font(font: &Path) -> anyhow::Result<()> {
    let mut registered = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
    if registered.as_deref() == Some(font) {
        return Ok(());
    }
    let bytes = std::fs::read(font).with_context(|| format!("reading font {}", font.display()))?;
    // plotters keeps fonts for the whole process and wants `'static` bytes.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font(FAMILY, FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{}: not a TrueType/OpenType font", font.display()))?;
    *registered = Some(font.to_path_buf());
    Ok(())
}

/// Draws one chart into `area`, choosing the x axis.
fn draw_chart(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    c: &Chart<'_>,
) -> anyhow::Result<()> {
    let keep = |x: f64| x.is_finite() && (!c.log_x || x > 0.0);
    let xs: Vec<f64> = c
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .filter(|&x| keep(x))
        .collect();
    let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if c.log_x {
        let (lo, hi) = if xs.is_empty() {
            (0.01, 1.0)
        } else {
            (min / 1.3, max * 1.3)
        };
        let ticks = log_ticks(&xs, lo, hi);
        draw_with_x(area, c, (lo..hi).log_scale().with_key_points(ticks), &keep)
    } else {
        let (lo, hi) = if xs.is_empty() {
            (0.0, 1.0)
        } else if max > min {
            let pad = (max - min) * 0.04;
            (min - pad, max + pad)
        } else {
            (min - 1.0, max + 1.0)
        };
        draw_with_x(area, c, RangedCoordf64::from(lo..hi), &keep)
    }
}

/// Ticks of a log axis over `lo..hi`: every distinct x of the data when there are at most 12,
/// else 1, 2, 5 times the powers of ten.
fn log_ticks(xs: &[f64], lo: f64, hi: f64) -> Vec<f64> {
    let mut distinct = xs.to_vec();
    distinct.sort_by(f64::total_cmp);
    distinct.dedup_by(|a, b| (*a - *b).abs() <= 1e-9 * b.abs());
    if distinct.len() <= 12 {
        return distinct;
    }
    let mut ticks = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let t = decade * m;
            if (lo..=hi).contains(&t) {
                ticks.push(t);
            }
        }
        decade *= 10.0;
    }
    ticks
}

/// Draws one chart into `area` with the x axis `x`; points whose x fails `keep` are left out.
fn draw_with_x<X>(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    c: &Chart<'_>,
    x: X,
    keep: &dyn Fn(f64) -> bool,
) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let (y_lo, y_hi) = c.y_range;
    let failed = |e: &dyn std::fmt::Display| anyhow!("chart {:?}: {e}", c.title);
    let mut chart = ChartBuilder::on(area)
        .caption(c.title, (FAMILY, 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x, y_lo..y_hi)
        .map_err(|e| failed(&e))?;
    chart
        .configure_mesh()
        .x_desc(c.x_label)
        .y_desc(c.y_label)
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 15))
        .x_label_formatter(&|v| plain_number(*v))
        .y_label_formatter(&|v| plain_number(*v))
        .light_line_style(RGBColor(244, 244, 244))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()
        .map_err(|e| failed(&e))?;

    for (i, s) in c.series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let points: Vec<(f64, f64, f64, f64)> =
            s.points.iter().copied().filter(|p| keep(p.0)).collect();
        // Error bars (clipped to the y range), with 8-pixel caps.
        let style = color.stroke_width(1);
        let bars: Vec<(f64, f64, f64)> = points
            .iter()
            .filter(|p| p.2 != p.3)
            .map(|&(x, _, low, high)| {
                (
                    x,
                    low.min(high).clamp(y_lo, y_hi),
                    low.max(high).clamp(y_lo, y_hi),
                )
            })
            .collect();
        chart
            .draw_series(
                bars.iter()
                    .map(|&(x, low, high)| PathElement::new([(x, low), (x, high)], style)),
            )
            .map_err(|e| failed(&e))?;
        let caps = bars
            .iter()
            .flat_map(|&(x, low, high)| [(x, low), (x, high)]);
        let caps = caps.map(|at| EmptyElement::at(at) + PathElement::new([(-4, 0), (4, 0)], style));
        chart.draw_series(caps).map_err(|e| failed(&e))?;
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.0, p.1)),
                color.stroke_width(2),
            ))
            .map_err(|e| failed(&e))?
            .label(s.label.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart
            .draw_series(
                points
                    .iter()
                    .map(|p| Circle::new((p.0, p.1), 3, color.filled())),
            )
            .map_err(|e| failed(&e))?;
    }

    if c.series.iter().any(|s| !s.label.is_empty()) {
        chart
            .configure_series_labels()
            .position(legend_corner(c, keep))
            .label_font((FAMILY, 14))
            .background_style(WHITE)
            .border_style(BLACK)
            .margin(10)
            .draw()
            .map_err(|e| failed(&e))?;
    }
    Ok(())
}

/// The corner of the plot with the fewest data points near it (ties: upper right, upper left,
/// lower right, lower left).
fn legend_corner(c: &Chart<'_>, keep: &dyn Fn(f64) -> bool) -> SeriesLabelPosition {
    let xs = c
        .series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|p| keep(p.0));
    let fx = |x: f64| if c.log_x { x.ln() } else { x };
    let (x_lo, x_hi) = xs
        .clone()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(fx(p.0)), b.max(fx(p.0)))
        });
    let (y_lo, y_hi) = c.y_range;
    // Corner boxes: the outer 45% of the width and 40% of the height.
    let mut counts = [0usize; 4]; // upper right, upper left, lower right, lower left
    for p in xs {
        let u = if x_hi > x_lo {
            (fx(p.0) - x_lo) / (x_hi - x_lo)
        } else {
            0.5
        };
        for y in [p.1, p.2, p.3] {
            let v = (y - y_lo) / (y_hi - y_lo);
            let (right, left) = (u >= 0.55, u <= 0.45);
            let (top, bottom) = (v >= 0.6, v <= 0.4);
            for (k, hit) in [top && right, top && left, bottom && right, bottom && left]
                .into_iter()
                .enumerate()
            {
                counts[k] += usize::from(hit);
            }
        }
    }
    let best = (0..4).min_by_key(|&k| (counts[k], k)).unwrap_or(0);
    [
        SeriesLabelPosition::UpperRight,
        SeriesLabelPosition::UpperLeft,
        SeriesLabelPosition::LowerRight,
        SeriesLabelPosition::LowerLeft,
    ][best]
        .clone()
}

/// `v` as a plain number with up to 4 significant digits and no trailing zeros (0.05, 1, 0.3).
fn plain_number(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return if v == 0.0 { "0".into() } else { v.to_string() };
    }
    let decimals = (3 - v.abs().log10().floor() as i32).clamp(0, 12) as usize;
    let s = format!("{v:.decimals$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        &s
    };
    if s == "-0" {
        "0".into()
    } else {
        s.to_string()
    }
}

//! SVG plot of used against allocated, one panel per (method, resource).
//!
//! A few line series on labelled axes, written as SVG directly: a plotting library would bring
//! more code into the `prescient` binary than the plot takes, and the C library's libm with it
//! (its text layout and tick placement use sin, cos and pow; see docs/memory.md).

use predictor::resource::{PerResource, Resource};
use std::path::Path;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PlotError {
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("nothing to plot")]
    Empty,
}

/// One method's allocation series, window by window.
pub struct Series<'a> {
    pub method: &'a str,
    pub allocated: &'a PerResource<Vec<f64>>,
    /// The upper forecast the allocation followed, drawn in red where given.
    pub forecast: Option<&'a PerResource<Vec<f64>>>,
}

/// Panels get at most this many points; longer series keep each chunk's maximum so that
/// peaks and shortfalls stay visible.
const MAX_POINTS: usize = 600;

/// Pixels: a panel, the title above all panels, and within a panel the margin, the caption
/// above the plot area and the tick labels left of and below it.
const PANEL: (f64, f64) = (320.0, 200.0);
const TITLE_H: f64 = 40.0;
const MARGIN: f64 = 6.0;
const CAPTION_H: f64 = 20.0;
const Y_LABELS_W: f64 = 45.0;
const X_LABELS_H: f64 = 20.0;

fn downsample(v: &[f64], window_s: f64) -> Vec<(f64, f64)> {
    let chunk = v.len().div_ceil(MAX_POINTS).max(1);
    v.chunks(chunk)
        .enumerate()
        .map(|(i, c)| {
            (
                (i * chunk) as f64 * window_s,
                c.iter().copied().fold(0.0, f64::max),
            )
        })
        .collect()
}

/// Ticks over [0, max] (max > 0): about five multiples of 1, 2 or 5 times a power of ten,
/// with the decimals their labels need.
fn ticks(max: f64) -> (Vec<f64>, usize) {
    let raw = max / 5.0;
    let mut power = 1.0;
    while power * 10.0 <= raw {
        power *= 10.0;
    }
    while power > raw {
        power /= 10.0;
    }
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power);
    let (mut decimals, mut unit) = (0, step);
    while unit < 0.999 && decimals < 9 {
        unit *= 10.0;
        decimals += 1;
    }
    // Truncation is the floor here: both are positive.
    let n = (max / step + 1e-9) as usize;
    ((0..=n).map(|i| i as f64 * step).collect(), decimals)
}

/// `text` with the characters SVG gives a meaning escaped.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn text(svg: &mut String, (x, y): (f64, f64), size: u32, anchor: &str, s: &str) {
    svg.push_str(&format!(
        "<text x=\"{x:.1}\" y=\"{y:.1}\" font-size=\"{size}\" text-anchor=\"{anchor}\">{}</text>\n",
        escape(s)
    ));
}

fn line(svg: &mut String, (x1, y1): (f64, f64), (x2, y2): (f64, f64), style: &str) {
    svg.push_str(&format!(
        "<line x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\" {style}/>\n"
    ));
}

/// One panel at `origin`: its caption, axes with ticks, grid lines and labels over [0, x_max]
/// and [0, y_max] (both > 0), and each series as a polyline in its colour.
fn panel(
    svg: &mut String,
    origin: (f64, f64),
    caption: &str,
    (x_max, y_max): (f64, f64),
    series: &[(&[(f64, f64)], &str)],
) {
    let (left, top) = (
        origin.0 + MARGIN + Y_LABELS_W,
        origin.1 + MARGIN + CAPTION_H,
    );
    let (right, bottom) = (
        origin.0 + PANEL.0 - MARGIN,
        origin.1 + PANEL.1 - MARGIN - X_LABELS_H,
    );
    let px = |x: f64| left + (right - left) * x / x_max;
    let py = |y: f64| bottom - (bottom - top) * y / y_max;
    text(
        svg,
        (origin.0 + PANEL.0 / 2.0, origin.1 + MARGIN + 12.0),
        12,
        "middle",
        caption,
    );
    let grid = "stroke=\"#000\" stroke-opacity=\"0.2\"";
    let axis = "stroke=\"#000\"";
    let (xs, x_decimals) = ticks(x_max);
    for x in xs {
        line(svg, (px(x), top), (px(x), bottom), grid);
        line(svg, (px(x), bottom), (px(x), bottom + 4.0), axis);
        let label = format!("{x:.x_decimals$}");
        text(svg, (px(x), bottom + 14.0), 10, "middle", &label);
    }
    let (ys, y_decimals) = ticks(y_max);
    for y in ys {
        line(svg, (left, py(y)), (right, py(y)), grid);
        line(svg, (left - 4.0, py(y)), (left, py(y)), axis);
        let label = format!("{y:.y_decimals$}");
        text(svg, (left - 6.0, py(y) + 3.5), 10, "end", &label);
    }
    line(svg, (left, top), (left, bottom), axis);
    line(svg, (left, bottom), (right, bottom), axis);
    text(svg, (right, bottom + X_LABELS_H), 10, "end", "s");
    for (points, colour) in series {
        let points: Vec<String> = points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" points=\"{}\"/>\n",
            points.join(" ")
        ));
    }
}

pub fn plot(
    path: &Path,
    title: &str,
    window_ms: u64,
    used: &PerResource<Vec<f64>>,
    methods: &[Series],
) -> Result<(), PlotError> {
    if methods.is_empty() || used.cpu.is_empty() {
        return Err(PlotError::Empty);
    }
    let window_s = window_ms as f64 / 1000.0;
    let cols = Resource::ALL.len();
    let (width, height) = (
        PANEL.0 * cols as f64,
        TITLE_H + PANEL.1 * methods.len() as f64,
    );
    let mut svg = format!(
        "<svg width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" \
         xmlns=\"http://www.w3.org/2000/svg\" font-family=\"sans-serif\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>\n"
    );
    text(
        &mut svg,
        (width / 2.0, 26.0),
        16,
        "middle",
        &format!("{title}: used (black) vs allocated (blue), forecast (red)"),
    );
    for (row, m) in methods.iter().enumerate() {
        for (col, r) in Resource::ALL.into_iter().enumerate() {
            let used_pts = downsample(&used[r], window_s);
            let alloc_pts = downsample(&m.allocated[r], window_s);
            let forecast_pts = m
                .forecast
                .map(|f| downsample(&f[r], window_s))
                .unwrap_or_default();
            let t_max = used[r].len() as f64 * window_s;
            let y_max = used_pts
                .iter()
                .chain(&alloc_pts)
                .chain(&forecast_pts)
                .map(|p| p.1)
                .fold(0.0, f64::max)
                * 1.05;
            let mut series = vec![(&used_pts[..], "#000"), (&alloc_pts[..], "#00f")];
            if !forecast_pts.is_empty() {
                series.push((&forecast_pts[..], "#f00"));
            }
            panel(
                &mut svg,
                (col as f64 * PANEL.0, TITLE_H + row as f64 * PANEL.1),
                &format!("{} {} ({})", m.method, r.name(), r.unit()),
                (t_max.max(1e-6), y_max.max(1e-6)),
                &series,
            );
        }
    }
    svg.push_str("</svg>\n");
    std::fs::write(path, svg).map_err(|source| PlotError::Write {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downsample_keeps_peaks() {
        let mut v = vec![1.0; 1200];
        v[601] = 9.0;
        let d = downsample(&v, 0.1);
        assert_eq!(d.len(), 600);
        assert_eq!(d[300], (60.0, 9.0));
        assert_eq!(d[299].1, 1.0);
        assert_eq!(downsample(&[2.0, 3.0], 1.0), vec![(0.0, 2.0), (1.0, 3.0)]);
    }

    #[test]
    fn ticks_are_round_numbers_over_the_range() {
        assert_eq!(ticks(10.0), (vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0], 0));
        assert_eq!(ticks(3.3).0, vec![0.0, 1.0, 2.0, 3.0]);
        let (t, decimals) = ticks(0.042);
        assert_eq!((t.len(), decimals), (5, 2));
        assert!((t[4] - 0.04).abs() < 1e-12, "{t:?}");
        assert_eq!(ticks(4500.0).0.last(), Some(&4000.0));
        assert_eq!(escape("a<b & \"c\">"), "a&lt;b &amp; &quot;c&quot;&gt;");
    }

    #[test]
    fn writes_an_svg_with_every_panel() {
        let path = std::env::temp_dir().join(format!("predictor-plot-{}.svg", std::process::id()));
        let used = PerResource::from_fn(|_| (0..100).map(f64::from).collect::<Vec<_>>());
        let alloc = used.map(|_, v| v.iter().map(|x| x + 5.0).collect::<Vec<_>>());
        let series = [
            Series {
                method: "holt",
                allocated: &alloc,
                forecast: Some(&used),
            },
            Series {
                method: "ewma",
                allocated: &alloc,
                forecast: None,
            },
        ];
        plot(&path, "t", 100, &used, &series).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..50]);
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("ewma net (MiB/s)") && svg.contains("holt cpu (cores)"));
        // holt: used, allocated and forecast in each of 4 panels; ewma: no forecast.
        assert_eq!(svg.matches("<polyline").count(), 4 * 3 + 4 * 2);
        assert_eq!(svg.matches("stroke=\"#f00\"").count(), 4);
        // Every panel's series spans its whole plot area: 100 windows of 0.1 s end at 9.9 s
        // of a 10 s axis, whose x runs from 51 (margin and labels) to 314 in the first column.
        let first = svg.split("points=\"").nth(1).unwrap();
        assert!(first.starts_with("51.0,"), "{first:.40}");
        assert!(matches!(
            plot(&path, "t", 100, &used, &[]),
            Err(PlotError::Empty)
        ));
        std::fs::remove_file(&path).unwrap();
    }
}

//! SVG plot of used against allocated, one panel per (method, resource).

use plotters::prelude::*;
use predictor::resource::{PerResource, Resource};
use std::path::Path;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PlotError {
    #[error("drawing {path}: {message}")]
    Draw { path: String, message: String },
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
    let err = |e: &dyn std::fmt::Display| PlotError::Draw {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let window_s = window_ms as f64 / 1000.0;
    let (cols, rows) = (Resource::ALL.len(), methods.len());
    let root =
        SVGBackend::new(path, (320 * cols as u32, 40 + 200 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(
            &format!("{title}: used (black) vs allocated (blue), forecast (red)"),
            ("sans-serif", 20),
        )
        .map_err(|e| err(&e))?;
    let panels = root.split_evenly((rows, cols));
    for (i, panel) in panels.iter().enumerate() {
        let (m, r) = (&methods[i / cols], Resource::ALL[i % cols]);
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
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("{} {} ({})", m.method, r.name(), r.unit()),
                ("sans-serif", 14),
            )
            .margin(6)
            .x_label_area_size(20)
            .y_label_area_size(45)
            .build_cartesian_2d(0.0..t_max, 0.0..y_max.max(1e-6))
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("s")
            .max_light_lines(0)
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(used_pts, &BLACK))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(alloc_pts, &BLUE))
            .map_err(|e| err(&e))?;
        if !forecast_pts.is_empty() {
            chart
                .draw_series(LineSeries::new(forecast_pts, &RED))
                .map_err(|e| err(&e))?;
        }
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
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
        assert!(svg.contains("ewma net (MiB/s)") && svg.contains("holt cpu (cores)"));
        assert!(matches!(
            plot(&path, "t", 100, &used, &[]),
            Err(PlotError::Empty)
        ));
        std::fs::remove_file(&path).unwrap();
    }
}

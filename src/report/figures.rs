//! Report figures with plotters, each written as PNG and SVG: line charts (FVD vs NFE with
//! interval bars on a log axis, sampling time vs NFE, training curves) and bar charts with
//! intervals (one per ablation axis). Text is drawn with DejaVu Sans compiled into the binary
//! (the `dejavu` crate), so figures look the same on CI and on a machine without fonts.

use crate::error::{Error, Result};
use plotters::coord::ranged1d::{Ranged, SegmentValue, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

const FONT: &str = "sans-serif";

/// Register the bundled font once per process.
pub(crate) fn register_fonts() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Both faces are valid TrueType files shipped by the crate; a failure here is a bug.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
        let _ = plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold());
    });
}

/// One point of a series: x, y and an optional interval on y.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub x: f64,
    pub y: f64,
    pub interval: Option<(f64, f64)>,
}

#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<Point>,
    /// Draw markers at the points (else the line alone, for dense curves).
    pub markers: bool,
}

#[derive(Debug, Clone)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub series: Vec<Series>,
    /// Horizontal reference lines (name, y): static, ceiling, ...
    pub references: Vec<(String, f64)>,
}

#[derive(Debug, Clone)]
pub struct Bar {
    pub name: String,
    pub value: f64,
    pub interval: Option<(f64, f64)>,
}

#[derive(Debug, Clone)]
pub struct BarChart {
    pub title: String,
    pub y_label: String,
    pub bars: Vec<Bar>,
    pub references: Vec<(String, f64)>,
}

#[derive(Debug, Clone)]
pub enum Figure {
    Line(LineChart),
    Bars(BarChart),
}

impl Figure {
    pub fn title(&self) -> &str {
        match self {
            Figure::Line(c) => &c.title,
            Figure::Bars(c) => &c.title,
        }
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let r = match self {
            Figure::Line(c) => draw_line(root, c),
            Figure::Bars(c) => draw_bars(root, c),
        };
        r.map_err(|e| Error::Other(format!("figure `{}`: {e}", self.title())))
    }
}

pub const SIZE: (u32, u32) = (900, 560);

/// Write `stem.png` and `stem.svg` into `dir`; returns both paths.
pub fn write(fig: &Figure, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    register_fonts();
    std::fs::create_dir_all(dir).map_err(|e| Error::Other(format!("{}: {e}", dir.display())))?;
    let (w, h) = SIZE;
    let png = dir.join(format!("{stem}.png"));
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        fig.draw(&root)?;
        root.present()
            .map_err(|e| Error::Other(format!("figure `{}`: {e}", fig.title())))?;
    }
    image::save_buffer(&png, &buf, w, h, image::ColorType::Rgb8)
        .map_err(|e| Error::Other(format!("{}: {e}", png.display())))?;
    let svg = dir.join(format!("{stem}.svg"));
    {
        let root = SVGBackend::new(&svg, (w, h)).into_drawing_area();
        fig.draw(&root)?;
        root.present()
            .map_err(|e| Error::Other(format!("{}: {e}", svg.display())))?;
    }
    Ok(vec![png, svg])
}

type DrawResult = std::result::Result<(), String>;

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Bounds of the data with a margin; `log` keeps the lower bound positive.
fn span(values: impl Iterator<Item = f64>, log: bool, from_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return if log { (1.0, 10.0) } else { (0.0, 1.0) };
    }
    if log {
        return (lo / 1.5, hi * 1.5);
    }
    if from_zero && lo >= 0.0 {
        lo = 0.0;
    }
    let pad = ((hi - lo) * 0.08).max(hi.abs().max(1e-9) * 0.02);
    (
        if from_zero && lo == 0.0 {
            0.0
        } else {
            lo - pad
        },
        hi + pad,
    )
}

fn draw_line<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, c: &LineChart) -> DrawResult {
    root.fill(&WHITE).map_err(s)?;
    let xs = c.series.iter().flat_map(|s| s.points.iter().map(|p| p.x));
    let (x0, x1) = span(xs, c.log_x, false);
    let ys = c
        .series
        .iter()
        .flat_map(|s| {
            s.points.iter().flat_map(|p| {
                [Some(p.y), p.interval.map(|i| i.0), p.interval.map(|i| i.1)]
                    .into_iter()
                    .flatten()
            })
        })
        .chain(c.references.iter().map(|r| r.1));
    let (y0, y1) = span(ys, false, false);
    let mut b = ChartBuilder::on(root);
    b.caption(&c.title, (FONT, 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70);
    if c.log_x {
        let chart = b
            .build_cartesian_2d((x0..x1).log_scale(), y0..y1)
            .map_err(s)?;
        fill_line(chart, c, (x0, x1))
    } else {
        let chart = b.build_cartesian_2d(x0..x1, y0..y1).map_err(s)?;
        fill_line(chart, c, (x0, x1))
    }
}

fn fill_line<'a, DB: DrawingBackend + 'a, X>(
    mut chart: ChartContext<'a, DB, Cartesian2d<X, RangedCoordf64>>,
    c: &LineChart,
    (x0, x1): (f64, f64),
) -> DrawResult
where
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc(&c.x_label)
        .y_desc(&c.y_label)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(s)?;
    for (i, (name, y)) in c.references.iter().enumerate() {
        let color = RGBColor(110, 110, 110).mix(0.9);
        let style = ShapeStyle::from(color).stroke_width(if i == 0 { 2 } else { 1 });
        chart
            .draw_series(DashedLineSeries::new(vec![(x0, *y), (x1, *y)], 8, 5, style))
            .map_err(s)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    for (i, ser) in c.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let style = ShapeStyle::from(color).stroke_width(2);
        let pts: Vec<(f64, f64)> = ser.points.iter().map(|p| (p.x, p.y)).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), style))
            .map_err(s)?
            .label(ser.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        if ser.markers {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(s)?;
        }
        chart
            .draw_series(ser.points.iter().filter_map(|p| {
                p.interval
                    .map(|(lo, hi)| PathElement::new(vec![(p.x, lo), (p.x, hi)], style))
            }))
            .map_err(s)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(s)?;
    Ok(())
}

fn draw_bars<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, c: &BarChart) -> DrawResult {
    root.fill(&WHITE).map_err(s)?;
    let n = c.bars.len().max(1);
    let ys = c
        .bars
        .iter()
        .flat_map(|b| {
            [
                Some(b.value),
                b.interval.map(|i| i.0),
                b.interval.map(|i| i.1),
            ]
            .into_iter()
            .flatten()
        })
        .chain(c.references.iter().map(|r| r.1));
    let (y0, y1) = span(ys, false, true);
    let names: Vec<String> = c.bars.iter().map(|b| b.name.clone()).collect();
    let mut chart = ChartBuilder::on(root)
        .caption(&c.title, (FONT, 22))
        .margin(12)
        .x_label_area_size(60)
        .y_label_area_size(70)
        .build_cartesian_2d((0..n).into_segmented(), y0..y1)
        .map_err(s)?;
    let fmt = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
            names.get(*i).cloned().unwrap_or_default()
        }
        SegmentValue::Last => String::new(),
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&fmt)
        .y_desc(&c.y_label)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 16))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(s)?;
    for (i, b) in c.bars.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0f64.max(y0)),
                    (SegmentValue::Exact(i + 1), b.value),
                ],
                color.mix(0.75).filled(),
            )))
            .map_err(s)?;
        if let Some((lo, hi)) = b.interval {
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![
                        (SegmentValue::CenterOf(i), lo),
                        (SegmentValue::CenterOf(i), hi),
                    ],
                    ShapeStyle::from(BLACK).stroke_width(2),
                )))
                .map_err(s)?;
        }
    }
    for (name, y) in &c.references {
        let style = ShapeStyle::from(RGBColor(110, 110, 110)).stroke_width(2);
        chart
            .draw_series(DashedLineSeries::new(
                vec![(SegmentValue::Exact(0), *y), (SegmentValue::Last, *y)],
                8,
                5,
                style,
            ))
            .map_err(s)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    if !c.references.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(s)?;
    }
    Ok(())
}

/// A trailing moving average over `window` points (training curves are noisy per step).
pub fn smooth(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let w = window.max(1);
    let mut out = Vec::with_capacity(points.len());
    let mut sum = 0.0;
    for (i, &(x, y)) in points.iter().enumerate() {
        sum += y;
        if i >= w {
            sum -= points[i - w].1;
        }
        out.push((x, sum / (i + 1).min(w) as f64));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_is_a_trailing_mean() {
        let p = [(1.0, 1.0), (2.0, 3.0), (3.0, 5.0), (4.0, 7.0)];
        assert_eq!(
            smooth(&p, 2),
            vec![(1.0, 1.0), (2.0, 2.0), (3.0, 4.0), (4.0, 6.0)]
        );
        assert_eq!(smooth(&p, 1), p.to_vec());
    }

    #[test]
    fn figures_render_to_png_and_svg_with_text() {
        let dir = tempfile::tempdir().unwrap();
        let line = Figure::Line(LineChart {
            title: "FVD vs NFE".into(),
            x_label: "NFE".into(),
            y_label: "FVD".into(),
            log_x: true,
            series: vec![Series {
                name: "teacher".into(),
                points: vec![
                    Point {
                        x: 2.0,
                        y: 300.0,
                        interval: Some((280.0, 320.0)),
                    },
                    Point {
                        x: 50.0,
                        y: 200.0,
                        interval: None,
                    },
                ],
                markers: true,
            }],
            references: vec![("static".into(), 250.0)],
        });
        let files = write(&line, dir.path(), "line").unwrap();
        let img = image::open(&files[0]).unwrap().to_rgb8();
        assert_eq!((img.width(), img.height()), SIZE);
        // Something other than the white background was drawn (axes, text, series).
        let dark = img.pixels().filter(|p| p.0.iter().all(|&c| c < 80)).count();
        assert!(dark > 500, "{dark} dark pixels");
        let svg = std::fs::read_to_string(&files[1]).unwrap();
        assert!(svg.contains("<svg") && svg.contains("FVD vs NFE") && svg.contains("teacher"));
        let bars = Figure::Bars(BarChart {
            title: "ablation".into(),
            y_label: "FVD".into(),
            bars: vec![
                Bar {
                    name: "a".into(),
                    value: 3.0,
                    interval: Some((2.0, 4.0)),
                },
                Bar {
                    name: "b".into(),
                    value: 5.0,
                    interval: None,
                },
            ],
            references: vec![],
        });
        let files = write(&bars, dir.path(), "bars").unwrap();
        assert!(std::fs::read_to_string(&files[1])
            .unwrap()
            .contains("ablation"));
    }
}

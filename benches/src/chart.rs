//! A small SVG line chart for the reports (log-scale x axis).

use std::fmt::Write as _;

/// One line: name, colour, dashed, points (x, y).
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Stroke colour.
    pub color: &'static str,
    /// Dashed line.
    pub dashed: bool,
    /// Points.
    pub points: Vec<(f64, f64)>,
}

/// A chart column: legend, colour, dashed, and the value of a row.
pub type Column<'a, R> = (&'a str, &'static str, bool, fn(&R) -> f64);

/// One series per column, each over `rows` at x = `x(row)`.
pub fn series_of<R>(columns: &[Column<'_, R>], rows: &[R], x: impl Fn(&R) -> f64) -> Vec<Series> {
    columns
        .iter()
        .map(|(name, color, dashed, f)| Series {
            name: (*name).into(),
            color,
            dashed: *dashed,
            points: rows.iter().map(|r| (x(r), f(r))).collect(),
        })
        .collect()
}

/// Renders the series over a log10 x axis and a linear y axis from 0 to
/// `y_max`, with a horizontal guide at `guide` (if any).
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    y_max: f64,
    guide: Option<(f64, &str)>,
) -> String {
    let (w, h) = (720.0, 420.0);
    let (l, r, t, b) = (70.0, 210.0, 40.0, 50.0);
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    let x_min = xs.iter().copied().fold(f64::INFINITY, f64::min).log10();
    let x_max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max).log10();
    let px = |x: f64| l + (x.log10() - x_min) / (x_max - x_min).max(1e-9) * (w - l - r);
    let py = |y: f64| t + (1.0 - y / y_max) * (h - t - b);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\n\
         <rect width='100%' height='100%' fill='white'/>\n\
         <text x='{}' y='22' font-size='15' text-anchor='middle'>{title}</text>",
        (w - r + l) / 2.0
    );
    // Axes and grid.
    for i in 0..=5 {
        let y = y_max * f64::from(i) / 5.0;
        let _ = writeln!(
            s,
            "<line x1='{l}' x2='{}' y1='{py}' y2='{py}' stroke='#ddd'/><text x='{}' y='{}' text-anchor='end'>{y:.2}</text>",
            w - r,
            l - 6.0,
            py(y) + 4.0,
            py = py(y)
        );
    }
    let mut ticks: Vec<f64> = xs.clone();
    ticks.sort_by(|a, b| a.total_cmp(b));
    ticks.dedup();
    for x in ticks {
        let _ = writeln!(
            s,
            "<line x1='{px}' x2='{px}' y1='{t}' y2='{}' stroke='#eee'/><text x='{px}' y='{}' text-anchor='middle'>{x}</text>",
            h - b,
            h - b + 16.0,
            px = px(x)
        );
    }
    if let Some((g, label)) = guide {
        let _ = writeln!(
            s,
            "<line x1='{l}' x2='{}' y1='{y}' y2='{y}' stroke='#c00' stroke-dasharray='2,3'/><text x='{}' y='{}' fill='#c00'>{label}</text>",
            w - r,
            w - r + 4.0,
            py(g) + 4.0,
            y = py(g)
        );
    }
    let _ = writeln!(
        s,
        "<text x='{}' y='{}' text-anchor='middle'>{x_label}</text>\n\
         <text x='16' y='{}' transform='rotate(-90 16 {})' text-anchor='middle'>{y_label}</text>",
        (w - r + l) / 2.0,
        h - 12.0,
        (h - b + t) / 2.0,
        (h - b + t) / 2.0
    );
    for (i, se) in series.iter().enumerate() {
        let pts: Vec<String> = se
            .points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let dash = if se.dashed {
            " stroke-dasharray='6,4'"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "<polyline fill='none' stroke='{}' stroke-width='2'{dash} points='{}'/>",
            se.color,
            pts.join(" ")
        );
        for (x, y) in &se.points {
            let _ = writeln!(
                s,
                "<circle cx='{:.1}' cy='{:.1}' r='3' fill='{}'/>",
                px(*x),
                py(*y),
                se.color
            );
        }
        let ly = t + 16.0 * i as f64;
        let _ = writeln!(
            s,
            "<line x1='{}' x2='{}' y1='{ly}' y2='{ly}' stroke='{}' stroke-width='2'{dash}/><text x='{}' y='{}'>{}</text>",
            w - r + 10.0,
            w - r + 34.0,
            se.color,
            w - r + 38.0,
            ly + 4.0,
            se.name
        );
    }
    s.push_str("</svg>\n");
    s
}

//! The plots, as small hand-written SVG files (no plotting crate): grouped bar charts of
//! throughput per scenario and target (`<json stem>-throughput.svg`, linear scale) and
//! of latency percentiles per target (`<json stem>-latency.svg`, logarithmic scale, as
//! the figures span milliseconds to seconds). Every bar carries its value as a label.

use std::fmt::Write as _;

use crate::backlog::BacklogResult;
use crate::report::PhaseResult;
use crate::scenarios::Scenario;

/// Bar colours per series (blindgate, the bridge, direct).
const COLOURS: [&str; 3] = ["#1b7837", "#b2182b", "#5e5e5e"];
const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 80.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 90.0;

/// One group of bars: its label and one value per series (`None`: no bar).
struct Group {
    label: String,
    values: Vec<Option<f64>>,
}

/// `(name, SVG text)` of every plot ("throughput", "latency").
pub(crate) fn plots(
    scenarios: &[Scenario],
    targets: &[&str],
    all: &[Vec<PhaseResult>],
    backlog: &[BacklogResult],
) -> Vec<(&'static str, String)> {
    let mut tput = Vec::new();
    let mut lat = Vec::new();
    for (sc, row) in scenarios.iter().zip(all) {
        if sc.unit == "msg/s" {
            tput.push(Group {
                label: sc.name.replace("throughput QoS 1, ", ""),
                values: row.iter().map(|r| Some(r.delivered_per_sec)).collect(),
            });
        } else {
            for (k, p) in ["p50", "p99", "p99.9"].iter().enumerate() {
                lat.push(Group {
                    label: format!(
                        "{} {p}",
                        sc.name.replace("latency at ", "").replace(", 256 B", "")
                    ),
                    values: row.iter().map(|r| Some(r.e2e_ms[k])).collect(),
                });
            }
        }
    }
    if !backlog.is_empty() {
        tput.push(Group {
            label: "backlog drain, 256 B".into(),
            values: backlog.iter().map(|r| Some(r.drain.rate)).collect(),
        });
        for (k, p) in ["p50", "p99"].iter().enumerate() {
            lat.push(Group {
                label: format!("live during drain {p}"),
                values: backlog
                    .iter()
                    .map(|r| Some(r.drain.live_e2e_ms[k]))
                    .collect(),
            });
        }
    }
    vec![
        (
            "throughput",
            bar_chart(
                "End-to-end throughput, QoS 1",
                "msg/s",
                targets,
                &tput,
                false,
            ),
        ),
        (
            "latency",
            bar_chart("End-to-end latency", "ms (log scale)", targets, &lat, true),
        ),
    ]
}

/// A grouped bar chart; `log`: logarithmic y axis.
fn bar_chart(title: &str, unit: &str, series: &[&str], groups: &[Group], log: bool) -> String {
    let finite = |v: &Option<f64>| v.filter(|x| x.is_finite() && *x > 0.0);
    let max = groups
        .iter()
        .flat_map(|g| g.values.iter().filter_map(finite))
        .fold(0.0_f64, f64::max);
    let min = groups
        .iter()
        .flat_map(|g| g.values.iter().filter_map(finite))
        .fold(f64::INFINITY, f64::min);
    let scale = Scale::new(min, max, log);
    let plot_h = HEIGHT - TOP - BOTTOM;
    let y = |v: f64| TOP + plot_h * (1.0 - scale.frac(v));
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" font-size="15" text-anchor="middle">{}</text>"#,
        WIDTH / 2.0,
        esc(title)
    );
    for t in scale.ticks() {
        let ty = y(t);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" x2="{}" y1="{ty:.1}" y2="{ty:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            WIDTH - 20.0,
            LEFT - 6.0,
            ty + 4.0,
            short(t)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.1}" transform="rotate(-90 16 {:.1})" text-anchor="middle">{}</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
        esc(unit)
    );
    let group_w = (WIDTH - LEFT - 20.0) / groups.len().max(1) as f64;
    let bar_w = (group_w * 0.8) / series.len().max(1) as f64;
    for (gi, g) in groups.iter().enumerate() {
        let gx = LEFT + gi as f64 * group_w + group_w * 0.1;
        for (si, v) in g.values.iter().enumerate() {
            let Some(v) = finite(v) else { continue };
            let (x, top) = (gx + si as f64 * bar_w, y(v));
            let colour = COLOURS.get(si).copied().unwrap_or("#888");
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="{colour}"><title>{}: {}</title></rect><text x="{:.1}" y="{:.1}" font-size="9" text-anchor="middle">{}</text>"#,
                bar_w - 2.0,
                (TOP + plot_h - top).max(0.0),
                esc(series.get(si).copied().unwrap_or("")),
                short(v),
                x + bar_w / 2.0 - 1.0,
                top - 3.0,
                short(v)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            gx + group_w * 0.4,
            TOP + plot_h + 16.0,
            esc(&g.label)
        );
    }
    for (si, name) in series.iter().enumerate() {
        let lx = LEFT + si as f64 * 170.0;
        let ly = HEIGHT - 30.0;
        let colour = COLOURS.get(si).copied().unwrap_or("#888");
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="{}" width="12" height="12" fill="{colour}"/><text x="{}" y="{ly}">{}</text>"#,
            ly - 10.0,
            lx + 16.0,
            esc(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The y axis: linear from 0 to a round maximum, or logarithmic over whole decades.
struct Scale {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Scale {
    fn new(min: f64, max: f64, log: bool) -> Self {
        let max = if max > 0.0 { max } else { 1.0 };
        if log {
            let min = if min.is_finite() && min > 0.0 {
                min
            } else {
                max / 10.0
            };
            Self {
                lo: min.log10().floor(),
                hi: max.log10().ceil().max(min.log10().floor() + 1.0),
                log,
            }
        } else {
            let step = nice_step(max);
            Self {
                lo: 0.0,
                hi: (max / step).ceil() * step,
                log,
            }
        }
    }

    /// Where `v` lies between the bottom (0) and the top (1).
    fn frac(&self, v: f64) -> f64 {
        let v = if self.log { v.max(1e-12).log10() } else { v };
        ((v - self.lo) / (self.hi - self.lo)).clamp(0.0, 1.0)
    }

    fn ticks(&self) -> Vec<f64> {
        if self.log {
            (self.lo as i32..=self.hi as i32)
                .map(|e| 10_f64.powi(e))
                .collect()
        } else {
            let step = nice_step(self.hi);
            (0..=((self.hi / step).round() as usize))
                .map(|k| k as f64 * step)
                .collect()
        }
    }
}

/// A round tick step giving about 5 ticks up to `max`.
fn nice_step(max: f64) -> f64 {
    let raw = max / 5.0;
    let mag = 10_f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(raw)
}

/// A compact label: 12345 → "12.3k", 0.42 → "0.42".
fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 100.0 || (v >= 1.0 && v.fract() == 0.0) {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

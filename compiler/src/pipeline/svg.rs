//! The simulated timeline as an SVG picture: one row per rank, one box per compute op at its
//! simulated start and length, coloured by kind as in the DeepSeek-V3 report's figure 5 (and
//! DualPipe's README): forward orange, backward green, input-gradient backward light green,
//! weight-gradient backward blue, an overlapped pair half orange half green inside one border.
//! The second stream (DualPipe's micro-batches entering at the last rank, DualPipeV's way back
//! up) is a darker shade. The output depends only on the report, so it can be snapshotted.

use std::fmt::Write as _;

use super::schedule::{Chunk, Method, ScheduleOp, second_stream};
use super::simulate::SimReport;

const LEFT: f64 = 64.0;
const TOP: f64 = 36.0;
const ROW: f64 = 26.0;
const BOX: f64 = 22.0;
const RIGHT: f64 = 16.0;

/// Fill colours: (first stream, second stream).
const FORWARD: (&str, &str) = ("#f5a623", "#b86e00");
const BACKWARD: (&str, &str) = ("#6cc644", "#2f7d12");
const BACKWARD_INPUT: (&str, &str) = ("#b5e48c", "#7ab648");
const WEIGHT: (&str, &str) = ("#6fa8dc", "#2b64a8");

/// Draws `report`'s timeline.
pub fn timeline_svg(report: &SimReport) -> String {
    let span = report.makespan.max(1e-9);
    // Wide enough to read the cell numbers, narrow enough to view whole: about 1200 pixels,
    // at most 40 per time unit; long spans (a measured timeline in milliseconds) are squeezed.
    let scale = (1200.0 / span).min(40.0);
    let rows = report.ranks.len() as f64;
    let plot_width = span * scale;
    let width = LEFT + plot_width + RIGHT;
    let axis_y = TOP + rows * ROW + 4.0;
    let legend_y = axis_y + 34.0;
    let height = legend_y + 24.0;
    let stream = |c: Chunk| second_stream(report.method, report.pp, report.micro_batches, c);
    let shade = |colours: (&'static str, &'static str), c: Chunk| {
        if stream(c) { colours.1 } else { colours.0 }
    };

    let mut svg = Svg::new(width, height);
    svg.text(
        LEFT,
        20.0,
        14.0,
        "start",
        "#000",
        &format!(
            "{}: PP={} on {} ranks, {} micro-batches, F={} B={} W={} F&B={} comm={}, \
             makespan {}, bubble {}",
            report.method,
            report.pp,
            report.ranks.len(),
            report.micro_batches,
            num(report.costs.f),
            num(report.costs.b),
            num(report.costs.w),
            num(report.costs.f_and_b),
            num(report.costs.comm),
            num(report.makespan),
            num(report.bubble()),
        ),
    );
    for (rank, timeline) in report.ranks.iter().enumerate() {
        let y = TOP + rank as f64 * ROW;
        svg.text(
            LEFT - 8.0,
            y + BOX / 2.0 + 4.0,
            12.0,
            "end",
            "#000",
            &format!("rank {rank}"),
        );
        for t in timeline.ops.iter().filter(|t| t.op.is_compute()) {
            let x = LEFT + t.start * scale;
            let w = (t.end - t.start) * scale;
            match t.op {
                ScheduleOp::FB { f, b } => {
                    let half = w / 2.0;
                    svg.rect(x, y, half, BOX, shade(FORWARD, f), None);
                    svg.rect(x + half, y, half, BOX, shade(BACKWARD, b), None);
                    svg.rect(x, y, w, BOX, "none", Some(1.5));
                    svg.cell_text(x, y, half, &f.mb.to_string(), stream(f));
                    svg.cell_text(x + half, y, half, &b.mb.to_string(), stream(b));
                }
                ScheduleOp::F(c) | ScheduleOp::B(c) | ScheduleOp::BInput(c) | ScheduleOp::W(c) => {
                    let colours = match t.op {
                        ScheduleOp::F(_) => FORWARD,
                        ScheduleOp::B(_) => BACKWARD,
                        ScheduleOp::BInput(_) => BACKWARD_INPUT,
                        _ => WEIGHT,
                    };
                    svg.rect(x, y, w, BOX, shade(colours, c), Some(0.5));
                    svg.cell_text(x, y, w, &c.mb.to_string(), stream(c));
                }
                ScheduleOp::Send { .. } | ScheduleOp::Recv { .. } => {}
            }
        }
    }
    axis(&mut svg, axis_y, span, scale);
    let two_streams = matches!(report.method, Method::DualPipe | Method::DualPipeV);
    legend(&mut svg, legend_y, two_streams);
    svg.finish()
}

/// The time axis: a line with ticks at a round step, about a dozen of them.
fn axis(svg: &mut Svg, y: f64, span: f64, scale: f64) {
    svg.line(LEFT, y, LEFT + span * scale, y);
    let rough = span / 12.0;
    let step = [1.0, 2.0, 5.0]
        .into_iter()
        .flat_map(|m| (-3..7).map(move |e| m * 10f64.powi(e)))
        .filter(|&s| s >= rough)
        .fold(f64::INFINITY, f64::min);
    let ticks = (span / step).floor() as usize;
    for i in 0..=ticks {
        let t = i as f64 * step;
        let x = LEFT + t * scale;
        svg.line(x, y, x, y + 4.0);
        svg.text(x, y + 16.0, 10.0, "middle", "#000", &num(t));
    }
    svg.text(LEFT - 8.0, y + 16.0, 10.0, "end", "#000", "time");
}

fn legend(svg: &mut Svg, y: f64, two_streams: bool) {
    let mut entries = vec![
        (FORWARD.0, "forward"),
        (BACKWARD.0, "backward"),
        (BACKWARD_INPUT.0, "backward for input"),
        (WEIGHT.0, "backward for weights"),
        ("overlap", "overlapped forward & backward"),
    ];
    if two_streams {
        entries.push((FORWARD.1, "second stream (darker)"));
    }
    let mut x = LEFT;
    for (colour, label) in entries {
        if colour == "overlap" {
            svg.rect(x, y, 8.0, 14.0, FORWARD.0, None);
            svg.rect(x + 8.0, y, 8.0, 14.0, BACKWARD.0, None);
            svg.rect(x, y, 16.0, 14.0, "none", Some(1.5));
        } else {
            svg.rect(x, y, 16.0, 14.0, colour, Some(0.5));
        }
        svg.text(x + 21.0, y + 11.0, 11.0, "start", "#000", label);
        // Proportional fonts: about 6.5 px a character at 11 px.
        x += 21.0 + label.len() as f64 * 6.5 + 16.0;
    }
}

/// A small hand-written SVG writer: only what the timeline needs.
struct Svg {
    body: String,
    width: f64,
    height: f64,
}

impl Svg {
    fn new(width: f64, height: f64) -> Self {
        Svg {
            body: String::new(),
            width,
            height,
        }
    }

    fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str, border: Option<f64>) {
        let stroke = match border {
            Some(width) => format!(r##" stroke="#000" stroke-width="{}""##, num(width)),
            None => String::new(),
        };
        // Writing to a String cannot fail.
        let _ = writeln!(
            self.body,
            r#"<rect x="{}" y="{}" width="{}" height="{}" fill="{fill}"{stroke}/>"#,
            num(x),
            num(y),
            num(w),
            num(h)
        );
    }

    fn line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64) {
        let _ = writeln!(
            self.body,
            r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#000"/>"##,
            num(x1),
            num(y1),
            num(x2),
            num(y2)
        );
    }

    fn text(&mut self, x: f64, y: f64, size: f64, anchor: &str, fill: &str, text: &str) {
        let _ = writeln!(
            self.body,
            r#"<text x="{}" y="{}" font-size="{}" text-anchor="{anchor}" fill="{fill}">{}</text>"#,
            num(x),
            num(y),
            num(size),
            escape(text)
        );
    }

    /// A micro-batch number centred in a box, if the box is wide enough to hold it.
    fn cell_text(&mut self, x: f64, y: f64, w: f64, text: &str, dark: bool) {
        if w >= 7.0 * text.len() as f64 {
            let fill = if dark { "#fff" } else { "#000" };
            self.text(x + w / 2.0, y + BOX / 2.0 + 4.0, 11.0, "middle", fill, text);
        }
    }

    fn finish(self) -> String {
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
             viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>\n{}</svg>\n",
            self.body,
            w = num(self.width),
            h = num(self.height)
        )
    }
}

/// A number with at most two decimals and no trailing zeros: short and deterministic.
fn num(x: f64) -> String {
    let text = format!("{x:.2}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".to_owned()
    } else {
        text.to_owned()
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

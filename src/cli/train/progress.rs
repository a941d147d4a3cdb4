//! Progress on a terminal (a bar with loss, tokens/s and ETA), plain lines otherwise.

use std::io::IsTerminal;
use std::time::Duration;

use fathom_runtime::train::StepReport;
use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    log_every: u64,
    floor: Option<f64>,
    /// Prints nothing (a rank other than 0 of a multi-process run).
    quiet: bool,
}

impl Progress {
    pub fn new(done: u64, total: u64, log_every: u64, floor: Option<f64>) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total).with_position(done);
            let style = ProgressStyle::with_template(
                "{spinner} [{bar:30}] step {pos}/{len} {msg} eta {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> ");
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            bar,
            total,
            log_every: log_every.max(1),
            floor,
            quiet: false,
        }
    }

    /// Progress that prints nothing.
    pub fn quiet(mut self) -> Self {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        self.quiet = true;
        self
    }

    pub fn update(&mut self, r: &StepReport) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(bar) => {
                bar.set_position(r.step);
                bar.set_message(format!(
                    "loss {:.4} · {:.0} tok/s",
                    r.loss,
                    r.tokens_per_second()
                ));
            }
            None => {
                if r.step == 1 || r.step.is_multiple_of(self.log_every) || r.step == self.total {
                    eprintln!("{}", line(r, self.total, self.floor));
                }
            }
        }
    }

    pub fn println(&self, text: &str) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// `step 10/300 loss 2.1234 (next-token 2.0712, mtp 2.3 , balance 0.012) lr 3.0e-3 ...`
fn line(r: &StepReport, total: u64, floor: Option<f64>) -> String {
    let mut parts = format!("next-token {:.4}", r.loss_next_token);
    if let Some(mtp) = r.loss_mtp {
        parts += &format!(", mtp {mtp:.4}");
    }
    if let Some(balance) = r.loss_balance {
        parts += &format!(", balance {balance:.4}");
    }
    if let Some(floor) = floor {
        parts += &format!(", floor {floor:.4}");
    }
    let balance = r
        .max_load_violation
        .map_or(String::new(), |v| format!(" load-violation {v:.2}"));
    format!(
        "step {}/{total} loss {:.4} ({parts}) lr {:.2e} grad-norm {:.3}{balance} {:.0} tok/s",
        r.step,
        r.loss,
        r.learning_rate,
        r.grad_norm,
        r.tokens_per_second()
    )
}

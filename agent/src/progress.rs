//! Progress bars for long runs: on stderr, drawn only when stderr is a
//! terminal, so pipes and CI logs stay clean.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar over `len` items of `what` (e.g. "cases", "rows").
pub fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    let template =
        format!("{{elapsed:>4}} [{{bar:30}}] {{pos}}/{{len}} {what} (eta {{eta}}) {{wide_msg}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

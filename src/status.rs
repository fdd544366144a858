//! What a technician with a laptop sees at `/status`: a small read-only HTML page with
//! the queue, the uplink, every certificate in use with its days to expiry, and the
//! last problems (reasons and times only: never payloads, keys or secrets).
//!
//! [`RecentProblems`] is filled where problems are already logged (rate-limited), so
//! a flood of bad input keeps only the newest few entries.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use crate::clock::now_ms;

/// How many problems the page keeps.
const KEEP: usize = 20;

/// One problem, as shown on the page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Unix time in milliseconds.
    pub at_ms: u64,
    /// A closed reason, e.g. `tls_handshake` or `reload_rejected`.
    pub reason: &'static str,
    /// One line of detail (no payload bytes, no secrets).
    pub detail: String,
}

/// The newest problems, oldest first; cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct RecentProblems {
    inner: Arc<Mutex<VecDeque<Problem>>>,
}

impl RecentProblems {
    /// Remembers a problem, forgetting the oldest beyond the last 20.
    pub fn record(&self, reason: &'static str, detail: impl Into<String>) {
        let mut detail = detail.into();
        truncate_chars(&mut detail, 300);
        let mut list = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if list.len() == KEEP {
            list.pop_front();
        }
        list.push_back(Problem {
            at_ms: now_ms(),
            reason,
            detail,
        });
    }

    /// The problems, oldest first.
    pub fn list(&self) -> Vec<Problem> {
        let list = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        list.iter().cloned().collect()
    }
}

fn truncate_chars(text: &mut String, max: usize) {
    if let Some((cut, _)) = text.char_indices().nth(max) {
        text.truncate(cut);
        text.push('…');
    }
}

/// One certificate in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateStatus {
    /// `device_listener`, `device_ca`, `uplink_client` or `uplink_ca`.
    pub role: &'static str,
    /// Position in its PEM file (0 for the first certificate).
    pub index: usize,
    /// The certificate's CN (or first DNS name), for people.
    pub subject: String,
    /// Unix time (seconds) after which it is invalid.
    pub not_after: i64,
}

impl CertificateStatus {
    /// Whole days left at `now_s` (negative once expired).
    pub fn days_left(&self, now_s: i64) -> i64 {
        (self.not_after - now_s).div_euclid(86_400)
    }
}

/// Everything the page shows, gathered at request time.
#[derive(Debug, Clone, Default)]
pub struct StatusView {
    /// `key: value` lines about the queue.
    pub queue: Vec<(&'static str, String)>,
    /// `key: value` lines about the uplink.
    pub uplink: Vec<(&'static str, String)>,
    /// Certificates in use.
    pub certificates: Vec<CertificateStatus>,
    /// The newest problems, oldest first.
    pub problems: Vec<Problem>,
    /// `None` when ready, otherwise why not.
    pub not_ready: Option<String>,
}

/// Renders the page. Every value is HTML-escaped; the page has no scripts, forms or
/// external resources, and refreshes itself every 10 s.
pub fn render(view: &StatusView) -> String {
    let now_s = i64::try_from(now_ms() / 1000).unwrap_or(i64::MAX);
    let mut page = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"10\">\
         <title>blindgate status</title><style>body{font-family:sans-serif;margin:1em}\
         table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}\
         .bad{color:#b00}</style></head><body><h1>blindgate</h1>",
    );
    let _ = match &view.not_ready {
        None => write!(page, "<p>Forwarding: <b>ready</b></p>"),
        Some(why) => write!(
            page,
            "<p class=\"bad\">Forwarding: <b>not ready</b>: {}</p>",
            escape(why)
        ),
    };
    table(&mut page, "Queue", &view.queue);
    table(&mut page, "Uplink", &view.uplink);
    page.push_str("<h2>Certificates</h2><table><tr><th>role</th><th>#</th><th>subject</th><th>not after (UTC)</th><th>days left</th></tr>");
    for cert in &view.certificates {
        let days = cert.days_left(now_s);
        let class = if days < 30 { " class=\"bad\"" } else { "" };
        let _ = write!(
            page,
            "<tr{class}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{days}</td></tr>",
            cert.role,
            cert.index,
            escape(&cert.subject),
            format_utc(cert.not_after)
        );
    }
    page.push_str("</table><h2>Recent problems</h2>");
    if view.problems.is_empty() {
        page.push_str("<p>none</p>");
    } else {
        page.push_str("<table><tr><th>time (UTC)</th><th>reason</th><th>detail</th></tr>");
        for problem in view.problems.iter().rev() {
            let at = i64::try_from(problem.at_ms / 1000).unwrap_or(i64::MAX);
            let _ = write!(
                page,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                format_utc(at),
                problem.reason,
                escape(&problem.detail)
            );
        }
        page.push_str("</table>");
    }
    page.push_str("</body></html>\n");
    page
}

fn table(page: &mut String, title: &str, rows: &[(&'static str, String)]) {
    let _ = write!(page, "<h2>{title}</h2><table>");
    for (key, value) in rows {
        let _ = write!(page, "<tr><th>{key}</th><td>{}</td></tr>", escape(value));
    }
    page.push_str("</table>");
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `YYYY-MM-DD HH:MM:SS` for a Unix time in seconds (UTC, proleptic Gregorian).
pub fn format_utc(unix_s: i64) -> String {
    let days = unix_s.div_euclid(86_400);
    let secs = unix_s.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_twenty_problems() {
        let recent = RecentProblems::default();
        for n in 0..25 {
            recent.record("tls_handshake", format!("peer {n}"));
        }
        let list = recent.list();
        assert_eq!(list.len(), 20);
        assert_eq!(list[0].detail, "peer 5");
        assert_eq!(list[19].detail, "peer 24");
    }

    #[test]
    fn dates_are_utc_calendar_dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(format_utc(1_795_564_799), "2026-11-24 23:59:59");
    }

    #[test]
    fn the_page_escapes_what_it_shows() {
        let recent = RecentProblems::default();
        recent.record("reload_rejected", "<script>alert(1)</script>");
        let view = StatusView {
            problems: recent.list(),
            not_ready: Some("a & b".into()),
            certificates: vec![CertificateStatus {
                role: "uplink_client",
                index: 0,
                subject: "gw-1".into(),
                not_after: 0,
            }],
            ..StatusView::default()
        };
        let page = render(&view);
        assert!(!page.contains("<script>"));
        assert!(page.contains("&lt;script&gt;"));
        assert!(page.contains("a &amp; b"));
        assert!(
            page.contains(
                "<td>uplink_client</td><td>0</td><td>gw-1</td><td>1970-01-01 00:00:00</td>"
            )
        );
    }
}

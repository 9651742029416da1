//! The status page on the API listener: `/status`, read-only, for an operator's
//! browser (phone width too). Server-rendered HTML and a small inline script that
//! refreshes it from `/status/data.json` every few seconds; no build step.
//!
//! Login: `POST /status/login` (a form) with the API token or the read-only
//! `api.status_token` sets an `HttpOnly; SameSite=Strict` session cookie (a
//! random id kept in memory, at most [`MAX_SESSIONS`], for [`SESSION_SECS`]);
//! `GET /status/login?token=` does the same once and redirects (for a link or a
//! headless browser: the token is then in that one URL). Without a session
//! `/status` redirects to the form and `/status/data.json` answers 401: no data.
//!
//! The chart of the last hour comes from a ring of samples (stanzas in and out
//! so far, messages queued) taken every [`SAMPLE_EVERY`] by [`sampler`].

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Form;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::s2s::links::now_ms;
use crate::server::Server;
use crate::xml::writer::escape;

use super::federation::{StatusOut, status};
use super::{ApiState, Problem, ProblemBody, same_token};

/// How often the ring is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Samples kept: one hour.
const SAMPLES: usize = 360;
/// Live sessions kept (the oldest is dropped past this).
pub const MAX_SESSIONS: usize = 256;
/// How long a login lasts.
pub const SESSION_SECS: u64 = 12 * 3600;
const COOKIE: &str = "xf_status";

/// One sample of the ring.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at_ms: u64,
    stanzas: u64,
    queued: usize,
}

/// The page's state: sessions and the ring.
#[derive(Debug, Default)]
pub struct Page {
    /// Session id -> expiry (unix ms).
    sessions: Mutex<HashMap<String, u64>>,
    ring: Mutex<VecDeque<Sample>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn take_sample(server: &Server) -> Sample {
    let m = &server.metrics;
    Sample {
        at_ms: now_ms(),
        stanzas: m.stanzas_in.get() + m.stanzas_out.get(),
        queued: server.delivery.queued(),
    }
}

impl Page {
    fn sample(&self, server: &Server) {
        let s = take_sample(server);
        let mut r = lock(&self.ring);
        if r.len() >= SAMPLES {
            r.pop_front();
        }
        r.push_back(s);
    }

    fn login(&self) -> String {
        let id = crate::s2s::conn::new_id();
        let now = now_ms();
        let mut s = lock(&self.sessions);
        s.retain(|_, exp| *exp > now);
        if s.len() >= MAX_SESSIONS
            && let Some(oldest) = s.iter().min_by_key(|(_, e)| **e).map(|(k, _)| k.clone())
        {
            s.remove(&oldest);
        }
        s.insert(id.clone(), now + SESSION_SECS * 1000);
        id
    }

    fn valid(&self, headers: &HeaderMap) -> bool {
        let Some(id) = cookie(headers) else {
            return false;
        };
        lock(&self.sessions)
            .get(&id)
            .is_some_and(|exp| *exp > now_ms())
    }

    /// Stanzas per second and queue depth over the ring, and since its last
    /// sample until `now`.
    fn points(&self, now: Sample) -> Vec<Point> {
        let r = lock(&self.ring);
        r.iter()
            .chain(std::iter::once(&now))
            .zip(r.iter().skip(1).chain(std::iter::once(&now)))
            .map(|(a, b)| {
                let secs = (b.at_ms.saturating_sub(a.at_ms) as f64 / 1000.0).max(0.001);
                Point {
                    at_ms: b.at_ms,
                    stanzas_per_sec: b.stanzas.saturating_sub(a.stanzas) as f64 / secs,
                    queued: b.queued,
                }
            })
            .collect()
    }
}

/// Sample the ring every [`SAMPLE_EVERY`] until shutdown (the first at once).
pub async fn sampler(page: Arc<Page>, server: Arc<Server>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => page.sample(&server),
            _ = server.shutdown.cancelled() => return,
        }
    }
}

fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == COOKIE).then(|| v.to_string())
        })
}

/// One point of the chart.
#[derive(Debug, Serialize, ToSchema)]
pub struct Point {
    /// When (unix ms).
    pub at_ms: u64,
    /// Stanzas in and out per second since the previous sample.
    pub stanzas_per_sec: f64,
    /// Messages queued for delivery.
    pub queued: usize,
}

/// A remote domain's latest error.
#[derive(Debug, Serialize, ToSchema)]
pub struct RecentError {
    /// The domain.
    pub domain: String,
    /// When (unix ms).
    pub at_ms: u64,
    /// Its condition.
    pub condition: String,
    /// Its text.
    pub text: String,
}

/// What the page shows.
#[derive(Debug, Serialize, ToSchema)]
pub struct PageData {
    /// `GET /v1/federation/status`'s document.
    pub status: StatusOut,
    /// The last hour, oldest first.
    pub chart: Vec<Point>,
    /// The latest errors, newest first (at most 10).
    pub errors: Vec<RecentError>,
}

fn data(st: &ApiState) -> Result<PageData, Problem> {
    let status = status(st)?;
    let mut errors: Vec<RecentError> = status
        .remote
        .iter()
        .filter_map(|r| {
            let e = r.last_error.as_ref()?;
            Some(RecentError {
                domain: r.domain.clone(),
                at_ms: e.at_ms,
                condition: e.condition.clone(),
                text: e.text.clone(),
            })
        })
        .collect();
    errors.sort_by_key(|e| std::cmp::Reverse(e.at_ms));
    errors.truncate(10);
    Ok(PageData {
        chart: st.page.points(take_sample(&st.server)),
        status,
        errors,
    })
}

/// The login form's fields.
#[derive(Debug, Deserialize, ToSchema, utoipa::IntoParams)]
pub struct LoginIn {
    /// The API token or `api.status_token`.
    pub token: Option<String>,
}

fn html(status: StatusCode, nonce: Option<&str>, body: String) -> Response {
    let csp = match nonce {
        Some(n) => format!(
            "default-src 'none'; style-src 'unsafe-inline'; script-src 'nonce-{n}'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'"
        ),
        None => "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'".into(),
    };
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    r
}

fn redirect(to: &'static str, cookie: Option<String>) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    r.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert(header::SET_COOKIE, c);
    }
    r
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:0;padding:12px;background:#f6f7f9;color:#1d2330}\
h1{font-size:18px;margin:0 8px 0 0;display:inline}h2{font-size:15px;margin:18px 0 6px}\
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:8px}\
.mode{padding:2px 8px;border-radius:10px;background:#dde3ee}#updated{color:#667;font-size:12px}\
table{border-collapse:collapse;width:100%;background:#fff}th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #e3e6eb;vertical-align:top}\
th{font-size:12px;color:#556;background:#eef1f5}\
tr.s-up td:first-child{border-left:4px solid #2e9d4f}tr.s-idle td:first-child{border-left:4px solid #9aa3af}\
tr.s-connecting td:first-child{border-left:4px solid #d99a1e}tr.s-held td:first-child{border-left:4px solid #d9531e}\
tr.s-blocked td:first-child{border-left:4px solid #8b1d1d}tr.s-blocked{background:#fbeaea}tr.s-held{background:#fdf1ea}\
.st{font-weight:600}svg{background:#fff;width:100%;height:140px}ul{padding-left:18px}\
form{background:#fff;padding:16px;max-width:360px}input{width:100%;padding:6px;margin:6px 0;box-sizing:border-box}\
@media (max-width:640px){thead{display:none}table,tbody,tr,td{display:block;width:100%;box-sizing:border-box}\
tr{margin-bottom:8px;border:1px solid #e3e6eb}td{border:0;padding:2px 8px}\
td[data-label]::before{content:attr(data-label) \": \";color:#667;font-size:12px}}";

fn streams(v: &[super::federation::StreamOut]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.iter()
        .map(|s| {
            format!(
                "{} {}{}{}",
                s.method,
                s.tls,
                if s.sm { " sm" } else { "" },
                if s.bidi { " bidi" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The page's markup from its data (the script renders the same from JSON).
fn render(d: &PageData) -> String {
    let s = &d.status;
    let mut rows = String::new();
    for r in &s.remote {
        let err = r
            .last_error
            .as_ref()
            .map_or("-".into(), |e| format!("{} {}", e.condition, e.text));
        let _ = write!(
            rows,
            "<tr class=\"s-{st}\" data-domain=\"{dom}\" data-state=\"{st}\"><td data-label=\"domain\">{dom}</td>\
             <td data-label=\"state\" class=\"st\">{st}</td><td data-label=\"in\">{i}</td><td data-label=\"out\">{o}</td>\
             <td data-label=\"stanzas in/out\">{si}/{so}</td><td data-label=\"queued\">{q}</td><td data-label=\"last error\">{e}</td></tr>",
            st = escape(&r.state),
            dom = escape(&r.domain),
            i = escape(&streams(&r.inbound)),
            o = escape(&streams(&r.outbound)),
            si = r.stanzas_in,
            so = r.stanzas_out,
            q = r.queued,
            e = escape(&err),
        );
    }
    let mut hosted = String::new();
    for h in &s.hosted {
        let cert = h.certificate_not_after_ms.map_or("-".into(), |t| {
            format!("{} days", (t.saturating_sub(s.now_ms)) / 86_400_000)
        });
        let _ = write!(
            hosted,
            "<tr><td data-label=\"domain\">{}</td><td data-label=\"users\">{}</td><td data-label=\"rooms\">{}</td><td data-label=\"certificate expires in\">{}</td></tr>",
            escape(&h.domain),
            h.users,
            h.rooms,
            escape(&cert)
        );
    }
    let mut errors = String::new();
    for e in &d.errors {
        let _ = write!(
            errors,
            "<li><b>{}</b> {} {}</li>",
            escape(&e.domain),
            escape(&e.condition),
            escape(&e.text)
        );
    }
    if errors.is_empty() {
        errors.push_str("<li>none</li>");
    }
    format!(
        "<section><h2>Hosted domains</h2><table id=\"hosted\"><thead><tr><th>domain</th><th>users</th><th>rooms</th><th>certificate expires in</th></tr></thead><tbody>{hosted}</tbody></table></section>\
         <section><h2>Remote domains</h2><table id=\"remote\"><thead><tr><th>domain</th><th>state</th><th>in</th><th>out</th><th>stanzas in/out</th><th>queued</th><th>last error</th></tr></thead><tbody>{rows}</tbody></table></section>\
         <section><h2>Last hour: stanzas/s <span style=\"color:#2563eb\">&#9632;</span> and queued <span style=\"color:#d9531e\">&#9632;</span></h2>{chart}</section>\
         <section><h2>Recent errors</h2><ul id=\"errors\">{errors}</ul></section>",
        chart = chart(&d.chart),
    )
}

/// The two lines of the chart, each scaled to its own maximum.
fn chart(points: &[Point]) -> String {
    let (w, h) = (600.0, 120.0);
    let line = |mut vals: Vec<f64>, colour: &str| -> String {
        if vals.len() == 1 {
            vals.push(vals[0]);
        }
        let max = vals.iter().copied().fold(1.0f64, f64::max);
        let n = vals.len().max(2) as f64 - 1.0;
        let pts: Vec<String> = vals
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", i as f64 * w / n, h - v / max * (h - 10.0)))
            .collect();
        format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            pts.join(" ")
        )
    };
    format!(
        "<svg id=\"chart\" viewBox=\"0 0 600 120\" preserveAspectRatio=\"none\" role=\"img\" aria-label=\"stanzas per second and queue depth\">{}{}</svg>",
        line(
            points.iter().map(|p| p.stanzas_per_sec).collect(),
            "#2563eb"
        ),
        line(points.iter().map(|p| p.queued as f64).collect(), "#d9531e"),
    )
}

const SCRIPT: &str = r#"
const esc = s => String(s).replace(/[&<>"']/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
const streams = v => v.length ? v.map(s => s.method + ' ' + s.tls + (s.sm ? ' sm' : '') + (s.bidi ? ' bidi' : '')).join(', ') : '-';
function line(vals, colour) {
  if (vals.length === 1) vals = [vals[0], vals[0]];
  const max = Math.max(1, ...vals), n = Math.max(vals.length, 2) - 1;
  const pts = vals.map((v, i) => (i * 600 / n).toFixed(1) + ',' + (120 - v / max * 110).toFixed(1)).join(' ');
  return '<polyline fill="none" stroke="' + colour + '" stroke-width="2" points="' + pts + '"/>';
}
async function refresh() {
  let r;
  try { r = await fetch('/status/data.json', {credentials: 'same-origin', cache: 'no-store'}); } catch (e) { return; }
  if (r.status === 401) { location.href = '/status/login'; return; }
  if (!r.ok) return;
  const d = await r.json(), s = d.status;
  document.getElementById('mode').textContent = 'federation: ' + s.mode;
  document.getElementById('updated').textContent = 'updated ' + new Date(s.now_ms).toLocaleTimeString();
  document.querySelector('#remote tbody').innerHTML = s.remote.map(r => {
    const e = r.last_error ? r.last_error.condition + ' ' + r.last_error.text : '-';
    return '<tr class="s-' + esc(r.state) + '" data-domain="' + esc(r.domain) + '" data-state="' + esc(r.state) + '">' +
      '<td data-label="domain">' + esc(r.domain) + '</td><td data-label="state" class="st">' + esc(r.state) + '</td>' +
      '<td data-label="in">' + esc(streams(r.inbound)) + '</td><td data-label="out">' + esc(streams(r.outbound)) + '</td>' +
      '<td data-label="stanzas in/out">' + r.stanzas_in + '/' + r.stanzas_out + '</td><td data-label="queued">' + r.queued + '</td>' +
      '<td data-label="last error">' + esc(e) + '</td></tr>';
  }).join('');
  document.querySelector('#hosted tbody').innerHTML = s.hosted.map(h =>
    '<tr><td data-label="domain">' + esc(h.domain) + '</td><td data-label="users">' + h.users + '</td><td data-label="rooms">' + h.rooms +
    '</td><td data-label="certificate expires in">' + (h.certificate_not_after_ms ? Math.floor((h.certificate_not_after_ms - s.now_ms) / 86400000) + ' days' : '-') + '</td></tr>').join('');
  document.getElementById('chart').innerHTML = line(d.chart.map(p => p.stanzas_per_sec), '#2563eb') + line(d.chart.map(p => p.queued), '#d9531e');
  document.getElementById('errors').innerHTML = d.errors.length ?
    d.errors.map(e => '<li><b>' + esc(e.domain) + '</b> ' + esc(e.condition) + ' ' + esc(e.text) + '</li>').join('') : '<li>none</li>';
}
setInterval(refresh, 5000);
"#;

fn page(d: &PageData, nonce: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>xmpp-federator status</title><style>{STYLE}</style></head><body>\
         <header><h1>xmpp-federator</h1><span id=\"mode\" class=\"mode\">federation: {mode}</span><span id=\"updated\"></span></header>\
         <main id=\"main\">{body}</main><script nonce=\"{nonce}\">{SCRIPT}</script></body></html>",
        mode = escape(&d.status.mode),
        body = render(d),
    )
}

fn login_form(error: Option<&str>) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>xmpp-federator status: log in</title><style>{STYLE}</style></head><body><h1>xmpp-federator status</h1>\
         <form method=\"post\" action=\"/status/login\"><label for=\"token\">Token (the API token or api.status_token)</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" required>{}\
         <button type=\"submit\">Log in</button></form></body></html>",
        error.map_or(String::new(), |e| format!(
            "<p id=\"error\" style=\"color:#8b1d1d\">{}</p>",
            escape(e)
        ))
    )
}

fn accepted(st: &ApiState, token: &str) -> bool {
    same_token(token, &st.token)
        || st
            .server
            .config
            .api
            .status_token
            .as_deref()
            .is_some_and(|t| same_token(token, t))
}

fn log_in(st: &ApiState, token: Option<&str>) -> Response {
    match token {
        Some(t) if accepted(st, t) => {
            let id = st.page.login();
            let cookie = format!(
                "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/status; Max-Age={SESSION_SECS}"
            );
            redirect("/status", Some(cookie))
        }
        Some(_) => html(
            StatusCode::UNAUTHORIZED,
            None,
            login_form(Some("That token is not valid.")),
        ),
        None => html(StatusCode::OK, None, login_form(None)),
    }
}

/// The status page
///
/// Without a session: a redirect to the login form.
#[utoipa::path(
    get,
    path = "/status",
    tag = "status page",
    responses(
        (status = 200, description = "The page", content_type = "text/html", body = String),
        (status = 303, description = "Not logged in: to `/status/login`"),
        (status = 500, description = "Internal error", body = ProblemBody, content_type = "application/problem+json"),
    ),
)]
pub(super) async fn get_page(State(st): State<ApiState>, headers: HeaderMap) -> Response {
    if !st.page.valid(&headers) {
        return redirect("/status/login", None);
    }
    match data(&st) {
        Ok(d) => {
            let nonce = crate::s2s::conn::new_id();
            html(StatusCode::OK, Some(&nonce), page(&d, &nonce))
        }
        Err(p) => p.into_response(),
    }
}

/// The login form, or a one-time login
///
/// With `?token=` (the API token or `api.status_token`): sets the session
/// cookie and redirects to `/status`, as the form does.
#[utoipa::path(
    get,
    path = "/status/login",
    tag = "status page",
    params(LoginIn),
    responses(
        (status = 200, description = "The form", content_type = "text/html", body = String),
        (status = 303, description = "Logged in (`Set-Cookie`): to `/status`"),
        (status = 401, description = "Not a valid token: the form again", content_type = "text/html", body = String),
    ),
)]
pub(super) async fn get_login(State(st): State<ApiState>, Query(q): Query<LoginIn>) -> Response {
    log_in(&st, q.token.as_deref())
}

/// Log in to the status page
#[utoipa::path(
    post,
    path = "/status/login",
    tag = "status page",
    request_body(content = LoginIn, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 303, description = "Logged in (`Set-Cookie`: an HttpOnly, SameSite=Strict session): to `/status`"),
        (status = 401, description = "Not a valid token: the form again", content_type = "text/html", body = String),
    ),
)]
pub(super) async fn post_login(
    State(st): State<ApiState>,
    form: Result<Form<LoginIn>, axum::extract::rejection::FormRejection>,
) -> Response {
    let token = form.ok().and_then(|Form(f)| f.token);
    log_in(&st, Some(token.as_deref().unwrap_or("")))
}

/// The page's data
///
/// What the page's script refreshes from: the status, the last hour's chart and
/// the latest errors. Needs the session cookie.
#[utoipa::path(
    get,
    path = "/status/data.json",
    tag = "status page",
    responses(
        (status = 200, description = "The data", body = PageData),
        (status = 401, description = "Not logged in", body = ProblemBody, content_type = "application/problem+json"),
        (status = 500, description = "Internal error", body = ProblemBody, content_type = "application/problem+json"),
    ),
)]
pub(super) async fn get_data(State(st): State<ApiState>, headers: HeaderMap) -> Response {
    if !st.page.valid(&headers) {
        return Problem::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "log in at /status/login",
        )
        .into_response();
    }
    match data(&st) {
        Ok(d) => {
            let mut r = axum::Json(d).into_response();
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(p) => p.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_found_by_cookie_and_points_are_rates() {
        let page = Page::default();
        let id = page.login();
        let mut h = HeaderMap::new();
        assert!(!page.valid(&h));
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("other=1; {COOKIE}={id}")).unwrap(),
        );
        assert!(page.valid(&h));
        h.insert(header::COOKIE, HeaderValue::from_static("xf_status=forged"));
        assert!(!page.valid(&h));
        for _ in 0..MAX_SESSIONS + 5 {
            page.login();
        }
        assert_eq!(lock(&page.sessions).len(), MAX_SESSIONS);

        let s = |at_ms, stanzas, queued| Sample {
            at_ms,
            stanzas,
            queued,
        };
        lock(&page.ring).extend([s(0, 0, 0), s(10_000, 100, 3)]);
        let p = page.points(s(20_000, 300, 1));
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].stanzas_per_sec, p[0].queued), (10.0, 3));
        assert_eq!((p[1].stanzas_per_sec, p[1].queued), (20.0, 1));
        assert!(chart(&p).contains("<polyline"));
    }
}

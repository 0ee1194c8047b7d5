//! The operator console: HTML pages on the admin listener, under `/console`.
//!
//! Pages are rendered on the server from the same handlers the JSON API uses (their answers are
//! read back as JSON), so the console shows exactly what `/v1/` answers and adds no query of its
//! own except the overview's per-minute counts ([`pages::minute_counts`]). Reading works with
//! JavaScript off; every action goes through a confirmation page with a form.
//!
//! Security: every answer carries a strict Content-Security-Policy (no inline script or style;
//! the CSS and JavaScript are files under `/console/assets/`, part of the binary). When an admin
//! token is configured, the console asks for it once in a login form and keeps it in an
//! `HttpOnly`, `SameSite=Strict` cookie. A state-changing request must pass the listener's
//! same-origin check and carry the process's CSRF token (in the form, or in the
//! `X-Console-Csrf` header for the playground's script).

mod html;
mod pages;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::Value;

use super::{Admin, read_body};
use crate::protocol::problem::{Body, Problem};

/// The Content-Security-Policy of every console answer.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The cookie that carries the admin token once the operator has logged in.
const COOKIE: &str = "ess_console";

/// What the console knows about the running process.
struct Info {
    started: Instant,
    config_path: Option<PathBuf>,
    /// Tied to this process: a form from an earlier run is refused.
    csrf: String,
}

static INFO: OnceLock<Info> = OnceLock::new();

fn info() -> &'static Info {
    INFO.get_or_init(|| Info {
        started: Instant::now(),
        config_path: None,
        csrf: new_csrf(),
    })
}

fn new_csrf() -> String {
    let bytes: [u8; 24] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Records the process's start and configuration file for the overview. Called once at start.
pub fn init(config_path: &Path) {
    let _ = INFO.set(Info {
        started: Instant::now(),
        config_path: Some(config_path.to_owned()),
        csrf: new_csrf(),
    });
}

/// True for a path the console answers.
pub fn is_console(path: &str) -> bool {
    path == "/console" || path.starts_with("/console/")
}

/// A console answer: an HTML page, an asset, a redirect.
pub(super) struct Page {
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
    headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl Page {
    fn html(status: StatusCode, text: String) -> Self {
        Self {
            status,
            content_type: "text/html; charset=utf-8",
            body: Bytes::from(text),
            headers: Vec::new(),
        }
    }

    fn redirect(to: &str) -> Self {
        let mut page = Self::html(StatusCode::SEE_OTHER, String::new());
        if let Ok(v) = HeaderValue::from_str(to) {
            page.headers.push((header::LOCATION, v));
        }
        page
    }

    fn into_response(self) -> Response<Body> {
        let mut response = Response::new(Full::new(self.body));
        *response.status_mut() = self.status;
        let h = response.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        for (k, v) in self.headers {
            h.append(k, v);
        }
        secure(h);
        response
    }
}

/// The headers every console answer carries, errors included.
fn secure(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

/// The assets, part of the binary.
fn asset(name: &str) -> Option<(&'static str, &'static str)> {
    Some(match name {
        "console.css" => (
            "text/css; charset=utf-8",
            include_str!("assets/console.css"),
        ),
        "console.js" => (
            "text/javascript; charset=utf-8",
            include_str!("assets/console.js"),
        ),
        "playground.js" => (
            "text/javascript; charset=utf-8",
            include_str!("assets/playground.js"),
        ),
        _ => return None,
    })
}

/// A form's or query's fields, decoded (`+` is a space, as browsers send forms).
pub(super) fn form_fields(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| super::percent_decode(&s.replace('+', " "));
            Some((decode(k)?, decode(v)?))
        })
        .collect()
}

/// The value of field `name`, if present.
pub(super) fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Percent-encodes a query value or path segment (everything but unreserved characters).
pub(super) fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The body of one of the API's own answers, as JSON; a problem when it is not a success.
pub(super) async fn answer(result: Result<Response<Body>, Problem>) -> Result<Value, Problem> {
    let response = result?;
    let bytes = response
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

impl Admin {
    /// Answers a request under `/console`; one that changes state must pass [`same_site`].
    pub(super) async fn console(
        &self,
        req: Request<Incoming>,
        path: &str,
        local: SocketAddr,
    ) -> Response<Body> {
        let checked = if matches!(*req.method(), Method::GET | Method::HEAD) {
            Ok(())
        } else {
            same_site(req.headers(), local)
        };
        let page = match checked {
            Err(problem) => Err(problem),
            Ok(()) => self.console_page(req, path).await,
        };
        let page = match page {
            Ok(page) => page,
            Err(problem) => Page::html(
                StatusCode::from_u16(problem.status).unwrap_or(StatusCode::BAD_REQUEST),
                pages::problem_page(&problem),
            ),
        };
        page.into_response()
    }

    async fn console_page(&self, req: Request<Incoming>, path: &str) -> Result<Page, Problem> {
        // HEAD is answered as GET; the listener leaves the body out.
        let method = match req.method() {
            &Method::HEAD => Method::GET,
            other => other.clone(),
        };
        let query = req.uri().query().unwrap_or("").to_owned();
        let rest = path.trim_start_matches("/console").trim_start_matches('/');
        let segments: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        // Assets and the login form are open: they show nothing of the journal.
        if let (&Method::GET, ["assets", name]) = (&method, segments.as_slice()) {
            let (content_type, text) = asset(name).ok_or_else(|| super::not_found(path))?;
            return Ok(Page {
                status: StatusCode::OK,
                content_type,
                body: Bytes::from_static(text.as_bytes()),
                headers: Vec::new(),
            });
        }
        if segments.as_slice() == ["login"] {
            return self.login(req).await;
        }
        if !self.console_authorised(req.headers()) {
            return Ok(Page::redirect("/console/login"));
        }
        let csrf = info().csrf.as_str();
        if method == Method::POST {
            let given = req
                .headers()
                .get("x-console-csrf")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let is_json = given.is_some();
            let body = read_body(req.into_body(), super::adapters::MAX_EVAL_BODY_BYTES).await?;
            let fields = if is_json {
                Vec::new()
            } else {
                form_fields(&String::from_utf8_lossy(&body))
            };
            let token = given.or_else(|| field(&fields, "csrf").map(str::to_owned));
            if token.as_deref() != Some(csrf) {
                return Err(Problem::new(
                    StatusCode::FORBIDDEN,
                    "csrf_token",
                    "the form's CSRF token is missing or stale (the agent restarted since the \
                     page was loaded): reload the page and try again",
                ));
            }
            return match segments.as_slice() {
                ["events", id, "replay"] => self.console_replay(id, &fields).await,
                ["events", id, "drop"] => self.console_drop(id).await,
                ["dead-letters", "retry"] => self.console_bulk_retry(&fields).await,
                ["eval"] | ["adapters", _, "fixtures"] => {
                    let response = match segments.as_slice() {
                        ["adapters", name, "fixtures"] => self.run_fixtures(name, &body).await?,
                        _ => self.eval_adapter(&body).await?,
                    };
                    let mut page = Page::html(StatusCode::OK, String::new());
                    page.content_type = "application/json";
                    page.body = response
                        .into_body()
                        .collect()
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    Ok(page)
                }
                _ => Err(super::not_found(path)),
            };
        }
        if method != Method::GET {
            return Err(Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed on {path}: the console takes GET and POST"),
            ));
        }
        let html = match segments.as_slice() {
            [] => self.overview_page(csrf).await?,
            ["events"] => match self.events_page(&query, csrf).await? {
                Ok(html) => html,
                Err(to) => return Ok(Page::redirect(&to)),
            },
            ["events", id] => self.event_page(id, csrf).await?,
            ["events", id, action @ ("replay" | "drop")] => {
                self.confirm_page(id, action, &query, csrf).await?
            }
            ["dead-letters", "retry"] => pages::bulk_confirm_page(&form_fields(&query), csrf),
            ["playground"] => self.playground_page(&query, csrf).await?,
            _ => return Err(super::not_found(path)),
        };
        Ok(Page::html(StatusCode::OK, html))
    }

    /// True when no admin token is configured, or the request's cookie (or `Authorization`
    /// header) carries it.
    fn console_authorised(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        if token.verify(headers).is_ok() {
            return true;
        }
        cookie(headers, COOKIE).is_some_and(|value| bearer_ok(token, &value))
    }

    /// The login form (GET) and its submission (POST): a right token sets the cookie.
    async fn login(&self, req: Request<Incoming>) -> Result<Page, Problem> {
        if req.method() != Method::POST {
            return Ok(Page::html(
                StatusCode::OK,
                pages::login_page(self.token.is_some(), None),
            ));
        }
        let body = read_body(req.into_body(), super::MAX_BODY_BYTES).await?;
        let fields = form_fields(&String::from_utf8_lossy(&body));
        let given = field(&fields, "token").unwrap_or("").trim().to_owned();
        match &self.token {
            None => Ok(Page::redirect("/console")),
            Some(token) if bearer_ok(token, &given) => {
                let mut page = Page::redirect("/console");
                let cookie = format!("{COOKIE}={given}; Path=/console; HttpOnly; SameSite=Strict");
                if let Ok(v) = HeaderValue::from_str(&cookie) {
                    page.headers.push((header::SET_COOKIE, v));
                }
                Ok(page)
            }
            Some(_) => Ok(Page::html(
                StatusCode::UNAUTHORIZED,
                pages::login_page(true, Some("that is not the admin token: try again")),
            )),
        }
    }
}

/// The console's cross-site check for a state-changing request. A browser that sends
/// `Sec-Fetch-Site` (which no page's script can set) must say `same-origin`: the console's pages
/// are served with `Referrer-Policy: no-referrer`, under which Chromium sends `Origin: null` on
/// its own forms, so the `Origin` comparison of the API's check would refuse them. Without that
/// header the API's check ([`super::cross_site`]) applies as it is.
fn same_site(headers: &HeaderMap, local: SocketAddr) -> Result<(), Problem> {
    match headers
        .get("sec-fetch-site")
        .map(|v| v.to_str().unwrap_or(""))
    {
        Some("same-origin") => Ok(()),
        Some(site) => Err(Problem::new(
            StatusCode::FORBIDDEN,
            "cross_site_request",
            format!(
                "the browser says the request is {site:?}: the console takes state-changing \
                 requests only from its own pages (http://{local}/console)"
            ),
        )),
        None => super::cross_site(headers, local),
    }
}

/// True when `value` is the admin token (compared in constant time by the token itself).
fn bearer_ok(token: &crate::protocol::auth::BearerToken, value: &str) -> bool {
    let mut headers = HeaderMap::new();
    match HeaderValue::from_str(&format!("Bearer {value}")) {
        Ok(v) => {
            headers.insert(header::AUTHORIZATION, v);
            token.verify(&headers).is_ok()
        }
        Err(_) => false,
    }
}

/// The value of cookie `name`.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// The process's uptime and configuration file.
pub(super) fn uptime_and_config() -> (std::time::Duration, Option<&'static Path>) {
    let info = info();
    (info.started.elapsed(), info.config_path.as_deref())
}

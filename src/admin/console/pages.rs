//! The console's pages, rendered from the JSON API's own answers.

use std::collections::BTreeMap;

use http::StatusCode;
use serde_json::{Value, json};

use super::html::{csrf_field, esc, facts, page};
use super::{Page, answer, encode, field, form_fields, uptime_and_config};
use crate::admin::{Admin, blocking};
use crate::protocol::problem::Problem;

/// How often the overview reloads itself, in seconds.
const OVERVIEW_REFRESH_SECS: u32 = 10;

/// The listing's filter fields, as the API names them.
const FILTERS: &[&str] = &["state", "type", "subject", "route", "since", "until"];

/// The states the filter form offers.
const STATES: &[&str] = &[
    "accepted",
    "applied",
    "filtered",
    "superseded",
    "failed",
    "parked",
    "dropped",
];

/// An error page for a problem the API answered.
pub fn problem_page(problem: &Problem) -> String {
    page(
        "Error",
        "",
        &format!(
            "<p class=\"problem\" id=\"problem\"><span class=\"code\">{}</span> {}</p>\
             <p><a href=\"/console\">Back to the overview</a></p>",
            esc(problem.code),
            esc(&problem.detail)
        ),
        None,
    )
}

/// The login form.
pub fn login_page(token_needed: bool, error: Option<&str>) -> String {
    let error = error
        .map(|e| format!("<p class=\"problem\" id=\"problem\">{}</p>", esc(e)))
        .unwrap_or_default();
    let body = if token_needed {
        format!(
            "{error}<form method=\"post\" action=\"/console/login\" class=\"login\">\
             <label>Admin token <input type=\"password\" name=\"token\" id=\"token\" \
             autocomplete=\"current-password\" required></label>\
             <button type=\"submit\">Log in</button></form>\
             <p class=\"hint\">The token is the agent's <code>admin.token</code>. It is kept in \
             a cookie for this browser session only.</p>"
        )
    } else {
        "<p>No admin token is configured: <a href=\"/console\">open the console</a>.</p>".into()
    };
    page("Log in", "", &body, None)
}

/// The per-minute counts as an inline SVG: one line per series.
fn chart(minutes: &[(String, [u64; 3])]) -> String {
    const W: f64 = 600.0;
    const H: f64 = 120.0;
    let max = minutes
        .iter()
        .flat_map(|(_, c)| c.iter().copied())
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let step = W / (minutes.len().max(2) - 1) as f64;
    let series = [
        ("received", "#3465a4"),
        ("applied", "#4e9a06"),
        ("failed", "#cc0000"),
    ];
    let mut svg = format!(
        "<svg id=\"chart\" class=\"chart\" viewBox=\"-4 -4 {} {}\" role=\"img\" \
         aria-label=\"events per minute, last hour\" xmlns=\"http://www.w3.org/2000/svg\">\
         <line x1=\"0\" y1=\"{H}\" x2=\"{W}\" y2=\"{H}\" stroke=\"#888\" stroke-width=\"1\"/>",
        W + 8.0,
        H + 8.0
    );
    for (i, (name, colour)) in series.iter().enumerate() {
        let points: Vec<String> = minutes
            .iter()
            .enumerate()
            .map(|(x, (_, c))| format!("{:.1},{:.1}", x as f64 * step, H - c[i] as f64 / max * H))
            .collect();
        svg.push_str(&format!(
            "<polyline class=\"series-{name}\" fill=\"none\" stroke=\"{colour}\" \
             stroke-width=\"2\" points=\"{}\"/>",
            points.join(" ")
        ));
    }
    svg.push_str("</svg>");
    let totals = minutes.iter().fold([0u64; 3], |mut t, (_, c)| {
        for i in 0..3 {
            t[i] += c[i];
        }
        t
    });
    format!(
        "{svg}<p class=\"legend\"><span class=\"received\">received {}</span> \
         <span class=\"applied\">applied {}</span> <span class=\"failed\">failed or parked {}</span> \
         <span class=\"hint\">(events received in the last hour, per minute, by their state now; \
         the peak is {max})</span></p>",
        totals[0], totals[1], totals[2]
    )
}

fn duration_text(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        3600..86400 => format!("{} h {} min", s / 3600, (s % 3600) / 60),
        _ => format!("{} d {} h", s / 86400, (s % 86400) / 3600),
    }
}

/// A state word as a badge.
fn state_badge(state: &str) -> String {
    format!("<span class=\"state state-{0}\">{0}</span>", esc(state))
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A route's attempts as a table (a row says where attempts were not kept), and the output its
/// latest applied attempt gave the sink, pretty-printed.
fn route_history(delivery: &Value) -> String {
    let route = text(&delivery["route"]);
    let attempts = delivery["history"].as_array().cloned().unwrap_or_default();
    let mut out = format!(
        "<div class=\"route-history\" data-route=\"{0}\"><h3>Route {0}</h3>",
        esc(&route)
    );
    if attempts.is_empty() {
        out.push_str(
            "<p class=\"hint\">No attempt is recorded (it was tried before this agent kept \
             attempts, or not yet).</p></div>",
        );
        return out;
    }
    out.push_str(
        "<table class=\"attempts\"><thead><tr><th>Attempt</th><th>Started</th><th>Duration</th>\
         <th>Outcome</th><th>Error</th></tr></thead><tbody>",
    );
    let mut previous = 0;
    for a in &attempts {
        let number = a["attempt"].as_u64().unwrap_or(0);
        if number > previous + 1 && previous > 0 {
            out.push_str(&format!(
                "<tr class=\"not-kept\"><td colspan=\"5\">attempts {} to {} are not kept</td></tr>",
                previous + 1,
                number - 1
            ));
        }
        previous = number;
        out.push_str(&format!(
            "<tr class=\"attempt\" data-attempt=\"{number}\"><td class=\"number\">{number}</td>\
             <td class=\"started\">{}</td><td class=\"duration\">{} ms</td><td>{}</td>\
             <td class=\"error\">{}</td></tr>",
            esc(&text(&a["started_at"])),
            esc(&text(&a["duration_ms"])),
            state_badge(&text(&a["outcome"])),
            esc(&text(&a["error"])),
        ));
    }
    out.push_str("</tbody></table>");
    let output = &delivery["output"];
    if !output.is_null() {
        let shown = match &output["value"] {
            Value::Null if output.get("value").is_none() => text(&output["text"]),
            value => serde_json::to_string_pretty(value).unwrap_or_default(),
        };
        let note = if output["truncated"] == Value::Bool(true) {
            format!(
                " <span class=\"hint\">(the first 64 KiB of {} bytes)</span>",
                esc(&text(&output["bytes"]))
            )
        } else {
            String::new()
        };
        out.push_str(&format!(
            "<h4>Output applied{note}</h4><pre class=\"output\">{}</pre>",
            esc(&shown)
        ));
    }
    out.push_str("</div>");
    out
}

/// How the delivery was authenticated: the methods, the Standard Webhooks id and timestamp
/// with the signature versions, the client certificate's subject. Never a secret or a
/// signature: the journal keeps none.
fn receipt_facts(receipt: &Value) -> String {
    if receipt.is_null() {
        return "<p>Not recorded: the event was received before the agent kept how deliveries \
                were authenticated.</p>"
            .to_owned();
    }
    let methods: Vec<String> = receipt["methods"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m.as_str() {
            Some("standard_webhooks") => "Standard Webhooks signature".to_owned(),
            Some("bearer") => "bearer token".to_owned(),
            Some("mtls") => "mutual TLS".to_owned(),
            _ => text(m),
        })
        .collect();
    let methods = if methods.is_empty() {
        "none (no check is configured on this loopback listener)".to_owned()
    } else {
        methods.join(", ")
    };
    let mut rows = vec![(
        "Authenticated by",
        format!("<span id=\"receipt-methods\">{}</span>", esc(&methods)),
    )];
    let webhook = &receipt["webhook"];
    if webhook.is_object() {
        let prefix = if webhook["header_names"] == "svix" {
            "svix"
        } else {
            "webhook"
        };
        let versions: Vec<String> = webhook["signature_versions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(text)
            .collect();
        rows.push((
            "Message id",
            format!(
                "<code id=\"webhook-id\">{}</code> <span class=\"hint\">({prefix}-id)</span>",
                esc(&text(&webhook["id"]))
            ),
        ));
        rows.push((
            "Signed at",
            format!(
                "<span id=\"webhook-timestamp\">{}</span> ({}) <span class=\"hint\">\
                 ({prefix}-timestamp)</span>",
                esc(&text(&webhook["timestamp"])),
                esc(&text(&webhook["time"]))
            ),
        ));
        rows.push((
            "Signatures listed",
            format!(
                "<span id=\"signature-versions\">{}</span>, verified by {}",
                esc(&versions.join(", ")),
                esc(&text(&webhook["verified_by"]))
            ),
        ));
    }
    let subject = &receipt["client_certificate"]["subject"];
    if !subject.is_null() {
        rows.push((
            "Client certificate",
            format!("<code id=\"client-subject\">{}</code>", esc(&text(subject))),
        ));
    }
    facts(&rows)
}

/// Link to an event's page.
fn event_link(id: &str) -> String {
    format!(
        "<a class=\"event-link\" href=\"/console/events/{}\">{}</a>",
        encode(id),
        esc(id)
    )
}

impl Admin {
    pub(super) async fn overview_page(&self, _csrf: &str) -> Result<String, Problem> {
        let journal = self.journal.clone();
        let backlog = journal.backlog();
        let (dead, outbox) =
            blocking(move || Ok((journal.dead_letter_count()?, journal.outbox_len()?))).await?;
        let journal = self.journal.clone();
        let minutes = blocking(move || minute_counts(&journal)).await?;
        let (uptime, config) = uptime_and_config();
        let reasons = self.readiness.reasons();
        let routing = self.dispatcher.routing();
        let mut sinks = String::from(
            "<table id=\"sinks\"><thead><tr><th>Sink</th><th>Type</th><th>Health</th>\
             <th>Last error</th></tr></thead><tbody>",
        );
        for (name, built) in &routing.sinks {
            let kind = built.config.kind();
            let (health, error) = match reasons.get(&format!("sink {name}")) {
                None => (
                    "<span class=\"ok\">healthy</span>".to_owned(),
                    String::new(),
                ),
                Some(reason) => ("<span class=\"bad\">failing</span>".to_owned(), esc(reason)),
            };
            sinks.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{health}</td><td>{error}</td></tr>",
                esc(name),
                esc(&kind)
            ));
        }
        if routing.sinks.is_empty() {
            sinks.push_str("<tr><td colspan=\"4\">no sinks are configured</td></tr>");
        }
        sinks.push_str("</tbody></table>");
        let ready = if reasons.is_empty() {
            "<span class=\"ok\" id=\"ready\">ready</span>".to_owned()
        } else {
            let list: Vec<String> = reasons
                .iter()
                .map(|(k, v)| format!("{}: {}", esc(k), esc(v)))
                .collect();
            format!(
                "<span class=\"bad\" id=\"ready\">not ready</span> ({})",
                list.join("; ")
            )
        };
        let dead_link = if dead > 0 {
            format!("<a href=\"/console/events?state=failed%2Cparked\">{dead}</a>")
        } else {
            "0".to_owned()
        };
        let body = format!(
            "<section><h2>Last hour</h2>{chart}</section>\
             <section class=\"cols\"><div><h2>Agent</h2>{agent}</div><div><h2>Queues</h2>{queues}</div></section>\
             <section><h2>Sinks</h2>{sinks}</section>",
            chart = chart(&minutes),
            agent = facts(&[
                ("Readiness", ready),
                ("Version", esc(env!("CARGO_PKG_VERSION"))),
                ("Agent id", esc(&self.partner)),
                ("Uptime", esc(&duration_text(uptime))),
                (
                    "Configuration",
                    config
                        .map(|p| format!("<code>{}</code>", esc(&p.display().to_string())))
                        .unwrap_or_else(|| "unknown".into()),
                ),
            ]),
            queues = facts(&[
                ("Backlog", format!("<span id=\"backlog\">{backlog}</span>")),
                (
                    "Dead letters",
                    format!("<span id=\"dead-letters\">{dead_link}</span>")
                ),
                (
                    "Status reports waiting",
                    format!("<span id=\"outbox\">{outbox}</span>")
                ),
            ]),
        );
        Ok(page(
            "Overview",
            "/console",
            &body,
            Some(OVERVIEW_REFRESH_SECS),
        ))
    }

    /// The listing; `Err(location)` when the form asked for one event by id.
    pub(super) async fn events_page(
        &self,
        query: &str,
        csrf: &str,
    ) -> Result<Result<String, String>, Problem> {
        let fields = form_fields(query);
        if let Some(id) = field(&fields, "id")
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            return Ok(Err(format!("/console/events/{}", encode(id))));
        }
        let filters: Vec<(&str, &str)> = FILTERS
            .iter()
            .filter_map(|name| {
                field(&fields, name)
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(|v| (*name, v))
            })
            .collect();
        let mut api: Vec<String> = filters
            .iter()
            .map(|(k, v)| format!("{k}={}", encode(v)))
            .collect();
        if let Some(cursor) = field(&fields, "cursor").filter(|c| !c.is_empty()) {
            api.push(format!("cursor={}", encode(cursor)));
        }
        let listed = answer(self.list_events(&api.join("&")).await).await;
        let value = |name: &str| {
            filters
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| esc(v))
                .unwrap_or_default()
        };
        let state_now = filters
            .iter()
            .find(|(k, _)| *k == "state")
            .map(|(_, v)| *v)
            .unwrap_or("");
        let mut options = String::from("<option value=\"\">any</option>");
        for state in STATES.iter().copied().chain(["failed,parked"]) {
            let label = if state == "failed,parked" {
                "dead letters (failed, parked)"
            } else {
                state
            };
            let selected = if state == state_now { " selected" } else { "" };
            options.push_str(&format!(
                "<option value=\"{state}\"{selected}>{label}</option>"
            ));
        }
        let form = format!(
            "<form method=\"get\" action=\"/console/events\" class=\"filters\" id=\"filters\">\
             <label>State <select name=\"state\" id=\"f-state\">{options}</select></label>\
             <label>Type <input name=\"type\" id=\"f-type\" value=\"{}\" placeholder=\"rule.*\"></label>\
             <label>Subject <input name=\"subject\" id=\"f-subject\" value=\"{}\"></label>\
             <label>Route <input name=\"route\" id=\"f-route\" value=\"{}\"></label>\
             <label>Since <input name=\"since\" id=\"f-since\" value=\"{}\" placeholder=\"2026-12-07T09:00:00Z\"></label>\
             <label>Until <input name=\"until\" id=\"f-until\" value=\"{}\"></label>\
             <button type=\"submit\" id=\"f-apply\">Filter</button> <a href=\"/console/events\">clear</a></form>\
             <form method=\"get\" action=\"/console/events\" class=\"search\">\
             <label>Event id <input name=\"id\" id=\"f-id\"></label><button type=\"submit\">Open</button></form>",
            value("type"),
            value("subject"),
            value("route"),
            value("since"),
            value("until"),
        );
        let listing = match listed {
            Err(problem) => format!(
                "<p class=\"problem\" id=\"problem\">{}</p>",
                esc(&problem.detail)
            ),
            Ok(body) => {
                let items = body["items"].as_array().cloned().unwrap_or_default();
                let mut table = String::from(
                    "<table id=\"events\"><thead><tr><th>Received</th><th>Id</th><th>Type</th>\
                     <th>Subject</th><th>State</th><th>Error</th></tr></thead><tbody>",
                );
                for item in &items {
                    table.push_str(&format!(
                        "<tr data-id=\"{}\"><td>{}</td><td>{}</td><td class=\"type\">{} v{}</td>\
                         <td class=\"subject\">{}</td><td>{}</td><td class=\"error\">{}</td></tr>",
                        esc(&text(&item["id"])),
                        esc(&text(&item["received_at"])),
                        event_link(&text(&item["id"])),
                        esc(&text(&item["type"])),
                        esc(&text(&item["version"])),
                        esc(&text(&item["subject"])),
                        state_badge(&text(&item["state"])),
                        esc(&text(&item["error"])),
                    ));
                }
                if items.is_empty() {
                    table.push_str("<tr><td colspan=\"6\">no events match</td></tr>");
                }
                table.push_str("</tbody></table>");
                if let Some(next) = body["next_cursor"].as_str() {
                    let mut q: Vec<String> = filters
                        .iter()
                        .map(|(k, v)| format!("{k}={}", encode(v)))
                        .collect();
                    q.push(format!("cursor={}", encode(next)));
                    table.push_str(&format!(
                        "<p class=\"paging\"><a id=\"next-page\" href=\"/console/events?{}\">Older events →</a></p>",
                        esc(&q.join("&"))
                    ));
                }
                table
            }
        };
        // Bulk retry of the dead letters this filter selects (state aside: it retries dead
        // letters only).
        let selects: Vec<String> = filters
            .iter()
            .filter(|(k, _)| *k != "state")
            .map(|(k, v)| format!("{k}={}", encode(v)))
            .collect();
        let bulk = format!(
            "<p class=\"bulk\"><a id=\"bulk-retry\" href=\"/console/dead-letters/retry?{}\">Retry the dead letters this filter selects…</a></p>",
            esc(&selects.join("&"))
        );
        let _ = csrf;
        Ok(Ok(page(
            "Events",
            "/console/events",
            &format!("{form}{bulk}{listing}"),
            None,
        )))
    }

    pub(super) async fn event_page(&self, raw_id: &str, _csrf: &str) -> Result<String, Problem> {
        let event = answer(self.get_event(raw_id).await).await?;
        let id = text(&event["id"]);
        let state = text(&event["state"]);
        let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
        let record = facts(&[
            ("Id", format!("<code id=\"event-id\">{}</code>", esc(&id))),
            (
                "State",
                format!("<span id=\"event-state\">{}</span>", state_badge(&state)),
            ),
            (
                "Type",
                format!(
                    "<span id=\"event-type\">{}</span> version {}",
                    esc(&text(&event["type"])),
                    esc(&text(&event["version"]))
                ),
            ),
            (
                "Subject",
                format!(
                    "<span id=\"event-subject\">{}</span>",
                    esc(&text(&event["subject"]))
                ),
            ),
            ("Revision", esc(&text(&event["revision"]))),
            ("Source", esc(&text(&event["source"]))),
            ("Time (hub)", esc(&text(&event["time"]))),
            ("Received", esc(&text(&event["received_at"]))),
            ("Finished", esc(&text(&event["finished_at"]))),
            (
                "Error",
                format!(
                    "<span class=\"error\">{}</span>",
                    esc(&text(&event["error"]))
                ),
            ),
            ("Wire format", esc(&text(&event["format"]))),
        ]);
        let mut deliveries = String::from(
            "<table id=\"deliveries\"><thead><tr><th>Route</th><th>Sink</th><th>State</th>\
             <th>Attempts</th><th>Last change</th><th>Last error</th></tr></thead><tbody>",
        );
        let delivered = event["deliveries"].as_array().cloned().unwrap_or_default();
        for d in &delivered {
            deliveries.push_str(&format!(
                "<tr data-route=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td class=\"attempts\">{}</td><td class=\"updated\">{}</td><td class=\"error\">{}</td></tr>",
                esc(&text(&d["route"])),
                esc(&text(&d["route"])),
                esc(&text(&d["sink"])),
                state_badge(&text(&d["state"])),
                esc(&text(&d["attempts"])),
                esc(&text(&d["updated_at"])),
                esc(&text(&d["last_error"])),
            ));
        }
        if delivered.is_empty() {
            deliveries
                .push_str("<tr><td colspan=\"6\">no route has taken this event yet</td></tr>");
        }
        deliveries.push_str("</tbody></table>");
        for d in &delivered {
            deliveries.push_str(&route_history(d));
        }
        let waiting = match &event["report"] {
            Value::Null => String::new(),
            report => format!(
                "<p>Waiting in the outbox: {} attempt(s){}.</p><pre id=\"report\">{}</pre>",
                esc(&text(&report["attempts"])),
                match report["last_error"].as_str() {
                    Some(e) => format!(", last error: {}", esc(e)),
                    None => String::new(),
                },
                esc(&pretty(&report["body"]))
            ),
        };
        // The reports the hub took, oldest first, then the one waiting.
        let mut report = String::new();
        let sent = event["reports_sent"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for (n, sent) in sent.iter().enumerate() {
            report.push_str(&format!(
                "<p>Taken by the hub at {} after {} attempt(s) (made {}).</p>\
                 <pre class=\"report-sent\" id=\"report-sent-{n}\">{}</pre>",
                esc(&text(&sent["sent_at"])),
                esc(&text(&sent["attempts"])),
                esc(&text(&sent["created_at"])),
                esc(&pretty(&sent["body"]))
            ));
        }
        report.push_str(&waiting);
        if report.is_empty() {
            report.push_str(
                "<p>No status report was made for this event yet: it is made when the event \
                 reaches its final state, where the hub takes reports.</p>",
            );
        }
        // The routes a replay may name: those in force.
        let routing = self.dispatcher.routing();
        let mut routes = String::from("<option value=\"\">every route</option>");
        for route in &routing.routes {
            routes.push_str(&format!(
                "<option value=\"{0}\">{0}</option>",
                esc(&route.name)
            ));
        }
        let enc = encode(&id);
        let dead = matches!(state.as_str(), "failed" | "parked");
        let dead_actions = if dead {
            format!(
                " <a class=\"button\" id=\"retry\" href=\"/console/events/{enc}/replay\">Retry…</a> \
                 <a class=\"button danger\" id=\"drop\" href=\"/console/events/{enc}/drop\">Drop…</a>"
            )
        } else {
            String::new()
        };
        let actions = format!(
            "<form method=\"get\" action=\"/console/events/{enc}/replay\" class=\"actions\">\
             <label>Replay through <select name=\"route\" id=\"replay-route\">{routes}</select></label>\
             <button type=\"submit\" id=\"replay\">Replay…</button>{dead_actions} \
             <a class=\"button\" href=\"/console/playground?event={enc}\">Open in the playground</a></form>"
        );
        let receipt = receipt_facts(&event["receipt"]);
        let body = format!(
            "{record}<section><h2>Actions</h2>{actions}</section>\
             <section><h2>Receipt</h2>{receipt}</section>\
             <section><h2>Routes and attempts</h2>{deliveries}\
             <p class=\"hint\">One row per route: the latest attempt's state, the attempts since \
             the route was last replayed and the last error; below, each route's attempts (the \
             first and the latest 99 are kept) and the output its latest applied attempt gave the \
             sink.</p></section>\
             <section><h2>Status reports</h2>{report}</section>\
             <section><h2>Envelope</h2><pre id=\"envelope\">{}</pre></section>\
             <section><h2>Raw body (as the hub sent it)</h2><pre id=\"raw-body\">{}</pre></section>",
            esc(&pretty(&event["envelope"])),
            esc(&text(&event["raw_body"])),
        );
        Ok(page(&format!("Event {id}"), "/console/events", &body, None))
    }

    /// The confirmation page of a replay (or retry) or a drop.
    pub(super) async fn confirm_page(
        &self,
        raw_id: &str,
        action: &str,
        query: &str,
        csrf: &str,
    ) -> Result<String, Problem> {
        let event = answer(self.get_event(raw_id).await).await?;
        let id = text(&event["id"]);
        let enc = encode(&id);
        let fields = form_fields(query);
        let route = field(&fields, "route").unwrap_or("").trim();
        let (question, extra, button) = if action == "drop" {
            (
                format!(
                    "Drop dead letter <code>{}</code>? It is no longer retried and leaves the dead \
                     letters; the hub is told it was dropped.",
                    esc(&id)
                ),
                String::new(),
                "Drop",
            )
        } else {
            let target = if route.is_empty() {
                "through every route that takes it".to_owned()
            } else {
                format!("through route <code>{}</code> only", esc(route))
            };
            (
                format!("Replay event <code>{}</code> {target}?", esc(&id)),
                format!(
                    "<input type=\"hidden\" name=\"route\" value=\"{}\">\
                     <label><input type=\"checkbox\" name=\"force\" id=\"force\"> apply again \
                     where it was already applied (force)</label>",
                    esc(route)
                ),
                "Replay",
            )
        };
        let body = format!(
            "<p id=\"question\">{question}</p>\
             <form method=\"post\" action=\"/console/events/{enc}/{action}\" id=\"confirm-form\">{}{extra}\
             <p><button type=\"submit\" id=\"confirm\">{button}</button> \
             <a href=\"/console/events/{enc}\" id=\"cancel\">Cancel</a></p></form>",
            csrf_field(csrf)
        );
        Ok(page("Confirm", "/console/events", &body, None))
    }

    pub(super) async fn console_replay(
        &self,
        raw_id: &str,
        fields: &[(String, String)],
    ) -> Result<Page, Problem> {
        let route = field(fields, "route")
            .map(str::trim)
            .filter(|r| !r.is_empty());
        let force = field(fields, "force").is_some_and(|v| matches!(v, "on" | "true" | "1"));
        let body = match route {
            Some(route) => json!({"route": route}).to_string(),
            None => String::new(),
        };
        let outcome = answer(self.replay(raw_id, force, body.as_bytes()).await).await;
        let id = super::super::percent_decode(raw_id).unwrap_or_default();
        Ok(result_page(
            &id,
            outcome.map(|_| match route {
                Some(r) => format!("Event {id} was requeued through route {r}."),
                None => format!("Event {id} was requeued through every route that takes it."),
            }),
        ))
    }

    pub(super) async fn console_drop(&self, raw_id: &str) -> Result<Page, Problem> {
        let outcome = answer(self.drop_dead_letter(raw_id).await).await;
        let id = super::super::percent_decode(raw_id).unwrap_or_default();
        Ok(result_page(
            &id,
            outcome.map(|_| format!("Dead letter {id} was dropped.")),
        ))
    }

    pub(super) async fn console_bulk_retry(
        &self,
        fields: &[(String, String)],
    ) -> Result<Page, Problem> {
        let mut filter = serde_json::Map::new();
        for name in ["route", "type", "subject", "since", "until"] {
            if let Some(v) = field(fields, name).map(str::trim).filter(|v| !v.is_empty()) {
                filter.insert(name.into(), Value::String(v.to_owned()));
            }
        }
        if filter.is_empty() {
            filter.insert("all".into(), Value::Bool(true));
        }
        let outcome = answer(
            self.retry_dead_letters(Value::Object(filter).to_string().as_bytes())
                .await,
        )
        .await;
        let body = match outcome {
            Ok(v) => {
                let ids: Vec<String> = v["ids"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|i| format!("<li>{}</li>", event_link(&text(i))))
                            .collect()
                    })
                    .unwrap_or_default();
                format!(
                    "<p class=\"done\" id=\"result\">{} dead letter(s) requeued{}.</p><ul id=\"requeued\">{}</ul>\
                     <p><a href=\"/console/events\">Back to the events</a></p>",
                    esc(&text(&v["requeued"])),
                    if v["more"] == Value::Bool(true) {
                        "; more are left: retry again"
                    } else {
                        ""
                    },
                    ids.join("")
                )
            }
            Err(problem) => format!(
                "<p class=\"problem\" id=\"result\">{}</p>",
                esc(&problem.detail)
            ),
        };
        Ok(Page::html(
            StatusCode::OK,
            page("Bulk retry", "/console/events", &body, None),
        ))
    }

    pub(super) async fn playground_page(&self, query: &str, csrf: &str) -> Result<String, Problem> {
        let fields = form_fields(query);
        let event = field(&fields, "event").unwrap_or("").trim().to_owned();
        let chosen = field(&fields, "adapter").unwrap_or("").trim().to_owned();
        let adapters = self
            .reloader
            .as_ref()
            .map(|r| r.adapters())
            .unwrap_or_default();
        let adapters = serde_json::to_value(&adapters).unwrap_or(Value::Null);
        // The adapters the routes use, by name (file name without `.jsonata`), with the script
        // in force: opening one puts its script in the editor and runs its fixtures on every
        // edit.
        let routing = self.dispatcher.routing();
        let mut scripts: BTreeMap<String, String> = BTreeMap::new();
        for route in &routing.routes {
            let name = route
                .adapter
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            scripts
                .entry(name)
                .or_insert_with(|| route.adapter.source().to_owned());
        }
        drop(routing);
        let opened = scripts.get(&chosen);
        let options: String = std::iter::once(String::new())
            .chain(scripts.keys().cloned())
            .map(|name| {
                format!(
                    "<option value=\"{0}\"{1}>{2}</option>",
                    esc(&name),
                    if opened.is_some() && name == chosen {
                        " selected"
                    } else {
                        ""
                    },
                    if name.is_empty() {
                        "(none)".to_owned()
                    } else {
                        esc(&name)
                    },
                )
            })
            .collect();
        let script = opened.map_or("{ \"id\": id, \"subject\": subject }", String::as_str);
        let fixtures = if opened.is_some() {
            format!(
                "<h2>Fixtures of {0}</h2><p id=\"fixtures-status\" class=\"hint\">the \
                 adapter's cases run on the script above as you type, as <code>ess-agent adapter \
                 test</code> runs them</p><ol id=\"fixtures\" class=\"fixtures\"></ol>",
                esc(&chosen)
            )
        } else if chosen.is_empty() {
            String::new()
        } else {
            format!(
                "<p class=\"problem\">No route uses an adapter named {}: choose one of the list.</p>",
                esc(&chosen)
            )
        };
        let body = format!(
            "<div id=\"playground\" data-csrf=\"{}\" data-adapter=\"{}\">\
             <p class=\"hint\">Edit a script and see its output as you type, with the agent's own \
             engine and limits. Nothing here writes adapter files: download the script and a \
             fixture and put them in the adapters directory. This page needs JavaScript.</p>\
             <form method=\"get\" action=\"/console/playground\" class=\"filters\">\
             <label>Adapter <select id=\"adapter\" name=\"adapter\">{}</select></label>\
             <input type=\"hidden\" name=\"event\" value=\"{}\">\
             <button type=\"submit\" id=\"open-adapter\">Open its script and fixtures</button></form>\
             <div class=\"cols\"><div>\
             <label>Stored event id <input id=\"event\" value=\"{}\" placeholder=\"evt-…\"></label>\
             <label>or input JSON <textarea id=\"input\" rows=\"8\" spellcheck=\"false\">{{}}</textarea></label>\
             <label>Script <textarea id=\"script\" rows=\"12\" spellcheck=\"false\">{}</textarea></label>\
             <ol id=\"lines\" class=\"lines\"></ol>\
             </div><div>\
             <h2>Output</h2><p id=\"status\" class=\"hint\">type to evaluate</p>\
             <p id=\"error-where\" class=\"problem\" hidden></p>\
             <pre id=\"diagnostic\" hidden></pre><pre id=\"output\"></pre>\
             <p><a id=\"download-script\" download=\"{}.jsonata\" href=\"#\">Download the script</a> · \
             <a id=\"download-fixture\" download=\"fixture.json\" href=\"#\">Download a fixture (the event and this output)</a></p>\
             <details><summary>The fixture</summary><pre id=\"fixture\"></pre></details>\
             {}\
             <h2>Adapters</h2><pre id=\"adapters\">{}</pre>\
             </div></div></div><script src=\"/console/assets/playground.js\" defer></script>",
            esc(csrf),
            esc(if opened.is_some() { &chosen } else { "" }),
            options,
            esc(&event),
            esc(&event),
            esc(script),
            esc(if opened.is_some() { &chosen } else { "adapter" }),
            fixtures,
            esc(&serde_json::to_string_pretty(&adapters).unwrap_or_default()),
        );
        Ok(page(
            "Adapter playground",
            "/console/playground",
            &body,
            None,
        ))
    }
}

/// The bulk retry's confirmation page for the filter in `fields`.
pub fn bulk_confirm_page(fields: &[(String, String)], csrf: &str) -> String {
    let mut hidden = String::new();
    let mut described = Vec::new();
    for name in ["route", "type", "subject", "since", "until"] {
        if let Some(v) = field(fields, name).map(str::trim).filter(|v| !v.is_empty()) {
            hidden.push_str(&format!(
                "<input type=\"hidden\" name=\"{name}\" value=\"{}\">",
                esc(v)
            ));
            described.push(format!("{name} <code>{}</code>", esc(v)));
        }
    }
    let what = if described.is_empty() {
        "every dead letter".to_owned()
    } else {
        format!("the dead letters with {}", described.join(", "))
    };
    let body = format!(
        "<p id=\"question\">Retry {what}? Routes already applied stay applied.</p>\
         <form method=\"post\" action=\"/console/dead-letters/retry\" id=\"confirm-form\">{}{hidden}\
         <p><button type=\"submit\" id=\"confirm\">Retry</button> \
         <a href=\"/console/events\" id=\"cancel\">Cancel</a></p></form>",
        csrf_field(csrf)
    );
    page("Confirm", "/console/events", &body, None)
}

/// The page showing an action's outcome.
fn result_page(id: &str, outcome: Result<String, Problem>) -> Page {
    let (status, message) = match outcome {
        Ok(done) => (
            StatusCode::OK,
            format!("<p class=\"done\" id=\"result\">{}</p>", esc(&done)),
        ),
        Err(p) => (
            StatusCode::from_u16(p.status).unwrap_or(StatusCode::BAD_REQUEST),
            format!("<p class=\"problem\" id=\"result\">{}</p>", esc(&p.detail)),
        ),
    };
    let body = format!(
        "{message}<p><a id=\"back\" href=\"/console/events/{}\">Back to the event</a></p>",
        encode(id)
    );
    Page::html(status, page("Result", "/console/events", &body, None))
}

/// Events received in the last hour, per minute, by their state now: the minute keys
/// (`YYYY-MM-DDTHH:MM`) in order, and the counts of received, applied and dead-lettered events.
/// Blocking.
fn minute_counts(
    journal: &crate::journal::Journal,
) -> Result<Vec<(String, [u64; 3])>, crate::journal::JournalError> {
    let now = time::OffsetDateTime::now_utc();
    let start = now - time::Duration::minutes(59);
    let start = start
        .replace_second(0)
        .unwrap_or(start)
        .replace_nanosecond(0)
        .unwrap_or(start);
    let since = crate::timestamp::format(start);
    let rows = journal.received_per_minute(&since)?;
    let mut minutes: BTreeMap<String, [u64; 3]> = (0..60)
        .map(|i| {
            let at = crate::timestamp::format(start + time::Duration::minutes(i));
            (at[..16].to_owned(), [0; 3])
        })
        .collect();
    for (minute, state, count) in rows {
        if let Some(slot) = minutes.get_mut(&minute) {
            slot[0] += count;
            match state.as_str() {
                "applied" => slot[1] += count,
                "failed" | "parked" => slot[2] += count,
                _ => {}
            }
        }
    }
    Ok(minutes.into_iter().collect())
}

//! The routing table: which events go through which adapter to which sink.
//!
//! A [`Routing`] is immutable once built. The dispatcher holds the current one behind a lock and
//! every event takes a snapshot when its processing starts, so a reload never changes the
//! adapter or sink under an event that is being applied.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::adapter::Adapter;
use crate::adapter::engine::{CODE_TIMEOUT, EngineError, Limits};
use crate::config::{Config, RouteConfig};
use crate::settings::Problem;
use crate::settings::{RetryConfig, VersionRange};
use crate::sink::{Sink, SinkConfig};

/// Matches `text` against a glob: `*` any run of characters (also empty), `?` one character.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative matching with one backtrack point: linear in practice, never exponential.
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// One usable route.
pub struct Route {
    pub name: String,
    pub types: Vec<String>,
    pub versions: VersionRange,
    pub adapter: Arc<Adapter>,
    pub sink_name: String,
    pub sink: Arc<dyn Sink>,
    pub retry: RetryConfig,
    pub limits: Limits,
    /// How many more evaluations go straight to the blocking pool, after one ran past
    /// [`INLINE_BUDGET`].
    offload: AtomicU32,
    /// The route's metrics, registered at first use (after the exporter is installed), so that
    /// recording one costs no label allocation or registry lookup.
    metrics: std::sync::OnceLock<RouteMetrics>,
}

/// The handles of one route's metrics.
pub struct RouteMetrics {
    pub adapter_eval_seconds: metrics::Histogram,
    pub sink_apply_seconds: metrics::Histogram,
    /// `ess_agent_deliveries_total` by result: applied, filtered, failed, retry.
    pub applied: metrics::Counter,
    pub filtered: metrics::Counter,
    pub failed: metrics::Counter,
    pub retry: metrics::Counter,
}

/// How long an adapter evaluation may run on the async thread that dispatches the event.
/// Most scripts take microseconds, and handing each evaluation to another thread would cost
/// more than the evaluation. An evaluation that runs out of this budget is dropped and run
/// again, with the route's full limits, on the blocking pool (evaluations have no side
/// effects), and the route's next [`OFFLOAD_AFTER_OVERRUN`] evaluations go there directly.
pub const INLINE_BUDGET: Duration = Duration::from_millis(1);

/// See [`INLINE_BUDGET`].
pub const OFFLOAD_AFTER_OVERRUN: u32 = 256;

impl Route {
    /// The route's metric handles.
    pub fn metrics(&self) -> &RouteMetrics {
        self.metrics.get_or_init(|| {
            let deliveries = |result: &'static str| {
                metrics::counter!(
                    "ess_agent_deliveries_total",
                    "route" => self.name.clone(),
                    "sink" => self.sink_name.clone(),
                    "result" => result
                )
            };
            RouteMetrics {
                adapter_eval_seconds: metrics::histogram!(
                    "ess_agent_adapter_eval_seconds",
                    "route" => self.name.clone()
                ),
                sink_apply_seconds: metrics::histogram!(
                    "ess_agent_sink_apply_seconds",
                    "sink" => self.sink_name.clone()
                ),
                applied: deliveries("applied"),
                filtered: deliveries("filtered"),
                failed: deliveries("failed"),
                retry: deliveries("retry"),
            }
        })
    }

    /// Runs the route's adapter on `input`, the JSON text of the event's envelope: on this
    /// thread within [`INLINE_BUDGET`], or on the blocking pool with the route's full limits
    /// when that does not suffice.
    pub async fn evaluate(&self, input: &str, partner: &str) -> Result<Option<Value>, EngineError> {
        let offloaded = self
            .offload
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if !offloaded && self.limits.time > INLINE_BUDGET {
            match self
                .adapter
                .evaluate_text_brief(input, partner, &self.limits, INLINE_BUDGET)
            {
                Err(e) if e.code == CODE_TIMEOUT => {
                    self.offload.store(OFFLOAD_AFTER_OVERRUN, Ordering::Relaxed);
                }
                done => return done,
            }
        }
        let adapter = self.adapter.clone();
        let limits = self.limits.clone();
        let partner = partner.to_owned();
        let input = input.to_owned();
        tokio::task::spawn_blocking(move || adapter.evaluate_text(&input, &partner, &limits))
            .await
            .unwrap_or_else(|e| {
                Err(EngineError::internal(format!(
                    "the evaluation task failed: {e}"
                )))
            })
    }

    /// True when the route takes events of this type and version.
    /// A route of every type and version through `adapter` to `sink`, with default retries
    /// and limits.
    #[cfg(test)]
    pub(crate) fn for_tests(name: &str, adapter: Adapter, sink: Arc<dyn Sink>) -> Route {
        Route {
            name: name.into(),
            types: vec!["*".into()],
            versions: VersionRange::parse("*").unwrap_or(VersionRange {
                min: None,
                max: None,
            }),
            adapter: Arc::new(adapter),
            sink_name: name.into(),
            sink,
            retry: serde_json::from_value(serde_json::json!({}))
                .unwrap_or_else(|e| unreachable!("the default retry policy deserializes: {e}")),
            limits: Limits::default(),
            offload: AtomicU32::new(0),
            metrics: std::sync::OnceLock::new(),
        }
    }

    /// True when the route takes events of this type and version.
    pub fn matches(&self, event_type: &str, version: u64) -> bool {
        self.versions.contains(version) && self.types.iter().any(|t| glob_match(t, event_type))
    }
}

/// A built sink with the configuration it was built from.
pub struct BuiltSink {
    pub config: SinkConfig,
    /// A digest of the secrets it was built with (see [`SinkConfig::secret_digest`]).
    pub secrets: [u8; 32],
    pub sink: Arc<dyn Sink>,
}

/// The routes and sinks in force.
#[derive(Default)]
pub struct Routing {
    pub routes: Vec<Route>,
    pub sinks: BTreeMap<String, BuiltSink>,
}

fn limits(route: &RouteConfig) -> Limits {
    let default = Limits::default();
    Limits {
        time: route
            .time_limit_ms
            .map(Duration::from_millis)
            .unwrap_or(default.time),
        max_depth: route.max_depth.unwrap_or(default.max_depth),
        max_output_bytes: route.max_output_bytes.unwrap_or(default.max_output_bytes),
    }
}

impl Routing {
    /// Builds the routing of a validated configuration: compiles every adapter and builds every
    /// sink. A sink whose configuration and secrets equal those of one in `previous` is reused,
    /// not rebuilt. Every problem is reported, not only the first.
    pub fn build(config: &Config, previous: Option<&Routing>) -> Result<Routing, Vec<Problem>> {
        Routing::build_with(config, previous, &mut |path| {
            Adapter::load(path).map(Arc::new)
        })
    }

    /// As [`Routing::build`], with the adapters loaded by `load` (so a caller can record what
    /// each load gave).
    pub fn build_with(
        config: &Config,
        previous: Option<&Routing>,
        load: &mut dyn FnMut(
            &std::path::Path,
        ) -> Result<Arc<Adapter>, crate::adapter::AdapterError>,
    ) -> Result<Routing, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut sinks = BTreeMap::new();
        for (name, sink_config) in &config.sinks {
            let key = format!("sinks.{name}");
            // Secrets are read again on every build, so that a rewritten secret file is
            // noticed and one that cannot be read any more refuses the build.
            let secrets = match sink_config.secret_digest(&key) {
                Ok(digest) => digest,
                Err(mut unreadable) => {
                    problems.append(&mut unreadable);
                    continue;
                }
            };
            let reused = previous
                .and_then(|p| p.sinks.get(name))
                .filter(|built| built.config == *sink_config && built.secrets == secrets)
                .map(|built| built.sink.clone());
            let sink = match reused {
                Some(sink) => sink,
                None => match sink_config.build(&key) {
                    Ok(sink) => sink,
                    Err(problem) => {
                        problems.push(problem);
                        continue;
                    }
                },
            };
            sinks.insert(
                name.clone(),
                BuiltSink {
                    config: sink_config.clone(),
                    secrets,
                    sink,
                },
            );
        }
        let mut adapters: BTreeMap<std::path::PathBuf, Arc<Adapter>> = BTreeMap::new();
        let mut routes = Vec::new();
        for (i, route) in config.routes.iter().enumerate() {
            let adapter = match adapters.get(&route.adapter) {
                Some(adapter) => adapter.clone(),
                None => match load(&route.adapter) {
                    Ok(adapter) => {
                        adapters.insert(route.adapter.clone(), adapter.clone());
                        adapter
                    }
                    Err(e) => {
                        problems.push(Problem {
                            key: format!("routes[{i}].adapter"),
                            message: e.to_string(),
                        });
                        continue;
                    }
                },
            };
            let (Some(built), Ok(versions)) =
                (sinks.get(&route.sink), VersionRange::parse(&route.versions))
            else {
                // Reported by Config::validate already.
                continue;
            };
            routes.push(Route {
                name: route.name.clone(),
                types: route.types.clone(),
                versions,
                adapter,
                sink_name: route.sink.clone(),
                sink: built.sink.clone(),
                retry: built.config.retry().clone(),
                limits: limits(route),
                offload: AtomicU32::new(0),
                metrics: std::sync::OnceLock::new(),
            });
        }
        if problems.is_empty() {
            Ok(Routing { routes, sinks })
        } else {
            Err(problems)
        }
    }

    /// The routes that take an event of this type and version, in configuration order.
    pub fn matching(&self, event_type: &str, version: u64) -> Vec<&Route> {
        self.routes
            .iter()
            .filter(|r| r.matches(event_type, version))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "rule.updated"));
        assert!(glob_match("rule.*", "rule.updated"));
        assert!(!glob_match("rule.*", "rules.updated"));
        assert!(glob_match("court.?", "court.1"));
        assert!(!glob_match("court.?", "court.12"));
        assert!(glob_match("*Updated", "PolicyUpdated"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("PolicyUpdated", "PolicyUpdated"));
        assert!(!glob_match("policy_update", "PolicyUpdated"));
        // Pathological patterns finish quickly.
        let long = "a".repeat(10_000);
        assert!(!glob_match("*a*a*a*a*a*a*b", &long));
    }

    struct Nowhere;

    #[async_trait::async_trait]
    impl Sink for Nowhere {
        async fn apply(
            &self,
            _: &crate::sink::EventMeta,
            _: &Value,
        ) -> Result<(), crate::sink::SinkError> {
            Ok(())
        }
    }

    fn route(source: &str, time: Duration) -> (tempfile::TempDir, Route) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonata");
        std::fs::write(&path, source).unwrap();
        let route = Route {
            name: "r".into(),
            types: vec!["*".into()],
            versions: VersionRange::parse("*").unwrap(),
            adapter: Arc::new(Adapter::load(&path).unwrap()),
            sink_name: "s".into(),
            sink: Arc::new(Nowhere),
            retry: serde_json::from_value(serde_json::json!({})).unwrap(),
            limits: Limits {
                time,
                ..Limits::default()
            },
            offload: AtomicU32::new(0),
            metrics: std::sync::OnceLock::new(),
        };
        (dir, route)
    }

    #[tokio::test]
    async fn an_evaluation_longer_than_the_inline_budget_still_gets_the_routes_full_limit() {
        // Far more than a millisecond of work, far less than the route's five seconds.
        let (_dir, slow) = route("$count([1..300000][$ % 2 = 0])", Duration::from_secs(5));
        let input = "{}";
        let out = slow.evaluate(input, "acme").await.unwrap();
        assert_eq!(out, Some(serde_json::json!(150_000)));
        // The next evaluations of that route skip the inline attempt.
        assert_eq!(slow.offload.load(Ordering::Relaxed), OFFLOAD_AFTER_OVERRUN);
        slow.evaluate(input, "acme").await.unwrap();
        assert_eq!(
            slow.offload.load(Ordering::Relaxed),
            OFFLOAD_AFTER_OVERRUN - 1
        );

        // A quick script stays inline and never sets the route aside.
        let (_dir, quick) = route("$partner & ':' & id", Duration::from_secs(5));
        let out = quick
            .evaluate(r#"{"id": "e-1", "unread": [1, 2]}"#, "acme")
            .await
            .unwrap();
        assert_eq!(out, Some(serde_json::json!("acme:e-1")));
        assert_eq!(quick.offload.load(Ordering::Relaxed), 0);

        // A script that overruns the route's own limit still fails with the time limit.
        let (_dir, endless) = route(
            "($f := function($n) { $n < 0 ? 0 : $f($n + 1) }; $f(0))",
            Duration::from_millis(50),
        );
        let err = endless.evaluate(input, "acme").await.unwrap_err();
        assert_eq!(err.code, CODE_TIMEOUT, "{err:?}");
    }

    /// Builds a routing of one sink `s`, configured by `sink` (TOML), whose secret is in
    /// `secret`; rewrites the secret and checks which builds reuse the sink.
    /// `sink` may also name a second secret file, `USER`, that does not change.
    fn check_secret_rebuild(sink: &str, secret_key: &str, first: &str, second: &str) {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        let user = dir.path().join("user");
        std::fs::write(&secret, format!("{first}\n")).unwrap();
        std::fs::write(&user, "ess").unwrap();
        let text = format!(
            "agent_id = \"p1\"\nstate_dir = \"state\"\n[sinks.s]\n{}\n",
            sink.replace("SECRET", &secret.display().to_string())
                .replace("USER", &user.display().to_string())
        );
        let config = Config::parse(&text).unwrap();
        let first = Routing::build(&config, None).unwrap();
        let sink_of = |routing: &Routing| routing.sinks["s"].sink.clone();

        // Nothing changed: the running sink is kept.
        let same = Routing::build(&config, Some(&first)).unwrap();
        assert!(Arc::ptr_eq(&sink_of(&first), &sink_of(&same)), "{sink}");

        // Only the secret file's contents changed: the sink is built again.
        std::fs::write(&secret, second).unwrap();
        let rotated = Routing::build(&config, Some(&same)).unwrap();
        assert!(!Arc::ptr_eq(&sink_of(&same), &sink_of(&rotated)), "{sink}");
        let again = Routing::build(&config, Some(&rotated)).unwrap();
        assert!(Arc::ptr_eq(&sink_of(&rotated), &sink_of(&again)), "{sink}");

        // A secret that cannot be read any more refuses the build, naming the secret.
        std::fs::remove_file(&secret).unwrap();
        let problems = Routing::build(&config, Some(&again)).err().unwrap();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, format!("sinks.s.{secret_key}"));
        assert!(
            problems[0].message.contains("cannot read secret file"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_rewritten_http_secret_header_rebuilds_the_sink() {
        check_secret_rebuild(
            "type = \"http\"\nurl = \"http://127.0.0.1:9/rules\"\n\
             secret_headers = { X-Api-Key = { file = \"SECRET\" } }",
            "secret_headers.X-Api-Key",
            "first-key",
            "second-key",
        );
    }

    #[test]
    fn a_rewritten_mqtt_password_rebuilds_the_sink() {
        check_secret_rebuild(
            "type = \"mqtt\"\nurl = \"mqtt://127.0.0.1\"\nclient_id = \"ess-1\"\n\
             topic = \"rules/{subject}\"\nusername = { file = \"USER\" }\n\
             password = { file = \"SECRET\" }",
            "password",
            "first-password",
            "second-password",
        );
    }

    #[test]
    fn a_rewritten_sftp_password_rebuilds_the_sink() {
        check_secret_rebuild(
            "type = \"sftp\"\nhost = \"sftp.partner.example\"\nuser = \"ess\"\n\
             host_key_fingerprints = [\"SHA256:3mNZr9KjcKgxeShM/ff/8Me9fMv6WtDZHDqg+WzTzeI\"]\n\
             dir = \"/upload\"\nname = \"{subject}/{id}.xml\"\n\
             password = { file = \"SECRET\" }",
            "password",
            "first-password",
            "second-password",
        );
    }

    #[test]
    fn a_rewritten_sql_password_or_url_rebuilds_the_sink() {
        check_secret_rebuild(
            "type = \"sql\"\nurl = \"postgres://ess@db.example:5432/rules\"\n\
             statement = \"SELECT :a\"\npassword = { file = \"SECRET\" }",
            "password",
            "first-password",
            "second-password",
        );
        check_secret_rebuild(
            "type = \"sql\"\nurl_secret = { file = \"SECRET\" }\n\
             statement = \"SELECT :a\"",
            "url_secret",
            "postgres://ess:first@db.example:5432/rules",
            "postgres://ess:second@db.example:5432/rules",
        );
    }
}

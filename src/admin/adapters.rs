//! `POST /v1/adapters/eval`: runs a script the caller sends on an input or a stored event, with
//! the agent's engine and limits, and answers its output or the agent's own diagnostic.
//! `POST /v1/adapters/{name}/fixtures/run`: runs an adapter's fixtures (its `.tests` cases) on a
//! script the caller sends, with the fixture runner of `ess-agent adapter test`, and answers each
//! case's result with a diff of expected and actual output. Neither writes adapter files.

use http::{Response, StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{Admin, blocking, percent_decode, unknown_event};
use crate::adapter::diagnostics::{describe_undefined, render};
use crate::adapter::engine::{EngineError, Expression, Limits, locate};
use crate::adapter::fixtures::{self, Actual, CaseResult};
use crate::protocol::problem::{Body, Problem, json_response};

/// Largest body an evaluation takes: the script and its input together.
pub const MAX_EVAL_BODY_BYTES: usize = 1024 * 1024;

/// The file name errors are rendered with: the script has no file.
const SCRIPT_NAME: &str = "script";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EvalRequest {
    /// The JSONata script.
    script: String,
    /// The input document; absent means JSONata `undefined`.
    input: Option<Value>,
    /// The id of a stored event, whose envelope is the input (as a route's adapter gets it).
    event: Option<String>,
    /// Evaluate within this route's limits instead of the defaults.
    route: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FixturesRequest {
    /// The JSONata script the adapter's fixtures run on (the one being edited, not the file).
    script: String,
}

/// One case's result as the API answers it.
fn case_body(result: &CaseResult) -> Value {
    let mut body = json!({
        "file": result.fixture.file_name().map(|n| n.to_string_lossy().into_owned()),
        "description": result.description,
        "passed": result.passed,
    });
    if let Some(failure) = &result.failure {
        body["failure"] = json!(failure);
    }
    if let Some(diff) = &result.diff {
        body["diff"] = json!(diff);
    }
    match &result.actual {
        Some(Actual::Value(value)) => body["output"] = value.clone(),
        Some(Actual::Undefined) => body["undefined"] = json!(true),
        Some(Actual::Error(_)) | None => {}
    }
    body
}

/// The answer for an evaluation's outcome.
fn outcome_body(
    outcome: Result<Option<Value>, EngineError>,
    expression: Option<&Expression>,
    input: Option<&Value>,
    bindings: &Map<String, Value>,
    limits: &Limits,
    source: &str,
) -> Value {
    match outcome {
        Ok(Some(output)) => json!({"output": output}),
        Ok(None) => {
            let causes = expression
                .map(|e| e.undefined_causes(input, bindings, limits))
                .unwrap_or_default();
            json!({"undefined": true, "reason": describe_undefined(&causes, source)})
        }
        Err(error) => {
            let place = error.position.map(|p| {
                let (line, _, column) = locate(source, p);
                (line, column + 1)
            });
            json!({"error": {
                "code": error.code,
                "message": error.message,
                "position": error.position,
                "line": place.map(|p| p.0),
                "column": place.map(|p| p.1),
                "diagnostic": render(&error, SCRIPT_NAME, source),
            }})
        }
    }
}

impl Admin {
    pub(super) async fn eval_adapter(&self, body: &[u8]) -> Result<Response<Body>, Problem> {
        let request: EvalRequest = super::json_body(body, None)?;
        let limits = match &request.route {
            None => Limits::default(),
            Some(name) => self
                .dispatcher
                .routing()
                .routes
                .iter()
                .find(|r| &r.name == name)
                .map(|r| r.limits.clone())
                .ok_or_else(|| {
                    Problem::new(
                        StatusCode::NOT_FOUND,
                        "unknown_route",
                        format!("there is no route {name:?} whose limits to evaluate within"),
                    )
                })?,
        };
        let input = match (request.input, &request.event) {
            (Some(_), Some(_)) => {
                return Err(Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    "give either input or event, not both",
                ));
            }
            (input, None) => input,
            (None, Some(id)) => {
                let journal = self.journal.clone();
                let lookup = id.clone();
                let detail = blocking(move || journal.get_detail(&lookup))
                    .await?
                    .ok_or_else(|| unknown_event(id))?;
                Some(serde_json::from_str(&detail.envelope).map_err(|e| {
                    Problem::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "unreadable_event",
                        format!("the stored envelope of event {id:?} is not JSON: {e}"),
                    )
                })?)
            }
        };
        let partner = self.partner.clone();
        let source = request.script;
        // A stored event's envelope goes back with the answer (the playground builds a fixture
        // of it); a pasted input the caller has already.
        let stored_input = request.event.as_ref().and(input.clone());
        let mut answer = tokio::task::spawn_blocking(move || {
            let mut bindings = Map::new();
            bindings.insert("partner".into(), Value::String(partner));
            let compiled = Expression::compile(&source);
            let outcome = compiled
                .as_ref()
                .map_err(Clone::clone)
                .and_then(|e| e.evaluate_optional(input.as_ref(), &bindings, &limits));
            outcome_body(
                outcome,
                compiled.as_ref().ok(),
                input.as_ref(),
                &bindings,
                &limits,
                &source,
            )
        })
        .await
        .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
        if let Some(input) = stored_input {
            answer["input"] = input;
        }
        Ok(json_response(StatusCode::OK, &answer))
    }

    pub(super) async fn run_fixtures(
        &self,
        raw_name: &str,
        body: &[u8],
    ) -> Result<Response<Body>, Problem> {
        let request: FixturesRequest = super::json_body(body, None)?;
        let name = percent_decode(raw_name).unwrap_or_else(|| raw_name.to_owned());
        let routing = self.dispatcher.routing();
        let stem = |path: &std::path::Path| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        // The adapter's file and the limits of the first route that uses it, as `ess-agent
        // adapter test` takes them.
        let Some(route) = routing
            .routes
            .iter()
            .find(|r| stem(&r.adapter.path) == name)
        else {
            let mut known: Vec<String> = routing
                .routes
                .iter()
                .map(|r| stem(&r.adapter.path))
                .collect();
            known.sort();
            known.dedup();
            return Err(Problem::new(
                StatusCode::NOT_FOUND,
                "unknown_adapter",
                format!(
                    "no route uses an adapter named {name:?}: the adapters in force are {}",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        };
        let script = route.adapter.path.clone();
        let limits = route.limits.clone();
        drop(routing);
        let source = request.script;
        let answer = tokio::task::spawn_blocking(move || {
            let cases = fixtures::cases_of(&script).map_err(|e| {
                Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "unreadable_fixtures",
                    format!("{e}: make the directory readable by the agent"),
                )
            })?;
            let results = fixtures::run_fixtures_on_source(
                &source,
                &script.display().to_string(),
                &cases,
                &limits,
            );
            let passed = results.iter().filter(|r| r.passed).count();
            Ok(json!({
                "adapter": name,
                "file": script.display().to_string(),
                "fixtures_dir": fixtures::tests_dir(&script).display().to_string(),
                "passed": passed,
                "failed": results.len() - passed,
                "fixtures": results.iter().map(case_body).collect::<Vec<_>>(),
            }))
        })
        .await
        .map_err(|e| {
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })??;
        Ok(json_response(StatusCode::OK, &answer))
    }
}

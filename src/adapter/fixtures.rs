//! Adapter fixtures: example events with the output their adapter must produce, run as tests
//! (`ess-agent adapter test`). The format is documented for partners in docs/adapters.md; keep
//! the two in step.
//!
//! # Where fixtures live
//!
//! Beside the adapter they test. For `adapters/court-calendar.jsonata`, the directory
//! `adapters/court-calendar.tests/` holds one JSON file per case:
//!
//! ```text
//! adapters/
//!   court-calendar.jsonata
//!   court-calendar.tests/
//!     deadline-moved.json
//!     other-jurisdiction-is-skipped.json
//! ```
//!
//! Every file of that directory whose name ends in `.json` is a case; cases run in file-name
//! order. Other files and subdirectories are ignored, so notes may sit beside the cases. A
//! `.tests` directory whose script does not exist is an error, so that renaming an adapter can
//! never leave its cases silently unrun.
//!
//! # A case
//!
//! ```json
//! {
//!   "description": "A v1 deadline change for a court of ours becomes one calendar rule",
//!   "event": {
//!     "id": "evt-0001",
//!     "version": 1,
//!     "type": "rule.updated",
//!     "subject": "RULE-COURT-DEADLINE",
//!     "payload": {"rule": "filing-deadline", "deadline_local": "16:00"}
//!   },
//!   "bindings": {"partner": "county-court-calendar"},
//!   "expect": {"rule": "filing-deadline", "cutoff_time": "16:00:00"}
//! }
//! ```
//!
//! | member             | required | meaning |
//! |--------------------|----------|---------|
//! | `description`      | yes      | A non-empty sentence saying what the case shows; printed with its result. |
//! | `event`            | yes      | The event as the hub delivers it: a Change Event object (PROTOCOL §1.1), or a CloudEvent in structured mode when it has a `specversion` member. |
//! | `bindings`         | no       | The variables the agent binds: only `partner` (`$partner`, the agent id), a string. Default `{"partner": "test-partner"}`. |
//! | `expect`           | one of   | The output the script must produce: any JSON value. `null` expects `null`, which is not the same as undefined. |
//! | `expect_undefined` | one of   | `true`: the result must be undefined, which means "skip this route" for the event. |
//! | `expect_error`     | one of   | `{"code": "D3137", "message": "must be HH:MM"}`: the evaluation must fail with that code; `message`, when given, must occur in the error's message. `$error("...")` raises `D3137`. |
//!
//! Exactly one of `expect`, `expect_undefined` and `expect_error` must be present. Any other
//! member is refused, so that a misspelt one (`expect_undefiend`) is not silently ignored.
//!
//! # How a case runs
//!
//! - The event is validated and normalised exactly as the agent does with a delivered event,
//!   and the script sees the same document the agent would give it: `type` defaults to
//!   `"change"`, `subject` to the `id`, optional fields that are `null` are left out, unknown
//!   top-level fields are kept, and a CloudEvent's `data` becomes `payload`. An event the agent
//!   would refuse fails the case, with the reason.
//! - The script runs within the limits it is given, as the agent runs it.
//! - A result is compared with `expect` as JSON values: the order of an object's members does
//!   not matter, the order of an array's items does, and numbers are compared by value (`1`
//!   equals `1.0`). On a mismatch the case reports a line diff of the pretty-printed values,
//!   `-` for what was expected and `+` for what the script produced. When the result is
//!   undefined, or lacks a member `expect` has, the case also names the paths of the script
//!   that matched nothing (see [`Expression::undefined_causes`]).
//! - A script that does not compile fails every one of its cases with the compile error,
//!   rendered as [`crate::adapter::diagnostics`] describes: `file:line:col: error CODE:
//!   message`, the line with a caret under the column, and what to do.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue};
use serde_json::{Map, Value};

use crate::adapter::diagnostics::undefined_reason;
use crate::adapter::engine::{EngineError, Expression, Limits, UndefinedKind};
use crate::protocol::envelope;

/// The extension of an adapter script.
pub const SCRIPT_EXTENSION: &str = "jsonata";
/// The suffix of the directory that holds an adapter's cases, after the script's stem.
pub const TESTS_SUFFIX: &str = ".tests";
/// The extension of a case file.
pub const FIXTURE_EXTENSION: &str = "json";
/// `$partner` in a case that does not bind it.
pub const DEFAULT_PARTNER: &str = "test-partner";

/// Lines of unchanged text shown around each change in a diff.
const DIFF_CONTEXT: usize = 5;
/// Above this many (expected lines × actual lines), a diff shows both values whole instead of
/// computing the smallest set of changed lines.
const DIFF_MAX_CELLS: usize = 4_000_000;

/// One case, read and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Fixture {
    /// The file it was read from.
    pub path: PathBuf,
    pub description: String,
    /// The script's input: the event normalised as the agent normalises a delivered one.
    pub input: Value,
    /// The variables bound while the script runs (`partner`).
    pub bindings: Map<String, Value>,
    pub expectation: Expectation,
}

/// What a case expects of the script.
#[derive(Debug, Clone, PartialEq)]
pub enum Expectation {
    /// `expect`: this output.
    Value(Value),
    /// `expect_undefined`: no output, the route is skipped.
    Undefined,
    /// `expect_error`: an evaluation error with this code, whose message contains `message`.
    Error {
        code: String,
        message: Option<String>,
    },
}

/// What the script did with a case's event.
#[derive(Debug, Clone, PartialEq)]
pub enum Actual {
    Value(Value),
    Undefined,
    Error(EngineError),
}

/// The result of one case.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseResult {
    /// The case's file.
    pub fixture: PathBuf,
    /// The case's description; empty when the file could not be read.
    pub description: String,
    pub passed: bool,
    /// Why the case failed, for a person: a sentence, or a rendered script error with its place.
    pub failure: Option<String>,
    /// What was expected against what the script did, line by line: lines only expected start
    /// with `- `, lines only produced with `+ `, common lines with two spaces. Present when the
    /// case ran and failed.
    pub diff: Option<String>,
    /// What the script did; `None` when the case could not run (an unreadable or invalid case
    /// file, or a script that does not compile).
    pub actual: Option<Actual>,
}

/// Why fixtures could not be found or read.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{} is not valid JSON: {message}", path.display())]
    Json { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error(
        "{} holds fixtures for {}, which does not exist: rename the directory after its script",
        dir.display(),
        script.display()
    )]
    OrphanTests { dir: PathBuf, script: PathBuf },
}

/// Finds the adapter scripts (`*.jsonata`) directly in `adapters_dir` and the case files of
/// each, both sorted by file name. A script without a `.tests` directory has no cases.
pub fn discover(adapters_dir: &Path) -> Result<Vec<(PathBuf, Vec<PathBuf>)>, FixtureError> {
    let mut scripts = Vec::new();
    let mut test_dirs = Vec::new();
    for entry in read_dir(adapters_dir)? {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if let Some(stem) = name.strip_suffix(TESTS_SUFFIX)
                && !stem.is_empty()
            {
                test_dirs.push((path.clone(), adapters_dir.join(script_name(stem))));
            }
        } else if path.extension().is_some_and(|ext| ext == SCRIPT_EXTENSION) {
            scripts.push(path);
        }
    }
    scripts.sort();
    if let Some((dir, script)) = test_dirs
        .into_iter()
        .find(|(_, script)| !scripts.contains(script))
    {
        return Err(FixtureError::OrphanTests { dir, script });
    }

    let mut found = Vec::with_capacity(scripts.len());
    for script in scripts {
        let cases = cases_of(&script)?;
        found.push((script, cases));
    }
    Ok(found)
}

/// The case files of `script`, sorted by file name; none when it has no `.tests` directory.
pub fn cases_of(script: &Path) -> Result<Vec<PathBuf>, FixtureError> {
    let dir = tests_dir(script);
    let mut cases = Vec::new();
    if dir.is_dir() {
        for entry in read_dir(&dir)? {
            let path = entry.path();
            if path.is_file() && path.extension().is_some_and(|ext| ext == FIXTURE_EXTENSION) {
                cases.push(path);
            }
        }
    }
    cases.sort();
    Ok(cases)
}

/// The directory of `script`'s cases: `x.jsonata` → `x.tests`.
pub fn tests_dir(script: &Path) -> PathBuf {
    let stem = script.file_stem().unwrap_or_default().to_string_lossy();
    script.with_file_name(format!("{stem}{TESTS_SUFFIX}"))
}

fn script_name(stem: &str) -> String {
    format!("{stem}.{SCRIPT_EXTENSION}")
}

fn read_dir(dir: &Path) -> Result<Vec<std::fs::DirEntry>, FixtureError> {
    let io_error = |source| FixtureError::Io {
        path: dir.to_owned(),
        source,
    };
    std::fs::read_dir(dir)
        .map_err(io_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_error)
}

/// Runs each case of `fixtures` through `script`, in order, and returns one result per case.
/// Nothing here fails as a whole: an unreadable script, a compile error or a broken case file
/// becomes a failed case that says so.
pub fn run_adapter_fixtures(
    script: &Path,
    fixtures: &[PathBuf],
    limits: &Limits,
) -> Vec<CaseResult> {
    let source = match std::fs::read_to_string(script) {
        Ok(source) => source,
        Err(err) => {
            let failure = format!("cannot read the script {}: {err}", script.display());
            return fixtures
                .iter()
                .map(|path| not_run(path, "", &failure))
                .collect();
        }
    };
    run_fixtures_on_source(&source, &script.display().to_string(), fixtures, limits)
}

/// [`run_adapter_fixtures`] on the script text `source` instead of a file (the console's
/// playground runs an adapter's cases on the script being edited). `script_name` names the
/// script in errors.
pub fn run_fixtures_on_source(
    source: &str,
    script_name: &str,
    fixtures: &[PathBuf],
    limits: &Limits,
) -> Vec<CaseResult> {
    let expression = match Expression::compile(source) {
        Ok(expression) => expression,
        Err(err) => {
            let failure = format!(
                "the script does not compile:\n{}",
                err.render(script_name, source)
            );
            return fixtures
                .iter()
                .map(|path| {
                    let description = Fixture::load(path)
                        .map(|fixture| fixture.description)
                        .unwrap_or_default();
                    not_run(path, &description, &failure)
                })
                .collect();
        }
    };
    fixtures
        .iter()
        .map(|path| match Fixture::load(path) {
            Ok(fixture) => run_case(&expression, script_name, &fixture, limits),
            Err(err) => not_run(path, "", &err.to_string()),
        })
        .collect()
}

/// Runs one case through a compiled script. `script_name` names the script in errors.
pub fn run_case(
    expression: &Expression,
    script_name: &str,
    fixture: &Fixture,
    limits: &Limits,
) -> CaseResult {
    let actual = match expression.evaluate(&fixture.input, &fixture.bindings, limits) {
        Ok(Some(value)) => Actual::Value(value),
        Ok(None) => Actual::Undefined,
        Err(err) => Actual::Error(err),
    };
    let failure = judge(&fixture.expectation, &actual);
    // Which paths of the script matched nothing, when the case failed for want of a value: the
    // whole result, or an object member that was left out because its value was undefined.
    let blank = match (&failure, &fixture.expectation, &actual) {
        (Some(_), Expectation::Value(_), Actual::Undefined) => {
            let causes =
                expression.undefined_causes(Some(&fixture.input), &fixture.bindings, limits);
            undefined_reason(&causes, expression.source())
        }
        (Some(_), Expectation::Value(want), Actual::Value(got)) if lacks_members(want, got) => {
            let mut causes =
                expression.undefined_causes(Some(&fixture.input), &fixture.bindings, limits);
            causes.retain(|cause| cause.kind == UndefinedKind::Unmatched);
            undefined_reason(&causes, expression.source())
        }
        _ => None,
    };
    let failure = failure.map(|reason| match (&actual, &blank) {
        (Actual::Error(err), _) => format!(
            "{reason}:\n{}",
            err.render(script_name, expression.source())
        ),
        (Actual::Undefined, Some(why)) => reason.replacen(
            "the result is undefined",
            &format!("the result is undefined ({why})"),
            1,
        ),
        (_, Some(why)) => format!("{reason} ({why})"),
        (_, None) => reason,
    });
    let diff = failure
        .is_some()
        .then(|| diff_outcomes(&fixture.expectation, &actual, blank.as_deref()));
    CaseResult {
        fixture: fixture.path.clone(),
        description: fixture.description.clone(),
        passed: failure.is_none(),
        failure,
        diff,
        actual: Some(actual),
    }
}

fn not_run(path: &Path, description: &str, failure: &str) -> CaseResult {
    CaseResult {
        fixture: path.to_owned(),
        description: description.to_owned(),
        passed: false,
        failure: Some(failure.to_owned()),
        diff: None,
        actual: None,
    }
}

/// Why `actual` does not meet `expected`, or `None` when it does.
fn judge(expected: &Expectation, actual: &Actual) -> Option<String> {
    match (expected, actual) {
        (Expectation::Value(want), Actual::Value(got)) => {
            (canonical(want) != canonical(got)).then(|| "the output differs from `expect`".into())
        }
        (Expectation::Value(_), Actual::Undefined) => Some(
            "the result is undefined, so the route would be skipped, but `expect` wants a value"
                .into(),
        ),
        (Expectation::Value(_), Actual::Error(_)) => {
            Some("the evaluation failed, but `expect` wants a value".into())
        }
        (Expectation::Undefined, Actual::Undefined) => None,
        (Expectation::Undefined, Actual::Value(_)) => Some(
            "the script produced an output, but `expect_undefined` wants the route skipped".into(),
        ),
        (Expectation::Undefined, Actual::Error(_)) => {
            Some("the evaluation failed, but `expect_undefined` wants the route skipped".into())
        }
        (Expectation::Error { code, .. }, Actual::Value(_) | Actual::Undefined) => Some(format!(
            "the evaluation succeeded, but `expect_error` wants error {code}"
        )),
        (Expectation::Error { code, message }, Actual::Error(err)) => {
            if err.code != *code {
                Some(format!(
                    "the evaluation failed with {} where `expect_error` wants {code}",
                    err.code
                ))
            } else if let Some(part) = message.as_deref()
                && !err.message.contains(part)
            {
                Some(format!(
                    "the error message does not contain {part:?}, as `expect_error` wants"
                ))
            } else {
                None
            }
        }
    }
}

impl Fixture {
    /// Reads and checks the case file at `path`.
    pub fn load(path: &Path) -> Result<Fixture, FixtureError> {
        let text = std::fs::read_to_string(path).map_err(|source| FixtureError::Io {
            path: path.to_owned(),
            source,
        })?;
        Fixture::parse(path, &text)
    }

    /// Checks the case `text`, read from `path` (which names it in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Fixture, FixtureError> {
        let invalid = |message: String| FixtureError::Invalid {
            path: path.to_owned(),
            message,
        };
        let value: Value = serde_json::from_str(text).map_err(|err| FixtureError::Json {
            path: path.to_owned(),
            message: err.to_string(),
        })?;
        let Value::Object(mut object) = value else {
            return Err(invalid(format!(
                "a case must be a JSON object, not {}",
                kind(&value)
            )));
        };

        let description = match object.remove("description") {
            Some(Value::String(s)) if !s.trim().is_empty() => s,
            Some(Value::String(_)) | None => {
                return Err(invalid(
                    "`description` is missing: say in a sentence what the case shows".into(),
                ));
            }
            Some(other) => {
                return Err(invalid(format!(
                    "`description` must be a string, not {}",
                    kind(&other)
                )));
            }
        };
        let input = match object.remove("event") {
            Some(Value::Object(event)) => normalise(event).map_err(&invalid)?,
            Some(other) => {
                return Err(invalid(format!(
                    "`event` must be the event object as the hub sends it, not {}",
                    kind(&other)
                )));
            }
            None => {
                return Err(invalid(
                    "`event` is missing: give the event as the hub sends it".into(),
                ));
            }
        };
        let bindings = bindings(object.remove("bindings")).map_err(&invalid)?;
        let expect = object.remove("expect");
        let expect_undefined = object.remove("expect_undefined");
        let expect_error = object.remove("expect_error");
        if let Some(name) = object.keys().next() {
            return Err(invalid(format!(
                "unknown member `{name}`: a case has `description`, `event`, `bindings`, and one \
                 of `expect`, `expect_undefined` and `expect_error`"
            )));
        }
        let expectation = match (expect, expect_undefined, expect_error) {
            (Some(value), None, None) => Expectation::Value(value),
            (None, Some(Value::Bool(true)), None) => Expectation::Undefined,
            (None, Some(_), None) => {
                return Err(invalid(
                    "`expect_undefined` must be `true`; to expect a value, use `expect`".into(),
                ));
            }
            (None, None, Some(error)) => expected_error(error).map_err(&invalid)?,
            (None, None, None) => {
                return Err(invalid(
                    "the case expects nothing: add one of `expect`, `expect_undefined` and \
                     `expect_error`"
                        .into(),
                ));
            }
            _ => {
                return Err(invalid(
                    "give only one of `expect`, `expect_undefined` and `expect_error`".into(),
                ));
            }
        };
        Ok(Fixture {
            path: path.to_owned(),
            description,
            input,
            bindings,
            expectation,
        })
    }
}

/// The document the agent would give the adapter for `event`, or why it would refuse it.
fn normalise(event: Map<String, Value>) -> Result<Value, String> {
    let media_type = if event.contains_key("specversion") {
        "application/cloudevents+json"
    } else {
        "application/json"
    };
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(media_type));
    let body = Value::Object(event).to_string();
    envelope::parse(&headers, body.as_bytes())
        .map(|envelope| Value::Object(envelope.document))
        .map_err(|err| format!("`event` would be refused by the agent: {err}"))
}

fn bindings(value: Option<Value>) -> Result<Map<String, Value>, String> {
    let mut bindings = Map::new();
    bindings.insert("partner".into(), Value::String(DEFAULT_PARTNER.into()));
    match value {
        None => {}
        Some(Value::Object(given)) => {
            for (name, value) in given {
                match (name.as_str(), value) {
                    ("partner", value @ Value::String(_)) => {
                        bindings.insert(name, value);
                    }
                    ("partner", other) => {
                        return Err(format!(
                            "`bindings.partner` must be a string (the agent id), not {}",
                            kind(&other)
                        ));
                    }
                    _ => {
                        return Err(format!(
                            "unknown binding `{name}`: the agent binds only `partner`"
                        ));
                    }
                }
            }
        }
        Some(other) => {
            return Err(format!(
                "`bindings` must be an object such as {{\"partner\": \"acme\"}}, not {}",
                kind(&other)
            ));
        }
    }
    Ok(bindings)
}

fn expected_error(value: Value) -> Result<Expectation, String> {
    const SHAPE: &str = "`expect_error` must be an object such as {\"code\": \"D3137\"}, with an \
                         optional \"message\" substring";
    let Value::Object(mut object) = value else {
        return Err(SHAPE.into());
    };
    let code = match object.remove("code") {
        Some(Value::String(code)) if !code.is_empty() => code,
        _ => return Err(SHAPE.into()),
    };
    let message = match object.remove("message") {
        None => None,
        Some(Value::String(message)) => Some(message),
        Some(_) => return Err(SHAPE.into()),
    };
    if let Some(name) = object.keys().next() {
        return Err(format!(
            "unknown member `{name}` in `expect_error`; {SHAPE}"
        ));
    }
    Ok(Expectation::Error { code, message })
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

// --- Comparing and showing values -------------------------------------------------------------

/// `value` with every number that is a whole number within `f64`'s exact range written as an
/// integer, so that `1` and `1.0` compare (and print) alike. Member order is kept; objects
/// compare regardless of it.
fn canonical(value: &Value) -> Value {
    /// 2^53: every integer up to it is exact as an `f64`.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    match value {
        Value::Number(n) if !n.is_i64() && !n.is_u64() => match n.as_f64() {
            // The range check makes the cast exact.
            #[allow(clippy::cast_possible_truncation)]
            Some(f) if f.fract() == 0.0 && f.abs() <= EXACT => Value::from(f as i64),
            _ => value.clone(),
        },
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        Value::Object(members) => Value::Object(
            members
                .iter()
                .map(|(name, value)| (name.clone(), canonical(value)))
                .collect(),
        ),
        _ => value.clone(),
    }
}

/// `actual` with its objects' members in the order of `expected`'s where they share them (the
/// others after, in their own order), so that a diff shows real differences and not ordering.
fn align(actual: &Value, expected: &Value) -> Value {
    match (actual, expected) {
        (Value::Object(got), Value::Object(want)) => {
            let mut aligned = Map::new();
            for (name, want_value) in want {
                if let Some(got_value) = got.get(name) {
                    aligned.insert(name.clone(), align(got_value, want_value));
                }
            }
            for (name, got_value) in got {
                if !want.contains_key(name) {
                    aligned.insert(name.clone(), got_value.clone());
                }
            }
            Value::Object(aligned)
        }
        (Value::Array(got), Value::Array(want)) => Value::Array(
            got.iter()
                .enumerate()
                .map(|(i, item)| match want.get(i) {
                    Some(want_item) => align(item, want_item),
                    None => item.clone(),
                })
                .collect(),
        ),
        _ => actual.clone(),
    }
}

fn pretty(value: &Value) -> String {
    // Serialising a `Value` cannot fail: its keys are strings and its numbers finite.
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// Whether `got` lacks an object member that `want` has, at any depth.
fn lacks_members(want: &Value, got: &Value) -> bool {
    match (want, got) {
        (Value::Object(want), Value::Object(got)) => want
            .iter()
            .any(|(name, want)| got.get(name).is_none_or(|got| lacks_members(want, got))),
        (Value::Array(want), Value::Array(got)) => want
            .iter()
            .zip(got)
            .any(|(want, got)| lacks_members(want, got)),
        _ => false,
    }
}

/// `why` says which places of the script gave nothing, for an undefined result.
fn diff_outcomes(expected: &Expectation, actual: &Actual, why: Option<&str>) -> String {
    let want = match expected {
        Expectation::Value(value) => pretty(&canonical(value)),
        Expectation::Undefined => "undefined".to_owned(),
        Expectation::Error {
            code,
            message: None,
        } => format!("error {code}"),
        Expectation::Error {
            code,
            message: Some(part),
        } => format!("error {code} (a message containing {part:?})"),
    };
    let got = match (actual, expected) {
        (Actual::Value(value), Expectation::Value(want)) => {
            pretty(&align(&canonical(value), &canonical(want)))
        }
        (Actual::Value(value), _) => pretty(&canonical(value)),
        (Actual::Undefined, _) => match why {
            Some(why) => format!("undefined ({why})"),
            None => "undefined".to_owned(),
        },
        (Actual::Error(err), _) => format!("error {}: {}", err.code, err.message),
    };
    line_diff(&want, &got)
}

/// A line diff of `expected` and `actual`: `- ` lines only expected, `+ ` lines only in
/// `actual`, and up to five common lines (`  `) around each change; longer runs of
/// common lines are shown as `  ...`.
pub fn line_diff(expected: &str, actual: &str) -> String {
    let want: Vec<&str> = expected.lines().collect();
    let got: Vec<&str> = actual.lines().collect();
    let ops = diff_ops(&want, &got);

    // Which common lines are near enough to a change to be shown.
    let near_change: Vec<bool> = {
        let mut near = vec![false; ops.len()];
        for (i, op) in ops.iter().enumerate() {
            if !matches!(op, Op::Same(_)) {
                let from = i.saturating_sub(DIFF_CONTEXT);
                let to = (i + DIFF_CONTEXT + 1).min(ops.len());
                near[from..to].iter_mut().for_each(|n| *n = true);
            }
        }
        near
    };
    let mut out = String::from("--- expected\n+++ actual\n");
    let mut skipping = false;
    for (op, near) in ops.iter().zip(near_change) {
        match op {
            Op::Same(line) if near => {
                skipping = false;
                push_line(&mut out, "  ", line);
            }
            Op::Same(_) => {
                if !skipping {
                    out.push_str("  ...\n");
                    skipping = true;
                }
            }
            Op::Removed(line) => {
                skipping = false;
                push_line(&mut out, "- ", line);
            }
            Op::Added(line) => {
                skipping = false;
                push_line(&mut out, "+ ", line);
            }
        }
    }
    out.pop();
    out
}

fn push_line(out: &mut String, marker: &str, line: &str) {
    out.push_str(marker);
    out.push_str(line);
    out.push('\n');
}

enum Op<'a> {
    Same(&'a str),
    Removed(&'a str),
    Added(&'a str),
}

/// The edit from `want` to `got` that keeps a longest common subsequence of lines, removals
/// before additions within each change. Texts too large for the table are shown as one change.
fn diff_ops<'a>(want: &[&'a str], got: &[&'a str]) -> Vec<Op<'a>> {
    // Common first and last lines need no table.
    let prefix = want.iter().zip(got).take_while(|(a, b)| a == b).count();
    let suffix = want[prefix..]
        .iter()
        .rev()
        .zip(got[prefix..].iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let (a, b) = (
        &want[prefix..want.len() - suffix],
        &got[prefix..got.len() - suffix],
    );

    let mut ops: Vec<Op<'a>> = want[..prefix].iter().map(|l| Op::Same(l)).collect();
    if a.len().saturating_mul(b.len()) > DIFF_MAX_CELLS {
        ops.extend(a.iter().map(|l| Op::Removed(l)));
        ops.extend(b.iter().map(|l| Op::Added(l)));
    } else {
        // lcs[i][j]: the length of a longest common subsequence of a[i..] and b[j..].
        let width = b.len() + 1;
        let mut lcs = vec![0u32; (a.len() + 1) * width];
        for i in (0..a.len()).rev() {
            for j in (0..b.len()).rev() {
                lcs[i * width + j] = if a[i] == b[j] {
                    lcs[(i + 1) * width + j + 1] + 1
                } else {
                    lcs[(i + 1) * width + j].max(lcs[i * width + j + 1])
                };
            }
        }
        let (mut i, mut j) = (0, 0);
        while i < a.len() || j < b.len() {
            if i < a.len() && j < b.len() && a[i] == b[j] {
                ops.push(Op::Same(a[i]));
                i += 1;
                j += 1;
            } else if j == b.len()
                || (i < a.len() && lcs[(i + 1) * width + j] >= lcs[i * width + j + 1])
            {
                ops.push(Op::Removed(a[i]));
                i += 1;
            } else {
                ops.push(Op::Added(b[j]));
                j += 1;
            }
        }
    }
    ops.extend(want[want.len() - suffix..].iter().map(|l| Op::Same(l)));
    ops
}

impl fmt::Display for CaseResult {
    /// `PASS file: description`, or `FAIL file: description` followed by the failure and the
    /// diff, indented.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.passed { "PASS" } else { "FAIL" };
        write!(f, "{verdict} {}", self.fixture.display())?;
        if !self.description.is_empty() {
            write!(f, ": {}", self.description)?;
        }
        for text in self.failure.iter().chain(&self.diff) {
            for line in text.lines() {
                write!(f, "\n    {line}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SCRIPT: &str = "/* a tiny adapter */\n\
        payload.kind = 'skip' ? undefined_on_purpose : {\n  \
          'id': id,\n  'partner': $partner,\n  'total': payload.a + payload.b,\n  \
          'subject': subject\n}";

    struct Dir(tempfile::TempDir);

    impl Dir {
        fn new() -> Dir {
            Dir(tempfile::tempdir().unwrap())
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.path().join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).unwrap();
            }
            std::fs::write(&path, text).unwrap();
            path
        }

        fn case(&self, name: &str, case: &Value) -> PathBuf {
            self.write(&format!("a.tests/{name}"), &case.to_string())
        }
    }

    fn event(payload: Value) -> Value {
        json!({"id": "evt-1", "version": 1, "type": "t", "payload": payload})
    }

    fn run(dir: &Dir, script: &str, cases: &[PathBuf]) -> Vec<CaseResult> {
        let script = dir.write("a.jsonata", script);
        run_adapter_fixtures(&script, cases, &Limits::default())
    }

    #[test]
    fn a_matching_output_passes() {
        let dir = Dir::new();
        let case = dir.case(
            "ok.json",
            &json!({
                "description": "adds",
                "event": event(json!({"a": 1, "b": 2})),
                "bindings": {"partner": "acme"},
                // Member order does not matter; the subject defaulted to the id.
                "expect": {"subject": "evt-1", "total": 3.0, "partner": "acme", "id": "evt-1"},
            }),
        );
        let results = run(&dir, SCRIPT, std::slice::from_ref(&case));
        assert_eq!(results.len(), 1);
        let result = &results[0];
        assert!(result.passed, "{result}");
        assert_eq!(result.fixture, case);
        assert_eq!(result.description, "adds");
        assert_eq!((&result.failure, &result.diff), (&None, &None));
        assert_eq!(result.to_string(), format!("PASS {}: adds", case.display()));
    }

    #[test]
    fn the_partner_defaults_to_test_partner() {
        let dir = Dir::new();
        let case = dir.case(
            "default.json",
            &json!({
                "description": "default partner",
                "event": event(json!({"a": 1, "b": 1})),
                "expect": {"id": "evt-1", "partner": "test-partner", "total": 2, "subject": "evt-1"},
            }),
        );
        let results = run(&dir, SCRIPT, &[case]);
        assert!(results[0].passed, "{}", results[0]);
    }

    #[test]
    fn a_wrong_expectation_gives_a_diff() {
        let dir = Dir::new();
        let case = dir.case(
            "wrong.json",
            &json!({
                "description": "wrong total",
                "event": event(json!({"a": 1, "b": 2})),
                "expect": {"id": "evt-1", "partner": "test-partner", "total": 4, "subject": "evt-1"},
            }),
        );
        let result = &run(&dir, SCRIPT, &[case])[0];
        assert!(!result.passed);
        assert_eq!(
            result.failure.as_deref(),
            Some("the output differs from `expect`")
        );
        assert_eq!(
            result.diff.as_deref(),
            Some(
                "--- expected\n+++ actual\n  {\n    \"id\": \"evt-1\",\n    \
                 \"partner\": \"test-partner\",\n-   \"total\": 4,\n+   \"total\": 3,\n    \
                 \"subject\": \"evt-1\"\n  }"
            )
        );
        assert_eq!(
            result.actual,
            Some(Actual::Value(
                json!({"id": "evt-1", "partner": "test-partner", "total": 3, "subject": "evt-1"})
            ))
        );
        let shown = result.to_string();
        assert!(shown.starts_with("FAIL "), "{shown}");
        assert!(shown.contains("\n    -   \"total\": 4,"), "{shown}");
    }

    #[test]
    fn undefined_is_expected_and_compared() {
        let dir = Dir::new();
        let skipped = event(json!({"kind": "skip"}));
        let ok = dir.case(
            "skip.json",
            &json!({"description": "skipped", "event": skipped, "expect_undefined": true}),
        );
        let wrong = dir.case(
            "wrong.json",
            &json!({"description": "wants a value", "event": skipped, "expect": null}),
        );
        let results = run(&dir, SCRIPT, &[ok, wrong]);
        assert!(results[0].passed, "{}", results[0]);
        assert_eq!(results[0].actual, Some(Actual::Undefined));
        assert!(!results[1].passed);
        assert_eq!(
            results[1].diff.as_deref(),
            Some(
                "--- expected\n+++ actual\n- null\n+ undefined (nothing matched \
                 `undefined_on_purpose` at line 2)"
            )
        );
    }

    #[test]
    fn an_expected_error_matches_on_code_and_message() {
        let dir = Dir::new();
        let bad = event(json!({"a": 1, "b": "x"}));
        let code_only = dir.case(
            "code.json",
            &json!({"description": "code", "event": bad, "expect_error": {"code": "T2002"}}),
        );
        let with_message = dir.case(
            "message.json",
            &json!({"description": "message", "event": bad,
                    "expect_error": {"code": "T2002", "message": "must evaluate to a number"}}),
        );
        let wrong_code = dir.case(
            "wrong-code.json",
            &json!({"description": "wrong code", "event": bad, "expect_error": {"code": "D3137"}}),
        );
        let wrong_message = dir.case(
            "wrong-message.json",
            &json!({"description": "wrong message", "event": bad,
                    "expect_error": {"code": "T2002", "message": "no such text"}}),
        );
        let no_error = dir.case(
            "no-error.json",
            &json!({"description": "succeeds", "event": event(json!({"a": 1, "b": 2})),
                    "expect_error": {"code": "T2002"}}),
        );
        let results = run(
            &dir,
            SCRIPT,
            &[code_only, with_message, wrong_code, wrong_message, no_error],
        );
        assert!(results[0].passed, "{}", results[0]);
        assert!(results[1].passed, "{}", results[1]);
        for result in &results[2..] {
            assert!(!result.passed, "{result}");
        }
        // An error is shown with its place in the script.
        let failure = results[2].failure.as_deref().unwrap();
        assert!(
            failure.contains("with T2002 where `expect_error` wants D3137"),
            "{failure}"
        );
        assert!(
            failure.contains("a.jsonata:5:22: error T2002: "),
            "{failure}"
        );
        assert!(
            failure.contains(
                "\n 5 |   'total': payload.a + payload.b,\n   |                      ^\n\
                 `payload.b` is \"x\" (a string).\n"
            ),
            "{failure}"
        );
        let diff = results[2].diff.as_deref().unwrap();
        assert!(diff.contains("\n- error D3137\n+ error T2002: "), "{diff}");
        let diff = results[3].diff.as_deref().unwrap();
        assert!(
            diff.contains("- error T2002 (a message containing \"no such text\")"),
            "{diff}"
        );
        assert!(
            results[4]
                .failure
                .as_deref()
                .unwrap()
                .contains("succeeded, but `expect_error` wants error T2002"),
            "{}",
            results[4]
        );
    }

    #[test]
    fn a_compile_error_fails_every_case_with_its_place() {
        let dir = Dir::new();
        let case = json!({"description": "any", "event": event(json!(1)), "expect": 1});
        let cases = [dir.case("1.json", &case), dir.case("2.json", &case)];
        let results = run(&dir, "(\n  $a := 1;\n  $a + ]\n)", &cases);
        assert_eq!(results.len(), 2);
        for result in &results {
            assert!(!result.passed);
            assert_eq!(result.actual, None);
            assert_eq!(result.description, "any");
            let failure = result.failure.as_deref().unwrap();
            let script = dir.0.path().join("a.jsonata");
            assert!(
                failure.starts_with(&format!(
                    "the script does not compile:\n{}:3:8: error S0211: ",
                    script.display()
                )),
                "{failure}"
            );
            assert!(
                failure.contains("\n 3 |   $a + ]\n   |        ^\n"),
                "{failure}"
            );
        }
    }

    #[test]
    fn numbers_compare_by_value_and_arrays_by_order() {
        let dir = Dir::new();
        let script = "[payload, 2.0]";
        let same = dir.case(
            "same.json",
            &json!({"description": "same", "event": event(json!(1.0)), "expect": [1, 2]}),
        );
        let reordered = dir.case(
            "reordered.json",
            &json!({"description": "reordered", "event": event(json!(1)), "expect": [2, 1]}),
        );
        let results = run(&dir, script, &[same, reordered]);
        assert!(results[0].passed, "{}", results[0]);
        assert!(!results[1].passed);
    }

    #[test]
    fn the_event_is_normalised_as_the_agent_does() {
        let dir = Dir::new();
        let script = "$";
        let change_event = dir.case(
            "change.json",
            &json!({
                "description": "defaults applied, nulls dropped, extras kept",
                "event": {"id": "e", "version": 2, "time": null, "payload": {}, "tenant": "x"},
                "expect": {"id": "e", "version": 2, "type": "change", "subject": "e",
                           "payload": {}, "tenant": "x"},
            }),
        );
        let cloud_event = dir.case(
            "cloud.json",
            &json!({
                "description": "a CloudEvent",
                "event": {"specversion": "1.0", "id": "c", "source": "hub", "type": "t",
                          "dataversion": 3, "data": {"k": 1}},
                "expect": {"id": "c", "version": 3, "type": "t", "subject": "c",
                           "source": "hub", "payload": {"k": 1}, "specversion": "1.0"},
            }),
        );
        let refused = dir.case(
            "refused.json",
            &json!({"description": "no id", "event": {"version": 1, "payload": 1}, "expect": 1}),
        );
        let results = run(&dir, script, &[change_event, cloud_event, refused]);
        assert!(results[0].passed, "{}", results[0]);
        assert!(results[1].passed, "{}", results[1]);
        let failure = results[2].failure.as_deref().unwrap();
        assert!(
            failure.contains("`event` would be refused by the agent: missing field `id`"),
            "{failure}"
        );
        assert_eq!(results[2].actual, None);
    }

    #[test]
    fn malformed_cases_fail_with_the_reason() {
        let path = Path::new("c.json");
        let parse = |text: &str| Fixture::parse(path, text).unwrap_err().to_string();
        let ev = r#""event": {"id": "e", "version": 1, "payload": 1}"#;
        assert!(parse("{").starts_with("c.json is not valid JSON: "));
        assert!(parse("[]").contains("must be a JSON object, not an array"));
        assert!(parse(&format!("{{{ev}, \"expect\": 1}}")).contains("`description` is missing"));
        let with = |rest: &str| parse(&format!("{{\"description\": \"d\", {ev}, {rest}}}"));
        assert!(with(r#""expect": 1, "expect_undefined": true"#).contains("only one of"));
        assert!(with(r#""bindings": {}"#).contains("expects nothing"));
        assert!(with(r#""expect_undefined": false"#).contains("must be `true`"));
        assert!(with(r#""expect_undefiend": true"#).contains("unknown member `expect_undefiend`"));
        assert!(with(r#""expect_error": {"message": "x"}"#).contains("{\"code\": \"D3137\"}"));
        assert!(with(r#""expect_error": {"code": "T1", "line": 1}"#).contains("`line`"));
        assert!(with(r#""bindings": {"tenant": "x"}, "expect": 1"#).contains("only `partner`"));
        assert!(with(r#""bindings": {"partner": 1}, "expect": 1"#).contains("must be a string"));
        assert!(with(r#""bindings": [], "expect": 1"#).contains("must be an object"));

        // A case that cannot be read is a failed case, not a failed run.
        let dir = Dir::new();
        let broken = dir.write("a.tests/broken.json", "{");
        let missing = dir.0.path().join("a.tests/missing.json");
        let results = run(&dir, "1", &[broken, missing]);
        assert!(results.iter().all(|r| !r.passed && r.actual.is_none()));
        assert!(
            results[1]
                .failure
                .as_deref()
                .unwrap()
                .starts_with("cannot read ")
        );
    }

    #[test]
    fn an_unreadable_script_fails_every_case() {
        let case = PathBuf::from("nowhere/a.tests/x.json");
        let results =
            run_adapter_fixtures(Path::new("nowhere/a.jsonata"), &[case], &Limits::default());
        assert!(!results[0].passed);
        assert!(
            results[0]
                .failure
                .as_deref()
                .unwrap()
                .starts_with("cannot read the script nowhere/a.jsonata: ")
        );
    }

    #[test]
    fn discover_pairs_scripts_with_their_cases() {
        let dir = Dir::new();
        dir.write("b.jsonata", "1");
        dir.write("a.jsonata", "1");
        dir.write("README.md", "");
        dir.write("a.tests/2-second.json", "{}");
        dir.write("a.tests/1-first.json", "{}");
        dir.write("a.tests/notes.md", "");
        dir.write("a.tests/sub/ignored.json", "{}");
        let root = dir.0.path();
        let found = discover(root).unwrap();
        assert_eq!(
            found,
            vec![
                (
                    root.join("a.jsonata"),
                    vec![
                        root.join("a.tests/1-first.json"),
                        root.join("a.tests/2-second.json")
                    ]
                ),
                (root.join("b.jsonata"), vec![]),
            ]
        );
        assert_eq!(tests_dir(&root.join("a.jsonata")), root.join("a.tests"));

        dir.write("gone.tests/x.json", "{}");
        let err = discover(root).unwrap_err();
        assert!(
            matches!(&err, FixtureError::OrphanTests { script, .. } if *script == root.join("gone.jsonata")),
            "{err}"
        );
        assert!(matches!(
            discover(&root.join("absent")),
            Err(FixtureError::Io { .. })
        ));
    }

    #[test]
    fn line_diff_keeps_context_around_changes() {
        let want: String = (1..=20).map(|n| format!("{n}\n")).collect();
        let got = want.replace("10\n", "ten\n");
        assert_eq!(
            line_diff(&want, &got),
            "--- expected\n+++ actual\n  ...\n  5\n  6\n  7\n  8\n  9\n- 10\n+ ten\n  11\n  \
             12\n  13\n  14\n  15\n  ..."
        );
        assert_eq!(
            line_diff("a\nb\nc", "a\nc\nd"),
            "--- expected\n+++ actual\n  a\n- b\n  c\n+ d"
        );
        assert_eq!(line_diff("", "x"), "--- expected\n+++ actual\n+ x");
    }

    #[test]
    fn canonical_numbers() {
        assert_eq!(canonical(&json!([1.0, -0.0, 2.5])), json!([1, 0, 2.5]));
        assert_eq!(canonical(&json!(1e300)), json!(1e300));
        assert_eq!(
            pretty(&align(
                &json!({"b": 1, "a": {"y": 1, "x": 2}, "c": 3}),
                &json!({"a": {"x": 0, "y": 0}, "b": 0})
            )),
            pretty(&json!({"a": {"x": 2, "y": 1}, "b": 1, "c": 3}))
        );
    }
}

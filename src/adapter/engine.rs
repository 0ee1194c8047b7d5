//! The JSONata engine seam: the only module that knows which JSONata implementation runs the
//! adapter scripts (today `jlens-core`). Everything else compiles and evaluates through
//! [`Expression`] and sees failures as [`EngineError`], so the engine can be swapped here.
//!
//! Every evaluation runs within [`Limits`] (wall-clock time, evaluation depth, output size) and
//! under [`std::panic::catch_unwind`], so a script can neither hang the caller, overflow its
//! stack, exhaust memory with its result, nor crash it through a bug in the engine.
//!
//! Error codes are JSONata's (`S0202`, `T2001`, `D1001`, ...) plus our own for the limits:
//!
//! | code    | meaning                                                       |
//! |---------|---------------------------------------------------------------|
//! | `U1001` | time limit exceeded                                           |
//! | `U1002` | depth limit exceeded (evaluation, or expression nesting)      |
//! | `U1003` | output size limit exceeded (result, or a string/array built)  |
//! | `U1004` | the engine panicked or failed internally                      |

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use serde_json::{Map, Value};

/// Time limit exceeded.
pub const CODE_TIMEOUT: &str = "U1001";
/// Depth limit exceeded.
pub const CODE_DEPTH: &str = "U1002";
/// Output size limit exceeded.
pub const CODE_OUTPUT_SIZE: &str = "U1003";
/// The engine panicked (or failed in a way that is not the script's fault).
pub const CODE_ENGINE: &str = "U1004";

/// The limits every evaluation runs within.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock time of one evaluation. The engine reads the clock every few hundred
    /// evaluation steps (and while a regular expression backtracks), so it stops shortly after.
    pub time: Duration,
    /// Maximum evaluation depth: the number of nested evaluation steps, as jsonata-js's test
    /// harness counts them (a non-tail recursive call costs a few levels). Tail calls do not
    /// grow it.
    pub max_depth: usize,
    /// Maximum size of the result as compact JSON text, in bytes. The result is measured while it
    /// is written, and writing stops at the limit. Values built during the evaluation are capped
    /// from the same figure, so memory stays bounded before the result is written: a string at
    /// `max_output_bytes` bytes, an array at `max_output_bytes / 2` items (an array of `n` items
    /// takes at least `2n` bytes of JSON).
    pub max_output_bytes: usize,
}

impl Default for Limits {
    /// 100 ms, depth 500, 10 MiB.
    fn default() -> Self {
        Limits {
            time: Duration::from_millis(100),
            max_depth: 500,
            max_output_bytes: 10 * 1024 * 1024,
        }
    }
}

/// A compiled JSONata expression: compile once, evaluate many times, from any thread.
#[derive(Debug, Clone)]
pub struct Expression {
    inner: jlens_core::Expression,
}

impl Expression {
    /// Parses and compiles `source`. Fails with a JSONata static error (`S0xxx`), with `U1002`
    /// when the expression is nested too deeply, or with `U1004` if the engine panics.
    pub fn compile(source: &str) -> Result<Expression, EngineError> {
        match catch_unwind(|| jlens_core::Expression::compile(source)) {
            Ok(Ok(inner)) => Ok(Expression { inner }),
            Ok(Err(err)) => Err(EngineError::from_engine(&err, source, Stage::Compile)),
            Err(payload) => Err(EngineError::panicked(payload.as_ref())),
        }
    }

    /// The source text the expression was compiled from.
    pub fn source(&self) -> &str {
        self.inner.source()
    }

    /// Evaluates the expression against `input`.
    ///
    /// Returns `None` when the result is JSONata `undefined`. `bindings` are extra `$name`
    /// variables (keys without the `$`, e.g. `partner` for `$partner`); they take precedence
    /// over built-in functions of the same name, as in jsonata-js.
    pub fn evaluate(
        &self,
        input: &Value,
        bindings: &Map<String, Value>,
        limits: &Limits,
    ) -> Result<Option<Value>, EngineError> {
        self.evaluate_optional(Some(input), bindings, limits)
    }

    /// Like [`Expression::evaluate`], where `None` as input means JSONata `undefined` (no
    /// input document at all), which is not the same as `null`: `$` is then undefined.
    pub fn evaluate_optional(
        &self,
        input: Option<&Value>,
        bindings: &Map<String, Value>,
        limits: &Limits,
    ) -> Result<Option<Value>, EngineError> {
        let vars: jlens_core::Bindings = bindings
            .iter()
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        // jlens reads the clock only every 256 evaluation steps, and one step can take long (a
        // range of millions of items): the watchdog cancels the evaluation at its deadline, and
        // the cancellation is checked at every step.
        let token = jlens_core::CancelToken::new();
        let _armed = watchdog::arm(limits.time, &token);
        let options = jlens_core::Options::new()
            .cancel_token(token)
            .timeout(limits.time)
            .max_depth(limits.max_depth)
            .max_result_size(limits.max_output_bytes)
            .max_string_length(limits.max_output_bytes)
            .max_array_length(limits.max_output_bytes / 2);
        // The evaluation keeps all of its state to itself and the expression is immutable, so
        // nothing observable is left half-updated when the engine panics.
        let run = AssertUnwindSafe(|| self.inner.evaluate_with(input, &vars, &options));
        match catch_unwind(run) {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(err)) => Err(EngineError::from_engine(
                &err,
                self.inner.source(),
                Stage::Evaluate(limits),
            )),
            Err(payload) => Err(EngineError::panicked(payload.as_ref())),
        }
    }
}

/// A compile or evaluation error, in terms that do not depend on the engine.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct EngineError {
    /// The JSONata error code (`S0202`, `T2001`, `D1001`, ...), or one of ours for the limits:
    /// `U1001` timeout, `U1002` depth, `U1003` output size, `U1004` engine panic.
    pub code: String,
    /// The human-readable message.
    pub message: String,
    /// Where in the source the error is, as an offset in characters (Unicode scalar values,
    /// 0-based): the start of the token the error is about when the source holds it there (an
    /// operator, a bracket), otherwise the start of the offending expression. `None` when the
    /// error has no place in the source (the limits, for example).
    pub position: Option<usize>,
    /// The token involved, if any (an operator, a function name, ...).
    pub token: Option<String>,
    /// The value involved, if any. Boxed to keep `Result<_, EngineError>` small.
    pub value: Option<Box<Value>>,
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)?;
        if let Some(position) = self.position {
            write!(f, " (at character {position})")?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Stage<'l> {
    Compile,
    Evaluate(&'l Limits),
}

impl EngineError {
    /// Whether the error is one of the limits (time, depth, output size) rather than a
    /// problem with the script or its input.
    pub fn is_limit(&self) -> bool {
        matches!(
            self.code.as_str(),
            CODE_TIMEOUT | CODE_DEPTH | CODE_OUTPUT_SIZE
        )
    }

    /// Renders the error for a person: `file:line:col: CODE: message`, then, when the error has
    /// a position, the source line and a caret under the column. Lines and columns count from 1,
    /// columns in characters.
    pub fn render(&self, file_name: &str, source: &str) -> String {
        let Some(position) = self.position else {
            return format!("{file_name}: {}: {}", self.code, self.message);
        };
        let (line_no, line, column) = locate(source, position);
        let mut out = format!(
            "{file_name}:{line_no}:{}: {}: {}\n",
            column + 1,
            self.code,
            self.message
        );
        out.push_str(line);
        out.push('\n');
        // Keep tabs so that the caret lines up with the text above it.
        out.extend(
            line.chars()
                .take(column)
                .map(|c| if c == '\t' { '\t' } else { ' ' }),
        );
        out.push('^');
        out
    }

    fn panicked(payload: &(dyn std::any::Any + Send)) -> EngineError {
        let detail = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        EngineError {
            code: CODE_ENGINE.to_owned(),
            message: format!("The JSONata engine failed internally: {detail}"),
            position: None,
            token: None,
            value: None,
        }
    }

    fn from_engine(err: &jlens_core::Error, source: &str, stage: Stage) -> EngineError {
        // jlens reports its guardrails with codes of its own, some of which collide with ours.
        let code = match (err.code(), stage) {
            ("D1012" | "U1003" | "U1006", _) => CODE_TIMEOUT,
            ("D1011", _) | ("U1001", Stage::Compile) => CODE_DEPTH,
            ("U1001", Stage::Evaluate(_)) => CODE_OUTPUT_SIZE,
            (other, _) if other.starts_with('U') => CODE_ENGINE,
            (other, _) => other,
        };
        let message = match (code, stage) {
            (CODE_TIMEOUT, Stage::Evaluate(limits)) => format!(
                "Evaluation timeout: the time limit of {} ms was exceeded. Check for an \
                 infinite loop",
                limits.time.as_millis()
            ),
            (CODE_DEPTH, Stage::Evaluate(limits)) => format!(
                "Stack overflow: the depth limit of {} was exceeded. Check for a \
                 non-terminating recursive function, or rewrite it as tail-recursive",
                limits.max_depth
            ),
            _ => err.message(),
        };
        let position = if code.starts_with('U') {
            None
        } else {
            error_start(err, source).map(|byte| char_offset_of_byte(source, byte))
        };
        EngineError {
            code: code.to_owned(),
            message,
            position,
            token: err.token(),
            value: err.value().cloned().map(Box::new),
        }
    }
}

/// One background thread that cancels evaluations whose time is up, shared by all of them.
mod watchdog {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
    use std::time::{Duration, Instant};

    use jlens_core::CancelToken;

    type Deadlines = BTreeMap<(Instant, u64), CancelToken>;

    struct Watchdog {
        deadlines: Mutex<Deadlines>,
        changed: Condvar,
    }

    impl Watchdog {
        fn lock(&self) -> MutexGuard<'_, Deadlines> {
            self.deadlines
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        }

        fn run(&self) {
            let mut deadlines = self.lock();
            loop {
                let now = Instant::now();
                while let Some(entry) = deadlines.first_entry() {
                    if entry.key().0 > now {
                        break;
                    }
                    entry.remove().cancel();
                }
                deadlines = match deadlines.first_key_value() {
                    Some(((deadline, _), _)) => {
                        let wait = deadline.saturating_duration_since(now);
                        self.changed
                            .wait_timeout(deadlines, wait)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0
                    }
                    None => self
                        .changed
                        .wait(deadlines)
                        .unwrap_or_else(PoisonError::into_inner),
                };
            }
        }
    }

    /// The watchdog, started on first use; `None` if its thread could not be started, in which
    /// case the engine's own clock checks remain.
    fn get() -> Option<&'static Arc<Watchdog>> {
        static WATCHDOG: OnceLock<Option<Arc<Watchdog>>> = OnceLock::new();
        WATCHDOG
            .get_or_init(|| {
                let watchdog = Arc::new(Watchdog {
                    deadlines: Mutex::new(BTreeMap::new()),
                    changed: Condvar::new(),
                });
                let runner = Arc::clone(&watchdog);
                std::thread::Builder::new()
                    .name("jsonata-watchdog".into())
                    .spawn(move || runner.run())
                    .ok()
                    .map(|_| watchdog)
            })
            .as_ref()
    }

    /// A deadline being watched; dropping it stops watching.
    pub(super) struct Armed {
        watchdog: &'static Watchdog,
        key: (Instant, u64),
    }

    impl Drop for Armed {
        fn drop(&mut self) {
            self.watchdog.lock().remove(&self.key);
        }
    }

    /// Cancels `token` once `time` has passed, unless the returned guard is dropped first.
    pub(super) fn arm(time: Duration, token: &CancelToken) -> Option<Armed> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let watchdog = get()?;
        let deadline = Instant::now().checked_add(time)?;
        let key = (deadline, NEXT_ID.fetch_add(1, Ordering::Relaxed));
        let mut deadlines = watchdog.lock();
        let earliest = deadlines
            .first_key_value()
            .is_none_or(|(first, _)| key < *first);
        deadlines.insert(key, token.clone());
        drop(deadlines);
        if earliest {
            watchdog.changed.notify_one();
        }
        Some(Armed {
            watchdog: watchdog.as_ref(),
            key,
        })
    }
}

/// The byte offset in `source` the error points at. jlens gives the JSONata position (in UTF-16
/// units, just after the token the error is about) and the span of the offending expression.
/// The token is the better place when the source holds it right there (an operator, a
/// bracket); otherwise the start of the expression is (`$max(...)` rather than its `(`).
fn error_start(err: &jlens_core::Error, source: &str) -> Option<usize> {
    let token_start = err.token().zip(err.position()).and_then(|(token, utf16)| {
        let end = byte_of_utf16(source, utf16)?;
        let before = source.get(..end)?;
        (!token.is_empty() && before.ends_with(token.as_str())).then(|| end - token.len())
    });
    token_start
        .or(err.span().map(|span| span.start))
        .or_else(|| {
            err.position()
                .and_then(|utf16| byte_of_utf16(source, utf16))
        })
        .map(|byte| byte.min(source.len()))
}

/// The byte offset of UTF-16 code unit `utf16` of `source`, if it falls on a character.
fn byte_of_utf16(source: &str, utf16: usize) -> Option<usize> {
    let mut units = 0;
    for (byte, c) in source.char_indices() {
        if units == utf16 {
            return Some(byte);
        }
        if units > utf16 {
            return None;
        }
        units += c.len_utf16();
    }
    (units == utf16).then_some(source.len())
}

/// The number of characters before byte `byte` of `source`.
fn char_offset_of_byte(source: &str, byte: usize) -> usize {
    source
        .char_indices()
        .take_while(|(index, _)| *index < byte)
        .count()
}

/// The 1-based line number, the text of the line (without its line ending) and the 0-based
/// column in characters of character `position` of `source`. A position past the end points
/// just after the last character.
fn locate(source: &str, position: usize) -> (usize, &str, usize) {
    let mut line_no = 1;
    let mut line_start = 0;
    let mut column = 0;
    for (index, (byte, c)) in source.char_indices().enumerate() {
        if index == position {
            break;
        }
        if c == '\n' {
            line_no += 1;
            line_start = byte + 1;
            column = 0;
        } else {
            column += 1;
        }
    }
    let rest = source.get(line_start..).unwrap_or("");
    let line = rest.split('\n').next().unwrap_or("");
    let line = line.strip_suffix('\r').unwrap_or(line);
    (line_no, line, column)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Instant;

    fn eval(source: &str, input: Value) -> Result<Option<Value>, EngineError> {
        Expression::compile(source)?.evaluate(&input, &Map::new(), &Limits::default())
    }

    /// A limit must fire within roughly its time: generous slack for loaded debug builds.
    const SLACK: Duration = Duration::from_millis(1500);

    fn assert_limit(source: &str, limits: &Limits, code: &str) {
        let expression = Expression::compile(source).expect("compiles");
        let started = Instant::now();
        let err = expression
            .evaluate(&Value::Null, &Map::new(), limits)
            .expect_err("must hit a limit");
        let elapsed = started.elapsed();
        assert_eq!(err.code, code, "{source}: {err}");
        assert!(err.is_limit());
        assert!(
            elapsed < limits.time + SLACK,
            "{source}: took {elapsed:?} for a limit of {:?}",
            limits.time
        );
    }

    #[test]
    fn expression_is_send_and_sync() {
        const fn assert_send_sync<T: Send + Sync>() {}
        const _: () = assert_send_sync::<Expression>();
        const _: () = assert_send_sync::<EngineError>();
    }

    #[test]
    fn evaluates_with_bindings() {
        let expression = Expression::compile("{'id': id, 'partner': $partner}").unwrap();
        let mut bindings = Map::new();
        bindings.insert("partner".into(), json!("acme"));
        let result = expression
            .evaluate(&json!({"id": 7}), &bindings, &Limits::default())
            .unwrap();
        assert_eq!(result, Some(json!({"id": 7, "partner": "acme"})));
    }

    #[test]
    fn undefined_is_none_and_differs_from_null_input() {
        assert_eq!(eval("missing", json!({"a": 1})).unwrap(), None);
        let expression = Expression::compile("$exists($)").unwrap();
        let limits = Limits::default();
        let none = Map::new();
        assert_eq!(
            expression.evaluate(&Value::Null, &none, &limits).unwrap(),
            Some(json!(true))
        );
        assert_eq!(
            expression.evaluate_optional(None, &none, &limits).unwrap(),
            Some(json!(false))
        );
    }

    #[test]
    fn compile_error_has_code_position_and_token() {
        let err = Expression::compile("Account.Order[0").unwrap_err();
        assert_eq!(err.code, "S0203");
        assert!(!err.is_limit());
        let err = Expression::compile("(1 + 2]").unwrap_err();
        assert_eq!(err.code, "S0202");
        assert_eq!(err.token.as_deref(), Some("]"));
        assert_eq!(err.position, Some(6));
    }

    #[test]
    fn evaluation_error_has_code_and_position() {
        let err = eval("\n  1 + 'a'", Value::Null).unwrap_err();
        assert_eq!(err.code, "T2002");
        assert_eq!(err.token.as_deref(), Some("+"));
        // At the operator, not at the start of `1 + 'a'`.
        assert_eq!(err.position, Some(5));
        // A function call: at the start of the call rather than after its `(`.
        let err = eval("[1] ~> $max(2)", Value::Null).unwrap_err();
        assert_eq!((err.code.as_str(), err.position), ("T0410", Some(7)));
        assert_eq!(eval("$number('x')", Value::Null).unwrap_err().code, "D3030");
    }

    #[test]
    fn positions_count_characters() {
        // 'é' is two bytes and one UTF-16 unit, '𝄞' four bytes and two units.
        let err = Expression::compile("'é𝄞' & (1 + ]").unwrap_err();
        assert_eq!(err.position, Some(12), "{err:?}");
        let err = eval("'é𝄞' & (1 + 'x')", Value::Null).unwrap_err();
        assert_eq!(err.position, Some(10), "{err:?}");
        assert_eq!(byte_of_utf16("é𝄞b", 0), Some(0));
        assert_eq!(byte_of_utf16("é𝄞b", 1), Some(2));
        assert_eq!(byte_of_utf16("é𝄞b", 2), None);
        assert_eq!(byte_of_utf16("é𝄞b", 3), Some(6));
        assert_eq!(byte_of_utf16("é𝄞b", 4), Some(7));
        assert_eq!(byte_of_utf16("é𝄞b", 5), None);
    }

    #[test]
    fn render_points_at_the_column() {
        let source = "(\n  $a := 1;\n\t$a + 'x'\n)";
        let err = eval(source, Value::Null).unwrap_err();
        let rendered = err.render("adapter.jsonata", source);
        let lines: Vec<&str> = rendered.lines().collect();
        assert!(
            lines[0].starts_with("adapter.jsonata:3:5: T2002: "),
            "{rendered}"
        );
        assert_eq!(lines[1], "\t$a + 'x'");
        assert_eq!(lines[2], "\t   ^");
    }

    #[test]
    fn render_without_position_has_no_excerpt() {
        let err = EngineError {
            code: CODE_TIMEOUT.into(),
            message: "too slow".into(),
            position: None,
            token: None,
            value: None,
        };
        assert_eq!(err.render("f.jsonata", "x"), "f.jsonata: U1001: too slow");
    }

    #[test]
    fn render_survives_positions_past_the_end() {
        let err = EngineError {
            code: "S0203".into(),
            message: "end".into(),
            position: Some(99),
            token: None,
            value: None,
        };
        assert_eq!(err.render("f", "ab\r\ncd"), "f:2:3: S0203: end\ncd\n  ^");
    }

    #[test]
    fn infinite_tail_recursion_times_out() {
        let limits = Limits {
            time: Duration::from_millis(200),
            ..Limits::default()
        };
        assert_limit("( $f := function($x){ $f($x) }; $f(1) )", &limits, "U1001");
    }

    #[test]
    fn infinite_loop_without_named_recursion_times_out() {
        let limits = Limits {
            time: Duration::from_millis(200),
            ..Limits::default()
        };
        // Self-application: no function refers to itself by name.
        assert_limit("( $w := function($f){ $f($f) }; $w($w) )", &limits, "U1001");
        // No function of ours at all: 10^12 items counted, each step building a large range.
        assert_limit(
            "$sum([1..1000000].($count([1..1000000])))",
            &limits,
            "U1001",
        );
    }

    #[test]
    fn concurrent_evaluations_keep_their_own_deadlines() {
        let expression = Expression::compile("( $f := function($x){ $f($x) }; $f(1) )").unwrap();
        std::thread::scope(|scope| {
            let runs: Vec<_> = [300u64, 50, 200, 100]
                .into_iter()
                .map(|millis| {
                    let expression = &expression;
                    scope.spawn(move || {
                        let limits = Limits {
                            time: Duration::from_millis(millis),
                            ..Limits::default()
                        };
                        let started = Instant::now();
                        let err = expression
                            .evaluate(&Value::Null, &Map::new(), &limits)
                            .unwrap_err();
                        (limits.time, started.elapsed(), err)
                    })
                })
                .collect();
            for run in runs {
                let (limit, elapsed, err) = run.join().unwrap();
                assert_eq!(err.code, CODE_TIMEOUT);
                assert!(
                    elapsed >= limit,
                    "stopped after {elapsed:?}, limit {limit:?}"
                );
                assert!(
                    elapsed < limit + SLACK,
                    "stopped after {elapsed:?}, limit {limit:?}"
                );
            }
        });
        // A quick evaluation afterwards is not cancelled by a stale deadline.
        let quick = Expression::compile("1 + 1").unwrap();
        let result = quick.evaluate(&Value::Null, &Map::new(), &Limits::default());
        assert_eq!(result.unwrap(), Some(json!(2)));
    }

    #[test]
    fn deep_recursion_hits_the_depth_limit() {
        assert_limit(
            "( $f := function($n){ $n = 0 ? 0 : 1 + $f($n - 1) }; $f(100000) )",
            &Limits::default(),
            "U1002",
        );
    }

    #[test]
    fn deep_recursion_never_overflows_a_small_stack() {
        // With a depth limit far beyond what 256 KiB of stack holds, the engine must grow its
        // stack on the heap instead of overflowing the thread's.
        let handle = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(|| {
                let expression = Expression::compile(
                    "( $f := function($n){ $n = 0 ? 0 : 1 + $f($n - 1) }; $f(20000) )",
                )
                .unwrap();
                let limits = Limits {
                    time: Duration::from_secs(10),
                    max_depth: 1_000_000,
                    ..Limits::default()
                };
                expression.evaluate(&Value::Null, &Map::new(), &limits)
            })
            .unwrap();
        let result = handle.join().expect("no stack overflow");
        match result {
            Ok(value) => assert_eq!(value, Some(json!(20000))),
            Err(err) => assert!(err.is_limit(), "{err}"),
        }
    }

    #[test]
    fn deeply_nested_expression_is_rejected_at_compile_time() {
        let source = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
        let err = Expression::compile(&source).unwrap_err();
        assert_eq!(err.code, CODE_DEPTH, "{err}");
    }

    #[test]
    fn huge_output_is_stopped() {
        let limits = Limits {
            time: Duration::from_secs(5),
            ..Limits::default()
        };
        // 10^7 items, about 130 MB of JSON: stopped when the array is built.
        assert_limit("[1..10000000].('xxxxxxxxxx')", &limits, "U1003");
        // A 1 GB string, doubled 30 times: stopped when the string is built.
        assert_limit(
            "( $double := function($s, $n){ $n = 0 ? $s : $double($s & $s, $n - 1) }; \
             $double('x', 30) )",
            &limits,
            "U1003",
        );
        // 1 GB of JSON from 1 MB of memory (shared values): stopped while the result is written.
        assert_limit(
            "( $a := $pad('', 1000000, 'x'); $b := [$a,$a,$a,$a,$a,$a,$a,$a,$a,$a]; \
             $c := [$b,$b,$b,$b,$b,$b,$b,$b,$b,$b]; [$c,$c,$c,$c,$c,$c,$c,$c,$c,$c] )",
            &limits,
            "U1003",
        );
    }

    #[test]
    fn output_just_within_the_limit_passes() {
        let limits = Limits {
            max_output_bytes: 12,
            ..Limits::default()
        };
        let expression = Expression::compile("'abcdefghij'").unwrap();
        let none = Map::new();
        // "abcdefghij" with its quotes is 12 bytes.
        assert!(expression.evaluate(&Value::Null, &none, &limits).is_ok());
        let limits = Limits {
            max_output_bytes: 11,
            ..limits
        };
        let err = expression
            .evaluate(&Value::Null, &none, &limits)
            .unwrap_err();
        assert_eq!(err.code, CODE_OUTPUT_SIZE);
    }

    #[test]
    fn panic_payloads_become_engine_errors() {
        let payload = catch_unwind(|| panic!("boom")).unwrap_err();
        let err = EngineError::panicked(payload.as_ref());
        assert_eq!(err.code, CODE_ENGINE);
        assert!(err.message.contains("boom"));
        assert!(!err.is_limit());
    }
}

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

impl Limits {
    /// These limits with the time cut to `budget`.
    fn within(&self, budget: Duration) -> Limits {
        Limits {
            time: budget.min(self.time),
            ..self.clone()
        }
    }
}

/// A compiled JSONata expression: compile once, evaluate many times, from any thread.
#[derive(Debug, Clone)]
pub struct Expression {
    inner: jlens_core::Expression,
    /// What the expression may read of its input (jlens' analysis, an upper bound); `None`
    /// when it does not read it. An input given as JSON text is parsed to this cut.
    reads: Option<jlens_core::reads::Read>,
}

/// The input document of an evaluation.
#[derive(Clone, Copy)]
enum Input<'a> {
    /// A parsed document; `None` is JSONata `undefined`.
    Json(Option<&'a Value>),
    /// JSON text, parsed straight into the engine's own form, without the fields the
    /// expression never reads.
    Text(&'a str),
}

impl Expression {
    /// Parses and compiles `source`. Fails with a JSONata static error (`S0xxx`), with `U1002`
    /// when the expression is nested too deeply, or with `U1004` if the engine panics.
    pub fn compile(source: &str) -> Result<Expression, EngineError> {
        match catch_unwind(|| jlens_core::Expression::compile(source)) {
            Ok(Ok(inner)) => {
                // Bindings named after built-in functions would make the analysis wrong (jlens'
                // `reads` module); the agent's own binding, `$partner`, is not one.
                let reads = inner.reads().input().cloned();
                Ok(Expression { inner, reads })
            }
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
        self.run(Input::Json(input), bindings, limits, true)
    }

    /// Like [`Expression::evaluate`], with the input given as JSON text: cheaper than parsing
    /// it into a `Value` first, since it is parsed straight into the engine's own form and the
    /// fields the expression cannot read are skipped (checked as JSON, not converted). Text
    /// that is not JSON fails with [`CODE_ENGINE`].
    pub fn evaluate_text(
        &self,
        input: &str,
        bindings: &Map<String, Value>,
        limits: &Limits,
    ) -> Result<Option<Value>, EngineError> {
        self.run(Input::Text(input), bindings, limits, true)
    }

    /// [`Expression::evaluate_text`] with the time limit cut to `budget`, checked by the
    /// engine's own clock only (no watchdog): for a caller that must not be held up long and
    /// tries again with [`Expression::evaluate_text`] when the budget runs out (`U1001`). The clock
    /// is read every few hundred evaluation steps, so an evaluation whose single steps are huge
    /// (a range of millions of items) can overrun the budget by the time such a step takes.
    pub fn evaluate_text_brief(
        &self,
        input: &str,
        bindings: &Map<String, Value>,
        limits: &Limits,
        budget: Duration,
    ) -> Result<Option<Value>, EngineError> {
        self.run(Input::Text(input), bindings, &limits.within(budget), false)
    }

    fn run(
        &self,
        input: Input<'_>,
        bindings: &Map<String, Value>,
        limits: &Limits,
        watched: bool,
    ) -> Result<Option<Value>, EngineError> {
        let vars = engine_bindings(bindings);
        // jlens reads the clock only every 256 evaluation steps, and one step can take long (a
        // range of millions of items): the watchdog cancels the evaluation at its deadline, and
        // the cancellation is checked at every step.
        let token = jlens_core::CancelToken::new();
        let _armed = if watched {
            watchdog::arm(limits.time, &token)
        } else {
            None
        };
        let options = engine_options(limits, token);
        // The evaluation keeps all of its state to itself and the expression is immutable, so
        // nothing observable is left half-updated when the engine panics.
        let run = AssertUnwindSafe(|| match input {
            Input::Json(input) => Ok(self.inner.evaluate_with(input, &vars, &options)),
            Input::Text(text) => {
                let document = match &self.reads {
                    Some(read) => jlens_core::Document::parse_cut(text, read),
                    None => jlens_core::Document::parse(text),
                };
                document.map(|document| self.inner.evaluate_document(&document, &vars, &options))
            }
        });
        match catch_unwind(run) {
            Err(payload) => Err(EngineError::panicked(payload.as_ref())),
            Ok(Err(e)) => Err(EngineError::internal(format!(
                "the input is not valid JSON: {e}"
            ))),
            Ok(Ok(Ok(result))) => Ok(result),
            Ok(Ok(Err(err))) => Err(EngineError::from_engine(
                &err,
                self.inner.source(),
                Stage::Evaluate(limits, self.inner.ast()),
            )),
        }
    }

    /// Evaluates the expression again, watching it, and returns the places whose evaluation
    /// gave nothing: the paths that matched nothing and the conditions that were false and
    /// have no else branch, outermost first, in source order, at most
    /// [`MAX_UNDEFINED_CAUSES`]. Meant for explaining to a person why a result is undefined or
    /// lacks a member; it is slower than [`Expression::evaluate`] and not for the agent's own
    /// evaluations. An evaluation that fails gives the places seen before the failure.
    pub fn undefined_causes(
        &self,
        input: Option<&Value>,
        bindings: &Map<String, Value>,
        limits: &Limits,
    ) -> Vec<UndefinedCause> {
        let vars = engine_bindings(bindings);
        let token = jlens_core::CancelToken::new();
        let _armed = watchdog::arm(limits.time, &token);
        let options = engine_options(limits, token);
        let mut tracer = causes::Tracer::default();
        let run = AssertUnwindSafe(|| {
            // Only what the tracer saw matters here, not the result.
            let _ = self
                .inner
                .evaluate_traced(input, &vars, &options, &mut tracer);
        });
        if catch_unwind(run).is_err() {
            return Vec::new();
        }
        tracer.causes(self.inner.source())
    }
}

fn engine_bindings(bindings: &Map<String, Value>) -> jlens_core::Bindings {
    bindings
        .iter()
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

fn engine_options(limits: &Limits, token: jlens_core::CancelToken) -> jlens_core::Options {
    jlens_core::Options::new()
        .cancel_token(token)
        .timeout(limits.time)
        .max_depth(limits.max_depth)
        .max_result_size(limits.max_output_bytes)
        .max_string_length(limits.max_output_bytes)
        .max_array_length(limits.max_output_bytes / 2)
}

/// The most places [`Expression::undefined_causes`] returns.
pub const MAX_UNDEFINED_CAUSES: usize = 5;

/// A place in a script whose evaluation gave nothing (JSONata `undefined`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndefinedCause {
    pub kind: UndefinedKind,
    /// Where the place starts in the source, in characters from 0.
    pub position: usize,
    /// The source text of the place, as written: the path up to the step that matched
    /// nothing, or the condition that was false.
    pub text: String,
}

/// Why a place gave nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UndefinedKind {
    /// A path matched nothing in its input.
    Unmatched,
    /// A condition (`c ? a`) was false and has no else branch.
    FalseCondition,
}

/// The names of JSONata's built-in functions, without their `$`.
pub fn function_names() -> Vec<&'static str> {
    jlens_core::function_catalog()
        .iter()
        .map(|function| function.name)
        .collect()
}

/// What built-in function `name` (without its `$`) accepts as its argument `index` (from 1), in
/// words ("a string", "an array of numbers"), read from its signature; `None` when there is no
/// such function or argument.
pub fn expected_argument(name: &str, index: usize) -> Option<String> {
    let function = jlens_core::function_catalog()
        .into_iter()
        .find(|function| function.name == name)?;
    signature::describe_parameter(&function.signature, index)
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
    /// For an evaluation error, the part of the script that failed, when the engine says.
    pub culprit: Option<Box<Culprit>>,
}

/// The part of a script whose evaluation failed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Culprit {
    /// The source text, as written, of the operation or function call that failed.
    pub expression: String,
    /// The part of `expression` that held the offending value (the error's `value`): an
    /// operator's operand or a function's argument, when the engine says which.
    pub operand: Option<String>,
    /// For a function argument the function does not accept: the argument's number, from 1,
    /// counting a value piped in with `~>` or taken from the context as the first.
    pub argument: Option<usize>,
    /// What the function accepts as that argument, in words ("a string"), when known.
    pub expected: Option<String>,
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
    Evaluate(&'l Limits, &'l jlens_core::Ast),
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

    /// An error of the agent rather than of the script (`U1004`), with `message` saying what
    /// failed.
    pub fn internal(message: String) -> EngineError {
        EngineError {
            code: CODE_ENGINE.to_owned(),
            message,
            position: None,
            token: None,
            value: None,
            culprit: None,
        }
    }

    /// Renders the error for a person, as
    /// [`diagnostics::render`](super::diagnostics::render) describes: `file:line:col: error
    /// CODE: what is wrong`, the line of the script with a caret under the column, what the
    /// failing part got, and a sentence saying what to do. Lines and columns count from 1,
    /// columns in characters.
    pub fn render(&self, file_name: &str, source: &str) -> String {
        super::diagnostics::render(self, file_name, source)
    }

    fn panicked(payload: &(dyn std::any::Any + Send)) -> EngineError {
        let detail = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        EngineError {
            code: CODE_ENGINE.to_owned(),
            message: format!("the JSONata engine failed internally: {detail}"),
            position: None,
            token: None,
            value: None,
            culprit: None,
        }
    }

    fn from_engine(err: &jlens_core::Error, source: &str, stage: Stage) -> EngineError {
        // jlens reports its guardrails with codes of its own, some of which collide with ours.
        let code = match (err.code(), stage) {
            ("D1012" | "U1003" | "U1006", _) => CODE_TIMEOUT,
            ("D1011", _) | ("U1001", Stage::Compile) => CODE_DEPTH,
            ("U1001", Stage::Evaluate(..)) => CODE_OUTPUT_SIZE,
            (other, _) if other.starts_with('U') => CODE_ENGINE,
            (other, _) => other,
        };
        let message = match (code, stage) {
            (CODE_TIMEOUT, Stage::Evaluate(limits, _)) => format!(
                "the time limit of {} ms was exceeded",
                limits.time.as_millis()
            ),
            (CODE_DEPTH, Stage::Evaluate(limits, _)) => {
                format!("the depth limit of {} was exceeded", limits.max_depth)
            }
            (CODE_DEPTH, Stage::Compile) => {
                "the expression is nested too deeply to be compiled".to_owned()
            }
            (CODE_OUTPUT_SIZE, Stage::Evaluate(limits, _)) => format!(
                "the output size limit of {} bytes was exceeded",
                limits.max_output_bytes
            ),
            _ => err.message(),
        };
        let position = if code.starts_with('U') {
            None
        } else {
            error_start(err, source).map(|byte| {
                let byte = match (code, stage) {
                    // "Expected ... before the end": point just after the last character
                    // written, not at the blank lines that may follow it.
                    ("S0203" | "S0207", Stage::Compile) => byte.min(source.trim_end().len()),
                    _ => byte,
                };
                char_offset_of_byte(source, byte)
            })
        };
        let culprit = match stage {
            Stage::Evaluate(_, ast) if !code.starts_with('U') => {
                culprit::find(err, ast, source).map(Box::new)
            }
            _ => None,
        };
        EngineError {
            code: code.to_owned(),
            message,
            position,
            token: err.token(),
            value: err.value().cloned().map(Box::new),
            culprit,
        }
    }
}

/// Finds the part of the script an evaluation error is about, in the syntax tree.
mod culprit {
    use jlens_core::{Ast, Node, NodeKind, Span};

    use super::Culprit;

    pub(super) fn find(err: &jlens_core::Error, ast: &Ast, source: &str) -> Option<Culprit> {
        let span = err.span()?;
        let code = err.code();
        let wanted = |node: &Node| match code {
            "T2001" | "T2002" => matches!(node.kind, NodeKind::Binary { .. }),
            "T0410" | "T0411" | "T0412" => {
                matches!(
                    node.kind,
                    NodeKind::Function { .. } | NodeKind::Partial { .. }
                )
            }
            "D1002" => matches!(node.kind, NodeKind::Negate { .. }),
            _ => true,
        };
        // Depth first with an explicit stack, so that a deeply nested script cannot overflow
        // the caller's: an enclosing node comes before the nodes within it. Each node carries
        // whether it is the function on the right of `~>`, which takes the piped value as its
        // first argument.
        let mut stack: Vec<(&Node, bool)> = vec![(&ast.root, false)];
        let (node, piped) = loop {
            let (node, piped) = stack.pop()?;
            if node.span == span && wanted(node) {
                break (node, piped);
            }
            if let NodeKind::Apply { lhs, rhs } = &node.kind {
                stack.push((rhs, true));
                stack.push((lhs, false));
            } else {
                let mut children = Vec::new();
                node.for_each_child(|child| children.push((child, false)));
                stack.extend(children.into_iter().rev());
            }
        };
        let text = |span: Span| source.get(span.start..span.end).map(str::to_owned);
        let mut culprit = Culprit {
            expression: text(node.span)?,
            ..Culprit::default()
        };
        match (&node.kind, code) {
            (NodeKind::Binary { lhs, .. }, "T2001") => culprit.operand = text(lhs.span),
            (NodeKind::Binary { rhs, .. }, "T2002") => culprit.operand = text(rhs.span),
            (NodeKind::Negate { expr }, "D1002") => culprit.operand = text(expr.span),
            (
                NodeKind::Function { args, .. } | NodeKind::Partial { args, .. },
                "T0410" | "T0411" | "T0412",
            ) => {
                let index = err
                    .detail("index")
                    .and_then(serde_json::Value::as_u64)
                    .and_then(|index| usize::try_from(index).ok());
                culprit.argument = index;
                if code != "T0411"
                    && let Some(index) = index
                    && let Some(written) = index.checked_sub(1 + usize::from(piped))
                {
                    culprit.operand = args.get(written).and_then(|arg| text(arg.span));
                }
                if let (Some(index), Some(name)) = (index, err.token()) {
                    culprit.expected = super::expected_argument(&name, index);
                }
            }
            _ => {}
        }
        Some(culprit)
    }
}

/// Reads a function signature (`<s-nn?:s>`) to say in words what a parameter accepts.
mod signature {
    /// What parameter `index` (from 1) of `signature` accepts, in words.
    pub(super) fn describe_parameter(signature: &str, index: usize) -> Option<String> {
        let params = signature.strip_prefix('<')?;
        let mut chars = params.chars().peekable();
        let mut position = 0;
        while let Some(c) = chars.next() {
            let words = match c {
                '(' => {
                    let mut choices = Vec::new();
                    for c in chars.by_ref() {
                        if c == ')' {
                            break;
                        }
                        choices.push(one(c, None));
                    }
                    choices.join(" or ")
                }
                c if c.is_ascii_alphabetic() => {
                    let mut sub = None;
                    if chars.peek() == Some(&'<') {
                        chars.next();
                        let mut depth = 1;
                        let mut inside = String::new();
                        for c in chars.by_ref() {
                            match c {
                                '<' => depth += 1,
                                '>' => {
                                    depth -= 1;
                                    if depth == 0 {
                                        break;
                                    }
                                }
                                _ => {}
                            }
                            inside.push(c);
                        }
                        sub = inside.chars().next();
                    }
                    one(c, sub)
                }
                // The result type follows `:`.
                ':' | '>' => return None,
                _ => continue,
            };
            while matches!(chars.peek(), Some('?' | '+' | '-')) {
                chars.next();
            }
            position += 1;
            if position == index {
                return Some(words);
            }
        }
        None
    }

    fn one(c: char, sub: Option<char>) -> String {
        match (c, sub) {
            ('a', Some(item)) => format!("an array of {}", plural(item)),
            ('b', _) => "a boolean".into(),
            ('n', _) => "a number".into(),
            ('s', _) => "a string".into(),
            ('l', _) => "null".into(),
            ('a', None) => "an array".into(),
            ('o', _) => "an object".into(),
            ('f', _) => "a function".into(),
            ('u', _) => "a boolean, number, string or null".into(),
            _ => "any value".into(),
        }
    }

    fn plural(c: char) -> &'static str {
        match c {
            'b' => "booleans",
            'n' => "numbers",
            's' => "strings",
            'o' => "objects",
            'a' => "arrays",
            'f' => "functions",
            _ => "values",
        }
    }
}

/// Watches an evaluation for the places that give nothing.
mod causes {
    use std::collections::{HashMap, HashSet};

    use jlens_core::audit::{Branch, Outcome, ValueRef};
    use jlens_core::{Node, NodeKind, Span};

    use super::{MAX_UNDEFINED_CAUSES, UndefinedCause, UndefinedKind, char_offset_of_byte};

    /// Bounds the memory a long evaluation can make the tracer use.
    const MAX_RECORDED: usize = 1000;

    struct Frame {
        id: u32,
        /// For a path: its steps, and the end of the last step evaluated so far, which is the
        /// step that matched nothing when the path gives nothing (a path stops there).
        steps: Option<HashSet<u32>>,
        last_step_end: Option<usize>,
        /// For a block: the expressions before the last, whose values are thrown away.
        discarded: Option<HashSet<u32>>,
        /// Within an expression whose value is thrown away (a guard such as
        /// `version != 3 ? $error("...")`), where giving nothing is not why a result is
        /// undefined. A binding's value is kept in its variable, so a binding is never quiet.
        quiet: bool,
    }

    #[derive(Default)]
    pub(super) struct Tracer {
        frames: Vec<Frame>,
        /// Conditions that took no branch, and the span of their test.
        no_branch: HashMap<u32, Span>,
        /// Node id → (kind, byte span), the first time the node gave nothing.
        found: HashMap<u32, (UndefinedKind, Span)>,
    }

    impl jlens_core::audit::Tracer for Tracer {
        fn enter(&mut self, node: &Node, _input: ValueRef<'_>) {
            let steps = match &node.kind {
                NodeKind::Path { steps, .. } => Some(steps.iter().map(|step| step.id).collect()),
                _ => None,
            };
            let discarded = match &node.kind {
                NodeKind::Block { exprs, .. } => Some(
                    exprs
                        .iter()
                        .take(exprs.len().saturating_sub(1))
                        .map(|expr| expr.id)
                        .collect(),
                ),
                _ => None,
            };
            let quiet = self.frames.last().is_some_and(|parent| {
                parent.quiet
                    || (parent
                        .discarded
                        .as_ref()
                        .is_some_and(|discarded| discarded.contains(&node.id))
                        && !matches!(node.kind, NodeKind::Bind { .. }))
            });
            self.frames.push(Frame {
                id: node.id,
                steps,
                last_step_end: None,
                discarded,
                quiet,
            });
        }

        fn branch(&mut self, node: &Node, taken: Branch) {
            if taken == Branch::None
                && let NodeKind::Condition { condition, .. } = &node.kind
                && self.no_branch.len() < MAX_RECORDED
            {
                self.no_branch.insert(node.id, condition.span);
            }
        }

        fn exit(&mut self, node: &Node, outcome: Outcome<'_>) {
            // Enter and exit pair up; an unpaired exit is ignored.
            let Some(position) = self.frames.iter().rposition(|frame| frame.id == node.id) else {
                return;
            };
            let frame = self.frames.swap_remove(position);
            self.frames.truncate(position);
            if let Some(parent) = self.frames.last_mut()
                && parent
                    .steps
                    .as_ref()
                    .is_some_and(|steps| steps.contains(&node.id))
            {
                parent.last_step_end = Some(node.span.end);
            }
            let undefined = matches!(outcome, Outcome::Value(value) if value.is_undefined());
            if !undefined
                || frame.quiet
                || self.found.contains_key(&node.id)
                || self.found.len() >= MAX_RECORDED
            {
                return;
            }
            let cause = match &node.kind {
                NodeKind::Path { .. } => {
                    let end = frame.last_step_end.unwrap_or(node.span.end);
                    Some((UndefinedKind::Unmatched, Span::new(node.span.start, end)))
                }
                NodeKind::Condition { .. } => self
                    .no_branch
                    .get(&node.id)
                    .map(|test| (UndefinedKind::FalseCondition, *test)),
                _ => None,
            };
            if let Some(cause) = cause {
                self.found.insert(node.id, cause);
            }
        }
    }

    impl Tracer {
        /// The places found, in source order.
        pub(super) fn causes(self, source: &str) -> Vec<UndefinedCause> {
            let mut kept: Vec<(UndefinedKind, Span)> = self.found.into_values().collect();
            kept.sort_by_key(|(kind, span)| (span.start, span.end, *kind as u8));
            kept.dedup();
            kept.into_iter()
                .filter_map(|(kind, span)| {
                    Some(UndefinedCause {
                        kind,
                        position: char_offset_of_byte(source, span.start),
                        text: source.get(span.start..span.end)?.to_owned(),
                    })
                })
                .take(MAX_UNDEFINED_CAUSES)
                .collect()
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

    #[derive(Default)]
    struct Deadlines {
        armed: BTreeMap<(Instant, u64), CancelToken>,
        /// When the thread wakes next by itself; `None` while it sleeps until woken. An arm
        /// whose deadline is no earlier needs no wake-up: the thread looks again then.
        wakes_at: Option<Instant>,
    }

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
                while let Some(entry) = deadlines.armed.first_entry() {
                    if entry.key().0 > now {
                        break;
                    }
                    entry.remove().cancel();
                }
                let next = deadlines.armed.first_key_value().map(|(key, _)| key.0);
                deadlines.wakes_at = next;
                deadlines = match next {
                    Some(deadline) => {
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
                    deadlines: Mutex::new(Deadlines::default()),
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
            // The thread is not told: if it wakes for this deadline, it finds it gone.
            self.watchdog.lock().armed.remove(&self.key);
        }
    }

    /// Cancels `token` once `time` has passed, unless the returned guard is dropped first.
    pub(super) fn arm(time: Duration, token: &CancelToken) -> Option<Armed> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let watchdog = get()?;
        let deadline = Instant::now().checked_add(time)?;
        let key = (deadline, NEXT_ID.fetch_add(1, Ordering::Relaxed));
        let mut deadlines = watchdog.lock();
        deadlines.armed.insert(key, token.clone());
        // Back to back evaluations with the same limit arm ever later deadlines: only the
        // first one wakes the thread.
        let wake = deadlines.wakes_at.is_none_or(|at| deadline < at);
        if wake {
            deadlines.wakes_at = Some(deadline);
        }
        drop(deadlines);
        if wake {
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
pub(crate) fn locate(source: &str, position: usize) -> (usize, &str, usize) {
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
        assert_eq!(
            err.render("adapter.jsonata", source),
            "adapter.jsonata:3:5: error T2002: the right side of the \"+\" operator must be a \
             number\n 3 | \t$a + 'x'\n   | \t   ^\n`'x'` is \"x\" (a string).\nTo join text, use & \
             instead of +; to add, convert the text first with $number(...)."
        );
    }

    #[test]
    fn render_without_position_has_no_excerpt() {
        let err = EngineError::internal("too slow".into());
        assert_eq!(
            err.render("f.jsonata", "x"),
            "f.jsonata: error U1004: too slow\nThis is a fault in the agent, not in the script: \
             report it with the script and the event; the event is kept and can be replayed."
        );
    }

    #[test]
    fn render_survives_positions_past_the_end() {
        let err = EngineError {
            code: "S0299".into(),
            message: "End".into(),
            position: Some(99),
            token: None,
            value: None,
            culprit: None,
        };
        assert_eq!(
            err.render("f", "ab\r\ncd"),
            "f:2:3: error S0299: end\n 2 | cd\n   |   ^"
        );
    }

    #[test]
    fn an_unclosed_bracket_points_after_the_last_character() {
        let err = Expression::compile("[1,\n 2\n\n").unwrap_err();
        assert_eq!((err.code.as_str(), err.position), ("S0203", Some(6)));
    }

    #[test]
    fn an_evaluation_error_names_the_failing_part() {
        let input = json!({"n": "3", "items": [1, 2]});
        let culprit = |source: &str| {
            let err = eval(source, input.clone()).unwrap_err();
            (err.code.clone(), *err.culprit.unwrap())
        };
        let (code, found) = culprit("1 + (n + 1)");
        assert_eq!(code, "T2001");
        assert_eq!(found.expression, "n + 1");
        assert_eq!(found.operand.as_deref(), Some("n"));
        let (code, found) = culprit("2 * n");
        assert_eq!(code, "T2002");
        assert_eq!(found.operand.as_deref(), Some("n"));
        let (code, found) = culprit("$substring(items, 1)");
        assert_eq!(code, "T0410");
        assert_eq!(found.operand.as_deref(), Some("items"));
        assert_eq!(found.argument, Some(1));
        assert_eq!(found.expected.as_deref(), Some("a string"));
        // Piped with `~>`, the value on the left is the first argument.
        let (_, found) = culprit("n ~> $substring('x')");
        assert_eq!(found.operand.as_deref(), Some("'x'"));
        assert_eq!(found.argument, Some(2));
        assert_eq!(found.expected.as_deref(), Some("a number"));
        let (code, found) = culprit("$join(items)");
        assert_eq!(code, "T0412");
        assert_eq!(found.expected.as_deref(), Some("an array of strings"));
        let (code, found) = culprit("-n");
        assert_eq!(code, "D1002");
        assert_eq!(found.operand.as_deref(), Some("n"));
        let (code, found) = culprit("n.$nosuch()");
        assert_eq!(code, "T1006");
        assert_eq!(
            (found.expression.as_str(), found.operand),
            ("$nosuch()", None)
        );
        // The limits have no place in the script.
        let err = Expression::compile("( $f := function($x){ $f($x) }; $f(1) )")
            .unwrap()
            .evaluate(
                &Value::Null,
                &Map::new(),
                &Limits {
                    time: Duration::from_millis(20),
                    ..Limits::default()
                },
            )
            .unwrap_err();
        assert_eq!((err.position, err.culprit), (None, None));
    }

    #[test]
    fn signatures_read_as_words() {
        let describe = signature::describe_parameter;
        assert_eq!(describe("<s-nn?:s>", 1).as_deref(), Some("a string"));
        assert_eq!(describe("<s-nn?:s>", 3).as_deref(), Some("a number"));
        assert_eq!(describe("<s-nn?:s>", 4), None);
        assert_eq!(
            describe("<a<n>:n>", 1).as_deref(),
            Some("an array of numbers")
        );
        assert_eq!(
            describe("<s-(sf)(sf)n?:s>", 3).as_deref(),
            Some("a string or a function")
        );
        assert_eq!(
            describe("<s-f<s:o>n?:a<o>>", 3).as_deref(),
            Some("a number")
        );
        assert_eq!(describe("<x-b?:s>", 2).as_deref(), Some("a boolean"));
        assert_eq!(describe("", 1), None);
        assert_eq!(
            expected_argument("uppercase", 1).as_deref(),
            Some("a string")
        );
        assert_eq!(expected_argument("no-such-function", 1), None);
    }

    fn causes(source: &str, input: Value) -> Vec<(UndefinedKind, usize, String)> {
        Expression::compile(source)
            .unwrap()
            .undefined_causes(Some(&input), &Map::new(), &Limits::default())
            .into_iter()
            .map(|cause| (cause.kind, cause.position, cause.text))
            .collect()
    }

    #[test]
    fn undefined_causes_name_the_paths_that_matched_nothing() {
        use UndefinedKind::{FalseCondition, Unmatched};
        let input = json!({"payload": {"court_id": "IL-1", "items": [{"a": 1}]}});
        // The path up to the step that matched nothing, not beyond.
        assert_eq!(
            causes("payload.cort_id.name", input.clone()),
            vec![(Unmatched, 0, "payload.cort_id".to_owned())]
        );
        assert_eq!(
            causes(
                "(\n  $p := payload;\n  $p.kind = 'x' ? $p.items\n)",
                input.clone()
            ),
            vec![
                (Unmatched, 21, "$p.kind".to_owned()),
                (FalseCondition, 21, "$p.kind = 'x'".to_owned())
            ]
        );
        // A guard whose value is thrown away gives nothing on purpose; a binding does not.
        assert_eq!(
            causes(
                "(payload.v != 3 ? $error('v3 only'); $n := payload.nothing; $n)",
                input.clone()
            ),
            vec![(Unmatched, 43, "payload.nothing".to_owned())]
        );
        // Nothing gave nothing: a result that is defined, or undefined from a variable.
        assert_eq!(causes("payload.court_id", input.clone()), vec![]);
        assert_eq!(causes("$nothing", input.clone()), vec![]);
        // At most five, in source order.
        let many = causes("[a, b, c, d, e, f, g]", input);
        assert_eq!(many.len(), MAX_UNDEFINED_CAUSES);
        assert_eq!(many[0], (Unmatched, 1, "a".to_owned()));
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

//! What a person sees when an adapter script is wrong: the people who edit adapters are often
//! not programmers, so every error says where it is, what the failing part got, and what to do.
//!
//! A compile or evaluation error ([`render`]):
//!
//! ```text
//! adapters/court-calendar.jsonata:12:14: error T2001: the left side of the "+" operator must be a number
//!  12 |   "total": payload.count + 1,
//!     |                          ^
//! `payload.count` is "3" (a string).
//! To join text, use & instead of +; to add, convert the text first with $number(...).
//! ```
//!
//! - the first line: file, line and column (from 1, columns in characters), the JSONata error
//!   code and what is wrong, in lower case;
//! - the line of the script with a caret under the column (none for the limits, which have no
//!   place in the script);
//! - for an evaluation error, the failing part of the script and the value it got, as compact
//!   JSON cut at [`MAX_VALUE_CHARS`] characters;
//! - one plain sentence saying what to do, for the codes of [`advice`].
//!
//! The agent's own message for an event that failed ([`describe_failure`]) starts with
//! `adapter FILE failed on event ID at line L, column C: error CODE: ...` and goes on the same
//! way. A result that is undefined is not an error, but when a person expected a value
//! [`describe_undefined`] says which paths of the script matched nothing and which conditions
//! were false with no else branch.

use serde_json::Value;

use super::engine::{EngineError, UndefinedCause, UndefinedKind, function_names, locate};

/// Values are shown as compact JSON cut at this many characters.
pub const MAX_VALUE_CHARS: usize = 100;
/// Parts of the script are quoted on one line, cut at this many characters.
const MAX_EXPRESSION_CHARS: usize = 80;
/// A longer line of the script is shown as a window of this many characters around the column.
const MAX_LINE_CHARS: usize = 120;

/// Renders `err`, raised by the script `source` read from `file_name`, for a person.
pub fn render(err: &EngineError, file_name: &str, source: &str) -> String {
    let first = match err.position {
        Some(position) => {
            let (line, _, column) = locate(source, position);
            format!(
                "{file_name}:{line}:{}: error {}: {}",
                column + 1,
                err.code,
                headline(err)
            )
        }
        None => format!("{file_name}: error {}: {}", err.code, headline(err)),
    };
    finish(first, err, source)
}

/// The message of an event that `err` stopped in the adapter `file_name` (whose source is
/// `source`): it names the adapter, the event, the place, the failing part of the script and
/// the value it got, and says what to do.
pub fn describe_failure(
    err: &EngineError,
    file_name: &str,
    source: &str,
    event_id: &str,
) -> String {
    let first = match err.position {
        Some(position) => {
            let (line, _, column) = locate(source, position);
            format!(
                "adapter {file_name} failed on event {event_id} at line {line}, column {}: error \
                 {}: {}",
                column + 1,
                err.code,
                headline(err)
            )
        }
        None => format!(
            "adapter {file_name} failed on event {event_id}: error {}: {}",
            err.code,
            headline(err)
        ),
    };
    finish(first, err, source)
}

fn finish(mut out: String, err: &EngineError, source: &str) -> String {
    if let Some(position) = err.position {
        out.push('\n');
        out.push_str(&excerpt(source, position));
    }
    for line in got(err).into_iter().chain(advice(err, source)) {
        out.push('\n');
        out.push_str(&line);
    }
    out
}

/// What is wrong, in lower case and plain words.
pub fn headline(err: &EngineError) -> String {
    let token = err.token.as_deref().unwrap_or_default();
    let expected = err
        .value
        .as_deref()
        .and_then(Value::as_str)
        .map(|text| format!("{text:?}"))
        .unwrap_or_else(|| "something".to_owned());
    let culprit = err.culprit.as_deref();
    let argument = culprit.and_then(|c| c.argument);
    let wanted = culprit.and_then(|c| c.expected.as_deref());
    match err.code.as_str() {
        "S0101" => "a string is not closed".into(),
        "S0102" => format!("the number {token} is out of range"),
        "S0103" => format!("unsupported escape sequence \\{token}"),
        "S0104" => "\\u must be followed by four hexadecimal digits".into(),
        "S0105" => "a quoted field name is not closed".into(),
        "S0106" => "a comment is not closed".into(),
        "S0201" => format!("syntax error at {token:?}"),
        "S0202" => format!("expected {expected} but found {token:?}"),
        "S0203" => format!("expected {expected} before the end of the expression"),
        "S0204" => format!("unknown operator {token:?}"),
        "S0205" => format!("unexpected {token:?}"),
        "S0207" => "the expression ends too early".into(),
        "S0211" => format!("{token:?} cannot start an expression here"),
        "T0410" | "T0412" => match (argument, wanted) {
            (Some(n), Some(wanted)) => format!("argument {n} of ${token} must be {wanted}"),
            _ => lower_first(&err.message),
        },
        "T0411" => match (argument, wanted) {
            (Some(n), Some(wanted)) => format!(
                "${token} has no argument {n}, and the context value it takes instead is not \
                 {wanted}"
            ),
            _ => lower_first(&err.message),
        },
        "T1005" | "T1006" if !token.is_empty() => format!("${token} is not a function"),
        "T2001" => format!("the left side of the {token:?} operator must be a number"),
        "T2002" => format!("the right side of the {token:?} operator must be a number"),
        "D1001" if !token.is_empty() => {
            format!("the result of the {token:?} operator is infinite or too large")
        }
        "D1002" => "only a number can be negated".into(),
        "D3030" => match err.value.as_deref() {
            Some(value) => format!("{} cannot be converted to a number", show_value(value)),
            None => lower_first(&err.message),
        },
        "D3110" => match err.value.as_deref() {
            Some(value) => format!(
                "$toMillis needs an ISO 8601 timestamp, not {}",
                show_value(value)
            ),
            None => lower_first(&err.message),
        },
        // The script's own words, from `$error(...)`.
        "D3137" => err.message.clone(),
        _ => lower_first(&err.message),
    }
}

/// What the failing part of the script got: `` `payload.count` is "3" (a string). ``
fn got(err: &EngineError) -> Option<String> {
    let culprit = err.culprit.as_deref()?;
    if err.code == "D3137" {
        return None;
    }
    let expression = one_line(&culprit.expression);
    Some(match (err.value.as_deref(), culprit.operand.as_deref()) {
        (Some(value), Some(operand)) => format!("`{}` is {}.", one_line(operand), described(value)),
        (Some(value), None) if err.code == "T0411" => {
            format!("The context value is {}.", described(value))
        }
        // An operation that overflowed has no value worth showing (jlens gives `null`).
        (Some(value), None) if err.code != "D1001" => {
            format!("In `{expression}`, the value is {}.", described(value))
        }
        _ => format!("The failing part is `{expression}`."),
    })
}

/// One plain sentence saying what to do about `err`, for the codes people meet most; `None`
/// for the others.
pub fn advice(err: &EngineError, source: &str) -> Option<String> {
    let token = err.token.as_deref().unwrap_or_default();
    let value = err.value.as_deref();
    let culprit = err.culprit.as_deref();
    let before = err
        .position
        .map(|p| text_before(source, p))
        .unwrap_or_default();
    let sentence = match err.code.as_str() {
        "S0101" => "Close the string with the quote it starts with (\" or ').".into(),
        "S0102" => "Write a smaller number, or put it in quotes as text.".into(),
        "S0103" => "Use a supported escape (\\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX), or write \
                    the character itself."
            .into(),
        "S0104" => "Write four hexadecimal digits after \\u, as in \\u00e9.".into(),
        "S0105" => "Close the field name with a backquote (`).".into(),
        "S0106" => "Close the comment with */.".into(),
        "S0201"
            if token == "|"
                && (before.ends_with('|')
                    || err
                        .position
                        .and_then(|p| source.chars().nth(p + 1))
                        .is_some_and(|c| c == '|')) =>
        {
            "JSONata writes `or`, not ||.".into()
        }
        "S0201" => "Check the text just before the caret: an operator, a comma or a quote may be \
                    missing, or there may be one too many."
            .into(),
        "S0202" | "S0203" if err.value.as_deref().and_then(Value::as_str).is_none() => {
            "Check that every bracket is closed: ( with ), [ with ] and { with }.".into()
        }
        "S0202" | "S0203" => {
            let close = err.value.as_deref().and_then(Value::as_str).unwrap_or("");
            match (
                err.position.and_then(|p| unclosed(source, p, close)),
                err.code.as_str(),
            ) {
                (Some((open, line, column)), "S0203") => format!(
                    "The \"{open}\" at line {line}, column {column} is never closed: add \
                     {close:?} where it should end."
                ),
                (Some((open, line, column)), _) if matches!(token, ")" | "]" | "}") => format!(
                    "The \"{open}\" at line {line}, column {column} must be closed with \
                     {close:?} before this {token:?}."
                ),
                (_, "S0203") => format!("Add the missing {close:?} at the end of the expression."),
                _ => format!(
                    "Put {close:?} where the caret points, or check that the brackets before it \
                     pair up: ( with ), [ with ] and {{ with }}."
                ),
            }
        }
        "S0204" => "Check the operator: JSONata has + - * / % & = != < <= > >= and or in ~> ? : \
                    ?: ??."
            .into(),
        "S0205" => format!("Remove {token:?}, or add what should come before it."),
        "S0207" => "Finish the expression: something is missing after the last operator, comma \
                    or colon."
            .into(),
        "S0208" | "S0212" | "S0214" => "Variable names start with $, as in $total := 1.".into(),
        "S0211" => match (token, before.chars().last()) {
            ("&", Some('&')) => "JSONata writes `and`, not &&.".into(),
            (">", Some('<')) => "JSONata writes != for \"not equal\", not <>.".into(),
            ("=", Some('=' | '!' | '<' | '>')) => {
                "JSONata compares with a single = (and !=, <=, >=), not ==.".into()
            }
            ("+", Some('+')) => "JSONata has no ++: write $x + 1.".into(),
            (")" | "]" | "}", Some(',')) => format!(
                "Remove the comma before {token:?}: JSONata does not allow a trailing comma."
            ),
            _ => format!("Remove {token:?}, or write what it applies to before it."),
        },
        "S0301" => {
            "A regular expression cannot be empty: write a pattern between the slashes.".into()
        }
        "S0302" => "Close the regular expression with /.".into(),
        "T0410" | "T0412" => argument_advice(token, value, culprit),
        "T0411" => format!(
            "Pass the value to ${token} explicitly, as in ${token}(payload.field), instead of \
             relying on the context value."
        ),
        "T1005" | "T1006" | "T1007" | "T1008" if !token.is_empty() => {
            match nearest_function(token) {
                Some(name) => format!(
                    "There is no function ${token}: did you mean ${name}? Function names are \
                     case-sensitive."
                ),
                None => format!(
                    "There is no function ${token}: check its spelling, or define it first with \
                     ${token} := function($x) {{ ... }}."
                ),
            }
        }
        "T1006" | "T1008" => "Only a function can be called with (...).".into(),
        "T1003" => "Object keys must be strings: convert the key with $string(...).".into(),
        "D1009" => "Two members of the object get the same key: make the keys unique.".into(),
        "T2001" | "T2002" => match value {
            Some(Value::String(_)) if token == "+" => "To join text, use & instead of +; to add, \
                                                       convert the text first with $number(...)."
                .into(),
            Some(Value::String(_)) => "Convert the text first with $number(...), or check that \
                                       the field holds a number for this event."
                .into(),
            Some(Value::Array(_)) => "It is an array here: add its items up with $sum(...), or \
                                      pick one item with [0]."
                .into(),
            Some(Value::Object(_)) => {
                "It is an object here: pick the field that holds the number.".into()
            }
            _ => "Check that the field holds a number for this event.".into(),
        },
        "T2003" | "T2004" => "Both ends of a range [a..b] must be whole numbers.".into(),
        "T2009" => "Compare values of one type: convert one side with $number(...) or \
                    $string(...)."
            .into(),
        "T2010" => format!("Only numbers or strings can be compared with {token:?}."),
        "D1001" => "Check for a division by zero, or inputs too large to compute with.".into(),
        "D1002" => "Convert the value first with $number(...).".into(),
        "D3030" => {
            "Give $number() only text that holds a number, such as \"42\" or \"-3.5\".".into()
        }
        "D3110" => "Give $toMillis a timestamp such as \"2026-12-01T16:00:00Z\", or a picture as \
                    its second argument to read other formats, as in $toMillis(date, \
                    \"[D01]/[M01]/[Y0001]\")."
            .into(),
        "D3132" | "D3133" | "D3134" | "D3135" | "D3136" => "Check the picture string: each \
                                                             component goes in square brackets, \
                                                             as in \"[Y0001]-[M01]-[D01] \
                                                             [H01]:[m01]\"."
            .into(),
        "D3137" => "The script refused this event itself with $error(...): the event does not \
                    meet a condition the script checks."
            .into(),
        "D3138" => "$single() wants exactly one match: make its condition more specific.".into(),
        "D3139" => "$single() found no match: check its condition against the input.".into(),
        "U1001" => "Look for a loop that never ends (a function that calls itself with no way to \
                    stop) or work over very large arrays; if the work is genuine, raise the \
                    route's time_limit_ms."
            .into(),
        "U1002" if err.position.is_none() && err.message.contains("compiled") => {
            "Split the expression into smaller parts bound to variables with :=.".into()
        }
        "U1002" => "Make recursive functions stop sooner, or have them call themselves last \
                    (tail recursion); if the depth is genuine, raise the route's max_depth."
            .into(),
        "U1003" => "Return less: filter or trim the output, or raise the route's \
                    max_output_bytes."
            .into(),
        "U1004" => "This is a fault in the agent, not in the script: report it with the script \
                    and the event; the event is kept and can be replayed."
            .into(),
        _ => return None,
    };
    Some(sentence)
}

/// What to do about a function argument of the wrong type.
fn argument_advice(
    function: &str,
    value: Option<&Value>,
    culprit: Option<&super::engine::Culprit>,
) -> String {
    let Some((culprit, index)) = culprit.and_then(|c| Some((c, c.argument?))) else {
        return format!("Check the arguments of ${function}.");
    };
    let Some(wanted) = culprit.expected.as_deref() else {
        return if function_names().contains(&function) {
            format!(
                "${function} takes fewer arguments: remove argument {index} and those after it."
            )
        } else {
            format!("Check argument {index} of ${function}.")
        };
    };
    let operand = culprit.operand.as_deref().map(one_line);
    let wants_text = wanted.starts_with("a string");
    let wants_number = wanted.starts_with("a number");
    match (value, operand) {
        (None, _) => format!("Give ${function} {wanted} as argument {index}."),
        (Some(Value::Array(_)), Some(operand)) if wants_text => format!(
            "It is an array here: pick one item, as in {operand}[0], or join the items with \
             $join({operand}, \", \")."
        ),
        (Some(Value::Array(_)), Some(operand)) if wants_number => format!(
            "It is an array here: pick one item, as in {operand}[0], or add them up with \
             $sum({operand})."
        ),
        (Some(Value::Number(_)), Some(operand)) if wants_text => {
            format!("Convert it first, as in $string({operand}).")
        }
        (Some(Value::String(_)), Some(operand)) if wants_number => {
            format!("Convert it first, as in $number({operand}).")
        }
        (Some(Value::Object(_)), Some(operand)) => {
            format!("It is an object here: pick the field you mean, as in {operand}.name.")
        }
        _ => format!(
            "Give ${function} {wanted} as argument {index}: check what the script passes for \
             this event."
        ),
    }
}

/// Why a result is undefined, from the places of the script that gave nothing:
/// ``the result is undefined: nothing matched `payload.cort_id` at line 3``.
pub fn describe_undefined(causes: &[UndefinedCause], source: &str) -> String {
    match undefined_reason(causes, source) {
        Some(reason) => format!("the result is undefined: {reason}"),
        None => {
            "the result is undefined, though every path the script read matched something".into()
        }
    }
}

/// The places of the script that gave nothing, in words: ``nothing matched `payload.cort_id`
/// at line 3; the condition `kind = "x"` at line 5 was false and has no else branch``; `None`
/// when there are none.
pub fn undefined_reason(causes: &[UndefinedCause], source: &str) -> Option<String> {
    let of = |kind: UndefinedKind| -> Vec<String> {
        causes
            .iter()
            .filter(|cause| cause.kind == kind)
            .map(|cause| {
                let (line, _, _) = locate(source, cause.position);
                format!("`{}` at line {line}", one_line(&cause.text))
            })
            .collect()
    };
    let unmatched = of(UndefinedKind::Unmatched);
    let conditions = of(UndefinedKind::FalseCondition);
    let mut parts = Vec::new();
    if !unmatched.is_empty() {
        parts.push(format!("nothing matched {}", unmatched.join(", ")));
    }
    match conditions.as_slice() {
        [] => {}
        [one] => parts.push(format!(
            "the condition {one} was false and has no else branch"
        )),
        several => parts.push(format!(
            "the conditions {} were false and have no else branch",
            several.join(", ")
        )),
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// A value as compact JSON, cut at [`MAX_VALUE_CHARS`] characters.
pub fn show_value(value: &Value) -> String {
    cut(&value.to_string(), MAX_VALUE_CHARS)
}

/// A value with what kind of value it is: `"3" (a string)`.
fn described(value: &Value) -> String {
    let kind = match value {
        Value::Null => return "null".into(),
        Value::Bool(_) => "a boolean".to_owned(),
        Value::Number(_) => "a number".to_owned(),
        Value::String(_) => "a string".to_owned(),
        Value::Array(items) if items.is_empty() => "an empty array".to_owned(),
        Value::Array(items) if items.len() == 1 => "an array of 1 item".to_owned(),
        Value::Array(items) => format!("an array of {} items", items.len()),
        Value::Object(_) => "an object".to_owned(),
    };
    format!("{} ({kind})", show_value(value))
}

/// Text cut at `max` characters, with `…` where it was cut.
fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((byte, _)) => format!("{}…", &text[..byte]),
        None => text.to_owned(),
    }
}

/// A part of the script on one line: runs of white space become one space.
fn one_line(text: &str) -> String {
    let joined = text.split_whitespace().collect::<Vec<_>>().join(" ");
    cut(&joined, MAX_EXPRESSION_CHARS)
}

/// The first letter in lower case, unless the first word is an abbreviation ("ISO").
fn lower_first(text: &str) -> String {
    let mut chars = text.chars();
    match (chars.next(), chars.next()) {
        (Some(first), second) if !second.is_some_and(char::is_uppercase) => {
            first.to_lowercase().chain(text.chars().skip(1)).collect()
        }
        _ => text.to_owned(),
    }
}

/// The line of `source` holding character `position`, with a caret under it:
///
/// ```text
///  3 |   "total": payload.count + 1,
///    |                          ^
/// ```
fn excerpt(source: &str, position: usize) -> String {
    let (line_no, line, column) = locate(source, position);
    let chars: Vec<char> = line.chars().collect();
    let (start, end) = if chars.len() <= MAX_LINE_CHARS {
        (0, chars.len())
    } else {
        let start = column
            .saturating_sub(MAX_LINE_CHARS / 2)
            .min(chars.len() - MAX_LINE_CHARS);
        (start, start + MAX_LINE_CHARS)
    };
    let mut shown: String = chars[start..end].iter().collect();
    let mut pad = String::new();
    if start > 0 {
        shown.insert(0, '…');
        pad.push(' ');
    }
    if end < chars.len() {
        shown.push('…');
    }
    // Keep tabs so that the caret lines up with the text above it.
    pad.extend(
        chars[start..column.min(chars.len()).max(start)]
            .iter()
            .map(|&c| if c == '\t' { '\t' } else { ' ' }),
    );
    let gutter = " ".repeat(line_no.to_string().len());
    format!(" {line_no} | {shown}\n {gutter} | {pad}^")
}

/// The non-blank text of `source` before character `position`.
fn text_before(source: &str, position: usize) -> String {
    let before: String = source.chars().take(position).collect();
    before.trim_end().to_owned()
}

/// The innermost bracket still open at character `position` of `source`, when `close` closes
/// it: the bracket, and its line and column (from 1). Strings, quoted names, comments and
/// regular expressions are skipped.
fn unclosed(source: &str, position: usize, close: &str) -> Option<(char, usize, usize)> {
    let chars: Vec<char> = source.chars().take(position).collect();
    let mut open: Vec<(char, usize)> = Vec::new();
    // The last character that is not blank: after an operand, `/` divides; otherwise it starts
    // a regular expression.
    let mut previous: Option<char> = None;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' && c != '`' {
                        i += 1;
                    }
                    i += 1;
                }
                previous = Some('a');
            }
            '/' if chars.get(i + 1) == Some(&'*') => {
                i += 2;
                while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                    i += 1;
                }
                i += 1;
            }
            '/' if previous.is_none_or(|p| "([{,:;?=<>!&+-*/%~|".contains(p)) => {
                i += 1;
                while i < chars.len() && chars[i] != '/' {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
                previous = Some('a');
            }
            '(' | '[' | '{' => {
                open.push((c, i));
                previous = Some(c);
            }
            ')' | ']' | '}' => {
                if open.last().is_some_and(|(o, _)| closing(*o) == c) {
                    open.pop();
                }
                previous = Some(c);
            }
            c if c.is_whitespace() => {}
            c => previous = Some(c),
        }
        i += 1;
    }
    let (bracket, at) = open.pop()?;
    if close.chars().eq([closing(bracket)]) {
        let (line, _, column) = locate(source, at);
        Some((bracket, line, column + 1))
    } else {
        None
    }
}

fn closing(open: char) -> char {
    match open {
        '(' => ')',
        '[' => ']',
        _ => '}',
    }
}

/// The built-in function whose name is nearest to `name`, if near enough to be a slip: the
/// same but for case, or at most two letters off (one for short names).
fn nearest_function(name: &str) -> Option<&'static str> {
    let lower = name.to_lowercase();
    let allowed = if name.chars().count() <= 4 { 1 } else { 2 };
    function_names()
        .into_iter()
        .map(|candidate| (edit_distance(&lower, &candidate.to_lowercase()), candidate))
        .filter(|(distance, _)| *distance <= allowed)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::engine::{Expression, Limits};
    use serde_json::{Map, json};

    fn compile_error(source: &str) -> String {
        Expression::compile(source)
            .unwrap_err()
            .render("a.jsonata", source)
    }

    fn evaluation_error(source: &str, input: Value) -> String {
        Expression::compile(source)
            .unwrap()
            .evaluate(&input, &Map::new(), &Limits::default())
            .unwrap_err()
            .render("a.jsonata", source)
    }

    fn last_line(text: &str) -> &str {
        text.lines().last().unwrap_or_default()
    }

    #[test]
    fn the_common_codes_have_advice() {
        for code in [
            "S0101", "S0201", "S0202", "S0203", "S0204", "S0211", "T0410", "T0411", "T0412",
            "T1006", "T2001", "T2002", "D1001", "D3030", "D3110", "D3137", "U1001", "U1002",
            "U1003", "U1004",
        ] {
            let err = EngineError {
                code: code.into(),
                message: "Message".into(),
                position: None,
                token: Some("x".into()),
                value: None,
                culprit: None,
            };
            let advice = advice(&err, "x");
            assert!(
                advice.as_deref().is_some_and(|a| a.ends_with('.')),
                "{code}: {advice:?}"
            );
            assert!(!headline(&err).is_empty());
        }
        let unknown = EngineError::internal("Something odd".into());
        assert_eq!(headline(&unknown), "something odd");
    }

    #[test]
    fn slips_from_other_languages_are_named() {
        assert_eq!(
            last_line(&compile_error("a && b")),
            "JSONata writes `and`, not &&."
        );
        assert_eq!(
            last_line(&compile_error("a || b")),
            "JSONata writes `or`, not ||."
        );
        assert_eq!(
            last_line(&compile_error("a <> b")),
            "JSONata writes != for \"not equal\", not <>."
        );
        assert_eq!(
            last_line(&compile_error("a == b")),
            "JSONata compares with a single = (and !=, <=, >=), not ==."
        );
        assert_eq!(
            last_line(&compile_error("[1, 2,]")),
            "Remove the comma before \"]\": JSONata does not allow a trailing comma."
        );
        assert_eq!(
            compile_error("'abc"),
            "a.jsonata:1:1: error S0101: a string is not closed\n 1 | 'abc\n   | ^\nClose \
             the string with the quote it starts with (\" or ')."
        );
    }

    #[test]
    fn the_open_bracket_is_found_past_strings_comments_and_regular_expressions() {
        let source = "{\n  'a': \"(\",  /* [ */\n  'b': $match(x, /[a-z]+/),\n  'c': (1 / 2\n}";
        let rendered = compile_error(source);
        assert_eq!(
            last_line(&rendered),
            "The \"(\" at line 4, column 8 must be closed with \")\" before this \"}\".",
            "{rendered}"
        );
        assert_eq!(unclosed("[1, 2", 5, "]"), Some(('[', 1, 1)));
        assert_eq!(unclosed("[1, 2", 5, ")"), None);
        assert_eq!(unclosed("(1)", 3, ")"), None);
    }

    #[test]
    fn unknown_functions_get_the_nearest_name() {
        assert_eq!(nearest_function("upercase"), Some("uppercase"));
        assert_eq!(nearest_function("Uppercase"), Some("uppercase"));
        assert_eq!(nearest_function("tomillis"), Some("toMillis"));
        assert_eq!(nearest_function("summ"), Some("sum"));
        assert_eq!(nearest_function("frobnicate"), None);
        let rendered = evaluation_error("$frobnicate(1)", Value::Null);
        assert_eq!(
            last_line(&rendered),
            "There is no function $frobnicate: check its spelling, or define it first with \
             $frobnicate := function($x) { ... }."
        );
    }

    #[test]
    fn the_advice_follows_the_value_given() {
        let input = json!({"n": "3", "list": [1, 2], "obj": {"a": 1}, "count": 3});
        let advice = |source: &str| last_line(&evaluation_error(source, input.clone())).to_owned();
        assert_eq!(
            advice("n + 1"),
            "To join text, use & instead of +; to add, convert the text first with $number(...)."
        );
        assert_eq!(
            advice("list * 2"),
            "It is an array here: add its items up with $sum(...), or pick one item with [0]."
        );
        assert_eq!(
            advice("$join(['a'], count)"),
            "Convert it first, as in $string(count)."
        );
        assert_eq!(advice("$abs(n)"), "Convert it first, as in $number(n).");
        assert_eq!(
            advice("$uppercase(obj)"),
            "It is an object here: pick the field you mean, as in obj.name."
        );
        assert_eq!(
            advice("$string(1, 2, 3)"),
            "Give $string a boolean as argument 2: check what the script passes for this event."
        );
        assert_eq!(
            advice("$count(1, 2)"),
            "$count takes fewer arguments: remove argument 2 and those after it."
        );
    }

    #[test]
    fn values_and_lines_are_cut() {
        let long = "x".repeat(300);
        let shown = show_value(&json!(long));
        assert_eq!(shown.chars().count(), MAX_VALUE_CHARS + 1);
        assert!(shown.starts_with("\"xxx") && shown.ends_with('…'));
        assert_eq!(show_value(&json!({"a": [1, "b"]})), r#"{"a":[1,"b"]}"#);
        assert_eq!(described(&json!([])), "[] (an empty array)");
        assert_eq!(described(&json!([1])), "[1] (an array of 1 item)");
        assert_eq!(described(&json!(null)), "null");

        let line = format!("{}1 +  'x'{}", " ".repeat(200), " ".repeat(200));
        let rendered = excerpt(&line, 202);
        let lines: Vec<&str> = rendered.lines().collect();
        assert!(lines[0].starts_with(" 1 | …"), "{rendered}");
        assert!(lines[0].ends_with('…'), "{rendered}");
        let caret = lines[1].chars().position(|c| c == '^').unwrap();
        assert_eq!(lines[0].chars().nth(caret), Some('+'), "{rendered}");
    }

    #[test]
    fn words_keep_abbreviations() {
        assert_eq!(lower_first("Expected x"), "expected x");
        assert_eq!(lower_first("ISO 8601"), "ISO 8601");
        assert_eq!(lower_first(""), "");
        assert_eq!(one_line("a\n   b\tc"), "a b c");
    }

    #[test]
    fn an_undefined_result_without_places_says_so() {
        assert_eq!(
            describe_undefined(&[], "x"),
            "the result is undefined, though every path the script read matched something"
        );
        let causes = Expression::compile("[a, b.c]").unwrap().undefined_causes(
            Some(&json!({"b": {}})),
            &Map::new(),
            &Limits::default(),
        );
        assert_eq!(
            describe_undefined(&causes, "[a, b.c]"),
            "the result is undefined: nothing matched `a` at line 1, `b.c` at line 1"
        );
    }
}

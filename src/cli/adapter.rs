//! `ess-agent adapter` subcommands.
//!
//! `adapter eval` runs an adapter script once against a JSON document, exactly as the agent
//! runs it (same engine, same limits), so partners can develop and test their scripts.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use serde_json::{Map, Value, json};

use crate::adapter::engine::{EngineError, Expression, Limits};

/// Evaluate a JSONata adapter script against a JSON input.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// The JSONata script.
    #[arg(long)]
    pub expr_file: PathBuf,
    /// The JSON input document. Without it the input is undefined (`$` is undefined), as in
    /// JSONata with no input at all; it is not `null`.
    #[arg(long)]
    pub input_file: Option<PathBuf>,
    /// A JSON object of extra variables: `{"partner": "acme"}` binds `$partner`. Keys may also
    /// be written with their `$`.
    #[arg(long)]
    pub bindings_file: Option<PathBuf>,
    /// Time limit of the evaluation, in milliseconds (default: the agent's, 100 ms).
    #[arg(long)]
    pub time_limit_ms: Option<u64>,
    /// Depth limit of the evaluation (default: the agent's, 500).
    #[arg(long)]
    pub max_depth: Option<usize>,
    /// Print exactly one JSON object on one line instead: `{"result": ...}`,
    /// `{"undefined": true}` or `{"error": {"code": ..., "message": ..., "position": ...}}`.
    #[arg(long)]
    pub envelope: bool,
}

/// Runs `adapter eval`.
///
/// Without `--envelope`: a result is printed to stdout as pretty JSON; an undefined result
/// prints nothing at all (so that scripts can tell it apart with `--envelope`, and an empty
/// stdout is never mistaken for JSON); a compile or evaluation error is printed to stderr as
/// `file:line:col: CODE: message` with the line of the script and a caret under the column,
/// and the exit code is 1.
///
/// With `--envelope`: exactly one JSON object on one line, `{"result": V}`,
/// `{"undefined": true}`, or `{"error": {"code": "T2001", "message": "...", "position": N}}`
/// where `position` is the character offset (from 0) in the script, or `null` when the error
/// has no place in it (the limits); the exit code is 1 for the error only.
///
/// Both ways, the exit code is 0 for a result or an undefined result. A file that cannot be read
/// or is not valid JSON (input, bindings) is not a script error: it is returned as `Err`, with
/// nothing printed.
pub fn eval(args: &EvalArgs) -> anyhow::Result<ExitCode> {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let code = eval_to(args, &mut stdout.lock(), &mut stderr.lock())?;
    Ok(ExitCode::from(code))
}

/// [`eval`], writing to `out` and `err`, and returning the exit code.
fn eval_to(args: &EvalArgs, out: &mut dyn Write, err: &mut dyn Write) -> anyhow::Result<u8> {
    let source = std::fs::read_to_string(&args.expr_file)
        .with_context(|| format!("cannot read the script {}", args.expr_file.display()))?;
    let input = args
        .input_file
        .as_deref()
        .map(|path| read_json(path, "input"))
        .transpose()?;
    let bindings = match &args.bindings_file {
        None => Map::new(),
        Some(path) => bindings(read_json(path, "bindings")?, path)?,
    };
    let defaults = Limits::default();
    let limits = Limits {
        time: args
            .time_limit_ms
            .map_or(defaults.time, std::time::Duration::from_millis),
        max_depth: args.max_depth.unwrap_or(defaults.max_depth),
        ..defaults
    };

    let outcome = Expression::compile(&source)
        .and_then(|expression| expression.evaluate_optional(input.as_ref(), &bindings, &limits));

    if args.envelope {
        let envelope = match &outcome {
            Ok(Some(value)) => json!({ "result": value }),
            Ok(None) => json!({ "undefined": true }),
            Err(error) => json!({ "error": {
                "code": error.code,
                "message": error.message,
                "position": error.position,
            }}),
        };
        writeln!(out, "{envelope}").context("cannot write the result")?;
        return Ok(exit_code(&outcome));
    }
    match &outcome {
        Ok(Some(value)) => {
            let text = serde_json::to_string_pretty(value).context("cannot format the result")?;
            writeln!(out, "{text}").context("cannot write the result")?;
        }
        Ok(None) => {}
        Err(error) => {
            let name = args.expr_file.display().to_string();
            writeln!(err, "{}", error.render(&name, &source)).context("cannot write the error")?;
        }
    }
    Ok(exit_code(&outcome))
}

fn exit_code(outcome: &Result<Option<Value>, EngineError>) -> u8 {
    match outcome {
        Ok(_) => 0,
        Err(_) => 1,
    }
}

fn read_json(path: &Path, what: &str) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the {what} file {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("the {what} file {} is not valid JSON", path.display()))
}

/// The variables of a bindings file: a JSON object, whose keys may start with `$`.
fn bindings(value: Value, path: &Path) -> anyhow::Result<Map<String, Value>> {
    let Value::Object(object) = value else {
        bail!(
            "the bindings file {} must hold a JSON object of variables",
            path.display()
        );
    };
    Ok(object
        .into_iter()
        .map(|(name, value)| match name.strip_prefix('$') {
            Some(bare) => (bare.to_owned(), value),
            None => (name, value),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use tempfile::TempDir;

    struct Run {
        code: u8,
        out: String,
        err: String,
    }

    struct Files {
        dir: TempDir,
    }

    impl Files {
        fn new() -> Self {
            Files {
                dir: tempfile::tempdir().unwrap(),
            }
        }

        fn write(&self, name: &str, contents: &str) -> PathBuf {
            let path = self.dir.path().join(name);
            std::fs::write(&path, contents).unwrap();
            path
        }

        fn args(&self, script: &str) -> EvalArgs {
            EvalArgs {
                expr_file: self.write("adapter.jsonata", script),
                input_file: None,
                bindings_file: None,
                time_limit_ms: None,
                max_depth: None,
                envelope: false,
            }
        }
    }

    fn run(args: &EvalArgs) -> Run {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = eval_to(args, &mut out, &mut err).unwrap();
        Run {
            code,
            out: String::from_utf8(out).unwrap(),
            err: String::from_utf8(err).unwrap(),
        }
    }

    fn envelope(run: &Run) -> Value {
        assert_eq!(run.out.lines().count(), 1, "one line: {}", run.out);
        assert!(run.err.is_empty(), "{}", run.err);
        serde_json::from_str(&run.out).unwrap()
    }

    #[test]
    fn flags_parse() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            eval: EvalArgs,
        }
        let cli = Cli::try_parse_from([
            "eval",
            "--expr-file",
            "a.jsonata",
            "--input-file",
            "in.json",
            "--bindings-file",
            "b.json",
            "--time-limit-ms",
            "250",
            "--max-depth",
            "80",
            "--envelope",
        ])
        .unwrap();
        assert_eq!(cli.eval.expr_file, PathBuf::from("a.jsonata"));
        assert_eq!(cli.eval.input_file, Some(PathBuf::from("in.json")));
        assert_eq!(cli.eval.bindings_file, Some(PathBuf::from("b.json")));
        assert_eq!(cli.eval.time_limit_ms, Some(250));
        assert_eq!(cli.eval.max_depth, Some(80));
        assert!(cli.eval.envelope);
        assert!(
            Cli::try_parse_from(["eval"]).is_err(),
            "--expr-file is required"
        );
    }

    #[test]
    fn prints_the_result_as_pretty_json() {
        let files = Files::new();
        let mut args = files.args("{'id': event.id, 'partner': $partner, 'n': 1.5}");
        args.input_file = Some(files.write("in.json", r#"{"event": {"id": "e-1"}}"#));
        args.bindings_file = Some(files.write("b.json", r#"{"partner": "acme"}"#));
        let run = run(&args);
        assert_eq!(run.code, 0);
        assert_eq!(
            run.out,
            "{\n  \"id\": \"e-1\",\n  \"partner\": \"acme\",\n  \"n\": 1.5\n}\n"
        );
        assert!(run.err.is_empty());
    }

    #[test]
    fn envelope_holds_the_result() {
        let files = Files::new();
        let mut args = files.args("[1, 'two', {'three': 3}]");
        args.envelope = true;
        let run = run(&args);
        assert_eq!(run.code, 0);
        assert_eq!(envelope(&run), json!({"result": [1, "two", {"three": 3}]}));
    }

    #[test]
    fn undefined_prints_nothing_or_its_envelope() {
        let files = Files::new();
        let mut args = files.args("nothing.here");
        args.input_file = Some(files.write("in.json", "{}"));
        let plain = run(&args);
        assert_eq!(
            (plain.code, plain.out.as_str(), plain.err.as_str()),
            (0, "", "")
        );
        args.envelope = true;
        let run = run(&args);
        assert_eq!(run.code, 0);
        assert_eq!(envelope(&run), json!({"undefined": true}));
    }

    #[test]
    fn no_input_file_means_undefined_input() {
        let files = Files::new();
        let mut args = files.args("[$exists($), $type(null)]");
        args.envelope = true;
        assert_eq!(envelope(&run(&args)), json!({"result": [false, "null"]}));
        args.input_file = Some(files.write("in.json", "null"));
        assert_eq!(envelope(&run(&args)), json!({"result": [true, "null"]}));
    }

    #[test]
    fn bindings_may_be_written_with_their_dollar() {
        let files = Files::new();
        let mut args = files.args("$partner & '/' & $region");
        args.bindings_file = Some(files.write("b.json", r#"{"$partner": "acme", "region": "eu"}"#));
        args.envelope = true;
        assert_eq!(envelope(&run(&args)), json!({"result": "acme/eu"}));
    }

    #[test]
    fn compile_error_is_rendered_with_a_caret() {
        let files = Files::new();
        let args = files.args("(\n  $a := 1;\n  $a + ]\n)");
        let run = run(&args);
        assert_eq!(run.code, 1);
        assert!(run.out.is_empty());
        let name = args.expr_file.display().to_string();
        let lines: Vec<&str> = run.err.lines().collect();
        assert!(
            lines[0].starts_with(&format!("{name}:3:8: S0211: ")),
            "{}",
            run.err
        );
        assert_eq!(lines[1], "  $a + ]");
        assert_eq!(lines[2], "       ^");
    }

    #[test]
    fn evaluation_error_is_rendered_with_a_caret() {
        let files = Files::new();
        let args = files.args("'x' - 1");
        let run = run(&args);
        assert_eq!(run.code, 1);
        assert!(run.out.is_empty());
        assert!(run.err.contains(": T2001: "), "{}", run.err);
        assert!(run.err.ends_with("'x' - 1\n    ^\n"), "{}", run.err);
    }

    #[test]
    fn envelope_holds_the_error() {
        let files = Files::new();
        let mut args = files.args("1 + 'x'");
        args.envelope = true;
        let run = run(&args);
        assert_eq!(run.code, 1);
        let value = envelope(&run);
        let error = &value["error"];
        assert_eq!(error["code"], "T2002");
        assert!(error["message"].as_str().unwrap().contains("right side"));
        assert_eq!(error["position"], 2);
        assert_eq!(value.as_object().unwrap().len(), 1);
    }

    #[test]
    fn time_limit_applies() {
        let files = Files::new();
        let mut args = files.args("( $f := function($x){ $f($x) }; $f(1) )");
        args.time_limit_ms = Some(50);
        args.envelope = true;
        let run = run(&args);
        assert_eq!(run.code, 1);
        let value = envelope(&run);
        assert_eq!(value["error"]["code"], "U1001");
        assert_eq!(value["error"]["position"], Value::Null);
    }

    #[test]
    fn depth_limit_applies() {
        let files = Files::new();
        let script = "( $f := function($n){ $n = 0 ? 0 : 1 + $f($n - 1) }; $f(50) )";
        let mut args = files.args(script);
        args.envelope = true;
        assert_eq!(envelope(&run(&args)), json!({"result": 50}));
        args.max_depth = Some(40);
        let run = run(&args);
        assert_eq!(run.code, 1);
        assert_eq!(envelope(&run)["error"]["code"], "U1002");
    }

    #[test]
    fn limit_error_without_envelope_has_no_excerpt() {
        let files = Files::new();
        let mut args = files.args("( $f := function($x){ $f($x) }; $f(1) )");
        args.time_limit_ms = Some(20);
        let run = run(&args);
        assert_eq!(run.code, 1);
        let name = args.expr_file.display().to_string();
        assert!(
            run.err.starts_with(&format!("{name}: U1001: ")),
            "{}",
            run.err
        );
        assert_eq!(run.err.lines().count(), 1);
    }

    #[test]
    fn unreadable_or_invalid_files_are_errors() {
        let files = Files::new();
        let mut args = files.args("$");
        args.input_file = Some(files.dir.path().join("missing.json"));
        let mut sink = Vec::new();
        let err = eval_to(&args, &mut sink, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("missing.json"), "{err}");

        args.input_file = Some(files.write("bad.json", "{not json"));
        let err = eval_to(&args, &mut sink, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("not valid JSON"), "{err}");

        args.input_file = None;
        args.bindings_file = Some(files.write("b.json", "[1]"));
        let err = eval_to(&args, &mut sink, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("JSON object"), "{err}");

        args.bindings_file = None;
        args.expr_file = files.dir.path().join("missing.jsonata");
        let err = eval_to(&args, &mut sink, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("missing.jsonata"), "{err}");
        assert!(sink.is_empty());
    }
}

//! `ess-agent adapter` subcommands.
//!
//! `adapter eval` runs an adapter script once against a JSON document, exactly as the agent
//! runs it (same engine, same limits), so partners can develop and test their scripts; with
//! `--watch` it runs again each time the script or the input is saved. `adapter test` runs the
//! cases kept beside each adapter (see [`crate::adapter::fixtures`]) and says which pass.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Map, Value, json};

use crate::adapter::diagnostics::describe_undefined;
use crate::adapter::engine::{EngineError, Expression, Limits};
use crate::adapter::fixtures;
use crate::config::{Config, DEFAULT_CONFIG_PATH};

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
    /// Keep running: evaluate again each time the script, the input or the bindings file is
    /// saved, and print the result or the error under a line with the time. Ctrl-C stops.
    #[arg(long, conflicts_with = "envelope")]
    pub watch: bool,
}

/// Run the test cases kept beside each adapter (`NAME.tests/*.json`) and show what fails.
#[derive(clap::Args, Debug)]
pub struct TestArgs {
    /// The adapters to test, by file name without `.jsonata` (`court-calendar`). Default: all
    /// of them.
    pub names: Vec<String>,
    /// The configuration file: the adapters are those of its `adapters_dir`, and each runs
    /// within the limits of the first route that uses it.
    #[arg(long, env = "ESS_AGENT_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Test the adapters of this directory instead, within the agent's default limits; no
    /// configuration is read.
    #[arg(long)]
    pub adapters_dir: Option<PathBuf>,
    /// Time limit of each evaluation, in milliseconds, instead of the route's (default 100 ms).
    #[arg(long)]
    pub time_limit_ms: Option<u64>,
}

/// Runs `adapter eval`.
///
/// Without `--envelope`: a result is printed to stdout as pretty JSON; an undefined result
/// prints nothing to stdout (so that scripts can tell it apart with `--envelope`, and an empty
/// stdout is never mistaken for JSON) and says on stderr which paths matched nothing; a compile
/// or evaluation error is printed to stderr as `file:line:col: error CODE: message` with the
/// line of the script, a caret under the column, what the failing part got and what to do, and
/// the exit code is 1.
///
/// With `--envelope`: exactly one JSON object on one line, `{"result": V}`,
/// `{"undefined": true}`, or `{"error": {"code": "T2001", "message": "...", "position": N}}`
/// where `position` is the character offset (from 0) in the script, or `null` when the error
/// has no place in it (the limits); the exit code is 1 for the error only.
///
/// Both ways, the exit code is 0 for a result or an undefined result. A file that cannot be read
/// or is not valid JSON (input, bindings) is not a script error: it is returned as `Err`, with
/// nothing printed.
///
/// With `--watch`: see [`watch`].
pub fn eval(args: &EvalArgs) -> anyhow::Result<ExitCode> {
    if args.watch {
        return watch(args);
    }
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let code = eval_to(args, &mut stdout.lock(), &mut stderr.lock())?;
    Ok(ExitCode::from(code))
}

/// What an evaluation works on, read from the files.
struct Inputs {
    source: String,
    input: Option<Value>,
    bindings: Map<String, Value>,
}

fn read_inputs(args: &EvalArgs) -> anyhow::Result<Inputs> {
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
    Ok(Inputs {
        source,
        input,
        bindings,
    })
}

fn eval_limits(args: &EvalArgs) -> Limits {
    let defaults = Limits::default();
    Limits {
        time: args
            .time_limit_ms
            .map_or(defaults.time, Duration::from_millis),
        max_depth: args.max_depth.unwrap_or(defaults.max_depth),
        ..defaults
    }
}

/// [`eval`], writing to `out` and `err`, and returning the exit code.
fn eval_to(args: &EvalArgs, out: &mut dyn Write, err: &mut dyn Write) -> anyhow::Result<u8> {
    let inputs = read_inputs(args)?;
    let limits = eval_limits(args);
    let compiled = Expression::compile(&inputs.source);
    let outcome = compiled
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|expression| {
            expression.evaluate_optional(inputs.input.as_ref(), &inputs.bindings, &limits)
        });

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
    let name = args.expr_file.display().to_string();
    match (&outcome, &compiled) {
        (Ok(Some(value)), _) => {
            let text = serde_json::to_string_pretty(value).context("cannot format the result")?;
            writeln!(out, "{text}").context("cannot write the result")?;
        }
        (Ok(None), Ok(expression)) => {
            let causes =
                expression.undefined_causes(inputs.input.as_ref(), &inputs.bindings, &limits);
            writeln!(
                err,
                "{name}: {}\n{UNDEFINED_MEANS}",
                describe_undefined(&causes, &inputs.source)
            )
            .context("cannot write the result")?;
        }
        (Ok(None), Err(_)) => {}
        (Err(error), _) => {
            writeln!(err, "{}", error.render(&name, &inputs.source))
                .context("cannot write the error")?;
        }
    }
    Ok(exit_code(&outcome))
}

/// What an undefined result does in the agent, said after it.
const UNDEFINED_MEANS: &str =
    "The agent skips the route for an event the adapter gives no result for.";

fn exit_code(outcome: &Result<Option<Value>, EngineError>) -> u8 {
    match outcome {
        Ok(_) => 0,
        Err(_) => 1,
    }
}

/// How long to wait for a save to settle: editors write a file in several steps (a temporary
/// file, a rename, a change of mode), and one evaluation should follow them all.
const WATCH_SETTLE: Duration = Duration::from_millis(150);

/// `adapter eval --watch`: evaluates once, then again each time the script, the input or the
/// bindings file changes, until the process is stopped (Ctrl-C).
///
/// The directories of the files are watched rather than the files, because editors often save
/// by writing a new file and renaming it over the old one (vim, VS Code, `sed -i`), which a
/// watch on the file itself would lose. Each evaluation prints a line with the time, then the
/// result as pretty JSON, why it is undefined, or the error, all on stdout so that they keep
/// their order. A file that cannot be read or parsed (for example while it is being written)
/// is reported and the watch goes on.
pub fn watch(args: &EvalArgs) -> anyhow::Result<ExitCode> {
    use notify_debouncer_full::new_debouncer;
    use notify_debouncer_full::notify::{EventKind, RecursiveMode};

    let mut files = BTreeSet::new();
    let mut dirs = BTreeSet::new();
    for file in [
        Some(&args.expr_file),
        args.input_file.as_ref(),
        args.bindings_file.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        let (dir, name) = watched_place(file)?;
        files.insert(dir.join(name));
        dirs.insert(dir);
    }

    let (tx, rx) = std::sync::mpsc::channel();
    let mut debouncer =
        new_debouncer(WATCH_SETTLE, None, tx).context("cannot watch the files for changes")?;
    for dir in &dirs {
        debouncer
            .watch(dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("cannot watch {} for changes", dir.display()))?;
    }

    // Watching starts before the first evaluation, so that no save made after its output
    // appears is missed.
    let stdout = std::io::stdout();
    watch_round(args, &mut stdout.lock())?;
    for batch in rx {
        let saved = match batch {
            Ok(events) => events.iter().any(|event| {
                !matches!(event.kind, EventKind::Access(_))
                    && event.paths.iter().any(|path| files.contains(path))
            }),
            Err(errors) => {
                for error in errors {
                    eprintln!("watching for changes: {error}");
                }
                false
            }
        };
        if saved {
            watch_round(args, &mut stdout.lock())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The directory to watch for `file`, resolved (so that it matches the paths of the events),
/// and the file's name in it.
fn watched_place(file: &Path) -> anyhow::Result<(PathBuf, std::ffi::OsString)> {
    let name = file
        .file_name()
        .with_context(|| format!("{} does not name a file", file.display()))?;
    let dir = match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot watch {}", dir.display()))?;
    Ok((dir, name.to_owned()))
}

/// One evaluation of `--watch`: the time, then what [`eval`] would print, all on `out`.
fn watch_round(args: &EvalArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let now = time::OffsetDateTime::now_utc();
    let stamp = format!(
        "{:02}:{:02}:{:02} UTC",
        now.hour(),
        now.minute(),
        now.second()
    );
    writeln!(
        out,
        "-------- {stamp} {} --------",
        args.expr_file.display()
    )
    .context("cannot write the result")?;
    // An evaluation prints either to stdout (a result) or to stderr (anything else), so the
    // two buffers one after the other keep the order.
    let (mut text, mut errors) = (Vec::new(), Vec::new());
    if let Err(error) = eval_to(args, &mut text, &mut errors) {
        writeln!(errors, "{error:#}").context("cannot write the result")?;
    }
    text.append(&mut errors);
    out.write_all(&text).context("cannot write the result")?;
    out.flush().context("cannot write the result")
}

/// Runs `adapter test`: prints one line per case, `PASS` or `FAIL`, with its file and
/// description, each failure followed by why and a diff of what was expected against what the
/// script did, then `N passed, M failed` alone on the last line. The exit code is 1 when any
/// case fails or any adapter does not compile, 0 otherwise.
///
/// A script that does not compile is shown once, with its error, and counts as one failure for
/// each of its cases (at least one). A script without cases is named, and is not a failure.
/// Configuration problems, an adapters directory that cannot be read or holds no adapter, and a
/// NAME that is not an adapter are errors (exit code 1, nothing run).
pub fn test(args: &TestArgs) -> anyhow::Result<ExitCode> {
    let stdout = std::io::stdout();
    let failed = test_to(args, &mut stdout.lock())?;
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// [`test`], writing to `out`; returns whether anything failed.
fn test_to(args: &TestArgs, out: &mut dyn Write) -> anyhow::Result<bool> {
    let (dir, routes) = match &args.adapters_dir {
        Some(dir) => (dir.clone(), Vec::new()),
        None => {
            let config = Config::load(&args.config).map_err(|err| {
                anyhow::anyhow!(
                    "{err}\n(to test adapters without a configuration, give --adapters-dir DIR)"
                )
            })?;
            (tidy(&config.adapters_dir), config.routes)
        }
    };
    let mut adapters = fixtures::discover(&dir)?;
    if adapters.is_empty() {
        bail!(
            "{} holds no adapter scripts (*.{})",
            dir.display(),
            fixtures::SCRIPT_EXTENSION
        );
    }
    if !args.names.is_empty() {
        let stem = |script: &Path| {
            script
                .file_stem()
                .map(|stem| stem.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let known: Vec<String> = adapters.iter().map(|(script, _)| stem(script)).collect();
        let unknown: Vec<&String> = args.names.iter().filter(|n| !known.contains(n)).collect();
        if !unknown.is_empty() {
            let list = |names: &[&String]| {
                names
                    .iter()
                    .map(|n| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            bail!(
                "no adapter named {} in {}; there are: {}",
                list(&unknown),
                dir.display(),
                list(&known.iter().collect::<Vec<_>>())
            );
        }
        adapters.retain(|(script, _)| args.names.contains(&stem(script)));
    }

    let write_error = |e| anyhow::Error::new(e).context("cannot write the results");
    let (mut passed, mut failed) = (0usize, 0usize);
    for (script, cases) in &adapters {
        let mut limits = route_limits(script, &routes);
        if let Some(ms) = args.time_limit_ms {
            limits.time = Duration::from_millis(ms);
        }
        let compiled = std::fs::read_to_string(script)
            .map_err(|err| format!("cannot read the script: {err}"))
            .and_then(|source| {
                Expression::compile(&source)
                    .map(drop)
                    .map_err(|err| err.render(&script.display().to_string(), &source))
            });
        if let Err(problem) = compiled {
            writeln!(
                out,
                "FAIL {}: the script does not compile",
                script.display()
            )
            .map_err(write_error)?;
            for line in problem.lines() {
                writeln!(out, "    {line}").map_err(write_error)?;
            }
            failed += cases.len().max(1);
            continue;
        }
        if cases.is_empty() {
            writeln!(
                out,
                "NO CASES {}: add some to {}/",
                script.display(),
                fixtures::tests_dir(script).display()
            )
            .map_err(write_error)?;
            continue;
        }
        for result in fixtures::run_adapter_fixtures(script, cases, &limits) {
            if result.passed {
                passed += 1;
            } else {
                failed += 1;
            }
            writeln!(out, "{result}").map_err(write_error)?;
        }
    }
    writeln!(out, "{passed} passed, {failed} failed").map_err(write_error)?;
    Ok(failed > 0)
}

/// `path` without the `dir/..` that resolving against the configuration's directory leaves
/// (`config/../adapters` → `adapters`), for shorter names in the output.
fn tidy(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut tidy = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir
                if matches!(tidy.components().next_back(), Some(Component::Normal(_))) =>
            {
                tidy.pop();
            }
            Component::CurDir => {}
            other => tidy.push(other),
        }
    }
    if tidy.as_os_str().is_empty() {
        tidy.push(".");
    }
    tidy
}

/// The limits of the first route that runs `script`, or the agent's defaults.
fn route_limits(script: &Path, routes: &[crate::config::RouteConfig]) -> Limits {
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    };
    let defaults = Limits::default();
    match routes.iter().find(|route| same(&route.adapter, script)) {
        Some(route) => Limits {
            time: route
                .time_limit_ms
                .map_or(defaults.time, Duration::from_millis),
            max_depth: route.max_depth.unwrap_or(defaults.max_depth),
            max_output_bytes: route.max_output_bytes.unwrap_or(defaults.max_output_bytes),
        },
        None => defaults,
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
                watch: false,
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
        assert!(!cli.eval.watch);
        assert!(
            Cli::try_parse_from(["eval"]).is_err(),
            "--expr-file is required"
        );
        let cli = Cli::try_parse_from(["eval", "--expr-file", "a.jsonata", "--watch"]).unwrap();
        assert!(cli.eval.watch);
        assert!(
            Cli::try_parse_from(["eval", "--expr-file", "a", "--watch", "--envelope"]).is_err(),
            "--watch prints more than one envelope"
        );
    }

    #[test]
    fn test_flags_parse_and_limits_follow_the_route() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            test: TestArgs,
        }
        let cli = Cli::try_parse_from([
            "test",
            "court-calendar",
            "law-firm-calendar",
            "--adapters-dir",
            "adapters",
            "--time-limit-ms",
            "900",
        ])
        .unwrap();
        assert_eq!(cli.test.names, ["court-calendar", "law-firm-calendar"]);
        assert_eq!(cli.test.adapters_dir, Some(PathBuf::from("adapters")));
        assert_eq!(cli.test.time_limit_ms, Some(900));

        let config = Config::parse(
            "agent_id = \"a\"\n\
             [[routes]]\nname = \"r\"\nadapter = \"slow.jsonata\"\nsink = \"s\"\n\
             time_limit_ms = 250\nmax_depth = 40\n\
             [sinks.s]\ntype = \"file\"\ndir = \"/tmp/out\"\nname = \"{id}.json\"\n",
        )
        .unwrap();
        let limits = route_limits(Path::new("slow.jsonata"), &config.routes);
        assert_eq!(limits.time, Duration::from_millis(250));
        assert_eq!(limits.max_depth, 40);
        assert_eq!(limits.max_output_bytes, Limits::default().max_output_bytes);
        assert_eq!(
            route_limits(Path::new("other.jsonata"), &config.routes),
            Limits::default()
        );

        assert_eq!(tidy(Path::new("config/../adapters")), Path::new("adapters"));
        assert_eq!(tidy(Path::new("/etc/a/../b/./c")), Path::new("/etc/b/c"));
        assert_eq!(tidy(Path::new("../x")), Path::new("../x"));
        assert_eq!(tidy(Path::new("a/..")), Path::new("."));
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
        assert_eq!((plain.code, plain.out.as_str()), (0, ""));
        // Why, on stderr.
        let name = args.expr_file.display();
        assert_eq!(
            plain.err,
            format!(
                "{name}: the result is undefined: nothing matched `nothing` at line 1\nThe \
                 agent skips the route for an event the adapter gives no result for.\n"
            )
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
            lines[0].starts_with(&format!("{name}:3:8: error S0211: ")),
            "{}",
            run.err
        );
        assert_eq!(lines[1], " 3 |   $a + ]");
        assert_eq!(lines[2], "   |        ^");
    }

    #[test]
    fn evaluation_error_is_rendered_with_a_caret() {
        let files = Files::new();
        let args = files.args("'x' - 1");
        let run = run(&args);
        assert_eq!(run.code, 1);
        assert!(run.out.is_empty());
        assert!(run.err.contains(":1:5: error T2001: "), "{}", run.err);
        assert!(
            run.err.contains("\n 1 | 'x' - 1\n   |     ^\n"),
            "{}",
            run.err
        );
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
            run.err.starts_with(&format!(
                "{name}: error U1001: the time limit of 20 ms was exceeded\nLook for a loop"
            )),
            "{}",
            run.err
        );
        assert_eq!(run.err.lines().count(), 2);
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

//! Entry points for the fuzz targets in `fuzz/` and for the test that replays their corpora.
//!
//! Each function takes the raw bytes a fuzzer produces, turns them into the input of one parser
//! that hostile input reaches, runs it, and checks properties that must hold for every input.
//! A property that does not hold panics, which the fuzzer reports as a crash; the parsers
//! themselves must never panic. The fuzz targets and the replay test call these same functions,
//! so a corpus file reproduces in `cargo nextest run` exactly what it did under the fuzzer.
//!
//! Input layouts, chosen so that a corpus file can be read and written by hand:
//! - [`envelope`]: the `Content-Type` value on the first line, the body after it.
//! - [`cloudevents_binary`], [`signature`]: `name: value` header lines, an empty line, the body.
//! - [`config`]: the TOML text.
//! - [`name_template`]: the template on the first line, then the event's id, type, version,
//!   subject, revision, source, route and partner, a line each, then the adapter output (JSON;
//!   text that is not JSON is taken as a string record).
//! - [`adapter_fixture`]: the fixture file's text.

use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde_json::Value;

use crate::adapter::fixtures::{Expectation, Fixture, line_diff};
use crate::config::Config;
use crate::protocol::auth::{WebhookSigner, WebhookVerifier};
use crate::protocol::envelope::{self, Envelope, EnvelopeError, Format, MAX_ID_LEN, MAX_INTEGER};
use crate::sink::EventMeta;
use crate::sink::template::file_records;

/// A target's entry point: the fuzzer's bytes in, a panic when a property does not hold.
pub type Target = fn(&[u8]);

/// The fuzz targets, as named under `fuzz/fuzz_targets/` and `fuzz/corpus/`.
pub const TARGETS: [(&str, Target); 6] = [
    ("envelope", envelope),
    ("cloudevents_binary", cloudevents_binary),
    ("signature", signature),
    ("config", config),
    ("name_template", name_template),
    ("adapter_fixture", adapter_fixture),
];

/// Error messages quote request text only in short, sanitised pieces.
const MAX_ERROR_MESSAGE: usize = 1024;

/// The Change Event and CloudEvents structured-mode parser: `Content-Type` line, then the body.
pub fn envelope(data: &[u8]) {
    let (content_type, body) = split_line(data);
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_bytes(content_type) {
        headers.insert(CONTENT_TYPE, value);
    }
    check_parse(&headers, body);
}

/// The CloudEvents binary-mode mapping: header lines, an empty line, the body (the event's data).
/// A `ce-specversion` header is added when the input has none, so that every input is read in
/// binary mode.
pub fn cloudevents_binary(data: &[u8]) {
    let (mut headers, body) = header_block(data);
    if !headers.contains_key("ce-specversion") {
        headers.insert("ce-specversion", HeaderValue::from_static("1.0"));
    }
    check_parse(&headers, body);
}

fn check_parse(headers: &HeaderMap, body: &[u8]) {
    match envelope::parse(headers, body) {
        Ok(env) => check_envelope(&env),
        Err(err) => check_envelope_error(&err),
    }
}

/// What every accepted event satisfies, and that its normalised document, which the journal
/// stores and adapters read, is itself a Change Event that parses to the same fields.
fn check_envelope(env: &Envelope) {
    assert!(
        !env.id.is_empty() && env.id.len() <= MAX_ID_LEN,
        "id length"
    );
    assert!(
        env.id.bytes().all(|b| (b' '..=b'~').contains(&b)),
        "id bytes"
    );
    assert!((1..=MAX_INTEGER).contains(&env.version), "version range");
    assert!(
        env.revision.is_none_or(|r| r <= MAX_INTEGER),
        "revision range"
    );
    // A Change Event's optional strings may be empty; CloudEvents attributes may not.
    if env.format != Format::ChangeEvent {
        assert!(!env.subject.is_empty(), "empty subject");
        assert!(!env.event_type.is_empty(), "empty type");
        assert!(env.source.as_ref().is_some_and(|s| !s.is_empty()), "source");
    }
    for field in ["id", "version", "type", "subject", "payload"] {
        assert!(env.document.contains_key(field), "document lacks {field}");
    }

    let mut json = HeaderMap::new();
    json.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let text = Value::Object(env.document.clone()).to_string();
    let again = envelope::parse(&json, text.as_bytes())
        .unwrap_or_else(|e| panic!("the normalised document is refused: {e}"));
    assert_eq!(again.id, env.id);
    assert_eq!(again.version, env.version);
    assert_eq!(again.event_type, env.event_type);
    assert_eq!(again.subject, env.subject);
    assert_eq!(again.revision, env.revision);
    assert_eq!(again.source, env.source);
    assert_eq!(again.time, env.time);
    assert!(
        again.document.keys().eq(env.document.keys()),
        "the normalised document's members change when it is parsed again"
    );
}

fn check_envelope_error(err: &EnvelopeError) {
    let message = err.to_string();
    assert!(!message.is_empty(), "empty error message");
    assert!(
        message.len() <= MAX_ERROR_MESSAGE,
        "error message of {} bytes",
        message.len()
    );
    assert!(!err.code().is_empty());
    assert!(matches!(
        err.status(),
        StatusCode::BAD_REQUEST | StatusCode::UNSUPPORTED_MEDIA_TYPE
    ));
    let _ = err.field();
}

/// The HMAC secret the signature target signs and verifies with (a Standard Webhooks test
/// vector's).
const FUZZ_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// The seed of the Ed25519 key the signature target signs `v1a` entries with.
const FUZZ_ED25519_SEED: [u8; 32] = [7; 32];
/// The agent's clock for the signature target: the timestamp of the Standard Webhooks vectors.
const FUZZ_NOW: u64 = 1_614_265_330;

/// The Standard Webhooks verifier: header lines, an empty line, the body.
///
/// The fuzzed headers are verified as they are (against an HMAC secret and an Ed25519 key);
/// then, for the fuzzed body and (when usable) the fuzzed `webhook-id`, signatures made with the
/// right keys must verify, also listed before the fuzzed signature entries, and the same
/// signatures must not verify once the body, the id, the timestamp or the signature changes.
pub fn signature(data: &[u8]) {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use ring::signature::{Ed25519KeyPair, KeyPair as _};

    let (headers, body) = header_block(data);
    let pair = Ed25519KeyPair::from_seed_unchecked(&FUZZ_ED25519_SEED)
        .unwrap_or_else(|e| panic!("ed25519 seed: {e}"));
    let public = format!("whpk_{}", STANDARD.encode(pair.public_key().as_ref()));
    let verifier = WebhookVerifier::new(
        &[FUZZ_SECRET.to_owned()],
        &[public],
        Duration::from_secs(300),
    )
    .unwrap_or_else(|e| panic!("verifier: {e}"));
    let now = UNIX_EPOCH + Duration::from_secs(FUZZ_NOW);
    if let Err(err) = verifier.verify(&headers, body, now) {
        assert!(!err.to_string().is_empty());
        assert_eq!(err.status(), StatusCode::UNAUTHORIZED);
    }

    // The id as a hub would send it: a header value that needs no trimming.
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.trim() == *v)
        .unwrap_or("msg_fuzz")
        .to_owned();
    let timestamp = i64::try_from(FUZZ_NOW).unwrap_or(i64::MAX);
    let signer = WebhookSigner::new(FUZZ_SECRET).unwrap_or_else(|e| panic!("signer: {e}"));
    let v1 = signer.sign(&id, timestamp, body);
    let mut message = format!("{id}.{timestamp}.").into_bytes();
    message.extend_from_slice(body);
    let v1a = format!("v1a,{}", STANDARD.encode(pair.sign(&message).as_ref()));
    let others = headers
        .get("webhook-signature")
        .map(|v| v.as_bytes().to_vec())
        .unwrap_or_default();

    for good in [&v1, &v1a] {
        let mut listed = good.as_bytes().to_vec();
        assert_eq!(
            verify_one(&verifier, &id, timestamp, good.as_bytes(), body, now),
            Ok(()),
            "a signature made with the right key does not verify"
        );
        if !others.is_empty() {
            listed.push(b' ');
            listed.extend_from_slice(&others);
            if HeaderValue::from_bytes(&listed).is_ok() {
                assert_eq!(
                    verify_one(&verifier, &id, timestamp, &listed, body, now),
                    Ok(()),
                    "a right signature listed first does not verify"
                );
            }
        }

        // Every change of what was signed, or of the signature itself, is refused.
        let mut longer = body.to_vec();
        longer.push(b'x');
        assert!(verify_one(&verifier, &id, timestamp, good.as_bytes(), &longer, now).is_err());
        if let Some((&last, rest)) = body.split_last() {
            let mut flipped = rest.to_vec();
            flipped.push(last ^ 1);
            assert!(
                verify_one(&verifier, &id, timestamp, good.as_bytes(), &flipped, now).is_err(),
                "a changed body verifies"
            );
        }
        let other_id = format!("{id}x");
        assert!(
            verify_one(&verifier, &other_id, timestamp, good.as_bytes(), body, now).is_err(),
            "a changed id verifies"
        );
        assert!(
            verify_one(&verifier, &id, timestamp - 1, good.as_bytes(), body, now).is_err(),
            "a changed timestamp verifies"
        );
        let (version, encoded) = good.split_once(',').unwrap_or_default();
        let mut raw = STANDARD
            .decode(encoded)
            .unwrap_or_else(|e| panic!("signature encoding: {e}"));
        let at = body.first().map_or(0, |&b| usize::from(b)) % raw.len();
        raw[at] ^= 1 << (body.len() % 8);
        let changed = format!("{version},{}", STANDARD.encode(&raw));
        assert!(
            verify_one(&verifier, &id, timestamp, changed.as_bytes(), body, now).is_err(),
            "a changed signature verifies"
        );
    }
}

fn verify_one(
    verifier: &WebhookVerifier,
    id: &str,
    timestamp: i64,
    signature: &[u8],
    body: &[u8],
    now: SystemTime,
) -> Result<(), crate::protocol::auth::AuthError> {
    let mut headers = HeaderMap::new();
    let (Ok(id), Ok(signature)) = (
        HeaderValue::from_str(id),
        HeaderValue::from_bytes(signature),
    ) else {
        panic!("the signed headers are not header values");
    };
    headers.insert("webhook-id", id);
    headers.insert("webhook-timestamp", HeaderValue::from(timestamp));
    headers.insert("webhook-signature", signature);
    verifier.verify(&headers, body, now)
}

/// The configuration loader: TOML text, parsed, its relative paths resolved, then validated.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut config = match Config::parse(text) {
        Ok(config) => config,
        Err(problem) => {
            assert!(!problem.to_string().is_empty());
            return;
        }
    };
    config.resolve_paths(Path::new("/etc/ess-agent"));
    let problems = config.validate();
    for problem in &problems {
        assert!(!problem.key.is_empty() && !problem.message.is_empty());
    }
    if problems.is_empty() {
        // What the agent derives from a valid configuration before it does any I/O.
        let _ = config.journal.retention();
        let _ = (config.header_read_timeout(), config.body_read_timeout());
    }
}

/// Where the name-template target pretends a sink's directory is.
const FUZZ_ROOT: &str = "/srv/ess-agent/out";

/// File and SFTP names: a template that the file and SFTP sinks accept, rendered for any event
/// and output, gives only names that stay inside the sink's directory.
pub fn name_template(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.splitn(10, '\n');
    let mut line = || lines.next().unwrap_or_default().to_owned();
    let template_text = line();
    let id = line();
    let event_type = line();
    let version = line();
    let subject = line();
    let revision = line();
    let source = line();
    let route = line();
    let partner = line();
    let output_text = line();

    // What the file sink's validation accepts, the SFTP sink's accepts too.
    let Ok(template) = crate::sink::sftp::check_name_template(&template_text) else {
        return;
    };
    let event = EventMeta {
        id,
        event_type,
        version: version.parse().unwrap_or(1),
        subject,
        revision: revision.parse().ok(),
        source: (!source.is_empty()).then_some(source),
        route,
        partner,
        received_at_ms: 1_796_601_600_000,
    };
    let output = serde_json::from_str::<Value>(&output_text).unwrap_or(Value::String(output_text));
    let Ok(records) = file_records(&template, &event, &output) else {
        return;
    };
    let root = Path::new(FUZZ_ROOT);
    for record in records {
        let mut relative: Vec<&str> = record.parents.iter().map(String::as_str).collect();
        relative.push(&record.file_name);
        for component in &relative {
            assert!(
                !component.is_empty() && *component != "." && *component != "..",
                "unsafe component {component:?}"
            );
            assert!(!component.contains(['/', '\0']), "component {component:?}");
        }
        // The file sink: the root joined with the components, as `Path`s, stays under the root.
        let mut path = root.to_path_buf();
        path.extend(&relative);
        assert_under(&path, root);
        // The SFTP sink: the remote directory and the components, joined as text.
        let remote = crate::sink::sftp::join(FUZZ_ROOT, &relative);
        assert_under(Path::new(&remote), root);
    }
}

/// `path`, normalised without touching the filesystem, is `root` or below it.
fn assert_under(path: &Path, root: &Path) {
    assert!(path.is_absolute(), "{path:?} is not absolute");
    let mut normal = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                normal.pop();
            }
            Component::CurDir => {}
            other => normal.push(other),
        }
    }
    assert!(normal.starts_with(root), "{path:?} leaves {root:?}");
    assert_eq!(normal, path, "{path:?} is not in normal form");
}

/// Adapter fixture files: parsed and checked as `ess-agent adapter test` does, and a diff of the
/// expectation against the event, as a failing case shows one.
pub fn adapter_fixture(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Fixture::parse(Path::new("adapters/fuzz.tests/case.json"), text) {
        Ok(fixture) => {
            assert!(fixture.input.is_object(), "the input is not an object");
            assert!(
                fixture
                    .bindings
                    .get("partner")
                    .is_some_and(Value::is_string)
            );
            if let Expectation::Value(expected) = &fixture.expectation {
                let want = serde_json::to_string_pretty(expected).unwrap_or_default();
                let got = serde_json::to_string_pretty(&fixture.input).unwrap_or_default();
                let _ = line_diff(&want, &got);
            }
        }
        Err(err) => assert!(!err.to_string().is_empty()),
    }
}

/// The first line (without its `\n`, or a trailing `\r`) and the rest.
fn split_line(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == b'\n') {
        Some(at) => {
            let line = &data[..at];
            (line.strip_suffix(b"\r").unwrap_or(line), &data[at + 1..])
        }
        None => (data, &[]),
    }
}

/// `name: value` lines up to an empty line, then the body. Lines that do not make a valid
/// header are skipped; a name given twice gives two values.
fn header_block(data: &[u8]) -> (HeaderMap, &[u8]) {
    let mut headers = HeaderMap::new();
    let mut rest = data;
    while !rest.is_empty() {
        let (line, tail) = split_line(rest);
        rest = tail;
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii();
        let value = line[colon + 1..].trim_ascii_start();
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    (headers, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fuzz_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
    }

    /// Every file of `dir`, sorted; `None` when the directory does not exist.
    fn files(dir: &Path) -> Option<Vec<PathBuf>> {
        let entries = std::fs::read_dir(dir).ok()?;
        let mut files: Vec<PathBuf> = entries
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.is_file())
            .collect();
        files.sort();
        Some(files)
    }

    fn replay(target: &str, run: Target, files: &[PathBuf]) {
        for file in files {
            let data = std::fs::read(file).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(
                outcome.is_ok(),
                "{target}: {} fails; reproduce with scripts/fuzz {target} and that file",
                file.display()
            );
        }
    }

    #[test]
    fn every_corpus_replays() {
        for (target, run) in TARGETS {
            let dir = fuzz_dir().join("corpus").join(target);
            let corpus = files(&dir).unwrap_or_else(|| panic!("{} is missing", dir.display()));
            assert!(!corpus.is_empty(), "{} is empty", dir.display());
            replay(target, run, &corpus);
        }
    }

    #[test]
    fn every_seed_replays() {
        for (target, run) in TARGETS {
            let dir = fuzz_dir().join("seeds").join(target);
            let seeds = files(&dir).unwrap_or_else(|| panic!("{} is missing", dir.display()));
            assert!(!seeds.is_empty(), "{} is empty", dir.display());
            replay(target, run, &seeds);
        }
    }

    #[test]
    fn every_regression_input_replays() {
        for (target, run) in TARGETS {
            let dir = fuzz_dir().join("regressions").join(target);
            replay(target, run, &files(&dir).unwrap_or_default());
        }
    }

    #[test]
    fn every_target_has_a_fuzz_target_file() {
        for (target, _) in TARGETS {
            let file = fuzz_dir().join("fuzz_targets").join(format!("{target}.rs"));
            assert!(file.is_file(), "{} is missing", file.display());
        }
    }
}

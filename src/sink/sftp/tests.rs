use std::path::Path;

use base64::Engine as _;
use russh::keys::{Algorithm, PublicKey};
use russh_sftp::protocol::Status;
use serde_json::json;

use super::error::*;
use super::host_key::*;
use super::known_hosts::*;
use super::session::*;
use super::upload::*;
use super::*;
use crate::settings::SecretSource;
use crate::sink::SinkSpec;
use crate::sink::template::temp_name;

const KEY_A: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGSITcg/5/KJSvy+tqhuE/Dj0QgPKbkO8/CD+wQQIHz+";
const FP_A: &str = "SHA256:3mNZr9KjcKgxeShM/ff/8Me9fMv6WtDZHDqg+WzTzeI";
const KEY_B: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGdINLD58dIqCDHhHCNCGRFx6WvIn6iH4YLestJ+2L5P";
const FP_B: &str = "SHA256:ty/hJTgVUdHGTxbiQK4s6XN4MR+YJWcjzZC7SaIVrpc";
const KEY_C: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBEZHsP48yyftr4N7X+nkrEcQk8J4wvr4Xzf1OelclvPV9tHBHLcw430KaLmQVRIvCbwum2pob1Xy4WfwAEPtWEQ=";

fn key(line: &str) -> PublicKey {
    PublicKey::from_openssh(line).unwrap()
}

fn event() -> EventMeta {
    EventMeta {
        id: "evt-1".into(),
        event_type: "case.updated".into(),
        version: 1,
        subject: "case-42".into(),
        revision: Some(3),
        source: None,
        route: "courts".into(),
        partner: "p1".into(),
        received_at_ms: 1_796_601_600_000,
    }
}

fn config() -> SftpConfig {
    SftpConfig {
        host: "sftp.partner.example".into(),
        port: 22,
        user: "ess".into(),
        private_key: Some("/etc/ess-agent/id_ed25519".into()),
        private_key_passphrase: None,
        password: None,
        known_hosts: None,
        host_key_fingerprints: vec![FP_A.into()],
        insecure_skip_host_key_verification: false,
        dir: "/upload".into(),
        create_dirs: false,
        name: "{subject}/{id}.xml".into(),
        file_mode: None,
        connect_timeout_ms: default_connect_timeout_ms(),
        timeout_ms: default_timeout_ms(),
        keepalive_secs: default_keepalive_secs(),
        max_concurrent_uploads: default_max_concurrent_uploads(),
        retry: RetryConfig::default(),
    }
}

fn problems(c: &SftpConfig) -> Vec<String> {
    c.validate("sinks.s")
        .into_iter()
        .map(|p| format!("{}: {}", p.key, p.message))
        .collect()
}

/// A sink that logs in with a password from a file (no key file needed).
fn sink(dir: &Path, c: SftpConfig) -> SftpSink {
    let secret = dir.join("password");
    std::fs::write(&secret, "pw").unwrap();
    let c = SftpConfig {
        private_key: None,
        password: Some(SecretSource {
            file: Some(secret),
            env: None,
            credential: None,
        }),
        ..c
    };
    SftpSink::new(&c, "sinks.s").unwrap()
}

#[test]
fn a_complete_configuration_is_valid_and_parses_from_toml() {
    assert_eq!(problems(&config()), Vec::<String>::new());
    let parsed: SftpConfig = toml::from_str(
        r#"
        host = "sftp.partner.example"
        user = "ess"
        private_key = "/etc/ess-agent/id_ed25519"
        host_key_fingerprints = ["SHA256:3mNZr9KjcKgxeShM/ff/8Me9fMv6WtDZHDqg+WzTzeI"]
        dir = "/upload"
        name = "{subject}/{id}.xml"
        "#,
    )
    .unwrap();
    assert_eq!(parsed, config());
    let unknown = toml::from_str::<SftpConfig>(
        "host = \"h\"\nuser = \"u\"\ndir = \"d\"\nname = \"n\"\nstrict = false\n",
    );
    assert!(unknown.unwrap_err().to_string().contains("unknown field"));
}

#[test]
fn host_key_verification_cannot_be_left_out() {
    let mut c = config();
    c.host_key_fingerprints.clear();
    let p = problems(&c);
    assert!(
        p.iter()
            .any(|p| p.starts_with("sinks.s.known_hosts: the server's host key must be verified")),
        "{p:?}"
    );
    c.insecure_skip_host_key_verification = true;
    assert_eq!(problems(&c), Vec::<String>::new());
    c.known_hosts = Some("/etc/ess-agent/known_hosts".into());
    let p = problems(&c);
    assert!(
        p.iter()
            .any(|p| p.contains("insecure_skip_host_key_verification: cannot be combined")),
        "{p:?}"
    );
    // Building refuses it too, whatever validation was run.
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config();
    c.host_key_fingerprints.clear();
    c.private_key = None;
    c.password = Some(SecretSource {
        file: None,
        env: Some("PATH".into()),
        credential: None,
    });
    let e = SftpSink::new(&c, "sinks.s").unwrap_err();
    assert!(e.contains("host key must be verified"), "{e}");
    drop(tmp);
}

#[test]
fn fingerprints_are_checked_as_ssh_keygen_prints_them() {
    assert!(parse_fingerprint(FP_A).is_ok());
    assert_eq!(
        parse_fingerprint(&format!("{FP_A}=")),
        parse_fingerprint(FP_A)
    );
    for bad in [
        "3mNZr9KjcKgxeShM/ff/8Me9fMv6WtDZHDqg+WzTzeI",
        "MD5:aa:bb",
        "SHA256:short",
        "SHA256:!!!",
    ] {
        let e = parse_fingerprint(bad).unwrap_err();
        assert!(
            e.contains(&format!("{bad:?}")) && e.contains("ssh-keygen -lf"),
            "{e}"
        );
    }
    let mut c = config();
    c.host_key_fingerprints.push("SHA1:x".into());
    assert!(
        problems(&c)
            .iter()
            .any(|p| p.starts_with("sinks.s.host_key_fingerprints[1]"))
    );
}

#[test]
fn every_field_is_checked() {
    let mut c = config();
    c.host = "ess@sftp.example".into();
    c.port = 0;
    c.user = String::new();
    c.private_key = None;
    c.private_key_passphrase = Some(SecretSource {
        file: Some("a".into()),
        env: Some("B".into()),
        credential: None,
    });
    c.dir = String::new();
    c.name = "../{id}".into();
    c.file_mode = Some("0999".into());
    c.timeout_ms = 0;
    c.connect_timeout_ms = 0;
    c.max_concurrent_uploads = 0;
    let keys: Vec<String> = problems(&c)
        .iter()
        .map(|p| p.split(':').next().unwrap().to_string())
        .collect();
    for key in [
        "sinks.s.host",
        "sinks.s.port",
        "sinks.s.user",
        "sinks.s.private_key",
        "sinks.s.private_key_passphrase",
        "sinks.s.dir",
        "sinks.s.name",
        "sinks.s.file_mode",
        "sinks.s.timeout_ms",
        "sinks.s.connect_timeout_ms",
        "sinks.s.max_concurrent_uploads",
    ] {
        assert!(keys.iter().any(|k| k == key), "{key} not in {keys:?}");
    }
    let mut c = config();
    c.name = "/abs/{id}".into();
    assert!(problems(&c).iter().any(|p| p.contains("is absolute")));
    c.max_concurrent_uploads = MAX_UPLOADS + 1;
    assert!(
        problems(&c)
            .iter()
            .any(|p| p.starts_with("sinks.s.max_concurrent_uploads"))
    );
}

#[test]
fn known_hosts_matches_plain_bracketed_hashed_and_wildcard_names() {
    // The hashed form of "[10.0.0.5]:2222", as ssh-keygen -H writes it.
    let salt = b"0123456789abcdefghij";
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, salt),
        b"[10.0.0.5]:2222",
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    let hashed = format!("|1|{}|{}", b64.encode(salt), b64.encode(tag.as_ref()));
    let text = format!(
        "# comment\n\
         \n\
         sftp.partner.example,192.0.2.7 {KEY_A} comment here\n\
         [sftp.partner.example]:2222\t{KEY_B}\n\
         {hashed} {KEY_A}\n\
         *.courts.example,!evil.courts.example {KEY_B}\n\
         @cert-authority * {KEY_C}\n\
         garbage line\n\
         bad.example ssh-ed25519 !!!notbase64\n"
    );
    let known = KnownHosts::parse(Path::new("kh"), &text);
    let (a, b, c) = (key(KEY_A), key(KEY_B), key(KEY_C));
    assert_eq!(known.check("sftp.partner.example", 22, &a), Verdict::Known);
    assert_eq!(known.check("SFTP.Partner.Example", 22, &a), Verdict::Known);
    assert_eq!(known.check("192.0.2.7", 22, &a), Verdict::Known);
    // Port 22 entries do not vouch for other ports, and vice versa.
    assert_eq!(
        known.check("sftp.partner.example", 2222, &b),
        Verdict::Known
    );
    assert_eq!(
        known.check("sftp.partner.example", 2222, &a),
        Verdict::Changed(vec![(4, FP_B.into())])
    );
    assert_eq!(known.check("10.0.0.5", 2222, &a), Verdict::Known);
    assert_eq!(known.check("10.0.0.5", 22, &a), Verdict::Unknown);
    assert_eq!(known.check("north.courts.example", 22, &b), Verdict::Known);
    assert_eq!(
        known.check("evil.courts.example", 22, &b),
        Verdict::Unknown,
        "a negated pattern excludes the host"
    );
    // A key of another type than those recorded is unknown, not changed; CA lines are
    // not host keys.
    assert_eq!(
        known.check("sftp.partner.example", 22, &c),
        Verdict::Unknown
    );
    assert_eq!(known.check("anything.example", 22, &c), Verdict::Unknown);
    assert_eq!(
        known.check("sftp.partner.example", 22, &b),
        Verdict::Changed(vec![(3, FP_A.into())])
    );
    assert_eq!(
        known.algorithms("sftp.partner.example", 22),
        [Algorithm::Ed25519]
    );
}

#[test]
fn revoked_keys_are_refused_even_when_listed() {
    let text = format!("h.example {KEY_A}\n@revoked * {KEY_A}\n");
    let known = KnownHosts::parse(Path::new("kh"), &text);
    assert_eq!(
        known.check("h.example", 22, &key(KEY_A)),
        Verdict::Revoked(2)
    );
    assert_eq!(
        known.check("h.example", 22, &key(KEY_B)),
        Verdict::Changed(vec![(1, FP_A.into())])
    );
}

#[test]
fn wildcards_match_like_openssh() {
    use known_hosts::wildcard;
    assert!(wildcard(b"*", b"anything"));
    assert!(wildcard(b"*.example", b"a.b.example"));
    assert!(!wildcard(b"*.example", b"example"));
    assert!(wildcard(b"host?", b"host1"));
    assert!(!wildcard(b"host?", b"host12"));
    assert!(wildcard(b"a*b*c", b"aXXbYYc"));
    assert!(!wildcard(b"a*b*c", b"aXXbYY"));
    assert!(wildcard(b"[h]:*", b"[h]:2222"));
}

fn target() -> Target {
    Target {
        sink: "sinks.s".into(),
        host: "h.example".into(),
        port: 2222,
        user: "ess".into(),
    }
}

#[test]
fn the_policy_accepts_pinned_or_known_keys_and_says_how_to_pin_others() {
    let pins = HostKeyPolicy::Verify {
        known_hosts: None,
        pins: vec![parse_fingerprint(FP_A).unwrap()],
    };
    assert!(pins.check(&target(), &key(KEY_A)).is_ok());
    let e = pins.check(&target(), &key(KEY_B)).unwrap_err();
    assert!(
        e.contains(FP_B) && e.contains(&format!("host_key_fingerprints = [\"{FP_B}\"]")),
        "{e}"
    );
    assert!(e.contains("sftp://ess@h.example:2222"), "{e}");

    let known = KnownHosts::parse(Path::new("/etc/kh"), &format!("[h.example]:2222 {KEY_A}\n"));
    let both = HostKeyPolicy::Verify {
        known_hosts: Some(WatchedKnownHosts::new(known.clone())),
        pins: vec![parse_fingerprint(FP_B).unwrap()],
    };
    assert!(both.check(&target(), &key(KEY_A)).is_ok(), "known");
    assert!(both.check(&target(), &key(KEY_B)).is_ok(), "pinned");
    let only_file = HostKeyPolicy::Verify {
        known_hosts: Some(WatchedKnownHosts::new(known)),
        pins: vec![],
    };
    let e = only_file.check(&target(), &key(KEY_B)).unwrap_err();
    assert!(
        e.contains(FP_B) && e.contains(FP_A) && e.contains("man-in-the-middle"),
        "{e}"
    );
    let e = only_file.check(&target(), &key(KEY_C)).unwrap_err();
    assert!(
        e.contains("unknown") && e.contains("[h.example]:2222"),
        "{e}"
    );
    assert!(
        HostKeyPolicy::Insecure
            .check(&target(), &key(KEY_C))
            .is_ok()
    );
}

#[test]
fn an_edited_known_hosts_file_counts_from_the_next_check_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("known_hosts");
    std::fs::write(&path, format!("[h.example]:2222 {KEY_A}\n")).unwrap();
    let policy = HostKeyPolicy::Verify {
        known_hosts: Some(WatchedKnownHosts::new(KnownHosts::load(&path).unwrap())),
        pins: vec![],
    };
    assert!(policy.check(&target(), &key(KEY_A)).is_ok());
    assert!(policy.check(&target(), &key(KEY_B)).is_err());
    // The server's key changed and the operator recorded the new one.
    std::fs::write(&path, format!("# rotated\n[h.example]:2222 {KEY_B}\n")).unwrap();
    assert!(policy.check(&target(), &key(KEY_B)).is_ok());
    let e = policy.check(&target(), &key(KEY_A)).unwrap_err();
    assert!(e.contains("line 2"), "{e}");
    // An unreadable edit keeps the keys read before.
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    assert!(policy.check(&target(), &key(KEY_B)).is_ok());
}

#[test]
fn known_key_types_are_asked_for_first() {
    let known = KnownHosts::parse(Path::new("kh"), &format!("h.example {KEY_C}\n"));
    let policy = HostKeyPolicy::Verify {
        known_hosts: Some(WatchedKnownHosts::new(known)),
        pins: vec![],
    };
    let algorithms = policy.algorithms("h.example", 22);
    assert_eq!(
        algorithms[0],
        Algorithm::Ecdsa {
            curve: russh::keys::EcdsaCurve::NistP256
        }
    );
    assert!(algorithms.contains(&Algorithm::Ed25519));
    assert_eq!(
        algorithms
            .iter()
            .any(|a| matches!(a, Algorithm::Rsa { .. })),
        cfg!(feature = "sftp-rsa")
    );
}

#[test]
fn temporary_names_are_hidden_stable_per_event_and_distinct_between_events() {
    let e = event();
    let t = temp_name("a.xml", &e, 0);
    assert!(t.starts_with(".a.xml.") && t.ends_with(".tmp"), "{t}");
    assert_eq!(t, temp_name("a.xml", &e, 0), "a retry reuses the name");
    assert_ne!(t, temp_name("a.xml", &e, 1));
    let mut other = event();
    other.id = "evt-2".into();
    assert_ne!(t, temp_name("a.xml", &other, 0));
    let mut other = event();
    other.route = "other".into();
    assert_ne!(t, temp_name("a.xml", &other, 0));
    // Long names are cut on a character boundary so that the whole fits 255 bytes.
    let long = "é".repeat(127);
    let t = temp_name(&long, &e, 0);
    assert!(t.len() <= 222 && t.is_char_boundary(1), "{}", t.len());
}

#[test]
fn planning_renders_names_and_content_and_refuses_escapes_before_anything_is_sent() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sink(
        tmp.path(),
        SftpConfig {
            name: "{subject}/{output.n}.out".into(),
            ..config()
        },
    );
    let out = json!([{"n": "a", "v": 1}, "plain\r\ntext"]);
    let e = s.plan(&event(), &out).unwrap_err();
    assert!(e.to_string().contains("{output.n}"), "{e}");
    let s = sink(
        tmp.path(),
        SftpConfig {
            name: "{subject}/{index}.out".into(),
            ..config()
        },
    );
    let planned = s.plan(&event(), &out).unwrap();
    assert_eq!(planned[0].target, "/upload/case-42/0.out");
    assert_eq!(planned[0].dir, "/upload/case-42");
    assert!(planned[0].temp.starts_with("/upload/case-42/.0.out."));
    assert_eq!(planned[0].content, b"{\"n\":\"a\",\"v\":1}\n");
    assert_eq!(planned[1].content, b"plain\r\ntext");

    let s = sink(
        tmp.path(),
        SftpConfig {
            name: "{output.name}".into(),
            dir: "out/".into(),
            ..config()
        },
    );
    assert_eq!(
        s.plan(&event(), &json!({"name": "x"})).unwrap()[0].target,
        "out/x"
    );
    for bad in [
        "../../etc/passwd",
        "/etc/passwd",
        "a/../../b",
        "a\0b",
        "a\\b",
        "x/./y",
    ] {
        let e = s
            .plan(&event(), &json!([{"name": "fine"}, {"name": bad}]))
            .unwrap_err();
        assert!(!e.is_retryable(), "{bad:?}");
        assert!(
            e.to_string().contains(&format!("{bad:?}")) && e.to_string().contains("record 1"),
            "{e}"
        );
    }
    let e = s
        .plan(&event(), &json!([{"name": "a"}, {"name": "a"}]))
        .unwrap_err();
    assert!(e.to_string().contains("records 0 and 1"), "{e}");
}

fn status(code: StatusCode, message: &str) -> SftpError {
    SftpError::Status(Status {
        id: 1,
        status_code: code,
        error_message: message.into(),
        language_tag: "en-US".into(),
    })
}

#[test]
fn errors_are_classified_by_status_code_and_carry_the_servers_message() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sink(tmp.path(), config());
    let classify = |error: SftpError, missing_is_permanent: bool| {
        s.classify(&OpFailure {
            missing_is_permanent,
            ..OpFailure::new("cannot create", "/upload/.x.tmp", error)
        })
    };
    let e = classify(
        status(StatusCode::PermissionDenied, "Permission denied"),
        false,
    );
    assert!(!e.is_retryable());
    assert!(
        e.to_string().contains("\"Permission denied\"") && e.to_string().contains("/upload/.x.tmp"),
        "{e}"
    );
    let e = classify(status(StatusCode::NoSuchFile, "No such file"), true);
    assert!(
        !e.is_retryable() && e.to_string().contains("create_dirs"),
        "{e}"
    );
    assert!(classify(status(StatusCode::NoSuchFile, "No such file"), false).is_retryable());
    assert!(!classify(status(StatusCode::BadMessage, "Bad message"), false).is_retryable());
    assert!(!classify(status(StatusCode::OpUnsupported, ""), false).is_retryable());
    let e = classify(status(StatusCode::Failure, "Failure"), false);
    assert!(
        e.is_retryable() && e.to_string().contains("\"Failure\""),
        "{e}"
    );
    assert!(classify(SftpError::Timeout, false).is_retryable());
    assert!(classify(SftpError::IO("reset".into()), true).is_retryable());
    assert!(OpFailure::new("x", "y", SftpError::Timeout).is_transport());
    assert!(!OpFailure::new("x", "y", status(StatusCode::Failure, "")).is_transport());
}

#[test]
fn the_debug_output_holds_no_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sink(tmp.path(), config());
    let text = format!("{s:?}");
    assert!(
        text.contains("sftp://ess@sftp.partner.example:22") && !text.contains("pw"),
        "{text}"
    );
}

#[tokio::test]
async fn in_order_sends_every_request_before_waiting_and_keeps_the_order() {
    use std::sync::Mutex as StdMutex;
    let sent = Arc::new(StdMutex::new(Vec::new()));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let rx = Arc::new(tokio::sync::Mutex::new(Some(rx)));
    let requests: Vec<Pending<'_, usize>> = (0..5usize)
        .map(|i| {
            let sent = sent.clone();
            let rx = rx.clone();
            Box::pin(async move {
                sent.lock().unwrap().push(i);
                // The first request's answer only comes once every request is out.
                if i == 0
                    && let Some(rx) = rx.lock().await.take()
                {
                    let _ = rx.await;
                }
                Ok(i)
            }) as Pending<'_, usize>
        })
        .collect();
    let all_sent = {
        let sent = sent.clone();
        async move {
            while sent.lock().unwrap().len() < 5 {
                tokio::task::yield_now().await;
            }
            let _ = tx.send(());
        }
    };
    let (results, ()) = tokio::join!(in_order(requests), all_sent);
    assert_eq!(*sent.lock().unwrap(), [0, 1, 2, 3, 4]);
    let results: Vec<usize> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(results, [0, 1, 2, 3, 4]);
}

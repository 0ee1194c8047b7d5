//! What an attacker or a broken hub sends: broken HTTP framing, forged and malformed signatures,
//! broken envelopes and CloudEvents, admin API abuse, and ids and subjects that try to leave the
//! file sink's directory. After every input the agent must still answer; nothing refused may be
//! stored, nothing acknowledged may be lost, and nothing may be written outside the sink's
//! directory.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use ess_agent::protocol::auth::WebhookSigner;
use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{self, Agent, SECRET, plain, raw_exchange, request, signed_headers, unix_now};

const EVENTS: &str = "/v1/events";
const ADMIN_TOKEN: &str = "admin-token-for-the-hostile-test";

/// What a case may be answered with.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// A 4xx (over HTTP), or for raw bytes a 4xx or a closed connection.
    Refused,
    /// This exact status.
    Status(u16),
    /// Any status below 500: the input is odd but may be valid.
    NoServerError,
}

enum Input {
    /// Bytes written as they are to the ingress listener.
    Raw(Vec<u8>),
    /// A request to the ingress listener.
    Ingress {
        method: Method,
        path: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// A request to the admin listener.
    Admin {
        method: Method,
        path: String,
        token: bool,
    },
}

struct Case {
    name: String,
    input: Input,
    expect: Expect,
}

fn case(name: impl Into<String>, input: Input, expect: Expect) -> Case {
    Case {
        name: name.into(),
        input,
        expect,
    }
}

fn raw(bytes: impl AsRef<[u8]>) -> Input {
    Input::Raw(bytes.as_ref().to_vec())
}

/// A request to `/v1/events` with `headers` (content type included when wanted).
fn post(headers: Vec<(String, String)>, body: impl Into<Vec<u8>>) -> Input {
    Input::Ingress {
        method: Method::POST,
        path: EVENTS.into(),
        headers,
        body: body.into(),
    }
}

fn owned(headers: Vec<(&'static str, String)>) -> Vec<(String, String)> {
    headers
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

/// A correctly signed delivery of `body` under webhook id `msg_id`.
fn signed(msg_id: &str, body: impl Into<Vec<u8>>) -> Input {
    let body = body.into();
    post(owned(signed_headers(msg_id, unix_now(), &body)), body)
}

/// A correctly signed delivery with another content type.
fn signed_as(msg_id: &str, content_type: &str, extra: &[(&str, &str)], body: &[u8]) -> Input {
    let mut headers: Vec<(String, String)> = owned(signed_headers(msg_id, unix_now(), body))
        .into_iter()
        .filter(|(k, _)| k != "content-type")
        .collect();
    headers.push(("content-type".into(), content_type.into()));
    for (k, v) in extra {
        headers.push(((*k).into(), (*v).into()));
    }
    post(headers, body.to_vec())
}

fn envelope(id: &str, fields: Value) -> Vec<u8> {
    let mut event = json!({"id": id, "version": 1, "type": "rule.updated", "subject": "S", "payload": {"n": 1}});
    for (k, v) in fields.as_object().unwrap() {
        if v.is_null() {
            event.as_object_mut().unwrap().remove(k);
        } else {
            event[k] = v.clone();
        }
    }
    serde_json::to_vec(&event).unwrap()
}

/// A raw HTTP/1.1 request carrying a correctly signed body.
fn raw_signed(id: &str, body: &[u8]) -> Vec<u8> {
    [support::signed_head(id, body).as_bytes(), body].concat()
}

/// Signature headers as given, with a JSON content type.
fn h(id: &str, ts: String, sig: String) -> Vec<(String, String)> {
    vec![
        ("content-type".to_owned(), "application/json".to_owned()),
        ("webhook-id".to_owned(), id.to_owned()),
        ("webhook-timestamp".to_owned(), ts),
        ("webhook-signature".to_owned(), sig),
    ]
}

/// The test secret's signature.
fn sign(id: &str, timestamp: i64, body: &[u8]) -> String {
    WebhookSigner::new(SECRET)
        .unwrap()
        .sign(id, timestamp, body)
}

/// A signature made with a secret the agent does not hold.
fn sign_other(id: &str, timestamp: i64, body: &[u8]) -> String {
    WebhookSigner::new("whsec_QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=")
        .unwrap()
        .sign(id, timestamp, body)
}

fn framing() -> Vec<Case> {
    let mut cases = Vec::new();
    let body = envelope("frame-smuggled", json!({}));
    let heads: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\x00\x01\x02\x03\xff\xfe\r\n\r\n".to_vec()),
        ("lone CRLFs", b"\r\n\r\n\r\n\r\n".to_vec()),
        ("bare LF line ends", b"POST /v1/events HTTP/1.1\nHost: a\n\n".to_vec()),
        ("HTTP/0.9", b"GET /\r\n".to_vec()),
        ("HTTP/2.0 in an HTTP/1 line", b"POST /v1/events HTTP/2.0\r\nHost: a\r\n\r\n".to_vec()),
        ("HTTP/1.2", b"POST /v1/events HTTP/1.2\r\nHost: a\r\n\r\n".to_vec()),
        ("lower-case version", b"POST /v1/events http/1.1\r\nHost: a\r\n\r\n".to_vec()),
        ("no target", b"POST HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
        ("space in target", b"POST /v1/ev ents HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
        ("NUL in target", b"POST /v1/events\x00 HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
        ("absolute-form target", b"POST http://evil.example/v1/events HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n".to_vec()),
        ("asterisk target", b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
        ("CONNECT", b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n".to_vec()),
        ("TRACE", b"TRACE /v1/events HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
        ("unknown method", b"BREW /v1/events HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
        ("method with a control character", b"PO\x01ST /v1/events HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
        ("space before a colon", b"POST /v1/events HTTP/1.1\r\nHost : a\r\n\r\n".to_vec()),
        ("obsolete line folding", b"POST /v1/events HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\nContent-Length: 0\r\n\r\n".to_vec()),
        ("header without a colon", b"POST /v1/events HTTP/1.1\r\nHost a\r\n\r\n".to_vec()),
        ("header name with a space", b"POST /v1/events HTTP/1.1\r\nX A: b\r\n\r\n".to_vec()),
        ("DEL in a header value", b"POST /v1/events HTTP/1.1\r\nHost: a\x7fb\r\n\r\n".to_vec()),
        ("two content lengths that differ", b"POST /v1/events HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec()),
        ("negative content length", b"POST /v1/events HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n".to_vec()),
        ("content length with a plus", b"POST /v1/events HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello".to_vec()),
        ("hex content length", b"POST /v1/events HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n".to_vec()),
        ("content length beyond u64", b"POST /v1/events HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n".to_vec()),
        ("content length beyond the body limit", b"POST /v1/events HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000000\r\n\r\n".to_vec()),
        ("chunked with a bad size", b"POST /v1/events HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec()),
        ("chunked with a huge size", b"POST /v1/events HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nhello\r\n0\r\n\r\n".to_vec()),
        ("chunked then identity", b"POST /v1/events HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n".to_vec()),
        ("unknown transfer coding", b"POST /v1/events HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec()),
        ("transfer coding in HTTP/1.0", b"POST /v1/events HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec()),
        ("chunk extension flood", format!("POST /v1/events HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;{}\r\nhello\r\n0\r\n\r\n", "x=y;".repeat(20_000)).into_bytes()),
        ("trailer flood", format!("POST /v1/events HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n{}\r\n", "X-T: v\r\n".repeat(5_000)).into_bytes()),
        ("very long target", format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(70_000)).into_bytes()),
        ("very long header", format!("GET / HTTP/1.1\r\nHost: a\r\nX-L: {}\r\n\r\n", "a".repeat(500_000)).into_bytes()),
        ("many headers", format!("GET / HTTP/1.1\r\nHost: a\r\n{}\r\n", "X-H: v\r\n".repeat(300)).into_bytes()),
        ("expect 100-continue for a huge body", b"POST /v1/events HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 999999999\r\n\r\n".to_vec()),
        ("unknown expectation", b"POST /v1/events HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\nContent-Length: 0\r\n\r\n".to_vec()),
        ("upgrade to websocket", b"GET /v1/events HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".to_vec()),
        ("h2c upgrade", b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n".to_vec()),
        ("HTTP/2 preface then garbage", [&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..], &[0xff; 64][..]].concat()),
        ("HTTP/2 frame larger than allowed", [&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"[..], &b"\xff\xff\xff\x00\x00\x00\x00\x00\x01"[..]].concat()),
        ("HTTP/2 headers on stream 0", [&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"[..], &b"\x00\x00\x01\x01\x05\x00\x00\x00\x00\x82"[..]].concat()),
        ("HTTP/2 settings flood", [&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..], &b"\x00\x00\x00\x04\x00\x00\x00\x00\x00".repeat(2_000)[..]].concat()),
        ("HTTP/2 RST flood", [&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"[..], &(1u32..2000).step_by(2).flat_map(|s| { let mut f = b"\x00\x00\x04\x03\x00".to_vec(); f.extend_from_slice(&s.to_be_bytes()); f.extend_from_slice(&[0, 0, 0, 8]); f }).collect::<Vec<u8>>()[..]].concat()),
        ("TLS ClientHello on the plain port", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03".to_vec()),
        // Request smuggling: a second request hidden in the first one's body or length.
        ("CL and TE together", [format!("POST /v1/events HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 5).as_bytes(), &raw_signed("frame-smuggled", &body)[..]].concat()),
        ("TE with a leading space", b"POST /v1/events HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:  chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n".to_vec()),
        ("TE obfuscated", b"POST /v1/events HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\nContent-Length: 3\r\n\r\nabc".to_vec()),
    ];
    for (name, bytes) in heads {
        cases.push(case(
            format!("framing: {name}"),
            raw(bytes),
            Expect::Refused,
        ));
    }
    // Pipelined: an unsigned request followed by a signed one on one connection: the first is
    // refused, the second acknowledged, and only the second is stored (checked at the end).
    let good = envelope("frame-pipelined", json!({}));
    cases.push(case(
        "framing: pipelined unsigned then signed",
        raw(
            [
                &b"POST /v1/events HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"[..],
                &raw_signed("frame-pipelined", &good)[..],
            ]
            .concat(),
        ),
        Expect::NoServerError,
    ));
    cases
}

fn authentication() -> Vec<Case> {
    let mut cases = Vec::new();
    let signer = WebhookSigner::new(SECRET).unwrap();
    let now = unix_now();
    let mut n = 0;
    let mut next = || {
        n += 1;
        format!("auth-{n}")
    };
    // (name, id header, timestamp header, signature header); the body's id is the case's id.
    type Variant = Box<dyn Fn(&str, &[u8]) -> Vec<(String, String)>>;
    let variants: Vec<(&str, Variant)> = vec![
        (
            "no signature headers",
            Box::new(|_, _| vec![("content-type".into(), "application/json".into())]),
        ),
        (
            "another secret",
            Box::new(move |id, b| h(id, now.to_string(), sign_other(id, now, b))),
        ),
        (
            "signature over another body",
            Box::new(move |id, _| h(id, now.to_string(), sign(id, now, b"{}"))),
        ),
        (
            "signature over another id",
            Box::new(move |id, b| h(id, now.to_string(), sign("someone-else", now, b))),
        ),
        (
            "signature for another timestamp",
            Box::new(move |id, b| h(id, now.to_string(), sign(id, now - 1, b))),
        ),
        (
            "stale timestamp",
            Box::new(move |id, b| h(id, (now - 3600).to_string(), sign(id, now - 3600, b))),
        ),
        (
            "future timestamp",
            Box::new(move |id, b| h(id, (now + 3600).to_string(), sign(id, now + 3600, b))),
        ),
        (
            "timestamp zero",
            Box::new(move |id, b| h(id, "0".into(), sign(id, 0, b))),
        ),
        (
            "negative timestamp",
            Box::new(move |id, b| h(id, "-1".into(), sign(id, -1, b))),
        ),
        (
            "timestamp beyond i64",
            Box::new(|id, _| h(id, "99999999999999999999999".into(), "v1,AAAA".into())),
        ),
        (
            "timestamp in milliseconds",
            Box::new(move |id, b| h(id, (now * 1000).to_string(), sign(id, now * 1000, b))),
        ),
        (
            "timestamp with a fraction",
            Box::new(move |id, _| h(id, format!("{now}.5"), "v1,AAAA".into())),
        ),
        (
            "timestamp with spaces",
            Box::new(move |id, _| h(id, format!(" {now} "), "v1,AAAA".into())),
        ),
        (
            "empty signature",
            Box::new(move |id, _| h(id, now.to_string(), String::new())),
        ),
        (
            "version only",
            Box::new(move |id, _| h(id, now.to_string(), "v1".into())),
        ),
        (
            "version and comma only",
            Box::new(move |id, _| h(id, now.to_string(), "v1,".into())),
        ),
        (
            "unknown version",
            Box::new(move |id, b| {
                h(
                    id,
                    now.to_string(),
                    sign(id, now, b).replacen("v1,", "v9,", 1),
                )
            }),
        ),
        (
            "v1a with an HMAC",
            Box::new(move |id, b| {
                h(
                    id,
                    now.to_string(),
                    sign(id, now, b).replacen("v1,", "v1a,", 1),
                )
            }),
        ),
        (
            "bad base64",
            Box::new(move |id, _| h(id, now.to_string(), "v1,!!!not base64!!!".into())),
        ),
        (
            "truncated signature",
            Box::new(move |id, b| {
                let mut sig = sign(id, now, b);
                sig.truncate(20);
                h(id, now.to_string(), sig)
            }),
        ),
        (
            "signature with an extra byte",
            Box::new(move |id, b| {
                let sig = sign(id, now, b);
                h(
                    id,
                    now.to_string(),
                    format!("{}A=", sig.trim_end_matches('=')),
                )
            }),
        ),
        (
            "url-safe base64",
            Box::new(move |id, b| {
                h(
                    id,
                    now.to_string(),
                    sign(id, now, b).replace('+', "-").replace('/', "_"),
                )
            }),
        ),
        (
            "huge signature",
            Box::new(move |id, _| h(id, now.to_string(), format!("v1,{}", "A".repeat(100_000)))),
        ),
        (
            "thousands of wrong entries",
            Box::new(move |id, _| {
                h(
                    id,
                    now.to_string(),
                    vec!["v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="; 2_000].join(" "),
                )
            }),
        ),
        (
            "empty id header",
            Box::new(move |_, b| h("", now.to_string(), sign("", now, b))),
        ),
        (
            "bearer instead of a signature",
            Box::new(|_, _| {
                vec![
                    ("content-type".into(), "application/json".into()),
                    ("authorization".into(), "Bearer anything".into()),
                ]
            }),
        ),
        (
            "svix and webhook headers that disagree",
            Box::new(move |id, b| {
                let mut v = h(id, now.to_string(), "v1,AAAA".into());
                v.push(("svix-id".into(), id.into()));
                v.push(("svix-timestamp".into(), now.to_string()));
                v.push(("svix-signature".into(), sign(id, now, b)));
                v
            }),
        ),
    ];
    for (name, variant) in variants {
        let id = next();
        let body = envelope(&id, json!({}));
        let headers = variant(&id, &body);
        // The URL-safe alphabet differs from the standard one only where a signature has a
        // '+' or '/', and many have neither.
        let expect = if name == "url-safe base64" {
            Expect::NoServerError
        } else {
            Expect::Status(401)
        };
        cases.push(case(format!("auth: {name}"), post(headers, body), expect));
    }
    // A signature made for one body cannot be replayed with another body under the same id:
    // the first is accepted, the altered copy refused, the same copy is a duplicate.
    let id = next();
    let body = envelope(&id, json!({}));
    let headers = owned(signed_headers(&id, now, &body));
    cases.push(case(
        "auth: original delivery",
        post(headers.clone(), body.clone()),
        Expect::Status(202),
    ));
    cases.push(case(
        "auth: replay with an altered body",
        post(headers.clone(), envelope(&id, json!({"payload": {"n": 2}}))),
        Expect::Status(401),
    ));
    cases.push(case(
        "auth: replay as it was",
        post(headers, body),
        Expect::Status(200),
    ));
    // Valid signatures in odd but legal places are accepted.
    let id = next();
    let body = envelope(&id, json!({}));
    let good = signer.sign(&id, now, &body);
    cases.push(case(
        "auth: the valid entry after wrong ones",
        post(
            h(
                &id,
                now.to_string(),
                format!("v1,AAAA v1a,BBBB v2,CCCC {good}"),
            ),
            body,
        ),
        Expect::Status(202),
    ));
    let id = next();
    let body = envelope(&id, json!({}));
    let mut svix = vec![("content-type".to_owned(), "application/json".to_owned())];
    svix.extend(
        signer
            .headers(&id, now, &body)
            .into_iter()
            .map(|(k, v)| (k.replace("webhook", "svix"), v)),
    );
    cases.push(case(
        "auth: svix header names",
        post(svix, body),
        Expect::Status(202),
    ));
    cases
}

fn envelopes() -> Vec<Case> {
    let mut cases = Vec::new();
    let mut n = 0;
    let mut next = || {
        n += 1;
        format!("env-{n}")
    };
    let bad_bodies: Vec<(&str, Vec<u8>)> = vec![
        ("empty body", Vec::new()),
        ("whitespace", b"   \n\t ".to_vec()),
        ("null", b"null".to_vec()),
        ("a number", b"42".to_vec()),
        ("a string", b"\"event\"".to_vec()),
        (
            "an array of events",
            format!(
                "[{}]",
                String::from_utf8(envelope("arr", json!({}))).unwrap()
            )
            .into_bytes(),
        ),
        (
            "truncated",
            b"{\"id\": \"x\", \"version\": 1, \"payload\": {".to_vec(),
        ),
        (
            "trailing garbage",
            [envelope("tg", json!({})), b"garbage".to_vec()].concat(),
        ),
        (
            "two objects",
            [envelope("two-a", json!({})), envelope("two-b", json!({}))].concat(),
        ),
        (
            "invalid UTF-8",
            b"{\"id\": \"\xff\xfe\", \"version\": 1, \"payload\": {}}".to_vec(),
        ),
        (
            "a lone surrogate",
            b"{\"id\": \"\\ud800\", \"version\": 1, \"payload\": {}}".to_vec(),
        ),
        (
            "a BOM",
            [&b"\xef\xbb\xbf"[..], &envelope("bom", json!({}))[..]].concat(),
        ),
        (
            "NaN",
            b"{\"id\": \"nan\", \"version\": NaN, \"payload\": {}}".to_vec(),
        ),
        (
            "comments",
            b"{\"id\": \"c\", /* x */ \"version\": 1, \"payload\": {}}".to_vec(),
        ),
        (
            "single quotes",
            b"{'id': 'q', 'version': 1, 'payload': {}}".to_vec(),
        ),
        (
            "nesting far too deep",
            format!(
                "{{\"id\": \"deep\", \"version\": 1, \"payload\": {}1{}}}",
                "[".repeat(100_000),
                "]".repeat(100_000)
            )
            .into_bytes(),
        ),
        (
            "unbalanced nesting",
            format!(
                "{{\"id\": \"ub\", \"version\": 1, \"payload\": {}",
                "[".repeat(10_000)
            )
            .into_bytes(),
        ),
    ];
    for (name, body) in bad_bodies {
        let id = next();
        cases.push(case(
            format!("envelope: {name}"),
            signed(&id, body),
            Expect::Status(400),
        ));
    }
    let bad_fields: Vec<(&str, Value)> = vec![
        ("no id", json!({"id": null})),
        ("empty id", json!({"id": ""})),
        ("id of 201 characters", json!({"id": "a".repeat(201)})),
        ("numeric id", json!({"id": 7})),
        ("id with a newline", json!({"id": "a\nb"})),
        ("id with a NUL", json!({"id": "a\u{0}b"})),
        ("id with a DEL", json!({"id": "a\u{7f}b"})),
        ("id with non-ASCII", json!({"id": "événement"})),
        ("no version", json!({"version": null})),
        ("version zero", json!({"version": 0})),
        ("negative version", json!({"version": -1})),
        ("version as a string", json!({"version": "1"})),
        ("fractional version", json!({"version": 1.5})),
        (
            "version 2^63",
            json!({"version": 9_223_372_036_854_775_808u64}),
        ),
        (
            "version 2^64",
            serde_json::from_str::<Value>("{\"version\": 18446744073709551616}").unwrap(),
        ),
        (
            "version 1e3",
            serde_json::from_str::<Value>("{\"version\": 1e3}").unwrap(),
        ),
        ("negative revision", json!({"revision": -1})),
        (
            "revision 2^63",
            json!({"revision": 9_223_372_036_854_775_808u64}),
        ),
        ("revision as a string", json!({"revision": "7"})),
        ("no payload", json!({"payload": null})),
        ("type as a number", json!({"type": 5})),
        ("subject as an object", json!({"subject": {"a": 1}})),
        ("time that is not RFC 3339", json!({"time": "yesterday"})),
        ("time as a number", json!({"time": 1_700_000_000})),
        ("source as an array", json!({"source": ["a"]})),
    ];
    for (name, fields) in bad_fields {
        let id = next();
        let body = envelope(&id, fields);
        cases.push(case(
            format!("envelope: {name}"),
            signed(&id, body),
            Expect::Status(400),
        ));
    }
    // Valid, if unusual: accepted.
    let odd: Vec<(&str, Value)> = vec![
        (
            "unknown top-level fields",
            json!({"x-extra": {"a": [1, 2]}, "__proto__": {"polluted": true}}),
        ),
        ("id of 200 characters", json!({})),
        ("revision 2^63-1", json!({"revision": i64::MAX})),
        ("version 2^63-1", json!({"version": i64::MAX})),
        ("payload null", json!({})),
        (
            "payload a large string",
            json!({"payload": "x".repeat(200_000)}),
        ),
        (
            "payload with every escape",
            json!({"payload": "\u{0}\u{1f}\"\\/\u{2028}\u{2029}\u{fffd}😀"}),
        ),
        (
            "payload nested 60 deep",
            serde_json::from_str::<Value>(&format!(
                "{{\"payload\": {}1{}}}",
                "[".repeat(60),
                "]".repeat(60)
            ))
            .unwrap(),
        ),
        (
            "payload with a huge integer",
            serde_json::from_str::<Value>("{\"payload\": {\"n\": 123456789012345678901234567890}}")
                .unwrap(),
        ),
        ("subject with unicode", json!({"subject": "RULE-Ω-😀"})),
        ("empty type", json!({"type": ""})),
        ("empty subject", json!({"subject": ""})),
    ];
    for (name, fields) in odd {
        let id = if name == "id of 200 characters" {
            format!("env-long-{}", "a".repeat(191))
        } else {
            next()
        };
        let mut body = envelope(&id, fields);
        if name == "payload null" {
            let mut v: Value = serde_json::from_slice(&body).unwrap();
            v["payload"] = Value::Null;
            body = serde_json::to_vec(&v).unwrap();
        }
        cases.push(case(
            format!("envelope: {name}"),
            signed(&id, body),
            Expect::Status(202),
        ));
    }
    // Duplicate keys: whichever the parser keeps, it must be stored consistently or refused.
    let id = next();
    let body =
        format!("{{\"id\": \"{id}\", \"id\": \"{id}-2\", \"version\": 1, \"payload\": {{}}}}");
    cases.push(case(
        "envelope: duplicate id key",
        signed(&id, body),
        Expect::NoServerError,
    ));
    // Content types.
    for (name, ct) in [
        ("text/plain", "text/plain"),
        ("no content type", ""),
        ("form", "application/x-www-form-urlencoded"),
        ("xml", "application/xml"),
        ("multipart", "multipart/form-data; boundary=x"),
    ] {
        let id = next();
        let body = envelope(&id, json!({}));
        cases.push(case(
            format!("envelope: content type {name}"),
            signed_as(&id, ct, &[], &body),
            Expect::Refused,
        ));
    }
    // Wrong methods and paths on the ingress listener.
    for (method, path) in [
        (Method::GET, EVENTS),
        (Method::PUT, EVENTS),
        (Method::DELETE, EVENTS),
        (Method::PATCH, EVENTS),
        (Method::POST, "/v1/events/"),
        (Method::POST, "/v1/events/../events"),
        (Method::POST, "/v1/%65vents"),
        (Method::POST, "//v1/events"),
        (Method::POST, "/V1/EVENTS"),
        (Method::POST, "/v1/dead-letters"),
        (Method::GET, "/metrics"),
    ] {
        let id = next();
        let body = envelope(&id, json!({}));
        cases.push(case(
            format!("ingress: {method} {path}"),
            Input::Ingress {
                method,
                path: path.into(),
                headers: owned(signed_headers(&id, unix_now(), &body)),
                body,
            },
            Expect::Refused,
        ));
    }
    cases
}

fn cloudevents() -> Vec<Case> {
    let mut cases = Vec::new();
    let mut n = 0;
    let mut next = || {
        n += 1;
        format!("ce-{n}")
    };
    let structured = |id: &str, fields: Value| {
        let mut event = json!({"specversion": "1.0", "id": id, "type": "rule.updated", "source": "hub", "subject": "S", "data": {"n": 1}});
        for (k, v) in fields.as_object().unwrap() {
            if v.is_null() {
                event.as_object_mut().unwrap().remove(k);
            } else {
                event[k] = v.clone();
            }
        }
        serde_json::to_vec(&event).unwrap()
    };
    let bad: Vec<(&str, Value)> = vec![
        ("no specversion", json!({"specversion": null})),
        ("specversion 0.3", json!({"specversion": "0.3"})),
        ("specversion 2.0", json!({"specversion": "2.0"})),
        ("numeric specversion", json!({"specversion": 1.0})),
        ("no id", json!({"id": null})),
        ("empty id", json!({"id": ""})),
        ("no type", json!({"type": null})),
        ("no source", json!({"source": null})),
        ("dataversion zero", json!({"dataversion": 0})),
        (
            "dataversion 2^63",
            json!({"dataversion": 9_223_372_036_854_775_808u64}),
        ),
        ("dataversion as a word", json!({"dataversion": "two"})),
        (
            "revision 2^63",
            json!({"revision": 9_223_372_036_854_775_808u64}),
        ),
        ("negative revision", json!({"revision": -5})),
        (
            "data_base64 that is not base64",
            json!({"data": null, "data_base64": "!!!"}),
        ),
        ("both data and data_base64", json!({"data_base64": "e30="})),
        ("id with a control character", json!({"id": "a\u{1}b"})),
    ];
    for (name, fields) in bad {
        let id = next();
        let body = structured(&id, fields);
        cases.push(case(
            format!("cloudevents structured: {name}"),
            signed_as(&id, "application/cloudevents+json", &[], &body),
            Expect::Status(400),
        ));
    }
    let id = next();
    let body = structured(
        &id,
        json!({"dataversion": 2, "revision": 4, "x-ext": "kept"}),
    );
    cases.push(case(
        "cloudevents structured: extensions",
        signed_as(&id, "application/cloudevents+json", &[], &body),
        Expect::Status(202),
    ));
    let batch = format!(
        "[{}]",
        String::from_utf8(structured("ce-batch", json!({}))).unwrap()
    );
    let id = next();
    cases.push(case(
        "cloudevents: batch mode",
        signed_as(
            &id,
            "application/cloudevents-batch+json",
            &[],
            batch.as_bytes(),
        ),
        Expect::Refused,
    ));
    // Binary mode: the attributes are headers.
    let binary_bad: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (
            "no ce-specversion",
            vec![("ce-type", "rule.updated"), ("ce-source", "hub")],
        ),
        (
            "ce-specversion 9.9",
            vec![
                ("ce-specversion", "9.9"),
                ("ce-type", "rule.updated"),
                ("ce-source", "hub"),
            ],
        ),
        (
            "no ce-type",
            vec![("ce-specversion", "1.0"), ("ce-source", "hub")],
        ),
        (
            "no ce-source",
            vec![("ce-specversion", "1.0"), ("ce-type", "rule.updated")],
        ),
        (
            "ce-dataversion 2^63",
            vec![
                ("ce-specversion", "1.0"),
                ("ce-type", "t"),
                ("ce-source", "hub"),
                ("ce-dataversion", "9223372036854775808"),
            ],
        ),
        (
            "ce-dataversion negative",
            vec![
                ("ce-specversion", "1.0"),
                ("ce-type", "t"),
                ("ce-source", "hub"),
                ("ce-dataversion", "-2"),
            ],
        ),
        (
            "ce-dataversion with spaces",
            vec![
                ("ce-specversion", "1.0"),
                ("ce-type", "t"),
                ("ce-source", "hub"),
                ("ce-dataversion", "1 2"),
            ],
        ),
        (
            "ce-revision 2^64",
            vec![
                ("ce-specversion", "1.0"),
                ("ce-type", "t"),
                ("ce-source", "hub"),
                ("ce-revision", "18446744073709551616"),
            ],
        ),
        (
            "ce-revision as a word",
            vec![
                ("ce-specversion", "1.0"),
                ("ce-type", "t"),
                ("ce-source", "hub"),
                ("ce-revision", "seven"),
            ],
        ),
        (
            "ce-time that is not a time",
            vec![
                ("ce-specversion", "1.0"),
                ("ce-type", "t"),
                ("ce-source", "hub"),
                ("ce-time", "noon"),
            ],
        ),
        (
            "percent-encoded garbage in ce-subject",
            vec![
                ("ce-specversion", "1.0"),
                ("ce-type", "t"),
                ("ce-source", "hub"),
                ("ce-subject", "%ff%fe%"),
            ],
        ),
    ];
    for (name, headers) in binary_bad {
        let id = next();
        let mut with_id = headers.clone();
        with_id.push(("ce-id", &id));
        cases.push(case(
            format!("cloudevents binary: {name}"),
            signed_as(&id, "application/json", &with_id, b"{\"n\": 1}"),
            Expect::Status(400),
        ));
    }
    for (name, body) in [
        ("body not JSON", &b"{not json"[..]),
        ("empty body", &b""[..]),
    ] {
        let id = next();
        cases.push(case(
            format!("cloudevents binary: {name}"),
            signed_as(
                &id,
                "application/json",
                &[
                    ("ce-specversion", "1.0"),
                    ("ce-type", "t"),
                    ("ce-source", "hub"),
                    ("ce-id", &id),
                ],
                body,
            ),
            Expect::NoServerError,
        ));
    }
    let id = next();
    cases.push(case(
        "cloudevents binary: ce-id differs from webhook-id",
        signed_as(
            &id,
            "application/json",
            &[
                ("ce-specversion", "1.0"),
                ("ce-type", "rule.updated"),
                ("ce-source", "hub"),
                ("ce-id", "ce-other"),
                ("ce-subject", "S"),
            ],
            b"{\"n\": 1}",
        ),
        Expect::NoServerError,
    ));
    cases
}

fn names() -> Vec<Case> {
    // Ids and subjects that would leave the sink's directory if used as paths; the file sink
    // names files "{subject}/{id}.json". Each is accepted or refused, and nothing is written
    // outside the sink's directory (checked at the end).
    let hostile = [
        "../pwned",
        "../../pwned",
        "..",
        ".",
        "/etc/pwned",
        "a/../../pwned",
        "..\\..\\pwned",
        "%2e%2e%2fpwned",
        "....//pwned",
        "./../pwned",
        "~/pwned",
        "$(touch pwned)",
        "`touch pwned`",
        "pwned;rm -rf /",
        "pwned|id",
        "pwned\"quote",
        "pwned*?[]",
        "-pwned",
        ".pwned",
        "pwned:stream",
        "CON",
        "pwned/",
        "//pwned",
    ];
    let mut cases = Vec::new();
    for (i, name) in hostile.iter().enumerate() {
        let id = format!("name-id-{i}-{name}");
        let body = envelope(&id, json!({}));
        cases.push(case(
            format!("names: id {name:?}"),
            signed(&id, body),
            Expect::NoServerError,
        ));
        let id = format!("name-subject-{i}");
        let body = envelope(&id, json!({"subject": name}));
        cases.push(case(
            format!("names: subject {name:?}"),
            signed(&id, body),
            Expect::NoServerError,
        ));
    }
    cases
}

fn admin() -> Vec<Case> {
    let mut cases = Vec::new();
    let paths = [
        (Method::GET, "/v1/events/..%2f..%2fetc%2fpasswd", true),
        (Method::GET, "/v1/events/%00", true),
        (Method::GET, "/v1/events/%ff%fe", true),
        (Method::GET, "/v1/events/%", true),
        (Method::GET, "/v1/events/%zz", true),
        (Method::GET, "/v1/events/", true),
        (Method::GET, "/v1/events/a/b/c", true),
        (Method::GET, "/v1/events/no-such-event", true),
        (Method::POST, "/v1/events/no-such-event/replay", true),
        (
            Method::POST,
            "/v1/events/no-such-event/replay?force=true&force=false",
            true,
        ),
        (Method::POST, "/v1/dead-letters/no-such-event/retry", true),
        (Method::DELETE, "/v1/dead-letters/no-such-event", true),
        (Method::DELETE, "/v1/dead-letters/%2e%2e", true),
        (Method::GET, "/v1/dead-letters?limit=-1", true),
        (
            Method::GET,
            "/v1/dead-letters?limit=99999999999999999999",
            true,
        ),
        (Method::GET, "/v1/dead-letters?limit=abc&after=%00", true),
        (
            Method::GET,
            "/v1/dead-letters?after=%27%20OR%201=1%20--",
            true,
        ),
        (Method::GET, "/v1/events/%27%20OR%20%271%27=%271", true),
        (
            Method::GET,
            "/v1/events/x%27;%20DROP%20TABLE%20events;%20--",
            true,
        ),
        (Method::PUT, "/v1/events/auth-1", true),
        (Method::GET, "/v1/../../etc/passwd", true),
        (Method::GET, "/v1/events/auth-1", false),
        (Method::POST, "/v1/events/auth-1/replay?force=true", false),
        (Method::DELETE, "/v1/dead-letters/auth-1", false),
        (Method::GET, "/v1/dead-letters", false),
        (Method::GET, "/v1/adapters", false),
        (Method::GET, "/nope", true),
        (Method::POST, "/healthz", true),
    ];
    let long = format!("/v1/events/{}", "a".repeat(60_000));
    for (method, path, token) in paths
        .into_iter()
        .chain([(Method::GET, long.as_str(), true)])
    {
        let expect = Expect::Refused;
        cases.push(case(
            format!("admin: {method} {path:.80} (token: {token})"),
            Input::Admin {
                method,
                path: path.to_owned(),
                token,
            },
            expect,
        ));
    }
    cases
}

/// Where the agent listens.
#[derive(Clone, Copy)]
struct Ports {
    ingress: std::net::SocketAddr,
    admin: std::net::SocketAddr,
}

impl Ports {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ingress)
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }
}

/// The ids a text of answers acknowledges (`"ack":"<id>"`).
fn acks_in(text: &str) -> Vec<String> {
    text.match_indices("\"ack\":\"")
        .filter_map(|(i, m)| {
            let rest = &text[i + m.len()..];
            Some(rest[..rest.find('"')?].to_owned())
        })
        .collect()
}

/// Sends one case and checks its answer; returns the HTTP status when there was one, and the
/// ids the answers acknowledged.
async fn run(agent: Ports, c: &Case) -> (Option<u16>, Vec<String>) {
    let mut acks = Vec::new();
    let status = match &c.input {
        Input::Raw(bytes) => {
            let answer = raw_exchange(agent.ingress, &[bytes]).await;
            // Every status line in the answer (pipelined requests have several).
            let statuses: Vec<u16> = answer
                .match_indices("HTTP/1.1 ")
                .filter_map(|(i, _)| answer.get(i + 9..i + 12)?.parse().ok())
                .collect();
            for s in &statuses {
                assert!(*s < 500, "{}: server error: {answer:.400}", c.name);
            }
            acks = acks_in(&answer);
            statuses.last().copied()
        }
        Input::Ingress {
            method,
            path,
            headers,
            body,
        } => {
            let headers: Vec<(&str, String)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.clone()))
                .collect();
            match request(
                &plain(),
                method.clone(),
                &agent.url(path),
                &headers,
                Bytes::from(body.clone()),
            )
            .await
            {
                Ok(reply) => {
                    check_reply(c, reply.status, &reply.headers, &reply.body);
                    if reply.status.is_success() {
                        acks.extend(reply.body["ack"].as_str().map(str::to_owned));
                    }
                    Some(reply.status.as_u16())
                }
                Err(e) => {
                    assert!(
                        c.expect == Expect::Refused,
                        "{}: the request failed: {e}",
                        c.name
                    );
                    None
                }
            }
        }
        Input::Admin {
            method,
            path,
            token,
        } => {
            let headers = if *token {
                vec![("authorization", format!("Bearer {ADMIN_TOKEN}"))]
            } else {
                vec![]
            };
            let reply = request(
                &plain(),
                method.clone(),
                &agent.admin_url(path),
                &headers,
                Bytes::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
            check_reply(c, reply.status, &reply.headers, &reply.body);
            Some(reply.status.as_u16())
        }
    };
    match (c.expect, status) {
        (Expect::Refused, Some(s)) => assert!((400..500).contains(&s), "{}: answered {s}", c.name),
        (Expect::Refused, None) | (Expect::NoServerError, _) => {}
        (Expect::Status(want), got) => assert_eq!(got, Some(want), "{}", c.name),
    }
    (status, acks)
}

fn check_reply(c: &Case, status: StatusCode, headers: &http::HeaderMap, body: &Value) {
    assert!(
        !status.is_server_error(),
        "{}: server error {status}: {body}",
        c.name
    );
    if status.is_client_error() {
        let ct = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert_eq!(
            ct, "application/problem+json",
            "{}: {status} {body}",
            c.name
        );
        assert!(
            body["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{}: a refusal without a detail: {body}",
            c.name
        );
    }
}

/// Every file under `root`, as paths relative to it.
fn files_under(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // The agent's whole world is one level down, so that a name that climbs one level out of
    // the sink's directory still lands somewhere this test can see.
    let world = dir.path().join("world");
    std::fs::create_dir_all(world.join("adapters")).unwrap();
    std::fs::write(world.join("adapters/pass.jsonata"), "payload").unwrap();
    std::fs::write(world.join("admin-token"), ADMIN_TOKEN).unwrap();
    let extra = format!(
        "adapters_dir = {adapters:?}\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken = {{ file = {token:?} }}\n\
         [limits]\nmin_free_disk_bytes = 0\nheader_read_timeout_ms = 1000\nbody_read_timeout_ms = 2000\n\
         [[routes]]\nname = \"files\"\nadapter = \"pass.jsonata\"\nsink = \"files\"\n\
         [sinks.files]\ntype = \"file\"\ndir = {out:?}\nname = \"{{subject}}/{{id}}.json\"\n",
        adapters = world.join("adapters").display().to_string(),
        token = world.join("admin-token").display().to_string(),
        out = world.join("out").display().to_string(),
    );
    let mut agent = Agent::start(&world, &extra);

    let cases: Vec<Case> = [
        framing(),
        authentication(),
        envelopes(),
        cloudevents(),
        names(),
        admin(),
    ]
    .into_iter()
    .flatten()
    .collect();
    assert!(cases.len() >= 200, "only {} cases", cases.len());
    eprintln!("{} hostile inputs", cases.len());

    let ports = Ports {
        ingress: agent.ingress,
        admin: agent.admin,
    };
    let mut acknowledged = BTreeSet::new();
    let mut refused = BTreeSet::new();
    let mut failures = Vec::new();
    for c in cases {
        let name = c.name.clone();
        // Each case runs as a task of its own, so that one wrong answer is reported with all
        // the others instead of hiding them.
        let (c, (status, acks)) = match tokio::spawn(async move {
            let answer = run(ports, &c).await;
            (c, answer)
        })
        .await
        {
            Ok(done) => done,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        if status.is_some_and(|s| (200..300).contains(&s)) {
            assert!(!acks.is_empty(), "{}: a 2xx without an ack", c.name);
        }
        acknowledged.extend(acks);
        if let Input::Ingress { headers, .. } = &c.input
            && !status.is_some_and(|s| (200..300).contains(&s))
        {
            refused.extend(
                headers
                    .iter()
                    .filter(|(k, _)| k == "webhook-id" || k == "svix-id")
                    .map(|(_, v)| v.clone()),
            );
        }
        let health = tokio::time::timeout(
            Duration::from_secs(10),
            support::admin_get(&agent, "/healthz"),
        )
        .await
        .unwrap_or_else(|_| panic!("{}: /healthz did not answer afterwards", c.name));
        assert_eq!(health.status, StatusCode::OK, "{}", c.name);
    }
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // A restart keeps every acknowledged event and has none of the refused ones.
    agent.kill9();
    let agent = Agent::start_config(&agent.config_path, &[]);
    let stored: BTreeSet<String> = agent.journal_ids().into_iter().collect();
    let missing: Vec<_> = acknowledged.difference(&stored).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not stored: {missing:?}"
    );
    let leaked: Vec<_> = refused
        .iter()
        .filter(|id| !acknowledged.contains(*id) && stored.contains(*id))
        .collect();
    assert!(leaked.is_empty(), "refused but stored: {leaked:?}");
    let unexpected: Vec<_> = stored
        .iter()
        .filter(|id| !acknowledged.contains(*id))
        .collect();
    assert!(
        unexpected.is_empty(),
        "stored but never acknowledged: {unexpected:?}"
    );

    // Nothing was written outside the sink's directory: every file of the whole test tree is
    // the agent's own or under out/.
    let outside: Vec<String> = files_under(dir.path())
        .into_iter()
        .filter(|f| {
            !f.starts_with("world/out/")
                && !f.starts_with("world/state/")
                && !f.starts_with("world/adapters/")
                && ![
                    "world/ess-agent.toml",
                    "world/hub-secret",
                    "world/admin-token",
                ]
                .contains(&f.as_str())
        })
        .collect();
    assert!(
        outside.is_empty(),
        "written outside the sink's directory: {outside:?}"
    );
    assert!(
        !Path::new("/etc/pwned").exists() && !Path::new("/tmp/pwned").exists(),
        "a name escaped to an absolute path"
    );
}

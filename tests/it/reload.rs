//! Hot reload: adapters and configuration change while the agent runs.

use std::path::Path;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{self, Agent, admin_get, plain, request, signed_headers, unix_now};

fn adapter_source(version: u64) -> String {
    // Two copies of the version: a half-written file cannot produce a matching pair.
    format!("{{\"version\": {version}, \"check\": \"{version}-{version}\", \"id\": id}}")
}

fn setup(dir: &Path) -> String {
    std::fs::create_dir_all(dir.join("adapters")).unwrap();
    std::fs::write(dir.join("adapters/live.jsonata"), adapter_source(1)).unwrap();
    support::config_text(
        dir,
        &format!(
            "adapters_dir = {:?}\n[[routes]]\nname = \"live\"\nadapter = \"live.jsonata\"\nsink = \"files\"\n\
             [sinks.files]\ntype = \"file\"\ndir = {:?}\nname = \"{{id}}.json\"\n",
            dir.join("adapters").display().to_string(),
            dir.join("out").display().to_string()
        ),
    )
}

/// Saves like an editor that writes the file in place.
fn save_in_place(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// Saves like vim, VS Code or `sed -i`: a new file renamed over the old one.
fn save_by_rename(path: &Path, text: &str) {
    let tmp = path.with_extension("jsonata.swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn apply(agent: &Agent, id: &str) -> Value {
    let body =
        serde_json::to_vec(&json!({"id": id, "version": 1, "type": "t", "payload": {}})).unwrap();
    let headers = signed_headers(id, unix_now(), &body);
    let reply = request(
        &plain(),
        Method::POST,
        &agent.url("/v1/events"),
        &headers,
        body,
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    agent
        .wait_for_log(Duration::from_secs(10), |v| {
            v["message"] == "event final" && v["event_id"] == id
        })
        .expect("event final");
    let path = agent
        .state_dir
        .parent()
        .unwrap()
        .join(format!("out/{id}.json"));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Waits until the log says the adapter with this content is loaded; returns how long it took.
fn wait_loaded(agent: &Agent, source: &str, since: Instant) -> Duration {
    let checksum: String = ring::digest::digest(&ring::digest::SHA256, source.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    agent
        .wait_for_log(Duration::from_secs(5), |v| {
            v["message"] == "adapter loaded" && v["checksum"] == checksum.as_str()
        })
        .unwrap_or_else(|| {
            panic!(
                "adapter {source} was not loaded; log:\n{}",
                agent.log_text()
            )
        });
    since.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_adapter_is_live_within_a_second_and_a_broken_one_keeps_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start_with(dir.path(), &setup(dir.path()));
    let script = dir.path().join("adapters/live.jsonata");
    assert_eq!(apply(&agent, "e1").await["version"], 1);

    let v2 = adapter_source(2);
    let saved = Instant::now();
    save_in_place(&script, &v2);
    let took = wait_loaded(&agent, &v2, saved);
    assert!(
        took < Duration::from_secs(1),
        "write-in-place save live after {took:?}"
    );
    assert_eq!(apply(&agent, "e2").await["version"], 2);

    let v3 = adapter_source(3);
    let saved = Instant::now();
    save_by_rename(&script, &v3);
    let took = wait_loaded(&agent, &v3, saved);
    assert!(
        took < Duration::from_secs(1),
        "rename-over save live after {took:?}"
    );
    assert_eq!(apply(&agent, "e3").await["version"], 3);

    // A syntax error: the old adapter keeps serving, the error is shown with line:col.
    save_by_rename(&script, "{\n  \"version\": 4,\n  \"check\": (\n}");
    let logged = agent
        .wait_for_log(Duration::from_secs(5), |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("adapter not reloaded"))
        })
        .expect("the broken save is logged");
    assert!(
        logged["message"]
            .as_str()
            .unwrap()
            .contains("live.jsonata:4:"),
        "{logged}"
    );
    let status = admin_get(&agent, "/v1/adapters").await;
    let adapter = &status.body["adapters"][0];
    let error = adapter["last_error"].as_str().unwrap();
    assert!(
        error.contains("live.jsonata:4:") && error.contains('^'),
        "{error}"
    );
    assert_eq!(apply(&agent, "e4").await["version"], 3);

    // The fix is picked up on the next save.
    let v5 = adapter_source(5);
    let saved = Instant::now();
    save_in_place(&script, &v5);
    wait_loaded(&agent, &v5, saved);
    assert_eq!(apply(&agent, "e5").await["version"], 5);
    let status = admin_get(&agent, "/v1/adapters").await;
    assert!(status.body["adapters"][0]["last_error"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_saves_while_events_flow_never_applies_half_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start_with(dir.path(), &setup(dir.path()));
    let script = dir.path().join("adapters/live.jsonata");
    let url = agent.url("/v1/events");
    let sender = tokio::spawn(async move {
        let client = plain();
        let mut ids = Vec::new();
        for n in 0..300 {
            let id = format!("b{n}");
            let body = serde_json::to_vec(&json!({"id": id, "version": 1, "type": "t", "subject": format!("s{}", n % 7), "payload": {}})).unwrap();
            let headers = signed_headers(&id, unix_now(), &body);
            let reply = request(&client, Method::POST, &url, &headers, body)
                .await
                .unwrap();
            assert_eq!(reply.status, StatusCode::ACCEPTED);
            ids.push(id);
        }
        ids
    });
    let writer = std::thread::spawn(move || {
        for version in 2..202 {
            let text = adapter_source(version);
            if version % 2 == 0 {
                save_in_place(&script, &text);
            } else {
                save_by_rename(&script, &text);
            }
        }
    });
    writer.join().unwrap();
    let ids = sender.await.unwrap();
    for id in &ids {
        agent
            .wait_for_log(Duration::from_secs(30), |v| {
                v["message"] == "event final" && v["event_id"] == id.as_str()
            })
            .unwrap_or_else(|| panic!("{id} not final"));
        let path = dir.path().join(format!("out/{id}.json"));
        let output: Value = serde_json::from_slice(
            &std::fs::read(&path).unwrap_or_else(|_| panic!("{id} not applied")),
        )
        .unwrap();
        let version = output["version"].as_u64().unwrap();
        assert_eq!(
            output["check"],
            format!("{version}-{version}"),
            "{id} was applied by half a file"
        );
    }
    // Finally the last version is in force.
    wait_loaded(&agent, &adapter_source(201), Instant::now());
}

#[tokio::test]
async fn sighup_reloads_and_a_listener_change_is_reported_as_needing_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    let agent = Agent::start_with(dir.path(), &config);
    // Add a second route through the configuration file, and move the listener.
    let changed = config.replace(
        "[ingress]\nlisten = \"127.0.0.1:0\"",
        "[ingress]\nlisten = \"127.0.0.1:1\"",
    ) + "[[routes]]\nname = \"second\"\nadapter = \"live.jsonata\"\nsink = \"files\"\ntypes = [\"other\"]\n";
    // Written under another name and renamed, so the file watch does not see a half-written file.
    let tmp = dir.path().join("ess-agent.toml.new");
    std::fs::write(&tmp, changed).unwrap();
    std::fs::rename(&tmp, &agent.config_path).unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    let line = agent
        .wait_for_log(Duration::from_secs(5), |v| {
            v["message"] == "reloaded routes, adapters and sinks"
        })
        .expect("reloaded");
    let restart = line["restart_needed"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(restart.contains("ingress.listen"), "{line}");
    assert!(
        agent
            .wait_for_log(Duration::from_secs(5), |v| v["message"]
                .as_str()
                .is_some_and(|m| m.contains("take effect only after a restart")))
            .is_some()
    );
    // Still serving on the original port, with the new route.
    let status = admin_get(&agent, "/v1/adapters").await;
    let routes = status.body["adapters"][0]["routes"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(routes, vec![json!("live"), json!("second")]);
    assert_eq!(apply(&agent, "after-hup").await["version"], 1);
}

/// Posts an event signed with `secret`.
async fn post_signed(agent: &Agent, secret: &str, id: &str) -> support::Reply {
    let body =
        serde_json::to_vec(&json!({"id": id, "version": 1, "type": "t", "payload": {}})).unwrap();
    let signer = ess_agent::protocol::auth::WebhookSigner::new(secret).unwrap();
    let mut headers: Vec<(&str, String)> = signer.headers(id, unix_now(), &body).into();
    headers.push(("content-type", "application/json".into()));
    request(
        &plain(),
        Method::POST,
        &agent.url("/v1/events"),
        &headers,
        body,
    )
    .await
    .unwrap()
}

/// How many log lines so far satisfy `pred`.
fn count_lines(agent: &Agent, pred: impl Fn(&Value) -> bool) -> usize {
    agent
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| pred(v))
        .count()
}

/// Sends SIGHUP and waits for the first line satisfying `pred` logged after it.
fn hup_and_wait(agent: &Agent, pred: impl Fn(&Value) -> bool) -> Value {
    let before = count_lines(agent, &pred);
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    let mut seen = 0;
    agent
        .wait_for_log(Duration::from_secs(10), |v| {
            if pred(v) {
                seen += 1;
            }
            pred(v) && seen > before
        })
        .unwrap_or_else(|| panic!("no line after SIGHUP; log:\n{}", agent.log_text()))
}

fn reloaded(v: &Value) -> bool {
    v["message"] == "reloaded routes, adapters and sinks"
}

fn secret(fill: u8) -> String {
    use base64::Engine as _;
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode([fill; 32])
    )
}

#[tokio::test]
async fn sighup_rotates_the_hub_secret_and_a_broken_secret_keeps_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    let agent = Agent::start_with(dir.path(), &config);
    let old_file = dir.path().join("hub-secret");
    let new_file = dir.path().join("hub-secret-new");
    let (old, new, newer) = (support::SECRET.to_string(), secret(1), secret(2));
    assert_eq!(
        post_signed(&agent, &old, "r0").await.status,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        post_signed(&agent, &new, "r1").await.status,
        StatusCode::UNAUTHORIZED
    );

    // Rotation, as documented: the new secret listed first, the old kept; both verify.
    std::fs::write(&new_file, &new).unwrap();
    let listed = |files: &[&Path]| {
        let list: Vec<String> = files
            .iter()
            .map(|f| format!("{{ file = {:?} }}", f.display().to_string()))
            .collect();
        let old_line = format!(
            "hmac_secrets = [{{ file = {:?} }}]",
            old_file.display().to_string()
        );
        assert!(config.contains(&old_line));
        config.replace(&old_line, &format!("hmac_secrets = [{}]", list.join(", ")))
    };
    let write_config = |text: String| {
        let tmp = dir.path().join("ess-agent.toml.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &agent.config_path).unwrap();
    };
    write_config(listed(&[&new_file, &old_file]));
    let line = hup_and_wait(&agent, reloaded);
    assert!(
        !line["restart_needed"].to_string().contains("auth"),
        "{line}"
    );
    assert_eq!(
        post_signed(&agent, &old, "r2").await.status,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        post_signed(&agent, &new, "r3").await.status,
        StatusCode::ACCEPTED
    );

    // The old entry removed: the old secret is refused from now on.
    write_config(listed(&[&new_file]));
    hup_and_wait(&agent, reloaded);
    let refused = post_signed(&agent, &old, "r4").await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(refused.body["code"], "invalid_signature");
    assert_eq!(
        post_signed(&agent, &new, "r5").await.status,
        StatusCode::ACCEPTED
    );

    // The secret file rewritten in place: SIGHUP reads it again.
    std::fs::write(&new_file, &newer).unwrap();
    hup_and_wait(&agent, |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("hub authentication reloaded"))
    });
    assert_eq!(
        post_signed(&agent, &new, "r6").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        post_signed(&agent, &newer, "r7").await.status,
        StatusCode::ACCEPTED
    );

    // A broken secret refuses the reload, saying which key, and the running secret stays.
    std::fs::write(&new_file, "whsec_not base64!").unwrap();
    let line = hup_and_wait(&agent, |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("reload refused"))
    });
    assert!(
        line["problems"].to_string().contains("auth.hmac_secrets")
            && line["problems"].to_string().contains("not valid base64"),
        "{line}"
    );
    assert_eq!(
        post_signed(&agent, &newer, "r8").await.status,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        post_signed(&agent, &old, "r9").await.status,
        StatusCode::UNAUTHORIZED
    );
}

/// Posts an event and waits until it is final.
async fn deliver(agent: &Agent, id: &str) {
    let body =
        serde_json::to_vec(&json!({"id": id, "version": 1, "type": "t", "payload": {}})).unwrap();
    let headers = signed_headers(id, unix_now(), &body);
    let reply = request(
        &plain(),
        Method::POST,
        &agent.url("/v1/events"),
        &headers,
        body,
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    agent
        .wait_for_log(Duration::from_secs(10), |v| {
            v["message"] == "event final" && v["event_id"] == id
        })
        .unwrap_or_else(|| panic!("{id} not final; log:\n{}", agent.log_text()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reads_a_rewritten_sink_secret_and_an_unreadable_one_keeps_the_old() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("adapters")).unwrap();
    std::fs::write(dir.path().join("adapters/live.jsonata"), adapter_source(1)).unwrap();
    let key_file = dir.path().join("partner-api-key");
    std::fs::write(&key_file, "first-key\n").unwrap();
    let server = crate::support::hub::TestServer::start(200).await;
    let agent = Agent::start(
        dir.path(),
        &format!(
            "adapters_dir = {:?}\n[[routes]]\nname = \"live\"\nadapter = \"live.jsonata\"\n\
             sink = \"partner\"\n[sinks.partner]\ntype = \"http\"\nurl = {:?}\n\
             secret_headers = {{ X-Api-Key = {{ file = {:?} }} }}\n",
            dir.path().join("adapters").display().to_string(),
            server.url("/rules"),
            key_file.display().to_string()
        ),
    );
    let last_key = || {
        let received = server.received();
        received.last().unwrap().headers["x-api-key"]
            .to_str()
            .unwrap()
            .to_string()
    };
    deliver(&agent, "k1").await;
    assert_eq!(last_key(), "first-key");

    // The key file rewritten in place, the configuration unchanged: SIGHUP reads it again.
    std::fs::write(&key_file, "second-key\n").unwrap();
    hup_and_wait(&agent, reloaded);
    deliver(&agent, "k2").await;
    assert_eq!(last_key(), "second-key");

    // A key file that cannot be read refuses the reload, naming the key; the sink keeps the
    // key it has.
    std::fs::remove_file(&key_file).unwrap();
    let line = hup_and_wait(&agent, |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("reload refused"))
    });
    assert!(
        line["problems"]
            .to_string()
            .contains("sinks.partner.secret_headers.X-Api-Key"),
        "{line}"
    );
    deliver(&agent, "k3").await;
    assert_eq!(last_key(), "second-key");
    assert_eq!(server.received().len(), 3);
}

/// The DER of the first certificate in a PEM file.
fn first_cert_der(path: &Path) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::CertificateDer::pem_file_iter(path)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// Opens a new TLS connection to the agent's ingress, trusting the CAs in `cas`, and returns
/// the DER of the certificate the agent presented.
async fn served_cert(agent: &Agent, cas: &[&Path]) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(agent.ingress).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.expect("handshake");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// Replaces `path` by a file with `contents` in one rename, as certbot and editors do.
fn replace_file(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_tls_certificate_is_served_after_a_reload_and_a_broken_key_keeps_the_old() {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["a", "b", "tls"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    let first = support::tls::generate(&dir.path().join("a"));
    let renewed = support::tls::generate(&dir.path().join("b"));
    let cert = dir.path().join("tls/server.pem");
    let key = dir.path().join("tls/server.key");
    std::fs::copy(&first.server_cert, &cert).unwrap();
    std::fs::copy(&first.server_key, &key).unwrap();
    let agent = Agent::start(
        dir.path(),
        &format!(
            "[ingress]\nlisten = \"127.0.0.1:0\"\n[ingress.tls]\ncert = {:?}\nkey = {:?}\n",
            cert.display().to_string(),
            key.display().to_string(),
        ),
    );
    let cas = [first.ca.as_path(), renewed.ca.as_path()];
    assert_eq!(
        served_cert(&agent, &cas).await,
        first_cert_der(&first.server_cert)
    );

    // Renewal: new certificate and key, then SIGHUP. New connections get the new certificate,
    // and nothing asks for a restart.
    replace_file(&cert, &std::fs::read(&renewed.server_cert).unwrap());
    replace_file(&key, &std::fs::read(&renewed.server_key).unwrap());
    let line = hup_and_wait(&agent, reloaded);
    assert!(
        !line["restart_needed"].to_string().contains("tls"),
        "{line}"
    );
    assert_eq!(
        served_cert(&agent, &cas).await,
        first_cert_der(&renewed.server_cert)
    );

    // A key that is not a key: the reload is refused, saying why, and the running certificate
    // is still served.
    replace_file(
        &key,
        b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
    );
    let line = hup_and_wait(&agent, |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("reload refused"))
    });
    assert!(
        line["problems"].to_string().contains("ingress.tls"),
        "{line}"
    );
    assert_eq!(
        served_cert(&agent, &cas).await,
        first_cert_der(&renewed.server_cert)
    );

    // Files replaced with no signal at all: the file watch reloads them.
    replace_file(&cert, &std::fs::read(&first.server_cert).unwrap());
    replace_file(&key, &std::fs::read(&first.server_key).unwrap());
    let want = first_cert_der(&first.server_cert);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if served_cert(&agent, &cas).await == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replaced certificate was not served; log:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_client_ca_is_in_force_after_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["old", "new", "tls"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    let old = support::tls::generate(&dir.path().join("old"));
    let new = support::tls::generate(&dir.path().join("new"));
    let client_ca = dir.path().join("tls/client-ca.pem");
    std::fs::copy(&old.ca, &client_ca).unwrap();
    let agent = Agent::start(
        dir.path(),
        &format!(
            "[ingress]\nlisten = \"127.0.0.1:0\"\n[ingress.tls]\ncert = {:?}\nkey = {:?}\n\
             client_ca = {:?}\n",
            old.server_cert.display().to_string(),
            old.server_key.display().to_string(),
            client_ca.display().to_string(),
        ),
    );
    // A delivery over mutual TLS with the client certificate of `pki`; Err when the handshake
    // (or anything after it) fails.
    let deliver = |pki: &support::tls::TestPki, id: &str| {
        let client = support::http(&ess_agent::http_client::ClientTls {
            ca_file: Some(&old.ca),
            client_cert: Some((&pki.client_cert, &pki.client_key)),
        });
        let body = support::event_body(id, "S", json!({}));
        let headers = signed_headers(id, unix_now(), &body);
        let url = agent.url("/v1/events");
        async move {
            request(&client, Method::POST, &url, &headers, body)
                .await
                .map(|reply| reply.status)
        }
    };
    assert_eq!(deliver(&old, "ca-1").await.unwrap(), StatusCode::ACCEPTED);
    let refused = deliver(&new, "ca-2").await;
    assert!(refused.is_err(), "a client of the new CA got {refused:?}");

    // The hub's client certificates move to a new CA: replace the file, then SIGHUP.
    replace_file(&client_ca, &std::fs::read(&new.ca).unwrap());
    hup_and_wait(&agent, reloaded);
    assert_eq!(deliver(&new, "ca-3").await.unwrap(), StatusCode::ACCEPTED);
    let refused = deliver(&old, "ca-4").await;
    assert!(refused.is_err(), "a client of the old CA got {refused:?}");
    assert_eq!(agent.journal_ids(), vec!["ca-1", "ca-3"]);
}

//! Test-owned Mosquitto brokers on free loopback ports, each with its own configuration file and
//! directory, that a test can stop and start again; and an MQTT subscriber that records what it
//! receives.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, RetainForwardRule};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::{Notify, mpsc};

use super::process::{self, ServerLog, free_port};

/// The broker every machine running the tests has (scripts/test starts it).
pub const SHARED_PORT: u16 = 1883;

/// How long a broker may take to start or stop.
const BROKER_TIMEOUT: Duration = Duration::from_secs(15);

/// TLS settings of a broker's second listener.
pub struct TlsListener {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Clients must present a certificate signed by `ca`.
    pub require_certificate: bool,
}

/// How to set up a broker.
#[derive(Default)]
pub struct Options {
    /// Keep sessions and queued messages across a stop and start.
    pub persistence: bool,
    /// Users and passwords; when any are given, anonymous clients are refused.
    pub users: Vec<(String, String)>,
    /// The contents of an ACL file (`user …` / `topic write …` lines).
    pub acl: Option<String>,
    /// A TLS listener besides the plain one.
    pub tls: Option<TlsListener>,
}

/// A running (or stopped) Mosquitto owned by one test.
pub struct Mosquitto {
    child: Option<Child>,
    /// The plain listener.
    pub port: u16,
    /// The TLS listener, when configured.
    pub tls_port: Option<u16>,
    config: PathBuf,
    log: Arc<ServerLog>,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Writes the configuration and starts the broker; returns once it is listening.
    pub fn start(options: Options) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let tls_port = options.tls.as_ref().map(|_| free_port());
        let mut config = format!(
            "# Runs as whoever runs the tests: without this, a root test run would switch to a\n\
             # user that cannot read the test's files.\n\
             user root\n\
             log_dest stderr\n\
             log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
             max_queued_messages 0\n\
             listener {port} 127.0.0.1\n"
        );
        if options.persistence {
            config.push_str(&format!(
                "persistence true\npersistence_location {}/\n",
                dir.path().display()
            ));
        }
        if options.users.is_empty() {
            config.push_str("allow_anonymous true\n");
        } else {
            let file = dir.path().join("passwords");
            for (i, (user, password)) in options.users.iter().enumerate() {
                let mut command = Command::new("mosquitto_passwd");
                if i == 0 {
                    command.arg("-c");
                }
                let status = command
                    .arg("-b")
                    .arg(&file)
                    .arg(user)
                    .arg(password)
                    .stdout(Stdio::null())
                    .status()
                    .expect("mosquitto_passwd must be installed for tests with credentials");
                assert!(status.success(), "mosquitto_passwd failed");
            }
            config.push_str(&format!(
                "allow_anonymous false\npassword_file {}\n",
                file.display()
            ));
        }
        if let Some(acl) = &options.acl {
            let file = dir.path().join("acl");
            std::fs::write(&file, acl).unwrap();
            config.push_str(&format!("acl_file {}\n", file.display()));
        }
        if let (Some(tls), Some(tls_port)) = (&options.tls, tls_port) {
            config.push_str(&format!(
                "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
                 require_certificate {}\n",
                tls.ca.display(),
                tls.cert.display(),
                tls.key.display(),
                tls.require_certificate
            ));
        }
        let config_path = dir.path().join("mosquitto.conf");
        std::fs::write(&config_path, config).unwrap();
        let mut broker = Mosquitto {
            child: None,
            port,
            tls_port,
            config: config_path,
            log: Arc::new(ServerLog::default()),
            _dir: dir,
        };
        broker.start_again();
        broker
    }

    /// Starts the (stopped) broker with the same configuration and ports; returns once it is
    /// listening.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the broker is running");
        let mut command = Command::new("/usr/sbin/mosquitto");
        command.arg("-c").arg(&self.config);
        // Mosquitto logs "… running" once every listener is open.
        self.child = Some(
            self.log
                .spawn_until(command, "mosquitto", BROKER_TIMEOUT, |l| {
                    l.ends_with(" running")
                }),
        );
    }

    /// Stops the broker the way an init system does (SIGTERM; it saves its persistence file)
    /// and waits until it has exited.
    pub fn stop(&mut self) {
        process::terminate(&mut self.child);
    }

    /// Freezes the broker (SIGSTOP): connections stay open, nothing is answered.
    pub fn freeze(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Lets a frozen broker run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let child = self.child.as_ref().expect("the broker is running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    /// What the broker logged so far.
    pub fn log_text(&self) -> String {
        self.log.text()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One message as a subscriber received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub message_expiry: Option<u32>,
}

impl Received {
    /// A user property's value.
    pub fn property(&self, name: &str) -> Option<&str> {
        self.user_properties
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The payload as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "payload on {} is not JSON ({e}): {:?}",
                self.topic, self.payload
            )
        })
    }
}

/// An MQTT 5 subscriber running in the background.
pub struct Subscriber {
    rx: mpsc::UnboundedReceiver<Received>,
    client: AsyncClient,
    /// Tells the subscriber that its broker is back, so it reconnects at once.
    broker_back: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

/// How to subscribe.
pub struct Subscription<'a> {
    pub port: u16,
    pub filter: &'a str,
    /// Keep the session (and the messages queued for it) while disconnected.
    pub persistent: bool,
    pub credentials: Option<(&'a str, &'a str)>,
}

impl Subscriber {
    /// Connects, subscribes with QoS 2 (so each message arrives with the QoS it was published
    /// with) and returns once the broker has confirmed the subscription.
    pub async fn start(s: Subscription<'_>) -> Subscriber {
        let id = format!("ess-test-sub-{}", rand::random::<u64>());
        let mut options = MqttOptions::new(id, "127.0.0.1", s.port);
        options.set_keep_alive(Duration::from_secs(30));
        if s.persistent {
            options
                .set_clean_start(false)
                .set_session_expiry_interval(Some(3600));
        }
        if let Some((user, password)) = s.credentials {
            options.set_credentials(user, password);
        }
        let (client, mut el) = AsyncClient::new(options, 100);
        let mut filter = Filter::new(s.filter, QoS::ExactlyOnce);
        // Show the retain flag as published, also for messages that arrive live.
        filter.preserve_retain = true;
        filter.retain_forward_rule = RetainForwardRule::OnEverySubscribe;
        client.subscribe_many([filter]).await.unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        let broker_back = Arc::new(Notify::new());
        let back = broker_back.clone();
        let task = tokio::spawn(async move {
            let mut subscribed = Some(subscribed_tx);
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let props = p.properties.unwrap_or_default();
                        let _ = tx.send(Received {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload,
                            qos: p.qos as u8,
                            retain: p.retain,
                            user_properties: props.user_properties,
                            content_type: props.content_type,
                            message_expiry: props.message_expiry_interval,
                        });
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(rumqttc::v5::ConnectionError::RequestsDone) => return,
                    Err(_) => {
                        // The broker is down: reconnect when the test says it is back, or try
                        // again shortly (the notice may have come before this error).
                        tokio::select! {
                            _ = back.notified() => {}
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        }
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
            .await
            .expect("the broker confirms the subscription")
            .unwrap();
        Subscriber {
            rx,
            client,
            broker_back,
            task,
        }
    }

    /// Tells the subscriber its broker is back up.
    pub fn broker_back(&self) {
        self.broker_back.notify_one();
    }

    /// The next message, or None when none arrives within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Received> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Every message that has arrived and not been taken yet.
    pub fn drain(&mut self) -> Vec<Received> {
        let mut out = Vec::new();
        while let Ok(m) = self.rx.try_recv() {
            out.push(m);
        }
        out
    }

    /// Collects messages until `done` says enough, or `timeout` passes; returns all of them.
    pub async fn collect_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut got = Vec::new();
        while !done(&got) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) => got.push(m),
                _ => break,
            }
        }
        got
    }

    /// Disconnects cleanly.
    pub async fn stop(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// Publishes an empty retained message to clear what a test retained on the shared broker.
pub async fn clear_retained(port: u16, topics: &[String]) {
    let options = MqttOptions::new(
        format!("ess-test-clear-{}", rand::random::<u64>()),
        "127.0.0.1",
        port,
    );
    let (client, mut el) = AsyncClient::new(options, 100);
    for topic in topics {
        client
            .publish(topic.clone(), QoS::AtLeastOnce, true, Bytes::new())
            .await
            .unwrap();
    }
    let mut acked = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while acked < topics.len() {
        match tokio::time::timeout_at(deadline, el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            _ => break,
        }
    }
}

/// A topic prefix no other test run uses, for tests on the shared broker.
pub fn unique_prefix() -> String {
    format!("ess-test/{:016x}", rand::random::<u64>())
}

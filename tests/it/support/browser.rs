//! A headless Chromium driven through chromedriver with the W3C WebDriver protocol (plain
//! HTTP/JSON, with the support's own HTTP client). Each [`Browser`] has its own chromedriver on a
//! free port and its own profile directory; dropping it ends the session and the driver.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::Method;
use serde_json::{Value, json};

use super::{plain, request};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The key under which WebDriver answers an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// How long a wait polls before it fails.
pub const WAIT: Duration = Duration::from_secs(15);

/// A running browser session.
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    _profile: tempfile::TempDir,
}

/// An element of the current page.
#[derive(Debug, Clone)]
pub struct Element(String);

impl Browser {
    /// Starts chromedriver and a headless Chromium session; panics with how to install them
    /// when either is missing.
    pub async fn start() -> Browser {
        for (path, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            assert!(
                Path::new(path).exists(),
                "{path} is missing: the browser tests need Debian's headless Chromium and its \
                 driver; install them with `apt-get install chromium chromium-driver` \
                 (scripts/test does this when run as root); package {package}"
            );
        }
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let profile = tempfile::tempdir().expect("profile dir");
        let mut browser = Browser {
            driver,
            addr,
            session: String::new(),
            _profile: profile,
        };
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "unhandledPromptBehavior": "ignore",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,900", "--no-first-run", "--disable-extensions",
                    format!("--user-data-dir={}", browser._profile.path().display()),
                ],
            },
        }}});
        let value = browser.call(Method::POST, "/session", Some(caps)).await;
        browser.session = value["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session from chromedriver: {value}"))
            .to_owned();
        browser
    }

    /// Sends one WebDriver command; panics on a WebDriver error, naming it.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        match self.try_call(method.clone(), path, body).await {
            Ok(v) => v,
            Err(e) => panic!("webdriver {method} {path}: {e}"),
        }
    }

    /// Sends one WebDriver command; a WebDriver error is `Err(value)`.
    async fn try_call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Value> {
        let url = format!("http://{}{path}", self.addr);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let headers = [("content-type", "application/json".to_owned())];
        let reply = request(&plain(), method, &url, &headers, Bytes::from(body))
            .await
            .unwrap_or_else(|e| panic!("chromedriver at {}: {e}", self.addr));
        let value = reply.body["value"].clone();
        if reply.status.is_success() {
            Ok(value)
        } else {
            Err(value)
        }
    }

    fn session_path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    /// Opens `url` and waits for the page to load.
    pub async fn goto(&self, url: &str) {
        self.call(
            Method::POST,
            &self.session_path("/url"),
            Some(json!({"url": url})),
        )
        .await;
    }

    /// The current page's URL.
    pub async fn url(&self) -> String {
        let v = self
            .call(Method::GET, &self.session_path("/url"), None)
            .await;
        v.as_str().unwrap_or_default().to_owned()
    }

    /// The elements matching a CSS selector now.
    pub async fn find_all(&self, css: &str) -> Vec<Element> {
        let v = self
            .call(
                Method::POST,
                &self.session_path("/elements"),
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e[ELEMENT].as_str().map(|s| Element(s.to_owned())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The first element matching `css`, waiting for it to appear.
    pub async fn find(&self, css: &str) -> Element {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(e) = self.find_all(css).await.into_iter().next() {
                return e;
            }
            if Instant::now() > deadline {
                panic!(
                    "no element {css:?} on {} within {WAIT:?}; the page:\n{}",
                    self.url().await,
                    self.body_text().await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The rendered text of an element.
    pub async fn text(&self, e: &Element) -> String {
        let v = self
            .call(
                Method::GET,
                &self.session_path(&format!("/element/{}/text", e.0)),
                None,
            )
            .await;
        v.as_str().unwrap_or_default().to_owned()
    }

    /// The text of the first element matching `css` (waiting for it).
    pub async fn text_of(&self, css: &str) -> String {
        let e = self.find(css).await;
        self.text(&e).await
    }

    /// An attribute of an element.
    pub async fn attribute(&self, e: &Element, name: &str) -> Option<String> {
        let v = self
            .call(
                Method::GET,
                &self.session_path(&format!("/element/{}/attribute/{name}", e.0)),
                None,
            )
            .await;
        v.as_str().map(str::to_owned)
    }

    pub async fn click(&self, e: &Element) {
        self.call(
            Method::POST,
            &self.session_path(&format!("/element/{}/click", e.0)),
            Some(json!({})),
        )
        .await;
    }

    /// Clears a text field.
    pub async fn clear(&self, e: &Element) {
        self.call(
            Method::POST,
            &self.session_path(&format!("/element/{}/clear", e.0)),
            Some(json!({})),
        )
        .await;
    }

    /// Types `text` into an element as keystrokes.
    pub async fn send_keys(&self, e: &Element, text: &str) {
        self.call(
            Method::POST,
            &self.session_path(&format!("/element/{}/value", e.0)),
            Some(json!({"text": text})),
        )
        .await;
    }

    /// Selects the option with value `value` of a `<select>` matched by `css`.
    pub async fn select(&self, css: &str, value: &str) {
        let option = self.find(&format!("{css} option[value=\"{value}\"]")).await;
        self.click(&option).await;
    }

    /// Runs `script` (a function body; `arguments` are `args`) and answers its return value.
    pub async fn execute(&self, script: &str, args: Value) -> Value {
        self.call(
            Method::POST,
            &self.session_path("/execute/sync"),
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// The text of an open alert, confirm or prompt dialog, if one is open.
    pub async fn open_dialog(&self) -> Option<String> {
        self.try_call(Method::GET, &self.session_path("/alert/text"), None)
            .await
            .ok()
            .map(|v| v.as_str().unwrap_or_default().to_owned())
    }

    /// The whole page's text, for failure messages.
    pub async fn body_text(&self) -> String {
        match self
            .try_call(
                Method::POST,
                &self.session_path("/execute/sync"),
                Some(json!({"script": "return document.body ? document.body.innerText : ''", "args": []})),
            )
            .await
        {
            Ok(v) => v.as_str().unwrap_or_default().to_owned(),
            Err(e) => format!("(page text unavailable: {e})"),
        }
    }

    /// Polls `condition` until it answers `Some`, or fails after [`WAIT`] with `what`.
    pub async fn wait_for<T, F, Fut>(&self, what: &str, mut condition: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(v) = condition().await {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "waited {WAIT:?} for {what}; at {} the page says:\n{}",
                    self.url().await,
                    self.body_text().await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Saves a PNG screenshot of the window to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let v = self
            .call(Method::GET, &self.session_path("/screenshot"), None)
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .expect("screenshot is base64");
        std::fs::write(path, png).expect("write screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the session (which closes Chromium) with a plain blocking request: no runtime
        // is at hand in a destructor. Then the driver itself.
        if !self.session.is_empty()
            && let Ok(mut stream) = TcpStream::connect(self.addr)
        {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = write!(
                stream,
                "DELETE /session/{} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                self.session, self.addr
            );
            // chromedriver keeps the connection open: read the answer up to its length.
            let mut got = Vec::new();
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = stream.read(&mut chunk) {
                got.extend_from_slice(&chunk[..n]);
                if answer_complete(&got) {
                    break;
                }
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// True once `got` holds a whole HTTP answer with a `Content-Length`.
fn answer_complete(got: &[u8]) -> bool {
    let text = String::from_utf8_lossy(got);
    let Some(end) = text.find("\r\n\r\n") else {
        return false;
    };
    let length = text[..end]
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    got.len() >= end + 4 + length
}

/// A free loopback port (bound, then released for chromedriver to take).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Where the console's screenshots are kept in the repository.
pub fn screenshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/console")
}

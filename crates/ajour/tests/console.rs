//! The web console (`crates/ajour-console`) end to end, used as a person uses it: `ajour serve`
//! run as its binary, its pages in headless Chromium driven over WebDriver (Debian's chromium and
//! chromedriver, through fantoccini), devices played by `ajour simulate`. Each test has a server,
//! a chromedriver and a browser of its own.
//!
//! - Signing in with the keyboard alone, the session cookie (HttpOnly, SameSite=Strict), a wrong
//!   token, signing out; POSTs without or with a forged CSRF token refused (403, with reqwest).
//! - A device's page following its update live (progress never going back, no reload); the
//!   devices page and the overview showing it in sync.
//! - An application's firmware changed from its page, and the device updated to it.
//! - The devices page and the overview on a phone's screen: nothing wider than the screen, no
//!   word of a table broken over lines.
//! - A firmware build triggered from the builds page, followed to `succeeded` with its log.
//! - A rollout paused, resumed and cancelled from its page; the overview's chart of it.
//! - The devices page's pages (50 devices each) and its sorting by state.
//!
//! Every page visited is saved as a screenshot in `target/console-screenshots/NAME.png` and
//! checked with axe-core: no violation of impact `serious` or `critical`. The device page's
//! screenshot becomes `docs/console.png` with `AJOUR_BLESS_SCREENSHOTS=1`.
//!
//! Needs chromium, chromium-driver and axe-core (from npm, in
//! `~/.cache/ajour-test/npm`), which scripts/setup-test-env.sh installs; `AJOUR_TEST_AXE` names
//! another `axe.min.js`, `AJOUR_TEST_CHROMIUM` and `AJOUR_TEST_CHROMEDRIVER` other programs.
//! Waits are for conditions in the page, polled every 100 ms, never for a fixed time.

use ajour_testkit::{OciRegistry, ServerProcess};
use fantoccini::actions::{InputSource, KeyAction, KeyActions};
use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use rand::RngCore;
use reqwest::StatusCode;
use serde_json::{json, Value as Json};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const AJOUR: &str = env!("CARGO_BIN_EXE_ajour");
const TOKEN: &str = "console-test-token";
/// How long a condition in the page is waited for.
const WAIT: Duration = Duration::from_secs(30);
/// How often it is looked at.
const POLL: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------------
// The browser: chromedriver, a session in headless Chromium, axe, screenshots.

/// `chromedriver` on a port of its own, in a process group of its own; on `Drop` asked to shut
/// down (it then quits its browsers), and what is left of its group killed.
struct ChromeDriver {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl ChromeDriver {
    async fn start() -> Self {
        let program = std::env::var("AJOUR_TEST_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        // chromedriver takes no port 0: a port found free, and another if it was taken meanwhile.
        let mut failures = Vec::new();
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let dir = tempfile::tempdir().unwrap();
            let log = dir.path().join("chromedriver.log");
            let child = Command::new(&program)
                .arg(format!("--port={port}"))
                .arg(format!("--log-path={}", log.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("running {program} ({e}): scripts/setup-test-env.sh installs chromium-driver")
                });
            let mut driver = Self { child, port, dir };
            match driver.ready().await {
                Ok(()) => return driver,
                Err(why) => failures.push(why),
            }
        }
        panic!("chromedriver did not start:\n{}", failures.join("\n"));
    }

    /// Wait until `GET /status` says `ready: true`; why not, if it exits or 30 s pass.
    async fn ready(&mut self) -> Result<(), String> {
        let http = reqwest::Client::new();
        let url = format!("{}/status", self.url());
        let deadline = Instant::now() + WAIT;
        let mut last;
        loop {
            // Not waited for here (its group stays ours until Drop).
            if self.exited() {
                return Err(format!("chromedriver exited: {}", self.log()));
            }
            match http.get(&url).timeout(Duration::from_secs(2)).send().await {
                Ok(response) => match response.json::<Json>().await {
                    Ok(body) if body["value"]["ready"] == json!(true) => return Ok(()),
                    Ok(body) => last = body.to_string(),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "chromedriver not ready after {WAIT:?}: {last}\n{}",
                    self.log()
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        let log = read("chromedriver.log");
        let tail = &log[log.len().saturating_sub(4000)..];
        format!("{}{tail}", read("stderr"))
    }

    /// Whether chromedriver has exited (a zombie not yet waited for counts: its process group
    /// is still this test's own until it is waited for).
    fn exited(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())) {
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
            Err(_) => true,
        }
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // Killed, chromedriver would leave its browsers running: ask it to shut down first.
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        if let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let _ =
                stream.write_all(b"GET /shutdown HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
            let _ = stream.read_to_end(&mut Vec::new());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.exited() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Whatever is left in its group (it is not waited for yet: the group is still ours).
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// The violations axe found in a page, as it reports them.
type Violation = Json;

/// A browser session of its own, on the console at `base`.
struct Browser {
    client: Client,
    base: String,
    // After the client: dropped last.
    driver: ChromeDriver,
}

impl Browser {
    /// A desktop-sized window (1280x900).
    async fn open(base: &str) -> Self {
        Self::with_options(base, json!({})).await
    }

    /// A phone's screen: 390x844 CSS pixels, as Chrome's device emulation shows a page on a
    /// phone (the layout viewport is the device's width only for a page that asks for it).
    async fn phone(base: &str) -> Self {
        let metrics = json!({"width": 390, "height": 844, "pixelRatio": 2.0, "mobile": true, "touch": true});
        Self::with_options(base, json!({"mobileEmulation": {"deviceMetrics": metrics}})).await
    }

    async fn with_options(base: &str, extra: Json) -> Self {
        let driver = ChromeDriver::start().await;
        let binary = std::env::var("AJOUR_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let mut options = json!({
            "binary": binary,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900"],
        });
        for (key, value) in extra.as_object().unwrap() {
            options[key] = value.clone();
        }
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert("goog:chromeOptions".into(), options);
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&driver.url())
            .await
            .unwrap_or_else(|e| panic!("a session in Chromium ({e}):\n{}", driver.log()));
        Self {
            client,
            base: base.to_string(),
            driver,
        }
    }

    /// End the session (its browser quits).
    async fn close(self) {
        let Self { client, driver, .. } = self;
        client.close().await.unwrap();
        drop(driver);
    }

    /// Open `path` of the console.
    async fn goto(&self, path: &str) {
        self.client
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap_or_else(|e| panic!("opening {path}: {e}"));
    }

    /// Run `script` (a function body) in the page.
    async fn js(&self, script: &str) -> Json {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("script failed ({e}):\n{script}"))
    }

    /// Run `script` (a function body) every 100 ms until it returns neither `null` nor `false`
    /// (or until 30 s have passed: then fail saying what it last returned and what the page
    /// shows); what it returned.
    async fn until(&self, what: &str, script: &str) -> Json {
        self.until_within(WAIT, what, script).await
    }

    async fn until_within(&self, timeout: Duration, what: &str, script: &str) -> Json {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            // While a page is being left, scripts fail: only a timeout is a failure.
            match self.client.execute(script, vec![]).await {
                Ok(Json::Null | Json::Bool(false)) => last = "nothing".to_string(),
                Ok(value) => return value,
                Err(e) => last = format!("an error: {e}"),
            }
            if Instant::now() >= deadline {
                panic!(
                    "waited {timeout:?} for {what}; the check last returned {last}; the page:\n{}",
                    self.page_text().await
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Wait until an element matches `selector`.
    async fn until_present(&self, selector: &str) {
        let script = format!("return document.querySelector({}) !== null", json!(selector));
        self.until(&format!("an element {selector}"), &script).await;
    }

    /// Wait until the page at `path` (its pathname) is loaded.
    async fn until_at(&self, path: &str) {
        let script = format!(
            "return location.pathname === {} && document.readyState === 'complete'",
            json!(path)
        );
        self.until(&format!("the page {path}"), &script).await;
    }

    /// The text content of the first element matching `selector`, trimmed; `None` if none.
    async fn text_of(&self, selector: &str) -> Option<String> {
        let script = format!(
            "const e = document.querySelector({}); return e && e.textContent.trim()",
            json!(selector)
        );
        self.js(&script).await.as_str().map(str::to_string)
    }

    /// Where the browser is and the text it shows, for failure messages.
    async fn page_text(&self) -> String {
        let script = "return location.href + '\\n' + (document.body ? document.body.innerText : '(no body)')";
        match self.client.execute(script, vec![]).await {
            Ok(Json::String(text)) => text.chars().take(3000).collect(),
            other => format!("{other:?}"),
        }
    }

    /// Click the element matching `selector`.
    async fn click(&self, selector: &str) {
        let element = match self.client.find(Locator::Css(selector)).await {
            Ok(element) => element,
            Err(e) => panic!("no {selector} ({e}); the page:\n{}", self.page_text().await),
        };
        element
            .click()
            .await
            .unwrap_or_else(|e| panic!("clicking {selector}: {e}"));
    }

    /// Click the element matching `selector` and wait until the browser shows another page (a
    /// navigation: what a script set in the page is gone).
    async fn click_and_wait_for_page(&self, selector: &str) {
        self.js("window.__leaving = true; return null").await;
        self.click(selector).await;
        self.until(
            &format!("another page after clicking {selector}"),
            "return window.__leaving === undefined && document.readyState === 'complete'",
        )
        .await;
    }

    /// Press `keys` on the keyboard, one after the other, into whatever has the focus.
    async fn press(&self, keys: &str) {
        let mut actions = KeyActions::new("keyboard".into());
        for key in keys.chars() {
            actions = actions
                .then(KeyAction::Down { value: key })
                .then(KeyAction::Up { value: key });
        }
        self.client.perform_actions(actions).await.unwrap();
    }

    /// Press Shift+Tab.
    async fn press_shift_tab(&self) {
        let (shift, tab) = (char::from(Key::Shift), char::from(Key::Tab));
        let actions = KeyActions::new("keyboard".into())
            .then(KeyAction::Down { value: shift })
            .then(KeyAction::Down { value: tab })
            .then(KeyAction::Up { value: tab })
            .then(KeyAction::Up { value: shift });
        self.client.perform_actions(actions).await.unwrap();
    }

    /// The focused element as `tag#id` (`tag` for one without an id).
    async fn focused(&self) -> String {
        let active = self.client.active_element().await.unwrap();
        let tag = active.tag_name().await.unwrap().to_ascii_lowercase();
        match active.attr("id").await.unwrap() {
            Some(id) if !id.is_empty() => format!("{tag}#{id}"),
            _ => tag,
        }
    }

    /// Press Tab until `target` (`tag#id`) has the focus, 20 times at most.
    async fn tab_to(&self, target: &str) {
        let mut seen = Vec::new();
        loop {
            let focused = self.focused().await;
            if focused == target {
                return;
            }
            seen.push(focused);
            assert!(
                seen.len() <= 20,
                "20 Tabs did not reach {target}: the focus went {seen:?}"
            );
            self.press(&Key::Tab).await;
        }
    }

    /// Sign in through the form, with `token`, and wait for the overview.
    async fn sign_in(&self) {
        self.goto("/login").await;
        self.until_present("form#login input#token").await;
        self.client
            .find(Locator::Css("form#login input#token"))
            .await
            .unwrap()
            .send_keys(TOKEN)
            .await
            .unwrap();
        self.click_and_wait_for_page("form#login button").await;
        self.until_at("/").await;
    }

    /// Save what the browser shows as `target/console-screenshots/NAME.png`; its path.
    async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.unwrap();
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// The page shown now, as one visited: saved as a screenshot (`NAME.png`), laid out as every
    /// console page is (a `main`, one `h1`; signed in, the header's `nav` with Overview, Builds
    /// and the sign-out form), and without serious or critical accessibility violations.
    async fn visit(&self, name: &str) {
        self.screenshot(name).await;
        let layout = self
            .js(r#"return {
                    path: location.pathname,
                    h1: document.querySelectorAll('h1').length,
                    main: document.querySelectorAll('main').length,
                    overview: document.querySelector('header nav a[href="/"]') !== null,
                    builds: document.querySelector('header nav a[href="/builds"]') !== null,
                    // In the header (beside its nav, not in it).
                    logout: document.querySelector('header form#logout button') !== null,
                }"#)
            .await;
        assert_eq!(layout["h1"], 1, "{name}: one h1: {layout}");
        assert_eq!(layout["main"], 1, "{name}: one main: {layout}");
        if layout["path"] != "/login" {
            for part in ["overview", "builds", "logout"] {
                assert_eq!(layout[part], true, "{name}: the header's {part}: {layout}");
            }
        }
        self.assert_accessible(name).await;
    }

    /// What axe-core finds wrong with the page shown now.
    async fn axe(&self) -> Vec<Violation> {
        self.js(axe_source()).await;
        let run = r#"
            const done = arguments[arguments.length - 1];
            axe.run(document, {resultTypes: ['violations']})
                .then(results => done(results.violations.map(v => ({
                    id: v.id, impact: v.impact, help: v.help,
                    nodes: v.nodes.map(n => ({target: n.target, html: n.html, summary: n.failureSummary})),
                }))))
                .catch(e => done({error: String(e)}));
        "#;
        match self.client.execute_async(run, vec![]).await.unwrap() {
            Json::Array(violations) => violations,
            other => panic!("axe failed: {other}"),
        }
    }

    /// No accessibility violation of impact `serious` or `critical` in the page shown now (all
    /// of them are printed if there is one).
    async fn assert_accessible(&self, name: &str) {
        let violations = self.axe().await;
        let grave = violations
            .iter()
            .filter(|v| matches!(v["impact"].as_str(), Some("serious" | "critical")))
            .count();
        if grave > 0 {
            let mut report = String::new();
            for v in &violations {
                report += &format!("- {} ({}): {}\n", v["id"], v["impact"], v["help"]);
                for node in v["nodes"].as_array().into_iter().flatten() {
                    report += &format!("    {} {}\n", node["target"], node["html"]);
                }
            }
            panic!("{name}: {grave} serious or critical accessibility violations:\n{report}");
        }
    }
}

/// The source of axe.min.js: `AJOUR_TEST_AXE`, else where scripts/setup-test-env.sh installs it.
fn axe_source() -> &'static str {
    static SOURCE: OnceLock<String> = OnceLock::new();
    SOURCE.get_or_init(|| {
        let path = match std::env::var_os("AJOUR_TEST_AXE") {
            Some(path) => PathBuf::from(path),
            None => {
                let npm = std::env::var_os("AJOUR_TEST_NPM")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| {
                        let cache = std::env::var_os("XDG_CACHE_HOME")
                            .map(PathBuf::from)
                            .unwrap_or_else(|| {
                                PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache")
                            });
                        cache.join("ajour-test/npm")
                    });
                npm.join("node_modules/axe-core/axe.min.js")
            }
        };
        std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "axe-core at {} ({e}): run scripts/setup-test-env.sh, or set AJOUR_TEST_AXE",
                path.display()
            )
        })
    })
}

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `$CARGO_TARGET_DIR/console-screenshots`, by default in the workspace's `target/`.
fn screenshot_dir() -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => repository().join(dir),
        None => repository().join("target"),
    };
    target.join("console-screenshots")
}

// ---------------------------------------------------------------------------------------------
// The server, the `ajour` CLI, the REST API.

/// `ajour serve` as a process, with a data dir of its own.
struct Server {
    process: ServerProcess,
    data: tempfile::TempDir,
    url: String,
}

impl Server {
    async fn start(extra: &[&str]) -> Self {
        let data = tempfile::tempdir().unwrap();
        let mut serve = Command::new(AJOUR);
        serve
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--api-token",
                TOKEN,
                "--data-dir",
            ])
            .arg(data.path())
            .args(["--progress-interval-ms", "200"])
            .args(extra)
            .env("AJOUR_LOG", "warn");
        let process = ServerProcess::start(serve).await;
        let url = process.url();
        Self { process, data, url }
    }

    fn data_dir(&self) -> &str {
        self.data.path().to_str().unwrap()
    }

    /// A command of the `ajour` CLI, without the test's own `AJOUR_*` settings.
    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = Command::new(AJOUR);
        command.args(args).env("AJOUR_LOG", "warn");
        ajour_testkit::without_outside_settings(&mut command);
        tokio::process::Command::from(command)
    }

    /// Run `ajour ARGS` to its end; it must succeed.
    async fn ajour(&self, args: &[&str]) -> String {
        let output = self.command(args).output().await.unwrap();
        assert!(
            output.status.success(),
            "ajour {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `ajour firmware add NAME --version VERSION` with `len` random bytes.
    async fn add_firmware(&self, name: &str, version: &str, len: usize) {
        let file = self.data.path().join(format!("{name}.bin"));
        let mut image = vec![0u8; len];
        rand::thread_rng().fill_bytes(&mut image);
        std::fs::write(&file, image).unwrap();
        let dir = self.data_dir();
        let file = file.to_str().unwrap();
        self.ajour(&[
            "firmware",
            "add",
            name,
            "--version",
            version,
            "--file",
            file,
            "--data-dir",
            dir,
        ])
        .await;
    }

    /// Application `fleet` on firmware `fw` (2.0.0, `len` random bytes) and its devices
    /// `devices`, each with password `pw`.
    async fn fleet(&self, len: usize, devices: &[&str]) {
        self.add_firmware("fw", "2.0.0", len).await;
        let (url, token) = (self.url.as_str(), TOKEN);
        self.ajour(&[
            "app",
            "create",
            "fleet",
            "--firmware-file",
            "fw",
            "--url",
            url,
            "--token",
            token,
        ])
        .await;
        for device in devices {
            let args = [
                "device",
                "create",
                "fleet",
                device,
                "--password",
                "pw",
                "--url",
                url,
                "--token",
                token,
            ];
            self.ajour(&args).await;
        }
    }

    /// `ajour simulate` of device `device` of `fleet` running `version`, started (not awaited):
    /// its output goes to files in the server's temp dir.
    fn simulate(&self, device: &str, version: &str, extra: &[&str]) -> Simulation {
        let dir = self.process.dir();
        let name = format!("simulate-{device}-{version}");
        let stdout = std::fs::File::create(dir.join(format!("{name}.stdout"))).unwrap();
        let stderr = std::fs::File::create(dir.join(format!("{name}.stderr"))).unwrap();
        let output = [
            dir.join(format!("{name}.stdout")),
            dir.join(format!("{name}.stderr")),
        ];
        let mut args = vec![
            "simulate", "--url", &self.url, "--app", "fleet", "--device", device,
        ];
        args.extend(["--password", "pw", "--version", version]);
        args.extend(extra);
        let child = self
            .command(&args)
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Simulation { child, output }
    }

    /// `METHOD /api/PATH` with the API token and `body`; the status and the JSON answered.
    async fn api(&self, method: reqwest::Method, path: &str, body: Option<Json>) -> (StatusCode, Json) {
        let mut request = reqwest::Client::new()
            .request(method, format!("{}/api/{path}", self.url))
            .bearer_auth(TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Json::String(text)))
    }
}

/// An `ajour simulate` running.
struct Simulation {
    child: tokio::process::Child,
    /// Its stdout and stderr.
    output: [PathBuf; 2],
}

impl Simulation {
    /// Wait for its end (at most two minutes); it must have succeeded.
    async fn succeeded(mut self) {
        let status = tokio::time::timeout(Duration::from_secs(120), self.child.wait())
            .await
            .expect("ajour simulate to end within 2 minutes")
            .unwrap();
        assert!(status.success(), "ajour simulate: {status}\n{}", self.output());
    }

    fn output(&self) -> String {
        let read = |path: &PathBuf| std::fs::read_to_string(path).unwrap_or_default();
        format!("{}{}", read(&self.output[0]), read(&self.output[1]))
    }
}

// ---------------------------------------------------------------------------------------------
// Without a browser: forms and cookies as reqwest sees them.

/// The cookies `response` sets, as `name=value` (for a `Cookie` header), with their whole lines.
fn set_cookies(response: &reqwest::Response) -> Vec<(String, String)> {
    response
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .map(|line| {
            let pair = line.split(';').next().unwrap_or_default().trim().to_string();
            (pair, line.to_string())
        })
        .collect()
}

/// The value of attribute `attr` of the tag that starts at `tag_start` in `html`.
fn attribute(html: &str, tag_start: usize, attr: &str) -> Option<String> {
    let tag = &html[tag_start..tag_start + html[tag_start..].find('>')?];
    let at = tag.find(&format!(" {attr}=\""))? + attr.len() + 3;
    Some(tag[at..at + tag[at..].find('"')?].replace("&amp;", "&"))
}

/// The `action` and the hidden `csrf` value (if it has one) of form `#id` in `html`.
fn form_of(html: &str, id: &str) -> (String, Option<String>) {
    let form = html
        .match_indices("<form")
        .map(|(at, _)| at)
        .find(|&at| attribute(html, at, "id").as_deref() == Some(id))
        .unwrap_or_else(|| panic!("no form#{id} in:\n{html}"));
    let action = attribute(html, form, "action").unwrap_or_else(|| panic!("form#{id} has no action"));
    let end = form + html[form..].find("</form>").unwrap();
    let csrf = html[form..end]
        .match_indices("<input")
        .map(|(at, _)| form + at)
        .find(|&at| attribute(html, at, "name").as_deref() == Some("csrf"))
        .and_then(|at| attribute(html, at, "value"));
    (action, csrf)
}

// ---------------------------------------------------------------------------------------------
// The tests.

/// Signing in with the keyboard alone: from `/` (sent to the sign-in page) Tab moves the focus
/// to the token, typing it and Enter lands on the overview with the session cookie HttpOnly and
/// SameSite=Strict; a wrong token shows an error; signing out. Forms refuse POSTs without their
/// CSRF token, or with a forged one (reqwest, no browser).
#[tokio::test]
async fn signing_in_with_the_keyboard() {
    let server = Server::start(&[]).await;
    let browser = Browser::open(&server.url).await;

    browser.goto("/").await;
    browser.until_at("/login").await;
    browser
        .until_present("form#login input#token[type=password]")
        .await;
    let label = browser
        .js("const t = document.getElementById('token'); return t.labels.length ? t.labels[0].textContent.trim() : null")
        .await;
    assert_eq!(label, "API token", "input#token's label");
    browser.visit("login").await;

    // A wrong token first: the form again, with an error.
    browser.tab_to("input#token").await;
    // Tab goes on to the button, Shift+Tab back.
    browser.press(&Key::Tab).await;
    assert_eq!(browser.focused().await, "button", "after input#token");
    browser.press_shift_tab().await;
    assert_eq!(
        browser.focused().await,
        "input#token",
        "Shift+Tab from the button"
    );
    browser.js("window.__leaving = true; return null").await;
    browser.press(&format!("wrong-token{}", Key::Enter)).await;
    browser
        .until(
            "the sign-in form again, with an error",
            "return window.__leaving === undefined && document.readyState === 'complete' && \
             document.querySelector('form#login') !== null && document.querySelector('p.error') !== null",
        )
        .await;
    browser.visit("login-error").await;

    // A token typed is never sent back.
    assert_eq!(
        browser.js("return document.getElementById('token').value").await,
        ""
    );

    browser.tab_to("input#token").await;
    browser.press(&format!("{TOKEN}{}", Key::Enter)).await;
    browser.until_at("/").await;
    // No application and no builds here: the overview has neither table#apps nor
    // section#builds-by-state (the tests below look at them where there are some).
    browser.until_present("main h1").await;
    browser.visit("overview-empty").await;

    let cookies = browser.client.get_all_cookies().await.unwrap();
    let session = cookies
        .iter()
        .find(|c| c.name() == "ajour_session")
        .unwrap_or_else(|| panic!("no cookie ajour_session: {cookies:?}"));
    assert_eq!(session.http_only(), Some(true), "{session:?}");
    assert!(session.same_site().is_some_and(|s| s.is_strict()), "{session:?}");

    // Signing out: the sign-in page, and the overview no more.
    browser.click_and_wait_for_page("form#logout button").await;
    browser.until_at("/login").await;
    browser.goto("/").await;
    browser.until_at("/login").await;
    browser.close().await;

    // Forms without the browser.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let url = &server.url;
    let page = http.get(format!("{url}/login")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let cookie: Vec<String> = set_cookies(&page).into_iter().map(|(pair, _)| pair).collect();
    let cookie = cookie.join("; ");
    let (action, login_csrf) = form_of(&page.text().await.unwrap(), "login");
    let post = |path: String, cookie: String, form: Vec<(&'static str, String)>| {
        let http = http.clone();
        async move {
            http.post(format!("{url}{path}"))
                .header(reqwest::header::COOKIE, cookie)
                .form(&form)
                .send()
                .await
                .unwrap()
        }
    };
    let token = |token: &str| ("token", token.to_string());
    let with_csrf = |mut form: Vec<(&'static str, String)>| {
        form.extend(login_csrf.clone().map(|csrf| ("csrf", csrf)));
        form
    };
    // The sign-in form has no session to tie a CSRF token to: only when it has one (as every
    // form is to have) are POSTs without it or with a forged one looked at.
    if login_csrf.is_some() {
        for (what, form) in [
            ("without csrf", vec![token(TOKEN)]),
            (
                "with a forged csrf",
                vec![token(TOKEN), ("csrf", "forged".into())],
            ),
        ] {
            let response = post(action.clone(), cookie.clone(), form).await;
            assert_eq!(response.status(), StatusCode::FORBIDDEN, "POST {action} {what}");
        }
    } else {
        eprintln!("form#login has no input[name=csrf]: its POSTs are not checked for one");
    }
    let wrong = post(action.clone(), cookie.clone(), with_csrf(vec![token("wrong")])).await;
    assert_eq!(
        wrong.status(),
        StatusCode::UNAUTHORIZED,
        "POST {action} with a wrong token"
    );
    let html = wrong.text().await.unwrap();
    assert!(
        html.contains("id=\"login\"") && html.contains("class=\"error\""),
        "{html}"
    );
    assert!(
        !html.contains("\"wrong\""),
        "the token typed is sent back: {html}"
    );
    let signed_in = post(action.clone(), cookie.clone(), with_csrf(vec![token(TOKEN)])).await;
    assert!(
        signed_in.status().is_redirection(),
        "POST {action}: {}",
        signed_in.status()
    );
    assert_eq!(signed_in.headers()[reqwest::header::LOCATION], "/");
    let (session, line) = set_cookies(&signed_in)
        .into_iter()
        .find(|(pair, _)| pair.starts_with("ajour_session="))
        .expect("ajour_session set");
    let attributes = line.to_ascii_lowercase();
    assert!(
        attributes.contains("httponly") && attributes.contains("samesite=strict"),
        "{line}"
    );
    let session = format!("{cookie}; {session}");

    let overview = http
        .get(format!("{url}/"))
        .header(reqwest::header::COOKIE, &session)
        .send()
        .await
        .unwrap();
    assert_eq!(overview.status(), StatusCode::OK);
    let (logout, csrf) = form_of(&overview.text().await.unwrap(), "logout");
    let csrf = csrf.expect("form#logout's input[name=csrf]");
    for (what, form) in [
        ("without csrf", vec![]),
        ("with a forged csrf", vec![("csrf", "forged".to_string())]),
        (
            "with a csrf one character longer",
            vec![("csrf", format!("{csrf}0"))],
        ),
    ] {
        let response = post(logout.clone(), session.clone(), form).await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "POST {logout} {what}");
    }
    // Still signed in: the refused POSTs did nothing.
    let overview = http
        .get(format!("{url}/"))
        .header(reqwest::header::COOKIE, &session)
        .send()
        .await
        .unwrap();
    assert_eq!(overview.status(), StatusCode::OK);
    let logged_out = post(logout.clone(), session.clone(), vec![("csrf", csrf)]).await;
    assert!(
        logged_out.status().is_redirection(),
        "POST {logout}: {}",
        logged_out.status()
    );
}

/// A device's page follows its update without being reloaded: the progress only goes up, passes
/// values between 0 and 100, and ends at 100 with the device in sync; its history tells it.
#[tokio::test]
async fn device_page_follows_an_update_live() {
    let server = Server::start(&[]).await;
    server.fleet(256 * 1024, &["dev"]).await;
    let browser = Browser::open(&server.url).await;
    browser.sign_in().await;

    browser.goto("/apps/fleet/devices/dev").await;
    browser.until_present("progress#progress").await;
    browser.until_present("span#state").await;
    browser.visit("device-unknown").await;
    browser.js("window.__marker = 1; return null").await;

    let simulation = server.simulate("dev", "1.0.0", &["--mtu", "64"]);
    let read = r#"
        const progress = document.querySelector('progress#progress');
        const state = document.querySelector('span#state');
        const percent = document.querySelector('span#percent');
        return {
            value: progress && progress.getAttribute('value'),
            max: progress && progress.getAttribute('max'),
            state: state && state.textContent.trim(),
            percent: percent && percent.textContent.trim(),
            marker: window.__marker === undefined ? null : window.__marker,
        };
    "#;
    let mut seen: Vec<f64> = Vec::new();
    let mut midway = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    let last = loop {
        let now = browser.js(read).await;
        let value: f64 = now["value"].as_str().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        if seen.last() != Some(&value) {
            seen.push(value);
        }
        if value > 0.0 && value < 100.0 && midway.is_none() {
            midway = Some(browser.screenshot("device-updating").await);
        }
        if now["state"] == "in sync" && value == 100.0 {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "the device page did not show the device in sync at 100 in 2 minutes; \
             last {now}, values seen {seen:?}\n{}\nsimulate: {}",
            browser.page_text().await,
            simulation.output()
        );
        tokio::time::sleep(POLL).await;
    };
    simulation.succeeded().await;
    eprintln!("progress seen on the device page: {seen:?}");
    assert!(
        seen.iter().any(|v| *v > 0.0 && *v < 100.0),
        "no progress between 0 and 100 seen: {seen:?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "the progress went back: {seen:?}"
    );
    assert_eq!(last["marker"], 1, "the page was reloaded (values seen {seen:?})");
    let max = last["max"].as_str().and_then(|v| v.parse::<f64>().ok());
    assert_eq!(max, Some(100.0), "{last}");
    assert_eq!(last["percent"], "100%", "{last}");

    let live_history = browser
        .js("return document.querySelectorAll('ol#history li').length")
        .await;
    // The history as the page shows it when opened (whether or not the list is live).
    browser.goto("/apps/fleet/devices/dev").await;
    browser.until_present("ol#history").await;
    let history = browser
        .js("return Array.from(document.querySelectorAll('ol#history li'), li => li.textContent.trim())")
        .await;
    assert!(
        history.as_array().unwrap().len() >= 2,
        "ol#history: {history} (before the reload, live: {live_history} items)"
    );
    let versions = browser.text_of("dl#versions").await.unwrap_or_default();
    assert!(versions.contains("2.0.0"), "dl#versions: {versions}");
    assert_eq!(browser.text_of("span#state").await.as_deref(), Some("in sync"));
    let in_sync = browser.screenshot("device-in-sync").await;
    browser.visit("device-in-sync").await;

    if std::env::var("AJOUR_BLESS_SCREENSHOTS").as_deref() == Ok("1") {
        let chosen = midway.unwrap_or(in_sync);
        std::fs::copy(&chosen, repository().join("docs/console.png")).unwrap();
    }

    browser.goto("/apps/fleet/devices").await;
    browser
        .until_present("table#devices tr[data-device=\"dev\"]")
        .await;
    let row = browser
        .js(r#"
            const row = document.querySelector('table#devices tr[data-device="dev"]');
            const text = s => { const e = row.querySelector(s); return e && e.textContent.trim(); };
            const progress = row.querySelector('progress');
            return {
                current: text('td.current'), target: text('td.target'), state: text('td.state'),
                percent: text('span.percent'), lastSeen: text('td.last-seen'),
                value: progress && progress.getAttribute('value'), max: progress && progress.getAttribute('max'),
            };
        "#)
        .await;
    assert_eq!(row["current"], "2.0.0", "{row}");
    assert_eq!(row["target"], "2.0.0", "{row}");
    assert_eq!(row["state"], "in sync", "{row}");
    let value = row["value"].as_str().and_then(|v| v.parse::<f64>().ok());
    assert_eq!(value, Some(100.0), "{row}");
    let max = row["max"].as_str().and_then(|v| v.parse::<f64>().ok());
    assert_eq!(max, Some(100.0), "{row}");
    assert_eq!(row["percent"], "100%", "{row}");
    assert!(row["lastSeen"].as_str().is_some_and(|s| !s.is_empty()), "{row}");
    browser.visit("devices").await;

    // The overview counts it in sync.
    browser.goto("/").await;
    browser.until_present("table#apps tr[data-app=\"fleet\"]").await;
    let counts = browser
        .js(r#"
            const row = document.querySelector('table#apps tr[data-app="fleet"]');
            const count = s => { const e = row.querySelector(`td[data-state="${s}"]`); return e && e.textContent.trim(); };
            return {
                inSync: count('in-sync'), updating: count('updating'), failed: count('failed'),
                unknown: count('unknown'), link: row.querySelector('a[href="/apps/fleet"]') !== null,
            };
        "#)
        .await;
    assert_eq!(
        counts,
        json!({"inSync": "1", "updating": "0", "failed": "0", "unknown": "0", "link": true})
    );
    browser.visit("overview").await;
    browser.close().await;
}

/// The application's firmware changed on its page; the device then updates to it, as the
/// devices page shows live.
#[tokio::test]
async fn firmware_changed_from_the_application_page() {
    let server = Server::start(&[]).await;
    server.fleet(16 * 1024, &["dev"]).await;
    server.simulate("dev", "1.0.0", &[]).succeeded().await;
    server.add_firmware("fw3", "3.0.0", 16 * 1024).await;
    let browser = Browser::open(&server.url).await;
    browser.sign_in().await;

    browser.goto("/apps/fleet").await;
    browser.until_present("form#set-firmware").await;
    let firmware = browser.text_of("dl#firmware").await.unwrap_or_default();
    assert!(firmware.contains("2.0.0"), "dl#firmware: {firmware}");
    let kinds = browser
        .js("return Array.from(document.querySelectorAll('select#firmware-kind option'), o => o.value)")
        .await;
    assert_eq!(kinds, json!(["file", "container", "hawkbit"]));
    assert_eq!(
        browser
            .js("return document.querySelector('a#devices-link').getAttribute('href')")
            .await,
        "/apps/fleet/devices"
    );
    assert_eq!(
        browser
            .js("return document.querySelector('p.notice') === null")
            .await,
        true
    );
    browser.visit("application").await;

    browser
        .client
        .find(Locator::Css("select#firmware-kind"))
        .await
        .unwrap()
        .select_by_value("file")
        .await
        .unwrap();
    let value = browser
        .client
        .find(Locator::Css("input#firmware-value"))
        .await
        .unwrap();
    value.clear().await.unwrap();
    value.send_keys("fw3").await.unwrap();
    browser.click("form#set-firmware button").await;
    browser.until_present("p.notice").await;
    // The source at once; the target version is the one devices are told, once they ask again.
    let firmware = browser.text_of("dl#firmware").await.unwrap_or_default();
    assert!(firmware.contains("fw3"), "dl#firmware: {firmware}");
    browser.visit("application-changed").await;

    browser.goto("/apps/fleet/devices").await;
    browser
        .until_present("table#devices tr[data-device=\"dev\"]")
        .await;
    let row = r#"
        const row = document.querySelector('table#devices tr[data-device="dev"]');
        const text = s => { const e = row && row.querySelector(s); return e && e.textContent.trim(); };
        return {current: text('td.current'), target: text('td.target'), state: text('td.state')};
    "#;
    // Until it asks again, the device is shown as it was told last: in sync on 2.0.0.
    browser.js("window.__marker = 1; return null").await;
    let simulation = server.simulate("dev", "2.0.0", &[]);
    browser
        .until(
            "the row of dev to show it in sync on 3.0.0",
            &format!(
                "const r = (() => {{ {row} }})(); \
                 return r.current === '3.0.0' && r.target === '3.0.0' && r.state === 'in sync' && r"
            ),
        )
        .await;
    simulation.succeeded().await;
    assert_eq!(
        browser.js("return window.__marker").await,
        1,
        "the devices page was reloaded"
    );

    browser.goto("/apps/fleet").await;
    browser.until_present("dl#firmware").await;
    let firmware = browser.text_of("dl#firmware").await.unwrap_or_default();
    assert!(
        firmware.contains("fw3") && firmware.contains("3.0.0"),
        "dl#firmware: {firmware}"
    );

    browser.goto("/apps/fleet/devices").await;
    browser.until_present("form#filter").await;
    // The filter: in sync shows the device, failed does not.
    for (state, shown) in [("failed", false), ("in-sync", true)] {
        browser
            .client
            .find(Locator::Css("form#filter select#state"))
            .await
            .unwrap()
            .select_by_value(state)
            .await
            .unwrap();
        browser.click_and_wait_for_page("form#filter button").await;
        let query = browser.js("return location.search").await;
        assert!(
            query.as_str().unwrap().contains(&format!("state={state}")),
            "{query}"
        );
        let present = browser
            .js(r#"return document.querySelector('table#devices tr[data-device="dev"]') !== null"#)
            .await;
        assert_eq!(present, shown, "state={state}: {}", browser.page_text().await);
    }
    browser.close().await;
}

/// How the page fits the window: its widths, the table's font size, and the words of the table
/// broken over two lines or more (a table too narrow for its words: unreadable; a break at a
/// hyphen is not counted).
const FITS: &str = r#"
    const table = document.querySelector('table#devices, table#apps');
    const broken = [];
    for (const cell of table.querySelectorAll('th, td')) {
        const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
        for (let node = walker.nextNode(); node; node = walker.nextNode()) {
            for (const word of node.data.matchAll(/[^\s-]+/g)) {
                const range = document.createRange();
                range.setStart(node, word.index);
                range.setEnd(node, word.index + word[0].length);
                const lines = new Set(Array.from(range.getClientRects(), r => Math.round(r.top)));
                if (lines.size > 1) broken.push(word[0]);
            }
        }
    }
    return {
        inner: window.innerWidth,
        scroll: document.documentElement.scrollWidth,
        fontSize: parseFloat(getComputedStyle(table.querySelector('td')).fontSize),
        broken,
    };
"#;

/// On a phone's screen the devices page is no wider than the screen, and its table readable.
#[tokio::test]
async fn devices_page_fits_a_phone() {
    let server = Server::start(&[]).await;
    server
        .fleet(16 * 1024, &["dev", "a-device-with-a-rather-long-name"])
        .await;
    server.simulate("dev", "1.0.0", &[]).succeeded().await;
    let browser = Browser::phone(&server.url).await;
    browser.sign_in().await;
    let mut problems = Vec::new();
    for (name, path, selector) in [
        (
            "devices-phone",
            "/apps/fleet/devices",
            "table#devices tr[data-device=\"dev\"]",
        ),
        ("overview-phone", "/", "table#apps"),
    ] {
        browser.goto(path).await;
        browser.until_present(selector).await;
        browser.screenshot(name).await;
        let fit = browser.js(FITS).await;
        if fit["inner"] != 390 {
            problems.push(format!(
                "{name}: not laid out for the phone's width (no meta viewport width=device-width?): {fit}"
            ));
        }
        if fit["scroll"].as_f64().unwrap() > fit["inner"].as_f64().unwrap() {
            problems.push(format!("{name}: wider than the screen: {fit}"));
        }
        if fit["fontSize"].as_f64().unwrap_or(0.0) < 12.0 {
            problems.push(format!("{name}: the table's text is too small: {fit}"));
        }
        if fit["broken"] != json!([]) {
            problems.push(format!(
                "{name}: words of the table broken over lines (see {name}.png): {}",
                fit["broken"]
            ));
        }
    }
    assert!(problems.is_empty(), "on a phone:\n{}", problems.join("\n"));
    browser.close().await;
}

/// A build triggered from the builds page, followed on its own page until it succeeded.
#[tokio::test]
async fn build_triggered_from_the_builds_page() {
    let registry = OciRegistry::start().await;
    let prefix = format!("{}/fw/", registry.host());
    let server = Server::start(&[
        "--build-runner",
        "local",
        "--oci-registry",
        &prefix,
        "--oci-plain-http",
        "--oci-recheck-ms",
        "200",
    ])
    .await;
    let source = tempfile::tempdir().unwrap();
    let repo = firmware_repository(source.path());
    let firmware = json!({"container": {
        "image": "app-fw:latest",
        "imagePullPolicy": "Always",
        "build": {
            "source": {"git": {"uri": repo.to_str().unwrap(), "project": "firmware"}},
            "command": ["sh", "build.sh"],
            "artifact": {"path": "out/firmware.bin"},
        },
    }});
    let (status, body) = server
        .api(
            reqwest::Method::POST,
            "registry/v1alpha1/apps",
            Some(json!({"metadata": {"name": "built"}, "spec": {"firmware": firmware}})),
        )
        .await;
    assert!(status.is_success(), "creating app built: {status} {body}");

    let browser = Browser::open(&server.url).await;
    browser.sign_in().await;
    browser.goto("/builds").await;
    browser.until_present("form.trigger[data-app=\"built\"]").await;
    browser.visit("builds").await;
    browser.click("form.trigger[data-app=\"built\"] button").await;
    let path = browser
        .until(
            "the build's page",
            "return /^\\/builds\\/[^/]+$/.test(location.pathname) && document.readyState === 'complete' \
             && location.pathname",
        )
        .await;
    let id = path.as_str().unwrap().trim_start_matches("/builds/").to_string();
    browser
        .until_within(
            // A clone, the build and a push: more than a page's wait.
            Duration::from_secs(60),
            "the build to succeed with `pushed` in its log",
            r#"
                const state = document.querySelector('span#build-state');
                const log = document.querySelector('pre#log');
                return state !== null && state.textContent.trim() === 'succeeded'
                    && log !== null && log.textContent.includes('pushed');
            "#,
        )
        .await;
    browser.visit("build").await;

    browser.goto("/builds").await;
    let row = format!("table#builds tr[data-build={}] td.state", json!(id));
    browser.until_present(&row).await;
    assert_eq!(browser.text_of(&row).await.as_deref(), Some("succeeded"));

    // The overview counts it.
    browser.goto("/").await;
    browser.until_present("section#builds-by-state").await;
    let builds = browser.text_of("section#builds-by-state").await.unwrap();
    assert!(builds.contains("succeeded"), "section#builds-by-state: {builds}");
    browser.visit("overview-builds").await;
    browser.close().await;
    drop(server);
    drop(registry);
}

/// A repository whose `firmware/build.sh` writes `out/firmware.bin` (as tests/it/builds.rs).
fn firmware_repository(dir: &Path) -> PathBuf {
    let repo = dir.join("firmware-src");
    std::fs::create_dir_all(repo.join("firmware")).unwrap();
    std::fs::write(
        repo.join("firmware/build.sh"),
        "set -e\n\
         mkdir -p out\n\
         seq 1 3000 | sed \"s/^/firmware $AJOUR_BUILD_COMMIT line /\" > out/firmware.bin\n\
         echo \"wrote $(wc -c < out/firmware.bin) bytes\"\n",
    )
    .unwrap();
    let git = |args: &[&str]| {
        let output = Command::new("git")
            .current_dir(&repo)
            .args(["-c", "user.name=Test", "-c", "user.email=test@example.com"])
            .args(args)
            .output()
            .expect("git (scripts/setup-test-env.sh installs it)");
        assert!(
            output.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    git(&["init", "--quiet", "--initial-branch=main"]);
    git(&["add", "."]);
    git(&["commit", "--quiet", "-m", "firmware"]);
    repo
}

/// A rollout paused, resumed and cancelled with its page's buttons; the API agrees each time.
#[tokio::test]
async fn rollout_steered_from_its_page() {
    let server = Server::start(&[]).await;
    server.fleet(16 * 1024, &["dev-0", "dev-1"]).await;
    server.add_firmware("fw3", "3.0.0", 16 * 1024).await;
    let (status, rollout) = server
        .api(
            reqwest::Method::POST,
            "dfu/v1alpha1/apps/fleet/rollouts",
            Some(json!({
                "firmware": {"file": {"name": "fw3"}},
                "waves": [{"count": 1, "approval": "manual"}, {"percent": 100, "approval": "manual"}],
            })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{rollout}");
    let id = match &rollout["id"] {
        Json::String(id) => id.clone(),
        id => id.to_string(),
    };
    let state = || async {
        let path = format!("dfu/v1alpha1/apps/fleet/rollouts/{id}");
        let (status, rollout) = server.api(reqwest::Method::GET, &path, None).await;
        assert_eq!(status, StatusCode::OK, "{rollout}");
        rollout["state"].as_str().unwrap().to_string()
    };
    assert_eq!(state().await, "active");

    let browser = Browser::open(&server.url).await;
    browser.sign_in().await;
    let page = format!("/apps/fleet/rollouts/{id}");
    browser.goto(&page).await;
    browser.until_present("table#waves").await;
    browser.until_present("form#rollout-actions").await;
    browser.visit("rollout").await;

    for (action, after) in [("pause", "paused"), ("resume", "active"), ("cancel", "cancelled")] {
        let button = format!("form#rollout-actions button[name=action][value={action}]");
        browser.until_present(&button).await;
        browser.click(&button).await;
        // The page says so (the contract names no element for the state: its text).
        let script = format!(
            "return location.pathname === {} && document.readyState === 'complete' \
             && document.querySelector('main').innerText.toLowerCase().includes({})",
            json!(page),
            json!(after)
        );
        browser
            .until(&format!("the rollout's page to say {after}"), &script)
            .await;
        assert_eq!(state().await, after, "after {action}");
        browser.screenshot(&format!("rollout-{after}")).await;
    }
    browser.visit("rollout-cancelled").await;

    // The overview's chart of the application's latest rollout.
    browser.goto("/?app=fleet").await;
    browser.until_present("svg#rollout-chart").await;
    browser.visit("overview-rollout").await;
    browser.close().await;
}

/// The devices page shows 50 devices a page, with links to the next and the previous page, and
/// sorts them by state.
#[tokio::test]
async fn devices_page_pages_and_sorts() {
    let server = Server::start(&[]).await;
    server.fleet(16 * 1024, &["dev"]).await;
    let (url, token) = (server.url.as_str(), TOKEN);
    let args = [
        "device",
        "create",
        "fleet",
        "d",
        "--count",
        "55",
        "--no-password",
        "--url",
        url,
        "--token",
        token,
    ];
    server.ajour(&args).await;
    server.simulate("dev", "1.0.0", &[]).succeeded().await;
    let browser = Browser::open(&server.url).await;
    browser.sign_in().await;

    let page = r#"return {
        rows: document.querySelectorAll('table#devices tr[data-device]').length,
        next: document.querySelector('nav.pages a[rel=next]') !== null,
        prev: document.querySelector('nav.pages a[rel=prev]') !== null,
        states: Array.from(document.querySelectorAll('table#devices tr[data-device] td.state'), td => td.textContent.trim()),
    }"#;
    browser.goto("/apps/fleet/devices").await;
    browser.until_present("table#devices tr[data-device]").await;
    let first = browser.js(page).await;
    assert_eq!(
        (&first["rows"], &first["next"], &first["prev"]),
        (&json!(50), &json!(true), &json!(false)),
        "{first}"
    );
    browser.click_and_wait_for_page("nav.pages a[rel=next]").await;
    browser.until_present("table#devices tr[data-device]").await;
    let second = browser.js(page).await;
    assert_eq!(
        (&second["rows"], &second["next"], &second["prev"]),
        (&json!(6), &json!(false), &json!(true)),
        "{second}"
    );
    browser.visit("devices-page-2").await;
    browser.click_and_wait_for_page("nav.pages a[rel=prev]").await;
    assert_eq!(browser.js(page).await["rows"], 50);

    browser
        .client
        .find(Locator::Css("form#filter select#sort"))
        .await
        .unwrap()
        .select_by_value("state")
        .await
        .unwrap();
    browser.click_and_wait_for_page("form#filter button").await;
    let query = browser.js("return location.search").await;
    assert!(query.as_str().unwrap().contains("sort=state"), "{query}");
    // Sorted by state: each state's devices together; the one in sync on this page or, sorted
    // the same, on the next.
    let sorted = browser.js(page).await;
    let states: Vec<&str> = sorted["states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let mut groups = states.clone();
    groups.dedup();
    let mut distinct = groups.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(groups.len(), distinct.len(), "not sorted by state: {states:?}");
    if !states.contains(&"in sync") {
        browser.click_and_wait_for_page("nav.pages a[rel=next]").await;
        let rest = browser.js(page).await;
        assert!(
            rest["states"].as_array().unwrap().contains(&json!("in sync")),
            "{rest}"
        );
    }
    browser.close().await;
}

//! The web app and the cluster map in headless Chromium, driven over WebDriver against
//! real `chinwag` processes. Needs `chromedriver` (Debian: `chromium-driver`) on PATH or
//! in `CHROMEDRIVER`; without it the tests say so and pass, unless
//! `CHINWAG_REQUIRE_BROWSER` is set, as `.ci/run` does after installing it.
//! With `CHINWAG_SCREENSHOTS=DIR` the screenshots for the README are written to DIR.

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

/// WebDriver's codes for the Enter and Escape keys.
const ENTER: char = '\u{e007}';
const ESCAPE: char = '\u{e00c}';
/// Long enough for a reconnect with backoff; only reached on failure.
const PATIENCE: Duration = Duration::from_secs(30);

/// A chromedriver process; each session it opens is a separate browser with its own
/// profile, so two sessions are two people.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    /// Starts chromedriver on a port found free. Another process can take that port
    /// before chromedriver binds it; chromedriver then exits, and we try a new port.
    fn start() -> Option<Driver> {
        let program = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let child = match Command::new(&program)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
            {
                Ok(child) => child,
                Err(e) => {
                    let why = format!("cannot run {program} ({e}); install chromium and chromium-driver");
                    assert!(std::env::var_os("CHINWAG_REQUIRE_BROWSER").is_none(), "{why}");
                    eprintln!("SKIPPED: {why}");
                    return None;
                }
            };
            if let Some(driver) = Self::listening(child, port) {
                return Some(driver);
            }
        }
        panic!("chromedriver exited at start three times");
    }

    /// Waits until chromedriver accepts connections on `port`; `None` if it exits first.
    fn listening(mut child: Child, port: u16) -> Option<Driver> {
        let deadline = std::time::Instant::now() + SOON;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if child.try_wait().unwrap().is_some() {
                return None;
            }
            assert!(std::time::Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        })
    }

    async fn browser(&self, width: u32, height: u32) -> Client {
        let mut caps = serde_json::Map::new();
        let args = [
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--disable-gpu".to_owned(),
            format!("--window-size={width},{height}"),
        ];
        // Desktop Chrome will not make a window narrower than 500 px; phone emulation will.
        let options = if width < 500 {
            json!({ "args": args, "mobileEmulation": { "deviceMetrics": { "width": width, "height": height, "pixelRatio": 1 } } })
        } else {
            json!({ "args": args })
        };
        caps.insert("goog:chromeOptions".into(), options);
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("start a headless Chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `chinwag demo`, as a user runs it: several DCs, development sign-in on.
struct Demo {
    child: Child,
    _dir: tempfile::TempDir,
    /// Per DC: its name and its web URL.
    dcs: Vec<(String, String)>,
}

impl Demo {
    fn start(n: usize) -> Demo {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(BIN)
            .args(["demo", "--json", "--dcs", &n.to_string(), "--data"])
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let dcs = lines
            .take(n)
            .map(|line| {
                let dc: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
                (
                    dc["dc"].as_str().unwrap().to_owned(),
                    dc["http"].as_str().unwrap().to_owned(),
                )
            })
            .collect::<Vec<(String, String)>>();
        // The demo stops every DC when one fails to start, and prints only those that did.
        assert_eq!(dcs.len(), n, "the demo did not start all {n} DCs");
        Demo { child, _dir: dir, dcs }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        // SIGTERM, so that the demo stops its DCs too.
        unsafe_kill(self.child.id(), "TERM");
        let _ = self.child.wait();
    }
}

/// Polls a JavaScript expression in the page until it is true.
async fn wait_until(page: &Client, what: &str, expression: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let script = format!("return Boolean({expression});");
    loop {
        if page.execute(&script, vec![]).await.ok() == Some(json!(true)) {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            let status = page.execute("return document.body.innerText", vec![]).await;
            panic!("never {what} ({expression}); the page shows: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn eval(page: &Client, expression: &str) -> serde_json::Value {
    page.execute(&format!("return {expression};"), vec![]).await.unwrap()
}

async fn type_into(page: &Client, id: &str, text: &str) {
    let field = page.find(Locator::Id(id)).await.unwrap();
    field.send_keys(text).await.unwrap();
}

async fn dev_sign_in(page: &Client, url: &str, user: &str) {
    page.goto(url).await.unwrap();
    wait_until(
        page,
        "offered dev sign-in",
        "!document.getElementById('dev-form').hidden",
    )
    .await;
    type_into(page, "dev-name", &format!("{user}{ENTER}")).await;
    wait_online(page).await;
}

async fn wait_online(page: &Client) {
    wait_until(
        page,
        "online",
        "document.getElementById('status').dataset.state === 'online'",
    )
    .await;
}

/// Opens the conversation with `peer` from the keyboard: type the name, Enter.
async fn open_conversation(page: &Client, peer: &str) {
    type_into(page, "new-peer", &format!("{peer}{ENTER}")).await;
    wait_until(
        page,
        "opened the conversation",
        &format!("document.getElementById('peer').textContent === '{peer}'"),
    )
    .await;
}

/// Types into the composer and presses Enter.
async fn say(page: &Client, text: &str) {
    type_into(page, "composer", &format!("{text}{ENTER}")).await;
}

/// Waits until the page shows the incoming message `text` exactly once.
async fn wait_received(page: &Client, text: &str) {
    let what = format!("shown {text:?} once");
    wait_until(page, &what, &format!("{} === 1", count_messages("in", text))).await;
}

/// Waits until the outgoing message `text` shows `state` (sending, accepted, delivered).
async fn wait_state(page: &Client, text: &str, state: &str) {
    let what = format!("shown {text:?} as {state}");
    wait_until(page, &what, &format!("{} === '{state}'", message_state(text))).await;
}

/// Opens the conversation with `peer` from the list.
async fn click_peer(page: &Client, peer: &str) {
    let selector = format!("[data-peer={peer}]");
    wait_until(
        page,
        "listed the conversation",
        &format!("document.querySelector('{selector}')"),
    )
    .await;
    page.find(Locator::Css(&selector)).await.unwrap().click().await.unwrap();
}

fn count_messages(dir: &str, text: &str) -> String {
    format!(
        "Array.from(document.querySelectorAll('.message.{dir} .text')).filter(e => e.textContent === '{text}').length"
    )
}

fn message_state(text: &str) -> String {
    format!(
        "(Array.from(document.querySelectorAll('.message.out')).find(e => e.querySelector('.text').textContent === '{text}') || {{dataset: {{}}}}).dataset.state"
    )
}

async fn screenshot(page: &Client, name: &str) {
    let png = page.screenshot().await.unwrap();
    let dir = std::env::var_os("CHINWAG_SCREENSHOTS")
        .map_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")), PathBuf::from);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), png).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_people_on_different_dcs_chat_and_the_map_shows_three_live_dcs() {
    let Some(driver) = Driver::start() else { return };
    let demo = Demo::start(3);
    let (east, west) = (&demo.dcs[0].1, &demo.dcs[1].1);
    let alice = driver.browser(1000, 760).await;
    let bob = driver.browser(1000, 700).await;
    dev_sign_in(&alice, east, "alice").await;
    dev_sign_in(&bob, west, "bob").await;
    assert_eq!(
        eval(&alice, "document.getElementById('where').textContent").await,
        "alice · DC east · node n1"
    );

    // alice (east) → bob (west): sending, then accepted, then delivered once bob has it.
    open_conversation(&alice, "bob").await;
    say(&alice, "hi bob, from east").await;
    click_peer(&bob, "alice").await;
    wait_received(&bob, "hi bob, from east").await;
    wait_state(&alice, "hi bob, from east", "delivered").await;

    // bob → alice.
    say(&bob, "hello alice, from west").await;
    wait_received(&alice, "hello alice, from west").await;
    wait_state(&bob, "hello alice, from west", "delivered").await;

    // bob closes his page; alice writes; bob comes back and gets it exactly once.
    bob.goto("about:blank").await.unwrap();
    say(&alice, "while you were away").await;
    wait_state(&alice, "while you were away", "accepted").await;
    bob.goto(west).await.unwrap();
    wait_online(&bob).await;
    click_peer(&bob, "alice").await;
    wait_received(&bob, "while you were away").await;
    wait_state(&alice, "while you were away", "delivered").await;
    // A reload shows the same conversation, nothing twice.
    bob.refresh().await.unwrap();
    wait_online(&bob).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(eval(&bob, "document.querySelectorAll('.message').length").await, 3);
    assert_eq!(eval(&bob, &count_messages("in", "hi bob, from east")).await, 1);
    screenshot(&alice, "chat.png").await;

    // The map, seen from east: three DCs up, bob online in west, no lag.
    alice.goto(&format!("{east}cluster")).await.unwrap();
    wait_until(
        &alice,
        "drew three live DCs",
        "document.querySelectorAll('#map g.dc.up').length === 3",
    )
    .await;
    wait_until(
        &alice,
        "drew three healthy links",
        "document.querySelectorAll('#map line.lag-none').length === 3",
    )
    .await;
    wait_until(
        &alice,
        "showed bob online in west",
        "document.querySelector('#dcs tr[data-dc=west] td:nth-child(3)').textContent === '1'",
    )
    .await;
    screenshot(&alice, "cluster.png").await;
    alice.close().await.unwrap();
    bob.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pasted_token_a_phone_sized_window_the_keyboard_and_a_restart() {
    let Some(driver) = Driver::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start_in(dir.path(), "");
    let page = driver.browser(360, 740).await;
    page.goto(&node.http("/")).await.unwrap();
    // Development sign-in is off unless asked for.
    assert_eq!(eval(&page, "document.getElementById('dev-form').hidden").await, true);
    let (status, body) = http_post_json(&node.http("/v1/dev/token"), r#"{"user":"mallory"}"#).await;
    assert_eq!((status, body.contains("dev_sign_in_disabled")), (404, true), "{body}");

    // From here on, only the keyboard.
    type_into(&page, "token", &format!("not-a-token{ENTER}")).await;
    wait_until(
        &page,
        "refused the bad token",
        "document.getElementById('sign-in-error').textContent !== ''",
    )
    .await;

    // A mailbox waiting for carol: it arrives once, in order, and is acknowledged.
    let mut erin = node.login("erin").await;
    for i in 0..200 {
        erin.send_message("carol", &format!("e{i}"), &format!("offline {i}"))
            .await
            .unwrap();
    }
    let token = node.token("carol");
    page.execute("document.getElementById('token').value = ''", vec![])
        .await
        .unwrap();
    type_into(&page, "token", &format!("{token}{ENTER}")).await;
    wait_online(&page).await;
    open_conversation(&page, "erin").await;
    wait_until(
        &page,
        "showed the mailbox",
        "document.querySelectorAll('.message.in').length === 200",
    )
    .await;
    let texts = eval(
        &page,
        "Array.from(document.querySelectorAll('.message.in .text'), e => e.textContent)",
    )
    .await;
    let expected: Vec<String> = (0..200).map(|i| format!("offline {i}")).collect();
    assert_eq!(texts, json!(expected));
    // The app acknowledged the whole mailbox.
    node.wait_for_metric("chinwag_mailbox_depth", 0.0).await;
    // Escape goes back to the list (one column at this width).
    type_into(&page, "composer", &ESCAPE.to_string()).await;
    assert_eq!(
        eval(&page, "document.body.classList.contains('show-conversation')").await,
        false
    );
    open_conversation(&page, "dave").await;
    assert_eq!(eval(&page, "document.activeElement.id").await, "composer");
    say(&page, "first").await;
    wait_state(&page, "first", "accepted").await;
    // Nothing sticks out sideways at 360 px.
    let widths = eval(&page, "[window.innerWidth, document.documentElement.scrollWidth]").await;
    assert_eq!(widths, json!([360, 360]), "[viewport, content] widths");
    screenshot(&page, "chat-360.png").await;

    // The node dies; what carol writes meanwhile waits, and goes once it is back.
    node.kill9();
    wait_until(
        &page,
        "noticed",
        "document.getElementById('status').dataset.state !== 'online'",
    )
    .await;
    say(&page, "written while the node was down").await;
    assert_eq!(
        eval(&page, &message_state("written while the node was down")).await,
        "sending"
    );
    node.restart();
    wait_online(&page).await;
    wait_state(&page, "written while the node was down", "accepted").await;

    let mut dave = node.login("dave").await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let (_, from, text) = next_message(&mut dave).await;
        got.push((from, text));
    }
    assert_eq!(
        got,
        [
            ("carol".into(), "first".into()),
            ("carol".into(), "written while the node was down".into())
        ]
    );
    assert_silent(&mut dave, Duration::from_millis(500)).await;
    page.close().await.unwrap();
}

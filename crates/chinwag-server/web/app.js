// The chinwag web client: one WebSocket speaking protocol v1 (docs/protocol.md).
//
// Nothing is lost or shown twice across reloads and reconnects because:
// - an incoming message is saved to localStorage before it is acknowledged, and messages
//   are de-duplicated by server id (a reconnect redelivers what was not acknowledged);
// - an outgoing message is saved with its client_id before it is sent, and resent with
//   the same client_id after every reconnect until the server answers `sent` (the server
//   stores a client_id once, however often it is retried).
"use strict";

const TOKEN_KEY = "chinwag.token";
const HISTORY_PER_CONVERSATION = 500;
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 15000;
const CONNECT_TIMEOUT_MS = 10000;
const ACK_BATCH = 512;
// Errors after which the same send cannot succeed; it is shown as failed, with a retry.
const RETRY_LATER = new Set(["rate_limited", "unavailable"]);
const SIGN_OUT = new Set(["bad_token", "token_expired"]);

const $ = (id) => document.getElementById(id);

const app = {
  token: null,
  user: null,
  ws: null,
  online: false,
  attempt: 0,
  reconnectTimer: null,
  db: null, // this user's history: { conversations: { peer: [message] }, outbox: [client_id] }
  seen: new Set(), // server ids of messages already in the history
  byClientId: new Map(), // client_id -> outgoing message
  byId: new Map(), // server id -> outgoing message (for delivery receipts)
  inflight: new Set(), // client_ids sent on the current connection
  toAck: [],
  current: null,
  unread: {},
};

// ---- storage ------------------------------------------------------------------------

function storageKey() {
  return `chinwag.history.${app.user}`;
}

function loadHistory() {
  let db = null;
  try {
    db = JSON.parse(localStorage.getItem(storageKey()));
  } catch (_) {
    db = null;
  }
  app.db = db && db.conversations ? db : { conversations: {}, outbox: [] };
  app.seen.clear();
  app.byClientId.clear();
  app.byId.clear();
  for (const messages of Object.values(app.db.conversations)) {
    for (const m of messages) index(m);
  }
  app.db.outbox = app.db.outbox.filter((cid) => app.byClientId.has(cid));
}

function index(m) {
  if (m.dir === "in") {
    app.seen.add(m.id);
  } else {
    app.byClientId.set(m.client_id, m);
    if (m.id) app.byId.set(m.id, m);
  }
}

function saveHistory() {
  if (!app.user || !app.db) return;
  try {
    localStorage.setItem(storageKey(), JSON.stringify(app.db));
  } catch (e) {
    notice(`cannot save history: ${e.message}`);
  }
}

function conversation(peer) {
  const list = app.db.conversations[peer] || (app.db.conversations[peer] = []);
  return list;
}

function append(peer, m) {
  const list = conversation(peer);
  list.push(m);
  index(m);
  // Keep what is still travelling; drop the oldest settled messages beyond the cap.
  while (list.length > HISTORY_PER_CONVERSATION && list[0].state !== "sending") list.shift();
}

// ---- connection ---------------------------------------------------------------------

function wsUrl() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${location.host}/v1/ws`;
}

function connect() {
  clearTimeout(app.reconnectTimer);
  setStatus("connecting", "connecting…");
  const ws = new WebSocket(wsUrl());
  app.ws = ws;
  app.inflight.clear();
  const timeout = setTimeout(() => ws.close(), CONNECT_TIMEOUT_MS);
  ws.onopen = () => {
    clearTimeout(timeout);
    ws.send(JSON.stringify({ type: "login", token: app.token, receipts: true }));
  };
  ws.onmessage = (event) => {
    if (ws !== app.ws) return;
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch (_) {
      return notice("the server sent a frame that is not JSON");
    }
    onFrame(frame);
  };
  ws.onclose = () => {
    clearTimeout(timeout);
    if (ws !== app.ws) return;
    app.ws = null;
    app.online = false;
    updateComposer();
    if (app.token) scheduleReconnect();
  };
}

function scheduleReconnect() {
  const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** app.attempt);
  // Full jitter, so that thousands of clients cut off together do not return together.
  const delay = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
  app.attempt += 1;
  setStatus("reconnecting", `offline — reconnecting in ${Math.ceil(delay / 1000)} s`);
  app.reconnectTimer = setTimeout(connect, delay);
}

function send(frame) {
  if (!app.ws || app.ws.readyState !== WebSocket.OPEN) return false;
  app.ws.send(JSON.stringify(frame));
  return true;
}

function onFrame(f) {
  switch (f.type) {
    case "welcome":
      return onWelcome(f);
    case "message":
      return onMessage(f);
    case "sent":
      return onSent(f);
    case "delivered":
      return onDelivered(f.ids || []);
    case "error":
      return onError(f);
    default:
      return undefined; // acked, pong, and frames of newer servers
  }
}

function onWelcome(f) {
  app.attempt = 0;
  if (app.user !== f.user) {
    app.user = f.user;
    loadHistory();
    localStorage.setItem(TOKEN_KEY, app.token);
    showChat();
  }
  app.online = true;
  $("where").textContent = `${f.user} · DC ${f.dc} · node ${f.node}`;
  setStatus("online", "online");
  updateComposer();
  for (const cid of app.db.outbox) transmit(app.byClientId.get(cid));
  render();
}

function onMessage(f) {
  if (!app.seen.has(f.id)) {
    const peer = f.from === app.user ? f.to : f.from;
    append(peer, { dir: "in", id: f.id, from: f.from, text: f.text, at: f.at, state: "received" });
    if (peer !== app.current) app.unread[peer] = (app.unread[peer] || 0) + 1;
  }
  // Repeats are acknowledged again: an earlier ack may have been lost with its connection.
  app.toAck.push(f.id);
  // One save and one ack for all the messages already received (a mailbox arrives as a
  // burst), after the frames queued before it.
  if (app.toAck.length === 1) setTimeout(saveThenAck, 0);
}

// Acknowledge only what is saved.
function saveThenAck() {
  saveHistory();
  render();
  while (app.toAck.length) {
    const ids = app.toAck.splice(0, ACK_BATCH);
    if (!send({ type: "ack", ids })) {
      app.toAck = [];
      return; // the server redelivers after the reconnect
    }
  }
}

function onSent(f) {
  const m = app.byClientId.get(f.client_id);
  app.inflight.delete(f.client_id);
  if (!m) return;
  if (m.state === "sending") m.state = "accepted";
  m.id = f.id;
  m.at = f.at;
  app.byId.set(f.id, m);
  app.db.outbox = app.db.outbox.filter((cid) => cid !== f.client_id);
  saveHistory();
  render();
}

function onDelivered(ids) {
  let changed = false;
  for (const id of ids) {
    const m = app.byId.get(id);
    if (m && m.state !== "delivered") {
      m.state = "delivered";
      changed = true;
    }
  }
  if (changed) {
    saveHistory();
    render();
  }
}

function onError(f) {
  if (SIGN_OUT.has(f.code)) {
    const first = !app.user;
    signOut();
    return showSignInError(first ? f.message : `signed out: ${f.message}`);
  }
  const m = f.client_id && app.byClientId.get(f.client_id);
  if (!m) return notice(`${f.code}: ${f.message}`);
  app.inflight.delete(f.client_id);
  if (RETRY_LATER.has(f.code)) {
    setTimeout(() => transmit(m), Math.max(f.retry_after_ms || 0, 1000));
    return undefined;
  }
  m.state = "failed";
  m.error = f.message;
  app.db.outbox = app.db.outbox.filter((cid) => cid !== f.client_id);
  saveHistory();
  return render();
}

// ---- sending ------------------------------------------------------------------------

// Time-ordered: the milliseconds first, so that this device's ids increase (the server
// checks an id above the sender's highest without a lookup), then randomness, so that
// two devices of one user never pick the same id.
let lastIdTime = 0;
function newClientId() {
  lastIdTime = Math.max(Date.now(), lastIdTime + 1);
  const bytes = new Uint8Array(8);
  crypto.getRandomValues(bytes);
  const random = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return lastIdTime.toString(16).padStart(12, "0") + random;
}

function compose(peer, text) {
  const m = { dir: "out", client_id: newClientId(), to: peer, text, at: Date.now(), state: "sending" };
  append(peer, m);
  app.db.outbox.push(m.client_id);
  saveHistory();
  render();
  transmit(m);
}

function transmit(m) {
  if (!m || m.state !== "sending" || app.inflight.has(m.client_id) || !app.online) return;
  if (send({ type: "send", to: m.to, client_id: m.client_id, text: m.text })) app.inflight.add(m.client_id);
}

function retry(m) {
  m.state = "sending";
  delete m.error;
  app.db.outbox.push(m.client_id);
  saveHistory();
  render();
  transmit(m);
}

// ---- sign in and out ----------------------------------------------------------------

function signIn(token) {
  app.token = token.trim();
  app.user = null;
  showSignInError("");
  connect();
}

async function devSignIn(name) {
  let answer;
  try {
    const response = await fetch("/v1/dev/token", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ user: name.trim() }),
    });
    answer = await response.json();
    if (!response.ok) return showSignInError(answer.message || `HTTP ${response.status}`);
  } catch (e) {
    return showSignInError(`cannot reach the node: ${e.message}`);
  }
  return signIn(answer.token);
}

function signOut() {
  // Keep what arrived; what was not acknowledged yet is delivered again next time.
  saveHistory();
  app.toAck = [];
  app.db = null;
  app.token = null;
  app.user = null;
  app.online = false;
  clearTimeout(app.reconnectTimer);
  localStorage.removeItem(TOKEN_KEY);
  if (app.ws) {
    const ws = app.ws;
    app.ws = null;
    ws.close();
  }
  app.current = null;
  $("chat").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in").hidden = false;
  $("where").textContent = "";
  setStatus("signed-out", "signed out");
}

// ---- rendering ----------------------------------------------------------------------

function setStatus(state, text) {
  const el = $("status");
  el.dataset.state = state;
  el.textContent = text;
}

function notice(text) {
  setStatus($("status").dataset.state, text);
}

function showSignInError(text) {
  $("sign-in-error").textContent = text;
}

function showChat() {
  $("sign-in").hidden = true;
  $("chat").hidden = false;
  $("sign-out").hidden = false;
  const peers = sortedPeers();
  if (peers.length && !app.current) app.current = peers[0];
}

function sortedPeers() {
  const last = (peer) => {
    const list = app.db.conversations[peer];
    return list.length ? list[list.length - 1].at : 0;
  };
  return Object.keys(app.db.conversations).sort((a, b) => last(b) - last(a));
}

function openConversation(peer, focus = true) {
  app.current = peer;
  conversation(peer);
  delete app.unread[peer];
  document.body.classList.add("show-conversation");
  render();
  updateComposer();
  if (focus) $("composer").focus();
}

function render() {
  if (!app.db) return;
  renderConversations();
  renderMessages();
}

function renderConversations() {
  const list = $("conversations");
  list.replaceChildren(
    ...sortedPeers().map((peer) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "peer";
      button.dataset.peer = peer;
      button.textContent = peer;
      if (peer === app.current) button.setAttribute("aria-current", "true");
      const unread = app.unread[peer];
      if (unread) {
        const badge = document.createElement("span");
        badge.className = "badge";
        badge.textContent = unread;
        badge.setAttribute("aria-label", `${unread} unread`);
        button.append(badge);
      }
      button.onclick = () => openConversation(peer);
      const item = document.createElement("li");
      item.append(button);
      return item;
    }),
  );
}

const STATE_LABEL = {
  sending: "sending…",
  accepted: "✓ accepted",
  delivered: "✓✓ delivered",
  failed: "failed",
};

function renderMessages() {
  $("peer").textContent = app.current || "No conversation";
  const list = $("messages");
  const messages = app.current ? conversation(app.current) : [];
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.replaceChildren(...messages.map(messageItem));
  if (atBottom || messages.length && messages[messages.length - 1].dir === "out") {
    list.scrollTop = list.scrollHeight;
  }
}

function messageItem(m) {
  const item = document.createElement("li");
  item.className = `message ${m.dir}`;
  item.dataset.state = m.state;
  if (m.id) item.dataset.id = m.id;
  const text = document.createElement("p");
  text.className = "text";
  text.textContent = m.text;
  const meta = document.createElement("span");
  meta.className = "meta";
  const time = new Date(m.at).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  meta.textContent = m.dir === "out" ? `${time} · ${STATE_LABEL[m.state]}` : time;
  item.append(text, meta);
  if (m.state === "failed") {
    const why = document.createElement("span");
    why.className = "why";
    why.textContent = m.error || "";
    const again = document.createElement("button");
    again.type = "button";
    again.textContent = "retry";
    again.onclick = () => retry(m);
    item.append(why, again);
  }
  return item;
}

function updateComposer() {
  const ready = Boolean(app.current && app.user);
  $("composer").disabled = !ready;
  $("send").disabled = !ready;
}

// ---- wiring -------------------------------------------------------------------------

function submitComposer() {
  const box = $("composer");
  const text = box.value.trim();
  if (!text || !app.current) return;
  compose(app.current, text);
  box.value = "";
}

function wire() {
  if (document.body.dataset.devSignIn === "on") $("dev-form").hidden = false;
  $("token-form").onsubmit = (e) => {
    e.preventDefault();
    signIn($("token").value);
  };
  // A token is one line: Enter signs in.
  $("token").onkeydown = (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("token-form").requestSubmit();
    }
  };
  $("dev-form").onsubmit = (e) => {
    e.preventDefault();
    devSignIn($("dev-name").value);
  };
  $("sign-out").onclick = signOut;
  $("new-form").onsubmit = (e) => {
    e.preventDefault();
    const peer = $("new-peer").value.trim();
    if (!peer) return;
    $("new-peer").value = "";
    openConversation(peer);
  };
  $("composer-form").onsubmit = (e) => {
    e.preventDefault();
    submitComposer();
  };
  $("composer").onkeydown = (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submitComposer();
    } else if (e.key === "Escape") {
      document.body.classList.remove("show-conversation");
      $("new-peer").focus();
    }
  };
  $("back").onclick = () => {
    document.body.classList.remove("show-conversation");
    $("new-peer").focus();
  };
  // The browser knows before the socket does that the network is back.
  window.addEventListener("online", () => {
    if (app.token && !app.ws) connect();
  });
  const saved = localStorage.getItem(TOKEN_KEY);
  if (saved) signIn(saved);
}

wire();

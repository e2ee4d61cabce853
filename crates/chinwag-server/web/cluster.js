// The live cluster map: draws /v1/cluster/events (the same object as /v1/cluster).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 640;
const HEIGHT = 440;
const RADIUS = 150;
const NODE_RADIUS = 52;
const HIGH_LAG = 100;

function el(name, attrs, text) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

// The DCs on a ring, this one at the top, so that three DCs make a triangle.
function positions(dcs) {
  if (dcs.length === 1) return [{ x: WIDTH / 2, y: HEIGHT / 2 }];
  return dcs.map((_, i) => {
    const angle = -Math.PI / 2 + (2 * Math.PI * i) / dcs.length;
    return { x: WIDTH / 2 + RADIUS * 1.4 * Math.cos(angle), y: HEIGHT / 2 + 10 + RADIUS * Math.sin(angle) };
  });
}

function linkClass(link, mine) {
  const kind = mine ? "link mine" : "link";
  if (link.up === null) return `${kind} unknown`;
  if (!link.up) return `${kind} down`;
  if (link.lag_entries === 0) return `${kind} lag-none`;
  return `${kind} ${link.lag_entries < HIGH_LAG ? "lag-some" : "lag-high"}`;
}

function linkLabel(link) {
  if (link.up === null) return "?";
  return link.up ? `lag ${link.lag_entries}` : "cut";
}

function draw(status) {
  const dcs = status.dcs || [];
  const at = positions(dcs);
  const where = new Map(dcs.map((dc, i) => [dc.dc, at[i]]));
  const map = document.getElementById("map");
  const title = map.querySelector("title");
  const links = (status.links || []).filter((l) => where.has(l.a) && where.has(l.b)).map((link) => {
    const [a, b] = [where.get(link.a), where.get(link.b)];
    const mine = link.a === status.dc || link.b === status.dc;
    const group = el("g", {});
    group.append(
      el("line", { class: linkClass(link, mine), "data-a": link.a, "data-b": link.b, x1: a.x, y1: a.y, x2: b.x, y2: b.y }),
      el("text", { class: "lag", x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 + 5 }, linkLabel(link)),
    );
    return group;
  });
  const nodes = dcs.map((dc, i) => {
    const group = el("g", { class: `dc ${dc.up ? "up" : "down"}${i === 0 ? " me" : ""}`, "data-dc": dc.dc });
    const { x, y } = at[i];
    group.append(
      el("circle", { cx: x, cy: y, r: NODE_RADIUS }),
      el("text", { class: "name", x, y: y - 14 }, dc.dc),
      el("text", { x, y: y + 6 }, `${dc.online_users} online`),
      el("text", { x, y: y + 24 }, `mailbox ${dc.mailbox_depth ?? "?"}`),
    );
    return group;
  });
  map.replaceChildren(title, ...links, ...nodes);
  table(dcs);
}

function table(dcs) {
  document.getElementById("dcs").replaceChildren(
    ...dcs.map((dc, i) => {
      const row = document.createElement("tr");
      row.dataset.dc = dc.dc;
      const lag = i === 0 ? "(this DC)" : dc.up ? String(dc.lag_entries) : "unreachable";
      for (const cell of [dc.dc, dc.up ? "up" : "down", dc.online_users, dc.mailbox_depth ?? "unknown", lag]) {
        const td = document.createElement("td");
        td.textContent = cell;
        row.append(td);
      }
      return row;
    }),
  );
}

function setStatus(state, text) {
  const status = document.getElementById("status");
  status.dataset.state = state;
  status.textContent = text;
}

function listen() {
  // EventSource reconnects by itself after an error.
  const events = new EventSource("/v1/cluster/events");
  events.onmessage = (event) => {
    const status = JSON.parse(event.data);
    document.getElementById("where").textContent = `seen from DC ${status.dc}`;
    setStatus("online", `live · ${new Date().toLocaleTimeString()}`);
    draw(status);
  };
  events.onerror = () => setStatus("reconnecting", "connection lost — retrying");
}

listen();

// The dashboard: plain DOM, no framework, no build step. Everything from records is put on
// the page with textContent (never innerHTML), so a tag or metadata value is shown, not run.
"use strict";

const STATUSES = ["serving", "draining", "not_serving"];
const POLL_MS = 2000; // without a live stream: how often the page refreshes itself
const STALL_MS = 5000; // a live stream sends at least a keepalive every 2 s; silent longer: poll
const RETRY_MS = 5000; // a stream the server refused for now (429, 503): try again after this
const MAX_CHANGES = 100;
const state = {
  listing: null, status: null, statusDenied: false, service: null, filter: "", changes: [],
  lastId: "", // the revision the page is up to: the stream's last id, else the listing's
};

function $(id) { return document.getElementById(id); }

function el(tag, attrs, children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children || []) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function badge(kind, text, title) { return el("span", title ? { class: "badge " + kind, text, title } : { class: "badge " + kind, text }); }

function seconds(value) {
  if (value < 0) return "never";
  if (value < 1) return value.toFixed(2) + " s";
  if (value < 120) return value.toFixed(1) + " s";
  return Math.round(value / 60) + " min";
}

async function getJson(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" }, cache: "no-store" });
  const body = await response.json().catch(() => ({}));
  return { ok: response.ok, status: response.status, body };
}

// --- data --------------------------------------------------------------------------------

async function loadListing() {
  const answer = await getJson("/v1/services");
  if (answer.ok) state.listing = answer.body;
}

// Messages above the page (a link that names no service, live updates off), one per topic.
const notices = {};
function notice(topic, text) {
  if (text) notices[topic] = text; else delete notices[topic];
  const box = $("notices");
  box.replaceChildren(...Object.values(notices).map((t) => el("p", { class: "notice", text: t })));
  box.classList.toggle("hidden", Object.keys(notices).length === 0);
}

async function loadStatus() {
  const answer = await getJson("/v1/status");
  state.statusDenied = answer.status === 401 || answer.status === 403;
  state.status = answer.ok ? answer.body : null;
}

async function loadService(name) {
  const query = "?scope=all" + STATUSES.map((s) => "&status=" + s).join("");
  const answer = await getJson("/v1/services/" + encodeURIComponent(name) + query);
  if (state.service === name) renderService(name, answer);
}

async function refresh() {
  await Promise.allSettled([loadListing(), loadStatus()]);
  renderHeader();
  renderRegions();
  renderServices();
  if (state.service) await loadService(state.service);
}

let pending = null;
function refreshSoon() {
  if (pending) return;
  pending = setTimeout(() => { pending = null; refresh(); }, 150);
}

// --- rendering ---------------------------------------------------------------------------

function renderHeader() {
  const listing = state.listing;
  if (!listing) return;
  $("region").textContent = "region " + listing.region;
  $("revision").textContent = "revision " + listing.revision + (listing.stale ? " (stale: etcd unreachable)" : "");
  document.title = "discovery · " + listing.region;
}

function renderRegions() {
  const listing = state.listing;
  const box = $("regions");
  if (!listing) return;
  const origins = {};
  for (const o of (state.status && state.status.origins) || []) origins[o.origin] = o;
  const note = $("regions-note");
  note.classList.toggle("hidden", !state.statusDenied);
  note.textContent = state.statusDenied ? "Replication details need the admin grant; freshness only." : "";
  const cards = listing.regions.map((r) => {
    const rows = [];
    let cls = "region";
    let stateBadge;
    if (r.local) {
      const etcd = state.status ? state.status.etcd : null;
      const healthy = etcd ? etcd.healthy : !listing.stale;
      stateBadge = healthy ? badge("ok", "etcd healthy") : badge("bad", "etcd unreachable");
      if (!healthy) cls += " stale";
      rows.push(["role", "this server's region"]);
      rows.push(["revision", String(listing.revision)]);
      if (state.status) rows.push(["instances", String(state.status.instance_count)]);
      if (etcd && !etcd.healthy && etcd.error) rows.push(["etcd", etcd.error.slice(0, 80)]);
    } else {
      const o = origins[r.region];
      if (r.stale) {
        stateBadge = badge("bad", r.stale_seconds < 0 ? "never heard from" : "stale " + seconds(r.stale_seconds));
        cls += " stale";
      } else {
        stateBadge = badge("ok", "connected");
      }
      if (o) {
        rows.push(["lag", seconds(o.lag_seconds) + " / " + o.lag_revisions + " rev"]);
        rows.push(["last contact", o.last_contact_seconds || o.connected ? seconds(o.last_contact_seconds) + " ago" : "never"]);
        rows.push(["replicas", String(o.replicas)]);
        rows.push(["pulled by", o.leader || "no server yet"]);
        if (o.warning) { cls += r.stale ? "" : " warn"; rows.push(["warning", o.warning.slice(0, 80)]); }
      }
    }
    const dl = el("dl", {}, rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v, title: v })]));
    return el("article", { class: cls, "data-region": r.region, "data-stale": String(r.local ? !!listing.stale : r.stale) }, [
      el("h3", {}, [el("span", { text: r.region }), stateBadge]),
      dl,
    ]);
  });
  box.replaceChildren(...cards);
}

function renderServices() {
  const listing = state.listing;
  if (!listing) return;
  const regions = listing.regions.map((r) => r.region);
  $("services-head").replaceChildren(
    el("th", { text: "Service" }),
    el("th", { class: "num", text: "Instances" }),
    ...regions.map((r) => el("th", { class: "num", text: r })),
    el("th", { text: "Not serving" }),
  );
  const needle = state.filter.trim().toLowerCase();
  const shown = listing.services.filter((s) => !needle || s.service.toLowerCase().includes(needle));
  const rows = shown.map((s) => {
    let notServing = 0;
    for (const r of Object.values(s.regions)) {
      for (const [status, n] of Object.entries(r.statuses)) if (status !== "SERVING") notServing += n;
    }
    const row = el("tr", { class: "link", "data-service": s.service, tabindex: "0" }, [
      el("td", { class: "id" }, [el("a", { href: "#/services/" + encodeURIComponent(s.service), text: s.service })]),
      el("td", { class: "num", text: String(s.instances) }),
      ...regions.map((r) => el("td", { class: "num", text: s.regions[r] ? String(s.regions[r].instances) : "–" })),
      el("td", {}, [notServing ? badge("warn", notServing + " draining or down") : el("span", { class: "muted", text: "–" })]),
    ]);
    row.addEventListener("click", () => { location.hash = "#/services/" + encodeURIComponent(s.service); });
    row.addEventListener("keydown", (e) => { if (e.key === "Enter") row.click(); });
    return row;
  });
  $("services").tBodies[0].replaceChildren(...rows);
  $("service-count").textContent = needle ? `(${shown.length} of ${listing.services.length})` : `(${listing.services.length})`;
  $("services-empty").classList.toggle("hidden", shown.length > 0);
  $("services-empty").textContent = listing.services.length ? "No service matches the filter." : "No services registered.";
}

function statusBadge(status) {
  if (status === "SERVING") return badge("ok", "serving");
  if (status === "DRAINING") return badge("warn", "draining");
  return badge("bad", status.toLowerCase().replace("_", " "));
}

// A health check's verdict under the status (docs/health-checks.md): the status above is what
// the endpoint is served as; the check says why.
function checkNote(check) {
  const text = "check " + check.state + (check.reason ? ": " + check.reason : "");
  return el("div", { class: "muted check", text: text, title: "checked by " + (check.checker || "?") });
}

function renderService(name, answer) {
  $("service-name").textContent = name;
  const body = $("instances").tBodies[0];
  if (!answer.ok) {
    body.replaceChildren();
    $("instances-empty").classList.remove("hidden");
    $("instances-empty").textContent = (answer.body && answer.body.message) || "Cannot read this service.";
    $("service-summary").textContent = "";
    return;
  }
  const resolved = answer.body;
  const cell = (label, attrs, children) => el("td", Object.assign({ "data-label": label }, attrs), children);
  const none = () => el("span", { class: "muted", text: "–" });
  const rows = resolved.endpoints.map((e) => el("tr", { "data-instance": e.instance_id }, [
    cell("Instance", { class: "id", text: e.instance_id }),
    cell("Address", { class: "mono", text: e.address }),
    cell("Region", { text: e.region }),
    cell("Zone", { text: e.zone || "–" }),
    cell("Status", {}, [statusBadge(e.status), ...(e.check ? [checkNote(e.check)] : [])]),
    cell("Weight", { class: "num", text: String(e.weight) }),
    cell("Tags", {}, [e.tags.length ? el("span", {}, e.tags.map((t) => el("span", { class: "tag", text: t }))) : none()]),
    cell("Metadata", { class: "kv" }, [Object.keys(e.metadata).length
      ? el("span", {}, Object.entries(e.metadata).sort().map(([k, v]) => el("div", { text: k + "=" + v })))
      : none()]),
    cell("Freshness", {}, [e.stale ? badge("bad", "stale " + seconds(e.age_seconds || 0)) : badge("ok", "fresh")]),
  ]));
  body.replaceChildren(...rows);
  $("instances-empty").classList.toggle("hidden", rows.length > 0);
  $("instances-empty").textContent = "No instances.";
  const regions = resolved.regions.map((r) => r.region + " " + r.endpoints).join(", ");
  $("service-summary").textContent = `${resolved.endpoints.length} instances at revision ${resolved.revision}` + (regions ? " · " + regions : "");
}

function renderChanges() {
  const list = $("changes");
  list.replaceChildren(...state.changes.map((c) => el("li", { "data-kind": c.kind }, [
    el("span", { class: "time muted", text: c.time }),
    c.kind === "PUT" ? badge("info", "put") : badge("warn", "delete"),
    el("span", { class: "what" }, [
      el("a", { href: "#/services/" + encodeURIComponent(c.service), text: c.service }),
      el("span", { class: "muted", text: " / " }),
      el("span", { class: "mono", text: c.instance_id }),
      el("span", { class: "muted", text: " in " + c.region + (c.status ? " · " + c.status.toLowerCase() : "") }),
    ]),
    el("span", { class: "rev muted mono", text: "@" + c.revision }),
  ])));
  list.classList.toggle("hidden", state.changes.length === 0);
  $("changes-empty").classList.toggle("hidden", state.changes.length > 0);
}

// --- navigation and the live stream ------------------------------------------------------

function route() {
  const match = location.hash.match(/^#\/services\/(.+)$/);
  let name = null;
  if (match) {
    try {
      name = decodeURIComponent(match[1]);
      notice("link", "");
    } catch (e) { // a hand-edited or cut link: say so, show the list
      notice("link", "This link names no service (" + match[1].slice(0, 80) + " is not valid percent-encoding); showing all services.");
    }
  } else {
    notice("link", "");
  }
  state.service = name;
  $("list-view").classList.toggle("hidden", !!state.service);
  $("service-view").classList.toggle("hidden", !state.service);
  if (state.service) {
    $("service-name").textContent = state.service;
    $("instances").tBodies[0].replaceChildren();
    loadService(state.service);
  }
}

// The stream starts where the page's first answers left off (?since= the listing's revision):
// without it the server would send every instance again as a snapshot. A reconnecting
// EventSource sends Last-Event-ID, which the server prefers to since.
let source = null;
let lastEventAt = 0;

function setLive(text, on, title) {
  const live = $("live");
  live.textContent = text;
  live.className = "live " + (on ? "on" : "off");
  live.title = title || "the event stream from this server";
}

function eventsUrl() {
  const since = state.lastId || (state.listing ? String(state.listing.revision) : "");
  return "/v1/events" + (since ? "?since=" + encodeURIComponent(since) : "");
}

function streaming() {
  return source !== null && source.readyState === EventSource.OPEN && Date.now() - lastEventAt < STALL_MS;
}

function connect() {
  if (source) source.close();
  const url = eventsUrl();
  const mine = source = new EventSource(url);
  const seen = (event) => {
    lastEventAt = Date.now();
    if (event.lastEventId) state.lastId = event.lastEventId;
  };
  mine.onopen = () => {
    lastEventAt = Date.now();
    setLive("live", true);
    notice("stream", "");
  };
  mine.onerror = () => {
    if (mine !== source) return;
    if (mine.readyState === EventSource.CLOSED) refused(url); // an answer other than a stream: no retry by itself
    else setLive("reconnecting", false);
  };
  // Every event refreshes the page: the keepalives (every 2 s at most) keep the region map's
  // freshness current while nothing changes.
  mine.addEventListener("snapshot", (event) => { seen(event); refreshSoon(); });
  mine.addEventListener("keepalive", (event) => { seen(event); refreshSoon(); });
  mine.addEventListener("changes", (event) => {
    seen(event);
    let data;
    try { data = JSON.parse(event.data); } catch (e) { return; }
    const time = new Date().toLocaleTimeString([], { hour12: false });
    for (const c of data.changes || []) {
      state.changes.unshift({
        time, kind: c.kind, service: c.service, instance_id: c.instance_id, region: c.region, revision: c.revision,
        status: c.instance ? c.instance.status : "",
      });
    }
    state.changes.length = Math.min(state.changes.length, MAX_CHANGES);
    renderChanges();
    refreshSoon();
  });
}

// The server answered the stream with an error: ask again to read which, then either stop
// (401/403 are final: the page keeps refreshing itself instead) or try again later.
async function refused(url) {
  source.close();
  source = null;
  let status = 0;
  let body = {};
  const abort = new AbortController();
  try {
    const response = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store", signal: abort.signal });
    status = response.status;
    if (!response.ok) body = await response.json().catch(() => ({}));
  } catch (e) {
    status = 0;
  } finally {
    abort.abort();
  }
  if (status === 401 || status === 403) {
    setLive("polling", false, "live updates are off: " + (body.message || "not allowed"));
    notice("stream", "Live updates are off: this identity may not follow the changes of every service" +
      (body.message ? " (" + body.message + ")" : "") + ". The page refreshes itself every " + POLL_MS / 1000 +
      " s instead; a grant to read \"*\" turns live updates on.");
    return;
  }
  if (status === 400) state.lastId = ""; // a position the server will not take: start afresh
  setLive("reconnecting", false, status ? "the server answered " + status + "; trying again" : "the server is unreachable");
  setTimeout(connect, RETRY_MS);
}

// Without a live stream (refused, reconnecting or silent), the page refreshes on a timer.
function tick() {
  if (!streaming()) refresh();
}

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", () => {
  $("filter").addEventListener("input", (e) => { state.filter = e.target.value; renderServices(); });
  route();
  refresh().finally(connect);
  setInterval(tick, POLL_MS);
});

// Functions for operators: the list with each one's state, pause and resume; the open function's
// backlog, versions and aliases (with the weights a rollout puts in force), statistics per version
// and rollouts, refreshed while shown. Every value from the hub goes through dom.js (text only).
import { ApiError, call } from "./api.js";
import { badge, h, table } from "./dom.js";
import { millis, percent, seconds, weights } from "./format.js";
import { inForce, loadRollouts, rolloutPanel } from "./rollouts.js";
import { $, ask, button, fail, guard, notify, onSignOut, path } from "./shell.js";

const REFRESH_MS = 5000; // the open function's figures move: read them again while shown
const WINDOWS = [["5m", "5 min"], ["1h", "1 h"], ["24h", "24 h"]];
const COUNTS = ["invocations", "successes", "failures"];
const LATER = ["retries", "deadLetters"];
const state = { shown: false, open: null, seq: 0, timer: null };

onSignOut(hideFunctions);

// A spec's mappings as [key, value] pairs, by name (v2 before v10); anything else (a stored
// resource gone invalid) as none. The hub keeps no declaration order (PostgreSQL's jsonb).
const byName = (a, b) => a.localeCompare(b, "en", { numeric: true });
const pairs = (x) => (x && typeof x === "object" && !Array.isArray(x)
  ? Object.entries(x).sort(([a], [b]) => byName(a, b)) : []);
const fnHref = (name) => `#functions/${encodeURIComponent(name)}`;

/** Show the view, and the function `name` in it (null: the list only). */
export function showFunctions(name) {
  const opened = name !== state.open;
  state.shown = true;
  state.open = name;
  $("function").hidden = !name;
  if (opened && name) {
    $("function").replaceChildren(h("p", { className: "muted" }, "Loading…"));
    $("function").scrollIntoView({ block: "start" });
  }
  return Promise.all([guard(loadList, $("functions"))(), refreshDetail()]);
}

export function hideFunctions() {
  state.shown = false;
  clearTimeout(state.timer);
  state.timer = null;
}

export const reloadFunctions = () => Promise.all([guard(loadList, $("functions"))(), refreshDetail()]);

// ---- the list

function versionNames(spec) {
  const names = pairs(spec.versions).map(([v]) => v);
  return spec.url ? ["latest", ...names] : names;
}

const target = (t) => (typeof t === "string" ? t : weights(pairs(t)));

function stateBadge(status = {}) {
  if (status.invalid) return h("span", { title: status.error || "" }, badge("invalid"));
  return badge(status.paused ? "paused" : "active");
}

function pauseButton(name, paused) {
  if (paused) return button("Resume", () => resume(name));
  return button("Pause…", () => confirmPause(name), "danger");
}

async function loadList() {
  const { items } = await call("GET", "/v1/functions");
  items.sort((a, b) => String(a.metadata.name).localeCompare(String(b.metadata.name)));
  const rows = items.map((doc) => {
    const name = doc.metadata.name;
    const spec = doc.spec || {};
    const aliases = pairs(spec.aliases).map(([a, t]) => `${a} → ${target(t)}`);
    return h("tr", { "data-function": name },
      h("td", {}, h("a", { href: fnHref(name) }, name)),
      h("td", {}, stateBadge(doc.status)),
      h("td", {}, spec.default ?? "latest"),
      h("td", {}, versionNames(spec).join(", ") || "—"),
      h("td", {}, aliases.join("; ") || "—"),
      h("td", {}, pauseButton(name, doc.status?.paused)));
  });
  const headers = ["Function", "State", "Default", "Versions", "Aliases", ""];
  $("functions").replaceChildren(table(headers, rows, "No functions yet."));
}

// ---- pause and resume

function confirmPause(name) {
  ask({
    title: `Pause ${name}`,
    text: "Its invocations wait in the queue and no call is made to any of its versions until it "
      + "is resumed. Events are still accepted; calls already in flight finish.",
    verb: "Pause",
    danger: true,
    run: async () => {
      await call("POST", `/v1/functions/${path(name)}/pause`);
      notify(`${name} is paused: its invocations wait until it is resumed.`, "ok");
      await reloadFunctions();
    },
  });
}

async function resume(name) {
  await call("POST", `/v1/functions/${path(name)}/resume`);
  notify(`${name} is resumed: what waited is sent on.`, "ok");
  await reloadFunctions();
}

// ---- the open function

async function refreshDetail() {
  clearTimeout(state.timer);
  state.timer = null;
  const name = state.open;
  if (!name) return;
  let again = true;
  try {
    await loadDetail();
  } catch (err) {
    if (name !== state.open) return; // another function is shown now
    again = !(err instanceof ApiError && err.status === 404); // gone: nothing more to read
    fail(err, $("function"));
  }
  // Signed out or moved on meanwhile: no timer. One read at a time: the next after this one.
  if (again && state.shown && state.open === name && !state.timer) {
    state.timer = setTimeout(tick, REFRESH_MS);
  }
}

// A dialog open (an operator deciding) or the tab hidden: the page stays as it is, and asks later.
function tick() {
  state.timer = null;
  if (!document.hidden && !document.querySelector("dialog[open]")) return refreshDetail();
  if (state.shown && state.open) state.timer = setTimeout(tick, REFRESH_MS);
  return null;
}

async function loadDetail() {
  const name = state.open;
  const seq = ++state.seq;
  const fn = path(name);
  const [doc, stats, rollouts] = await Promise.all([
    call("GET", `/v1/functions/${fn}`),
    call("GET", `/v1/functions/${fn}/stats`),
    loadRollouts(name),
  ]);
  if (seq !== state.seq || name !== state.open) return; // a newer read started, or it was closed
  const spec = doc.spec || {};
  const parts = [
    h("div", { className: "card-head" },
      h("h2", {}, name, " ", stateBadge(doc.status)),
      h("div", { className: "actions" },
        pauseButton(name, doc.status?.paused),
        button("Refresh", refreshDetail),
        h("a", { href: "#functions", className: "close-link" }, "Close"))),
    doc.status?.invalid ? h("p", { className: "err" }, doc.status.error) : null,
    facts(spec),
    h("h3", {}, "Backlog"), backlog(stats.backlog || {}),
    h("h3", {}, "Versions"), versionTable(spec),
    h("h3", {}, "Aliases"), aliasTable(spec, rollouts.items),
    h("h3", {}, "Statistics"), statsTable(spec, stats.windows || {}),
    h("h3", {}, "Rollouts"), rolloutPanel(rollouts, refreshDetail),
  ];
  $("function").replaceChildren(...parts.filter(Boolean));
}

function facts(spec) {
  const entries = [
    ["Default", spec.default ?? "latest"],
    ["Max concurrency", spec.maxConcurrency ?? "10 (default)"],
    ["Rate limit", spec.rateLimit ?? "none"],
    ["Delivery", spec.delivery ?? "at-least-once"],
    ["Dead letters to", spec.deadLetter?.function ?? "—"],
  ];
  return h("dl", { className: "facts" }, entries.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function backlog(b) {
  const tile = (key, label, value) =>
    h("div", { className: "tile", "data-backlog": key }, h("span", {}, label), h("strong", {}, value));
  return h("div", { className: "tiles" },
    tile("queued", "Waiting", b.queued ?? "—"),
    tile("inFlight", "In flight", b.inFlight ?? "—"),
    tile("retrying", "Waiting for retry", b.retrying ?? "—"),
    tile("oldestWaitingSeconds", "Oldest waiting", seconds(b.oldestWaitingSeconds)));
}

function versionTable(spec) {
  const reachedBy = (version) => {
    const via = pairs(spec.aliases)
      .filter(([, t]) => (typeof t === "string" ? t === version : pairs(t).some(([v]) => v === version)))
      .map(([a]) => a);
    if ((spec.default ?? "latest") === version) via.unshift("default");
    return via.join(", ") || "—";
  };
  const rows = versionNames(spec).map((v) => {
    const s = v === "latest" ? spec : spec.versions[v] || {};
    const timeout = typeof s.timeout === "number" ? seconds(s.timeout) : s.timeout ?? "—";
    return [h("code", {}, v), h("code", {}, s.url ?? "—"), timeout, reachedBy(v)];
  });
  return table(["Version", "URL", "Timeout", "Called through"], rows, "No versions.");
}

function aliasTable(spec, rollouts) {
  const rows = pairs(spec.aliases).map(([alias, t]) => {
    const running = inForce(alias, rollouts);
    const now = running
      ? h("span", { className: "in-force" }, weights(running.weights), " ", badge(running.rollout.state))
      : h("span", { className: "muted" }, "as declared");
    const name = alias === spec.default ? `${alias} (default)` : alias;
    return h("tr", { "data-alias": alias }, h("td", {}, name), h("td", {}, target(t)), h("td", {}, now));
  });
  return table(["Alias", "Declared", "In force now"], rows, "No aliases.");
}

// One row per version and window; a version's name spans its three rows. Every declared version
// is shown, with zeros until it is called; a version no longer declared shows while it has counts.
function statsTable(spec, windows) {
  const seen = pairs(windows["24h"]?.versions).map(([v]) => v);
  const declared = versionNames(spec);
  const versions = [...declared, ...seen.filter((v) => !declared.includes(v))];
  const rows = [];
  for (const version of [...versions, null]) {
    WINDOWS.forEach(([key, label], i) => {
      const f = (version === null ? windows[key]?.total : windows[key]?.versions?.[version]) || {};
      const head = i === 0
        ? h("th", { rowSpan: WINDOWS.length, scope: "rowgroup" }, version ?? "all versions") : null;
      const which = version === null ? { "data-total": "all" } : { "data-version": version };
      rows.push(h("tr", { ...which, "data-window": key },
        head, h("td", {}, label),
        COUNTS.map((k) => h("td", { className: "num", "data-figure": k }, f[k] ?? 0)),
        h("td", { className: "num", "data-figure": "errorRate" }, percent(f.errorRate ?? 0)),
        LATER.map((k) => h("td", { className: "num", "data-figure": k }, f[k] ?? 0)),
        h("td", { className: "num", "data-figure": "p50Ms" }, millis(f.p50Ms)),
        h("td", { className: "num", "data-figure": "p99Ms" }, millis(f.p99Ms))));
    });
  }
  const headers = ["Version", "Window", "Invocations", "Successes", "Failures", "Error rate", "Retries",
    "Dead letters", "p50", "p99"];
  return h("div", { className: "stats" }, table(headers, rows));
}

// Dead letters for operators: overview, filtered list, detail, replay and purge, replay jobs; the
// views (dead letters, functions, flows) and sign-in. Every value from the hub is rendered through dom.js
// (text nodes only): event data is user input.
import { ApiError, call, query, token } from "./api.js";
import { badge, h, sparkline, table, time } from "./dom.js";
import { hideFlows, reloadFlows, showFlows } from "./flows.js";
import { hideFunctions, reloadFunctions, showFunctions } from "./functions.js";
import { $, button, fail, guard, notify, onSignOut, path, signOut } from "./shell.js";

const ACTIVE = new Set(["pending", "running"]);
const FIELDS = ["function", "binding", "source", "status", "errorCode", "since", "until"];
const HOUR = 3600 * 1000;
const state = { filter: {}, cursor: null, seq: 0, selected: new Set(), jobs: new Map(), timer: null };
const can = { dlq: false, admin: false }; // what the token may do, learnt at sign-in
const plural = (n) => `${n} dead letter${n === 1 ? "" : "s"}`;

onSignOut(() => {
  clearTimeout(state.timer);
  state.timer = null;
});

// ---- sign-in and views

// Whether the token may read `path`: a 403 says no; any other refusal is thrown.
async function allowed(path) {
  try {
    await call("GET", path);
    return true;
  } catch (err) {
    if (err instanceof ApiError && err.status === 403) return false;
    throw err;
  }
}

async function signIn() {
  try {
    [can.dlq, can.admin] = await Promise.all([allowed("/v1/dead-letters?limit=1"), allowed("/v1/functions")]);
  } catch (err) {
    return fail(err);
  }
  if (!can.dlq && !can.admin) {
    return signOut("This token may neither manage dead letters nor operate functions (403 Forbidden). "
      + `Use a token with the "dlq" scope (dead letters) or the "admin" scope (functions).`);
  }
  notify("");
  $("login").hidden = true;
  $("app").hidden = $("signout").hidden = $("views").hidden = false;
  $("to-dead-letters").hidden = !can.dlq;
  $("to-functions").hidden = $("to-flows").hidden = !can.admin;
  await Promise.all([can.dlq ? Promise.all([guard(loadList)(), refresh()]) : null, route()]);
}

const refresh = () => Promise.all([guard(loadStats, $("stats"))(), guard(loadJobs, $("jobs"))()]);

function decoded(text) {
  try {
    return decodeURIComponent(text);
  } catch {
    return text; // typed by hand, not encoded: taken as it is
  }
}

// "#functions" and "#functions/NAME" show the functions, "#flows", "#flows/NAME" and
// "#flows/NAME/RUN" the flows; anything else the dead letters (when the token may see them).
const VIEWS = { "dead-letters": "dead letters", functions: "functions", flows: "flows" };

function route() {
  if ($("app").hidden) return null;
  const [asked, ...rest] = location.hash.slice(1).split("/");
  let view = can.dlq ? "dead-letters" : "functions";
  if (can.admin && (asked === "functions" || asked === "flows")) view = asked;
  for (const name of Object.keys(VIEWS)) {
    $(`${name}-view`).hidden = name !== view;
    if (name === view) $(`to-${name}`).setAttribute("aria-current", "page");
    else $(`to-${name}`).removeAttribute("aria-current");
  }
  $("view-name").textContent = VIEWS[view];
  document.title = `eventhub · ${VIEWS[view]}`;
  if (view !== "functions") hideFunctions();
  if (view !== "flows") hideFlows();
  if (view === "functions") return showFunctions(rest[0] ? decoded(rest.join("/")) : null);
  const [flow, run] = [rest[0], rest[1]].map((x) => (x ? decoded(x) : null));
  if (view === "flows") return showFlows(flow, run);
  return null;
}

// ---- overview

function hourly(stats, fn) {
  const start = Math.floor(Date.now() / HOUR) * HOUR - 23 * HOUR;
  const counts = new Array(24).fill(0);
  for (const x of stats.hourly || []) {
    const i = Math.round((Date.parse(x.hour) - start) / HOUR);
    if (x.function === fn && i >= 0 && i < 24) counts[i] += x.count;
  }
  return counts;
}

function filterBy(values) {
  for (const name of FIELDS) $("filters").elements[name].value = values[name] || "";
  return loadList();
}

async function loadStats() {
  const s = await call("GET", "/v1/dead-letters/stats");
  const link = (text, values) => (text ? button(text, () => filterBy(values), "link") : "(no function)");
  const tile = (label, value) =>
    h("div", { className: "tile" }, h("span", {}, label), h("strong", {}, value));
  const byFunction = (s.byFunction || []).map((f) => {
    const counts = hourly(s, f.function);
    const label = `${counts.reduce((a, b) => a + b, 0)} in the last 24 h`;
    return [link(f.function, { function: f.function }), f.count, sparkline(counts, label)];
  });
  const byError = (s.byError || []).map((e) => [
    e.function || "(no function)",
    link(e.errorCode, { function: e.function, errorCode: e.errorCode }),
    e.reason,
    e.count,
  ]);
  $("stats").replaceChildren(
    h("div", { className: "tiles" },
      tile("Dead letters", s.total), tile("Oldest", time(s.oldest)), tile("Newest", time(s.newest))),
    h("div", { className: "split" },
      table(["Function", "Dead letters", "Last 24 h"], byFunction),
      table(["Function", "Error code", "Reason", "Dead letters"], byError)),
  );
}

// ---- the list

function readFilter() {
  const filter = {};
  for (const name of FIELDS) {
    const v = $("filters").elements[name].value.trim();
    // datetime-local is the browser's local time; the API wants RFC 3339.
    if (v) filter[name] = name === "since" || name === "until" ? new Date(v).toISOString() : v;
  }
  return filter;
}

async function loadList(more = false) {
  const seq = more ? state.seq : ++state.seq;
  if (!more) {
    state.filter = readFilter();
    state.cursor = null;
    state.selected.clear();
  }
  const params = query({ ...state.filter, limit: 50, cursor: state.cursor });
  const page = await call("GET", `/v1/dead-letters${params}`);
  if (seq !== state.seq) return; // a newer filter was applied meanwhile
  if (!more) $("rows").replaceChildren();
  $("rows").append(...page.items.map(row));
  state.cursor = page.nextCursor;
  $("more").hidden = !state.cursor;
  $("empty").hidden = $("rows").children.length > 0;
  updateSelection();
}

function row(d) {
  const select = (e) => {
    if (e.target.checked) state.selected.add(d.id);
    else state.selected.delete(d.id);
    updateSelection();
  };
  const box = h("input", {
    type: "checkbox", "aria-label": `Select ${d.id}`, onclick: (e) => e.stopPropagation(), onchange: select,
  });
  return h("tr", { "data-id": d.id, onclick: guard(() => openDetail(d.id)) },
    h("td", {}, box),
    h("td", {}, time(d.failedAt)),
    h("td", {}, d.function ?? "—"),
    h("td", {}, d.binding ?? "—"),
    h("td", {}, d.source ?? "—"),
    h("td", { title: d.errorMessage }, h("code", {}, d.errorCode)),
    h("td", {}, badge(d.status)),
    h("td", { className: "num" }, d.replayCount),
    h("td", {}, h("button", { type: "button", className: "link mono" }, d.event?.id ?? d.id)));
}

function updateSelection() {
  const boxes = [...$("rows").querySelectorAll("input[type=checkbox]")];
  $("selection").textContent = `${state.selected.size} selected`;
  $("replay-selected").disabled = $("purge-selected").disabled = state.selected.size === 0;
  $("select-all").checked = boxes.length > 0 && boxes.every((b) => b.checked);
}

function selectAll(e) {
  for (const tr of $("rows").children) {
    tr.querySelector("input").checked = e.target.checked;
    if (e.target.checked) state.selected.add(tr.dataset.id);
    else state.selected.delete(tr.dataset.id);
  }
  updateSelection();
}

// ---- detail

function deadLetterFunction(d) {
  const f = d.deadLetterFunction || {};
  if (!f.name) return h("p", { className: "muted" }, "None configured for this function.");
  const resend = async () => {
    await call("POST", `/v1/dead-letters/${path(d.id)}/resend`);
    await openDetail(d.id);
  };
  const problem = h("div"); // errors show here: the notice at the top is behind the dialog
  return h("div", { className: "dlf" }, h("code", {}, f.name), " ", badge(f.status),
    f.error ? h("span", { className: "err" }, f.error) : null, " ", button("Resend", resend, "", problem),
    problem);
}

function attempts(list) {
  return table(["#", "Started", "Status", "Latency", "Message", "Response"], (list || []).map((a) => [
    a.attempt,
    time(a.startedAt),
    a.status != null ? h("code", {}, `HTTP ${a.status}`) : h("code", { className: "err" }, a.error ?? "—"),
    a.latencyMs != null ? `${Number(a.latencyMs).toFixed(1)} ms` : "—",
    a.message || "—",
    a.response ? h("pre", { className: "excerpt" }, a.response) : "—",
  ]), "No attempt was made.");
}

// A step of a flow run: where it stood, and (with the "admin" scope) a link to the run.
function flowRun(f) {
  const branch = f.branch !== null && f.branch !== undefined ? `[${f.branch}]` : "";
  const where = `${f.flow}, step ${f.step}${branch}`;
  if (!can.admin) return `${where}, run ${f.run}`;
  const href = `#flows/${encodeURIComponent(f.flow)}/${encodeURIComponent(f.run)}`;
  return h("span", {}, `${where}, run `, h("a", { href, onclick: () => $("detail").close() }, f.run));
}

async function openDetail(id) {
  const d = await call("GET", `/v1/dead-letters/${path(id)}`);
  const facts = [
    ["Function", d.function], ["Binding", d.binding], ["Source", d.source], ["Invocation", d.invocationId],
    ["Reason", d.reason], ["Error", `${d.errorCode}: ${d.errorMessage}`], ["Enqueued", time(d.enqueuedAt)],
    ["Failed", time(d.failedAt)], ["Replays", d.replayCount],
  ];
  if (d.flow) facts.splice(1, 0, ["Flow run", flowRun(d.flow)]);
  $("detail-body").replaceChildren(
    h("h2", {}, "Dead letter ", badge(d.status)),
    h("p", { className: "mono muted" }, d.id),
    h("dl", { className: "facts" }, facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v ?? "—")])),
    h("h3", {}, "Dead-letter function"),
    deadLetterFunction(d),
    h("h3", {}, `Attempts (${(d.attempts || []).length})`),
    attempts(d.attempts),
    h("h3", {}, "Event"),
    h("pre", { className: "json" }, JSON.stringify(d.event, null, 2)),
    h("div", { className: "actions" },
      button("Replay…", () => openReplay({ ids: [d.id] })),
      button("Purge…", () => openPurge({ ids: [d.id] }), "danger")),
  );
  if (!$("detail").open) $("detail").showModal();
}

// ---- replay and purge: a dry run shows the count first, then the operator confirms

const scope = (sel) => (sel.ids ? { ids: sel.ids } : { filter: { ...state.filter } });

function describe(sel) {
  if (sel.ids) return `The ${sel.ids.length} selected.`;
  const parts = Object.entries(state.filter).map(([k, v]) => `${k}=${v}`);
  return parts.length ? `Every dead letter matching ${parts.join(", ")}.` : "Every dead letter (no filter).";
}

// `preview()` answers {count, sample?}; `run()` acts. Changing an input asks for a new preview.
function confirmation({ title, sel, inputs = [], preview, says, verb, run, danger = false }) {
  const out = h("div", { className: "preview" }, "Counting…");
  const go = h("button", { type: "button", className: danger ? "danger" : "primary", disabled: true }, verb);
  let asked = 0; // a preview answered after the options changed is stale
  const check = guard(async () => {
    const mine = ++asked;
    go.disabled = true;
    const r = await preview();
    if (mine !== asked) return;
    const sample = (r.sample || []).map((d) => h("li", {}, `${d.function ?? "—"} · ${d.event?.id}`));
    const list = sample.length ? [h("ul", { className: "sample mono" }, sample)] : [];
    out.replaceChildren(h("p", { className: "count" }, says(r.count)), ...list);
    go.textContent = `${verb} ${r.count}`;
    go.disabled = r.count === 0;
  }, out);
  const changed = () => {
    asked += 1;
    go.disabled = true;
    out.replaceChildren("Options changed: preview again.");
  };
  go.addEventListener("click", guard(async () => {
    go.disabled = true;
    await run();
  }, out));
  for (const [, input] of inputs) input.addEventListener("input", changed);
  const options = inputs.map(([label, input]) => h("label", {}, label, input));
  const previewButton = inputs.length ? h("button", { type: "button", onclick: check }, "Preview") : null;
  $("confirm-body").replaceChildren(
    h("h2", {}, title),
    h("p", { className: "muted" }, describe(sel)),
    h("div", { className: "options", hidden: !options.length }, options, previewButton),
    out,
    h("div", { className: "actions end" },
      h("button", { type: "button", onclick: () => $("confirm").close() }, "Cancel"), go),
  );
  $("confirm").showModal();
  check();
}

function openReplay(sel) {
  const to = h("input", { name: "to", placeholder: "the same function" });
  const rate = h("input", { name: "rate", placeholder: "50/s" });
  const body = (dryRun) => {
    const options = { ...scope(sel), dryRun };
    if (to.value.trim()) options.to = to.value.trim();
    if (rate.value.trim()) options.rate = rate.value.trim();
    return options;
  };
  confirmation({
    title: "Replay dead letters", sel, inputs: [["Redirect to function", to], ["Rate", rate]], verb: "Replay",
    preview: () => call("POST", "/v1/dead-letters/replay", body(true)),
    says: (n) => `${plural(n)} will be replayed.`,
    run: async () => {
      const r = await call("POST", "/v1/dead-letters/replay", body(false));
      $("confirm").close();
      notify(`Replay job ${r.job.id} started.`, "ok");
      watch(r.job);
      await loadList();
    },
  });
}

function openPurge(sel) {
  confirmation({
    title: "Purge dead letters", sel, verb: "Purge", danger: true,
    preview: () => call("POST", "/v1/dead-letters/purge", { ...scope(sel), dryRun: true }),
    says: (n) => `${plural(n)} will be deleted. This cannot be undone.`,
    run: async () => {
      const r = await call("POST", "/v1/dead-letters/purge", scope(sel));
      for (const d of document.querySelectorAll("dialog[open]")) d.close();
      notify(`Purged ${plural(r.purged)}.`, "ok");
      await Promise.all([loadList(), refresh()]);
    },
  });
}

// ---- replay jobs, polled while pending or running

async function loadJobs() {
  for (const j of (await call("GET", "/v1/replay-jobs")).items) state.jobs.set(j.id, j);
  watch();
}

function watch(job = null) {
  if (job) state.jobs.set(job.id, job);
  const jobs = [...state.jobs.values()];
  jobs.sort((a, b) => String(b.createdAt).localeCompare(String(a.createdAt)));
  $("jobs").replaceChildren(jobs.length
    ? h("ul", { className: "jobs" }, jobs.slice(0, 10).map(jobItem))
    : h("p", { className: "muted" }, "No replay jobs yet."));
  if (!state.timer && jobs.some((j) => ACTIVE.has(j.status))) state.timer = setTimeout(poll, 1000);
}

async function poll() {
  let finished = false;
  for (const j of [...state.jobs.values()].filter((x) => ACTIVE.has(x.status))) {
    try {
      const fresh = await call("GET", `/v1/replay-jobs/${path(j.id)}`);
      state.jobs.set(j.id, fresh);
      finished ||= !ACTIVE.has(fresh.status);
    } catch (err) {
      if (!(err instanceof ApiError) || err.status === 401 || err.status === 403) return fail(err);
      if (err.status === 404) state.jobs.set(j.id, { ...j, status: "unknown", error: err.message });
    }
  }
  state.timer = null;
  watch();
  if (finished) await Promise.all([guard(loadList)(), guard(loadStats, $("stats"))()]);
}

function jobItem(j) {
  const total = j.total || 0;
  const rate = typeof j.rate === "number" ? `${j.rate}/s` : j.rate;
  const cancel = async () => watch(await call("POST", `/v1/replay-jobs/${path(j.id)}/cancel`));
  const counts = `${j.processed}/${total} processed · ${j.published} published · ${j.skipped} skipped`
    + ` · ${j.succeeded} succeeded · ${j.failed} failed`;
  return h("li", { className: "job", "data-id": j.id },
    h("div", { className: "job-head" }, badge(j.status), h("code", {}, j.id),
      j.to ? `→ ${j.to}` : "", rate ? `at ${rate}` : "", time(j.createdAt)),
    h("progress", { max: total || 1, value: total ? j.processed : Number(j.status === "done") }),
    h("span", { className: "counts" }, counts),
    ACTIVE.has(j.status) ? button("Cancel", cancel) : null,
    j.error ? h("p", { className: "err" }, j.error) : null);
}

// ---- wiring

$("login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  token.set($("token").value.trim());
  $("token").value = "";
  signIn();
});
$("signout").addEventListener("click", () => signOut());
$("filters").addEventListener("submit", (e) => {
  e.preventDefault();
  guard(loadList)();
});
$("filters").addEventListener("reset", () => setTimeout(guard(loadList))); // after the reset
$("more").addEventListener("click", guard(() => loadList(true)));
$("select-all").addEventListener("change", selectAll);
$("replay-selected").addEventListener("click", () => openReplay({ ids: [...state.selected] }));
$("replay-filter").addEventListener("click", () => openReplay({}));
$("purge-selected").addEventListener("click", () => openPurge({ ids: [...state.selected] }));
$("purge-filter").addEventListener("click", () => openPurge({}));
$("detail-close").addEventListener("click", () => $("detail").close());
$("refresh").addEventListener("click", () => Promise.all([guard(loadList)(), refresh()]));
$("functions-refresh").addEventListener("click", reloadFunctions);
$("flows-refresh").addEventListener("click", reloadFlows);
window.addEventListener("hashchange", route);

if (token.get()) signIn();
else signOut();

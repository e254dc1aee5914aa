// Flows for operators: the declared flows with the bindings that start them; a flow's runs
// (status, trigger event, times); one run as a graph of the flow's steps coloured by how far it
// went, a step's entries (timing, attempts, version, result) on selection. Read again every 5
// seconds while a run shown is running. Every value from the hub goes through dom.js or
// flowgraph.js as text.
import { call, query } from "./api.js";
import { badge, h, table, time } from "./dom.js";
import { branchId, draw, entries, model } from "./flowgraph.js";
import { millis } from "./format.js";
import { $, button, fail, guard, onSignOut, path } from "./shell.js";

const REFRESH_MS = 5000;
const RUNS_SHOWN = 50;
const state = {
  shown: false, flow: null, run: null, selected: null, status: "", seq: 0, timer: null, running: false,
};

onSignOut(hideFlows);

const flowHref = (name) => `#flows/${encodeURIComponent(name)}`;
const runHref = (name, id) => `${flowHref(name)}/${encodeURIComponent(id)}`;
const short = (id) => String(id).slice(0, 8);

/** Show the view: the list, the flow `name`'s runs (null: none), its run `run` (null: none). */
export function showFlows(name, run) {
  const changed = name !== state.flow || run !== state.run;
  if (run !== state.run) state.selected = null;
  if (name !== state.flow) state.status = "";
  state.shown = true;
  state.flow = name;
  state.run = run;
  $("flow").hidden = !name;
  if (changed && name) {
    $("flow").replaceChildren(h("p", { className: "muted" }, "Loading…"));
    $("flow").scrollIntoView({ block: "start" });
  }
  return reloadFlows();
}

export function hideFlows() {
  state.shown = false;
  clearTimeout(state.timer);
  state.timer = null;
}

export function reloadFlows() {
  clearTimeout(state.timer);
  state.timer = null;
  return Promise.all([guard(loadList, $("flows"))(), refreshDetail()]);
}

// ---- the list

async function loadList() {
  const [flows, bindings] = await Promise.all([call("GET", "/v1/flows"), call("GET", "/v1/bindings")]);
  const items = [...(flows.items || [])];
  items.sort((a, b) => String(a.metadata.name).localeCompare(String(b.metadata.name)));
  const rows = items.map((doc) => {
    const name = doc.metadata.name;
    const steps = Array.isArray(doc.spec?.steps) ? doc.spec.steps : [];
    const state_ = doc.status?.invalid
      ? h("span", { title: doc.status.error || "" }, badge("invalid")) : badge("active");
    return h("tr", { "data-flow": name },
      h("td", {}, h("a", { href: flowHref(name) }, name)),
      h("td", {}, state_),
      h("td", { className: "num" }, steps.length),
      h("td", {}, steps.map((s) => s.name).join(" → ") || "—"),
      h("td", {}, startedBy(name, bindings.items || []).join(", ") || "—"));
  });
  $("flows").replaceChildren(table(["Flow", "State", "Steps", "Declared steps", "Started by"], rows,
    "No flows yet."));
}

// The bindings whose `flow` is this one (a binding names a function or a flow, never both).
function startedBy(name, bindings) {
  return bindings.filter((b) => b.spec?.flow === name).map((b) => b.metadata.name).sort();
}

// ---- the open flow and run

async function refreshDetail() {
  const name = state.flow;
  if (!name) return;
  try {
    await loadDetail();
  } catch (err) {
    if (name === state.flow) fail(err, $("flow"));
    return;
  }
  if (state.shown && state.flow === name && state.running && !state.timer) {
    state.timer = setTimeout(tick, REFRESH_MS);
  }
}

// A dialog open or the tab hidden: the page stays as it is, and asks later.
function tick() {
  state.timer = null;
  if (!document.hidden && !document.querySelector("dialog[open]")) return refreshDetail();
  if (state.shown && state.flow) state.timer = setTimeout(tick, REFRESH_MS);
  return null;
}

async function loadDetail() {
  const { flow: name, run: runId } = state;
  const seq = ++state.seq;
  const f = path(name);
  const [flow, runs, run] = await Promise.all([
    declared(name),
    call("GET", `/v1/flows/${f}/runs${query({ status: state.status, limit: RUNS_SHOWN })}`),
    runId ? call("GET", `/v1/flows/${f}/runs/${path(runId)}`) : null,
  ]);
  if (seq !== state.seq || name !== state.flow || runId !== state.run) return; // moved on
  const items = runs.items || [];
  state.running = items.some((r) => r.status === "running") || run?.status === "running";
  const filter = h("select", { name: "status", "aria-label": "Status" },
    ["", "running", "succeeded", "failed"].map((s) =>
      h("option", { value: s, selected: s === state.status }, s || "any status")));
  filter.addEventListener("change", () => {
    state.status = filter.value;
    reloadFlows();
  });
  $("flow").replaceChildren(
    h("div", { className: "card-head" },
      h("h2", {}, name, flow ? null : badge("not declared")),
      h("div", { className: "actions" },
        filter, button("Refresh", reloadFlows),
        h("a", { href: "#flows", className: "close-link" }, "Close"))),
    flow?.status?.invalid ? h("p", { className: "err" }, flow.status.error) : null,
    h("h3", {}, "Runs"),
    runTable(name, items),
    items.length === RUNS_SHOWN
      ? h("p", { className: "muted" },
        `The ${RUNS_SHOWN} newest shown (eventhub flow runs ${name} --limit N shows more).`)
      : null,
    h("div", { id: "flow-run", className: "flow-run" }, runPanel(name, flow, run)),
  );
  if (state.selected) select(state.selected); // kept across a redraw (the run read again)
}

// The flow as declared now, or null when it is no longer (its runs stay readable).
async function declared(name) {
  const { items } = await call("GET", "/v1/flows");
  return (items || []).find((d) => d.metadata.name === name) || null;
}

function runTable(name, items) {
  const rows = items.map((r) => {
    const trigger = r.triggerEvent || {};
    return h("tr", { "data-run": r.id, className: r.id === state.run ? "current" : null },
      h("td", {}, h("a", { href: runHref(name, r.id), className: "mono", title: r.id }, short(r.id))),
      h("td", {}, badge(r.status)),
      h("td", {}, h("code", {}, trigger.id ?? r.triggerEventId ?? "—"),
        h("div", { className: "muted" }, `${trigger.source ?? "—"} · ${trigger.type ?? "—"}`)),
      h("td", {}, time(r.startedAt)),
      h("td", {}, time(r.endedAt)),
      h("td", {}, r.binding ?? "—"),
      h("td", {}, r.error ? h("span", { className: "err" }, r.error) : "—"));
  });
  const headers = ["Run", "Status", "Trigger event", "Started", "Ended", "Binding", "Error"];
  return table(headers, rows, "No runs yet.");
}

function runPanel(name, flow, run) {
  if (!run) {
    if (!flow) {
      return h("p", { className: "muted" }, "This flow is no longer declared: open a run to see its steps.");
    }
    return [h("h3", {}, "Steps as declared"),
      h("p", { className: "muted" }, "Open a run to see how far it went."),
      h("div", { className: "graph" }, draw(flow.spec, null, select)),
      h("div", { id: "flow-step", className: "flow-step" }, stepPanel(flow, null))];
  }
  const trigger = run.triggerEvent || {};
  const facts = [
    ["Status", badge(run.status)], ["Binding", run.binding ?? "—"],
    ["Trigger event", `${trigger.id ?? "—"} (source ${trigger.source ?? "—"}, type ${trigger.type ?? "—"})`],
    ["Started", time(run.startedAt)], ["Updated", time(run.updatedAt)], ["Ended", time(run.endedAt)],
    ["Error", run.error ? h("span", { className: "err" }, run.error) : "—"],
    ["Output", run.output ? h("pre", { className: "excerpt" }, run.output) : "—"],
  ];
  const graph = flow
    ? h("div", { className: "graph" }, draw(flow.spec, run, select))
    : h("p", { className: "muted" }, "This flow is no longer declared: its steps cannot be drawn.");
  const stray = undeclared(flow, run);
  return [
    h("div", { className: "card-head" },
      h("h3", {}, "Run ", h("code", {}, run.id)),
      h("a", { href: flowHref(name), className: "close-link" }, "Close run")),
    h("dl", { className: "facts" }, facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
    h("div", { className: "legend" }, ["succeeded", "failed", "running", "not-reached"].map((s) =>
      h("span", { className: `legend-item status-${s}` }, s.replace("-", " ")))),
    graph,
    stray.length ? h("p", { className: "muted" },
      `Entered but no longer in the flow: ${stray.join(", ")} (see the table below).`) : null,
    h("div", { id: "flow-step", className: "flow-step" }, stepPanel(flow, run)),
    h("h3", {}, "Steps entered"),
    stepTable(run),
  ];
}

function undeclared(flow, run) {
  if (!flow) return [];
  const ids = new Set(model(flow.spec).rows.flat().map((n) => n.id));
  return [...entries(run).keys()].filter((id) => !ids.has(id));
}

function stepTable(run) {
  const rows = (run.steps || []).map((s) => {
    const id = s.branch !== null && s.branch !== undefined ? branchId(s.name, s.branch) : s.name;
    return h("tr", { "data-seq": s.seq, "data-node": id, className: "pick", onclick: () => select(id) },
      h("td", { className: "num" }, s.seq), h("td", {}, id), h("td", {}, s.kind), h("td", {}, badge(s.status)),
      h("td", {}, s.function ?? "—"), h("td", {}, s.version ?? "—"),
      h("td", { className: "num" }, s.attempts ?? 0), h("td", { className: "num" }, millis(s.durationMs)),
      h("td", {}, result(s)));
  });
  return table(["Seq", "Step", "Kind", "Status", "Function", "Version", "Attempts", "Duration", "Result"],
    rows, "No step entered yet.");
}

// A step's error, else the first KiB of its result.
function result(s) {
  if (s.error) return h("span", { className: "err" }, s.error);
  return s.output ? h("pre", { className: "excerpt" }, s.output) : "—";
}

// ---- the selected step

let shown = { flow: null, run: null }; // what the graph on the page was drawn from

function select(id) {
  state.selected = id;
  for (const g of document.querySelectorAll("#flow-run [data-node]")) {
    g.classList.toggle("selected", g.dataset.node === id);
  }
  const panel = $("flow-step");
  if (panel) panel.replaceChildren(...[stepPanel(shown.flow, shown.run)].flat().filter(Boolean));
}

function declaration(flow, id) {
  if (!flow) return null;
  return model(flow.spec).rows.flat().find((n) => n.id === id) || null;
}

function stepPanel(flow, run) {
  shown = { flow, run };
  const id = state.selected;
  if (!id) {
    return h("p", { className: "muted" }, "Select a step to see its timing, attempts, version and result.");
  }
  const node = declaration(flow, id);
  const list = run ? entries(run).get(id) || [] : [];
  const decl = node?.decl || {};
  const facts = [
    ["Kind", node?.kind ?? list[0]?.kind ?? "—"],
    node?.target || decl.function ? ["Function", node?.target ?? decl.function] : null,
    node?.kind !== "join" && decl.input ? ["Input", h("code", {}, decl.input)] : null,
    node?.kind === "parallel" && decl.timeout !== undefined ? ["Branch timeout", String(decl.timeout)] : null,
    node?.kind === "parallel" ? ["On branch failure", decl.onBranchFailure ?? "fail"] : null,
  ].filter(Boolean);
  const head = h("h3", {}, node?.kind === "join" ? `Join of ${node.step}` : id, " ",
    run ? badge(list.length ? list[list.length - 1].status : "not reached") : null);
  const dl = h("dl", { className: "facts" }, facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  const parts = [head, dl];
  if (!run) return parts;
  if (!list.length) return [...parts, h("p", { className: "muted" }, "This run did not reach this step.")];
  if (list.length > 1) {
    parts.push(h("p", { className: "muted" }, `Entered ${list.length} times; each below, latest last.`));
  }
  for (const s of list) parts.push(entry(s));
  return parts;
}

function entry(s) {
  const facts = [
    ["Seq", s.seq], ["Status", badge(s.status)], ["Version", s.version ?? "—"], ["Attempts", s.attempts ?? 0],
    ["Queued", time(s.queuedAt)], ["Started", time(s.startedAt)], ["Ended", time(s.endedAt)],
    ["Duration", millis(s.durationMs)],
    ["Result", s.output ? h("pre", { className: "excerpt" }, s.output) : "—"],
    ["Error", s.error ? h("span", { className: "err" }, s.error) : "—"],
    ["Dead letter", s.deadLetterId ? h("code", {}, s.deadLetterId) : "—"],
  ];
  return h("dl", { className: "facts entry", "data-seq": s.seq },
    facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}


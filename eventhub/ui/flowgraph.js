// A flow drawn as a graph of its declared steps, coloured by one run: plain SVG built through
// DOM calls (text nodes and attributes only: names and expressions are user input). The layout
// is layered: one row per step in list order, a parallel step as three rows (the fan-out, its
// branches side by side, the join). An edge to the row just below is a straight line; any other
// (a skip, a cycle back) runs in its own lane on the right, so no edge crosses a node.
import { millis } from "./format.js";

const NS = "http://www.w3.org/2000/svg";
const NODE_W = 190;
const NODE_H = 54;
const JOIN_H = 16;
const GAP_X = 24;
const GAP_Y = 44;
const PAD = 16;
const LANE = 14;
const LABEL_MAX = 30; // characters of a `when` shown on its edge; the whole one in its tooltip
const LABEL_ROOM = LABEL_MAX * 6.7 + 16;

function svg(tag, attrs = {}, text = null) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v !== undefined && v !== null && v !== false) el.setAttribute(k, String(v));
  }
  if (text !== null) el.textContent = String(text);
  return el;
}

const clip = (text, n) => (text.length > n ? `${text.slice(0, n - 1)}…` : text);
const kindOf = (step) => (step.choice ? "choice" : step.parallel ? "parallel" : "function");
export const branchId = (name, i) => `${name}[${i}]`;
export const joinId = (name) => `${name}/join`;

/** The declared steps as nodes in rows, and the edges between them. */
export function model(spec) {
  const steps = Array.isArray(spec?.steps) ? spec.steps : [];
  const rows = [];
  const edges = [];
  const exit = new Map(); // step name -> the node its `next` leaves from (a parallel's join)
  const row = (...nodes) => rows.push(nodes);
  for (const step of steps) {
    const name = String(step.name);
    const kind = kindOf(step);
    row({ id: name, step: name, kind, target: step.function ?? null, decl: step });
    exit.set(name, name);
    if (kind === "parallel") {
      row(...step.parallel.map((b, i) => ({
        id: branchId(name, i), step: name, kind: "branch", branch: i, target: b.function, decl: b,
      })));
      row({ id: joinId(name), step: name, kind: "join", decl: step });
      exit.set(name, joinId(name));
      step.parallel.forEach((_, i) => {
        edges.push({ from: name, to: branchId(name, i), kind: "fan-out" });
        edges.push({ from: branchId(name, i), to: joinId(name), kind: "join" });
      });
    }
  }
  steps.forEach((step, i) => {
    const name = String(step.name);
    if (kindOf(step) === "choice") {
      for (const rule of step.choice) {
        edges.push({ from: name, to: rule.next, kind: "choice", label: rule.when });
      }
      if (step.default) edges.push({ from: name, to: step.default, kind: "default", label: "default" });
      return;
    }
    if (step.end) return;
    const next = step.next ?? steps[i + 1]?.name;
    if (next !== undefined) edges.push({ from: exit.get(name), to: String(next), kind: "next" });
  });
  return { rows, edges };
}

/** Each node's entries in the run, by node id, oldest first (a step entered twice has two). */
export function entries(run) {
  const by = new Map();
  const add = (id, s) => by.set(id, [...(by.get(id) || []), s]);
  for (const s of [...(run?.steps || [])].sort((a, b) => a.seq - b.seq)) {
    const branch = s.branch !== null && s.branch !== undefined;
    add(branch ? branchId(s.name, s.branch) : s.name, s);
    if (s.kind === "parallel") add(joinId(s.name), s);
  }
  return by;
}

const statusOf = (list) => (list?.length ? String(list[list.length - 1].status) : "not-reached");

// Whether the run went along an edge: the step it leads to was entered right after (the next
// seq), or for a parallel step's own edges, the branch was entered or ended.
function taken(edge, by, nodes) {
  const from = by.get(edge.from) || [];
  const to = by.get(edge.to) || [];
  if (edge.kind === "fan-out") return to.length > 0;
  if (edge.kind === "join") return from.some((s) => s.status !== "running");
  const done = nodes.get(edge.from)?.kind === "join" ? from.filter((s) => s.status === "succeeded") : from;
  return done.some((f) => to.some((t) => t.seq === f.seq + 1));
}

function place(rows) {
  const widths = rows.map((r) => r.length * NODE_W + (r.length - 1) * GAP_X);
  const content = Math.max(NODE_W, ...widths);
  const nodes = new Map();
  let y = PAD;
  rows.forEach((r, index) => {
    const height = r[0].kind === "join" ? JOIN_H
      : r[0].kind === "choice" ? Math.max(NODE_H, 16 * (r[0].decl.choice.length + 2)) : NODE_H;
    let x = PAD + (content - widths[index]) / 2;
    for (const n of r) {
      nodes.set(n.id, { ...n, row: index, x, y, w: NODE_W, h: height });
      x += NODE_W + GAP_X;
    }
    y += height + GAP_Y;
  });
  return { nodes, content, height: y - GAP_Y + PAD };
}

/** The graph as an <svg>; `select(id)` runs when a node is chosen (click, Enter or Space). */
export function draw(spec, run, select) {
  const { rows, edges } = model(spec);
  const by = entries(run);
  const { nodes, content, height } = place(rows);
  const known = edges.filter((e) => nodes.has(e.from) && nodes.has(e.to));
  const seen = new Set();
  const direct = (e) => {
    const a = nodes.get(e.from);
    const b = nodes.get(e.to);
    const key = `${e.from}>${e.to}`;
    const ok = b.row === a.row + 1 && !seen.has(key);
    seen.add(key);
    return ok;
  };
  const routed = known.map((e) => ({ ...e, direct: direct(e) }));
  const lanes = routed.filter((e) => !e.direct);
  const laneStart = PAD + content + (lanes.some((e) => e.label) ? LABEL_ROOM : 24);
  const width = laneStart + lanes.length * LANE + PAD;
  const el = svg("svg", {
    class: "flow-graph", viewBox: `0 0 ${width} ${height}`, width, height, role: "group",
    "aria-label": run ? `Run ${run.id} of flow` : "The flow as declared",
  });
  el.append(defs());
  const edgeLayer = svg("g", { class: "edges" });
  const nodeLayer = svg("g", { class: "nodes" });
  el.append(edgeLayer, nodeLayer);
  const exits = new Map(); // how many lane edges already leave each node (each its own height)
  const outs = new Map();
  for (const e of lanes) outs.set(e.from, (outs.get(e.from) || 0) + 1);
  let lane = 0;
  for (const e of routed) {
    const went = run ? taken(e, by, nodes) : false;
    const g = svg("g", {
      class: `edge edge-${e.kind}${went ? " taken" : ""}`, "data-from": e.from, "data-to": e.to,
      "data-kind": e.kind, "data-label": e.label, "data-taken": run ? String(went) : null,
    });
    const a = nodes.get(e.from);
    const b = nodes.get(e.to);
    let d;
    let label = null;
    if (e.direct) {
      const [x1, y1, x2, y2] = [a.x + a.w / 2, a.y + a.h, b.x + b.w / 2, b.y];
      d = `M${x1},${y1} L${x2},${y2}`;
      if (e.label) label = { x: (x1 + x2) / 2 + 6, y: (y1 + y2) / 2 + 4 };
    } else {
      const k = exits.get(e.from) || 0;
      exits.set(e.from, k + 1);
      const y1 = a.y + ((k + 1) * a.h) / ((outs.get(e.from) || 1) + 1);
      const x = laneStart + lane * LANE;
      lane += 1;
      const y2 = b.y + b.h / 2;
      d = `M${a.x + a.w},${y1} H${x} V${y2} H${b.x + b.w}`;
      if (e.label) label = { x: a.x + a.w + 6, y: y1 - 4 };
    }
    const arrow = went ? "flow-arrow-taken" : "flow-arrow";
    g.append(svg("path", { d, class: "edge-line", "marker-end": `url(#${arrow})` }));
    if (label) {
      g.append(svg("title", {}, String(e.label))); // the whole `when`, as the edge's tooltip
      const text = clip(String(e.label), LABEL_MAX);
      g.append(svg("text", { x: label.x, y: label.y, class: "edge-label" }, text));
    }
    edgeLayer.append(g);
  }
  for (const n of nodes.values()) {
    nodeLayer.append(node(n, run ? statusOf(by.get(n.id)) : null, by.get(n.id), select));
  }
  return el;
}

function defs() {
  const d = svg("defs");
  for (const id of ["flow-arrow", "flow-arrow-taken"]) {
    const m = svg("marker", {
      id, viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7,
      orient: "auto-start-reverse", class: id,
    });
    m.append(svg("path", { d: "M0,0 L10,5 L0,10 z" }));
    d.append(m);
  }
  return d;
}

function subtitle(n) {
  const rules = n.decl.choice?.length;
  if (n.kind === "choice") return `choice · ${rules} rule${rules === 1 ? "" : "s"}`;
  if (n.kind === "parallel") return `parallel · ${n.decl.parallel.length} branches`;
  return n.target ? String(n.target) : n.kind;
}

function node(n, status, list, select) {
  const cls = (status ?? "none").replace(/[^a-z0-9-]/gi, "");
  const last = list?.[list.length - 1];
  const label = n.kind === "join" ? `join of ${n.step}` : n.id;
  const g = svg("g", {
    class: `node node-${n.kind} status-${cls}`, "data-node": n.id, "data-step": n.step,
    "data-kind": n.kind, "data-branch": n.branch, "data-status": status, tabindex: 0, role: "button",
    "aria-label": `${label}${status ? `: ${status}` : ""}`,
  });
  g.append(svg("title", {}, `${label}${status ? ` (${status})` : ""}`));
  const rx = n.kind === "join" ? 8 : 6;
  g.append(svg("rect", { x: n.x, y: n.y, width: n.w, height: n.h, rx, class: "shape" }));
  if (n.kind === "join") {
    g.append(svg("text", { x: n.x + n.w / 2, y: n.y + 12, class: "join-label" }, "join"));
  } else {
    g.append(svg("text", { x: n.x + 10, y: n.y + 18, class: "name" }, clip(n.id, 26)));
    g.append(svg("text", { x: n.x + 10, y: n.y + 33, class: "sub" }, clip(subtitle(n), 28)));
    if (status) {
      const timed = last && last.durationMs !== null && last.durationMs !== undefined;
      const timing = timed ? ` · ${millis(last.durationMs)}` : "";
      const tries = last?.attempts > 1 ? ` · ${last.attempts} attempts` : "";
      const times = list && list.length > 1 ? ` · ×${list.length}` : "";
      const line = `${status.replace("-", " ")}${timing}${tries}${times}`;
      g.append(svg("text", { x: n.x + 10, y: n.y + 48, class: "state" }, line));
    }
  }
  const choose = () => select(n.id);
  g.addEventListener("click", choose);
  g.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      choose();
    }
  });
  return g;
}

// A function's rollouts (GET /v1/rollouts?function=f): state, the canary's weight now, each
// judged step with the canary's and the stable version's figures and the verdict; pause, resume
// and abort. A hub without the rollout API answers 404: the panel then says there are none.
import { ApiError, call, query } from "./api.js";
import { badge, h, table, time } from "./dom.js";
import { millis, percent, seconds } from "./format.js";
import { ask, button, path } from "./shell.js";

// Rollouts whose weights are in force (the hub's routers read running and paused ones).
const ACTIVE = new Set(["running", "paused"]);
const ENDED_SHOWN = 5; // the history of older ones: eventhub rollout list

/** The function's rollouts, newest first; `missing` is why there are none when the hub has no
 * rollout API (404), else null. */
export async function loadRollouts(fn) {
  try {
    const r = await call("GET", `/v1/rollouts${query({ function: fn })}`);
    const items = (r.items || []).filter((x) => x.function === fn);
    items.sort((a, b) => String(b.createdAt).localeCompare(String(a.createdAt)));
    return { items, missing: null };
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) return { items: [], missing: err.message };
    throw err;
  }
}

/** The rollout that sets `alias`'s weights now, with them as [[version, weight]], or null. */
export function inForce(alias, items) {
  const r = items.find((x) => x.alias === alias && ACTIVE.has(x.state));
  return r ? { rollout: r, weights: [[r.stable, 100 - r.weight], [r.canary, r.weight]] } : null;
}

/** The panel: every rollout, or why there is none. `changed()` runs after an action. */
export function rolloutPanel({ items, missing }, changed) {
  if (!items.length) {
    const why = missing ? ` (this hub has no rollout API: ${missing})` : "";
    return h("p", { className: "muted no-rollouts" }, `No rollouts${why}.`);
  }
  const active = items.filter((r) => ACTIVE.has(r.state));
  const ended = items.filter((r) => !ACTIVE.has(r.state));
  const more = ended.length - ENDED_SHOWN;
  return h("div", {},
    h("ul", { className: "rollouts" },
      [...active, ...ended.slice(0, ENDED_SHOWN)].map((r) => rolloutItem(r, changed))),
    more > 0 ? h("p", { className: "muted" }, `${more} older ended rollout${more === 1 ? "" : "s"} `
      + "not shown (eventhub rollout list shows them all).") : null);
}

function rolloutItem(r, changed) {
  const problem = h("div"); // an action's error shows here, beside its buttons
  const act = (verb) => async () => {
    await call("POST", `/v1/rollouts/${path(r.id)}/${verb}`);
    await changed();
  };
  const abort = () => ask({
    title: `Abort the rollout of ${r.canary}`,
    text: `Alias ${r.alias} goes back to ${r.stable} alone, and the rollout does not resume. `
      + `Invocations already sent to ${r.canary} stay with it.`,
    verb: "Abort", danger: true, run: act("abort"),
  });
  const steps = `(${(r.steps || []).map((s) => `${s} %`).join(" → ")}), each ${seconds(r.interval)}`;
  const live = ACTIVE.has(r.state);
  return h("li", { className: "rollout", "data-id": r.id },
    h("div", { className: "job-head" },
      badge(r.state), h("strong", {}, `${r.alias}: ${r.stable} → ${r.canary}`),
      live ? h("span", { className: "weight" }, `canary at ${r.weight} %`) : null,
      h("span", { className: "muted" },
        live ? `step ${Number(r.step) + 1} of ${(r.steps || []).length} ${steps}` : `steps ${steps}`),
      time(r.createdAt)),
    h("p", { className: "muted" }, analysis(r), " · ", h("code", {}, r.id)),
    r.reason ? h("p", { className: r.state === "rolled-back" ? "err" : "muted" }, r.reason) : null,
    live
      ? h("div", { className: "actions" },
        r.state === "running" ? button("Pause", act("pause"), "", problem) : null,
        r.state === "paused" ? button("Resume", act("resume"), "", problem) : null,
        button("Abort…", abort, "danger", problem), problem)
      : null,
    history(r.history || []));
}

function analysis(r) {
  const a = r.analysis || {};
  return `Judged by: error rate at most ${percent(a.maxErrorRate)}, p95 at most `
    + `${a.maxLatencyRatio ?? "—"}× the stable version's, from ${a.minCalls ?? "—"} canary calls; `
    + `on rollback: ${r.onRollback === "dead-letter" ? "dead-letter" : "call the stable version"}`;
}

function figures(f) {
  if (!f) return "—";
  const calls = `${f.calls} call${f.calls === 1 ? "" : "s"}`;
  return `${calls} · ${f.errors} failed · ${percent(f.errorRate)} · p95 ${millis(f.p95Ms)}`;
}

function history(steps) {
  const rows = steps.map((s) => [
    Number(s.step) + 1, `${s.weight} %`, time(s.startedAt), time(s.endedAt), badge(s.verdict),
    figures(s.canary), figures(s.stable), s.reason || "—",
  ]);
  const headers = ["Step", "Canary weight", "Started", "Ended", "Verdict", "Canary", "Stable", "Reason"];
  return table(headers, rows, "No step has ended yet.");
}

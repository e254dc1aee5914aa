// What every view of the page shares: the notice at the top, errors, sign-out, buttons and the
// confirmation dialog. A view registers what it must stop on sign-out (its timers) with onSignOut.
import { ApiError, token } from "./api.js";
import { h } from "./dom.js";

export const $ = (id) => document.getElementById(id);
export const path = (...parts) => parts.map(encodeURIComponent).join("/");
const stops = [];

export function notify(text, kind = "error") {
  $("notice").textContent = text;
  $("notice").className = `notice ${kind}`;
  $("notice").hidden = !text;
}

export function problemText(err) {
  const fields = err.fields.map((f) => `${f.field}: ${f.message}`).join("; ");
  const text = fields && !err.message.includes(fields) ? `${err.message} (${fields})` : err.message;
  return err.status ? `HTTP ${err.status}: ${text}` : text;
}

// Dead letters and replay jobs need the "dlq" scope; functions and rollouts need "admin".
const needs = (err) => (/^\/v1\/(dead-letters|replay-jobs)/.test(err.path) ? "dlq" : "admin");
const what = { dlq: "manage dead letters", admin: "operate functions" };

// A refused token signs out with the reason; other errors show in `el` (a section, a dialog), or
// in the notice at the top.
export function fail(err, el = null) {
  if (!(err instanceof ApiError)) {
    console.error(err);
    notify(`Unexpected error: ${err}`);
  } else if (err.status === 401) {
    signOut(`The hub did not accept this token (401 Unauthorized: ${err.message}). Sign in again.`);
  } else if (err.status === 403) {
    const scope = needs(err);
    signOut(`This token may not ${what[scope]} (403 Forbidden: ${err.message}). `
      + `Use a token with the "${scope}" scope.`);
  } else if (el) {
    el.replaceChildren(h("p", { className: "err" }, problemText(err)));
  } else {
    notify(problemText(err));
  }
}

export const guard = (fn, el = null) => async (...args) => {
  try {
    await fn(...args);
  } catch (err) {
    fail(err, el);
  }
};

export function onSignOut(stop) {
  stops.push(stop);
}

export function signOut(message = "") {
  token.clear();
  for (const stop of stops) stop();
  for (const d of document.querySelectorAll("dialog[open]")) d.close();
  $("app").hidden = $("signout").hidden = $("views").hidden = true;
  $("login").hidden = false;
  notify(message);
  $("token").focus();
}

export function button(text, onclick, className = "", errorsIn = null) {
  return h("button", { type: "button", className, onclick: guard(onclick, errorsIn) }, text);
}

/** Asks before `run()` acts; its errors show in the dialog (the notice is behind it). */
export function ask({ title, text, verb, run, danger = false }) {
  const out = h("div", { className: "preview" });
  const go = h("button", { type: "button", className: danger ? "danger" : "primary" }, verb);
  go.addEventListener("click", guard(async () => {
    go.disabled = true;
    try {
      await run();
    } finally {
      go.disabled = false;
    }
    $("confirm").close();
  }, out));
  $("confirm-body").replaceChildren(
    h("h2", {}, title),
    h("p", {}, text),
    out,
    h("div", { className: "actions end" },
      h("button", { type: "button", onclick: () => $("confirm").close() }, "Cancel"), go),
  );
  $("confirm").showModal();
}

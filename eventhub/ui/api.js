// The hub's HTTP API. Every call carries the operator's token (kept in sessionStorage, so it
// dies with the tab); a non-2xx answer becomes an ApiError built from the problem document.
const KEY = "eventhub.token";

export const token = {
  get: () => sessionStorage.getItem(KEY),
  set: (value) => sessionStorage.setItem(KEY, value),
  clear: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, problem, path = "") {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.path = path; // what was asked: the scope a 403 wants depends on it
    this.title = problem.title || "";
    this.fields = Array.isArray(problem.errors) ? problem.errors : [];
  }
}

export async function call(method, path, body) {
  const headers = { Authorization: `Bearer ${token.get() || ""}`, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    response = await fetch(path, { method, headers, body: payload, cache: "no-store" });
  } catch (err) {
    const problem = { title: "Network error", detail: `cannot reach the hub (${err.message})` };
    throw new ApiError(0, problem, path);
  }
  const text = await response.text();
  let doc = null;
  try {
    doc = text ? JSON.parse(text) : null;
  } catch {
    doc = null;
  }
  if (!response.ok) {
    const problem = doc && typeof doc === "object" ? doc : { detail: text.slice(0, 200) };
    throw new ApiError(response.status, problem, path);
  }
  return doc;
}

/** "?a=1&b=2" from the non-empty values of `params`. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") q.set(k, v);
  }
  const s = q.toString();
  return s ? `?${s}` : "";
}

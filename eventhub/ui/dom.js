// Building the DOM without HTML strings: every value becomes a text node or a property, so
// event data (user input) is never parsed as markup.
const SVG = "http://www.w3.org/2000/svg";

export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k in el) el[k] = v;
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function badge(status) {
  const name = String(status ?? "unknown");
  return h("span", { className: `badge badge-${name.replace(/[^a-z0-9-]/gi, "")}` }, name);
}

function pad(n) {
  return String(n).padStart(2, "0");
}

/** A time in the browser's zone, the exact RFC 3339 value in its tooltip. */
export function time(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  const text =
    `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  return h("time", { dateTime: iso, title: iso }, text);
}

/** A table of `rows`: each an array of cells, or a ready <tr> (for row spans or data attributes). */
export function table(headers, rows, empty = "None.") {
  return h(
    "table",
    { className: "grid" },
    h("thead", {}, h("tr", {}, headers.map((t) => h("th", {}, t)))),
    h(
      "tbody",
      {},
      rows.length
        ? rows.map((r) => (r instanceof Node ? r : h("tr", {}, r.map((c) => h("td", {}, c)))))
        : h("tr", {}, h("td", { colSpan: headers.length, className: "muted" }, empty)),
    ),
  );
}

function svg(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

/** Bars for hourly counts, oldest first. */
export function sparkline(counts, label) {
  const w = 5;
  const height = 24;
  const max = Math.max(1, ...counts);
  const el = svg("svg", {
    viewBox: `0 0 ${counts.length * w} ${height}`,
    width: counts.length * w,
    height,
    role: "img",
    class: "spark",
    "aria-label": label,
    "data-total": counts.reduce((a, b) => a + b, 0),
  });
  const title = svg("title", {});
  title.textContent = label;
  el.append(title);
  counts.forEach((c, i) => {
    const bar = c ? Math.max(2, Math.round((c / max) * (height - 2))) : 1;
    const cls = c ? "bar" : "bar zero";
    el.append(svg("rect", { x: i * w, y: height - bar, width: w - 1, height: bar, class: cls }));
  });
  return el;
}

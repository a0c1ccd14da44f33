// Small DOM and formatting helpers shared by the views.

/** h("a", {href, class: "x", dataset: {run: "P-1"}}, "text", child, ...) */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "dataset") Object.assign(el.dataset, value);
    else if (name === "class") el.className = value;
    else if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** A link handled by the router (no page load). */
export function link(href, text, attrs = {}) {
  return h("a", { href, "data-link": true, ...attrs }, text);
}

export const enc = encodeURIComponent;

export function runPath(project, displayId) {
  return `/projects/${enc(project)}/runs/${enc(displayId)}`;
}

export function projectPath(project) {
  return `/projects/${enc(project)}`;
}

export function experimentPath(project, name) {
  return `/projects/${enc(project)}/experiments/${enc(name)}`;
}

export function fmtTime(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const d = new Date(seconds * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "";
  seconds = Math.max(0, Math.round(seconds));
  const hrs = Math.floor(seconds / 3600);
  const min = Math.floor((seconds % 3600) / 60);
  const sec = seconds % 60;
  if (hrs) return `${hrs}h ${min}m`;
  if (min) return `${min}m ${sec}s`;
  return `${sec}s`;
}

/** A run's duration: to its finish, or (still running) to its last update. */
export function runDuration(run) {
  const end = run.finished_at ?? (run.status === "RUNNING" ? Date.now() / 1000 : run.updated_at);
  return end - run.created_at;
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function fmtValue(v) {
  if (v === undefined || v === null) return "";
  if (typeof v === "string") return v; // "NaN", "Infinity"
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(4)
    : String(Number(v.toPrecision(5)));
}

export function statusBadge(status) {
  return h("span", { class: `status status-${String(status).toLowerCase()}`,
                     dataset: { status } }, status);
}

export function tagChips(tags) {
  return (tags || []).map((t) => h("span", { class: "tag", dataset: { tag: t } }, t));
}

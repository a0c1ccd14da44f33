// Data side of the charts: metric queries, series normalisation, writer aggregation,
// smoothing, and the toolbar state (URL query wins over localStorage).
// No DOM and no Plotly here, so every piece is easy to reason about on its own.

import { get, getAllRuns, num } from "./api.js";

/** Fixed colours (docs/dashboard.md, "Charts"). A run's inherited points are drawn in
 * the run's own colour, as one line with its own points; the steps it inherits are
 * shaded with INHERITED_REGION behind the line. */
export const PALETTE = [
  "#1f77b4", // blue: a run's own line (and the first run or experiment of a comparison)
  "#ff7f0e", // orange
  "#2ca02c", // green
  "#d62728", // red
  "#9467bd", // purple
  "#8c564b", // brown
  "#e377c2", // pink
  "#17becf", // cyan
  "#bcbd22", // olive
];
export const FORK_COLOR = "#999999"; // dashed vertical fork lines: a grey no series uses
export const INHERITED_REGION = "rgba(120, 120, 120, 0.07)";

/** Points past this are not asked for raw (wall-time axes use per-bucket times). */
export const DEFAULT_BUCKETS = 1000;

// -- API -------------------------------------------------------------------------------

export const api = {
  run: (ref, project) => get(`/runs/${encodeURIComponent(ref)}`, { project }),
  lineage: (id) => get(`/runs/${id}/lineage`),
  keys: (id, lineage) => get(`/runs/${id}/keys`, { lineage: lineage ? "true" : "false" }),
  runs: (project) => getAllRuns(project),
  /** One key of one run: {key, lineage, buckets, step_min, step_max}. */
  metrics: (id, q) => get(`/runs/${id}/metrics`, {
    keys: q.key,
    lineage: q.lineage ? "true" : "false",
    buckets: q.buckets,
    step_min: q.step_min,
    step_max: q.step_max,
    writer: q.writer,
  }),
};

/** User text (run names, metric keys) as Plotly shows it literally. Plotly reads a
 * subset of HTML in names, titles and tooltips (<br>, <b>, <a href>) and fills `%{...}`
 * in a hovertemplate: `<`, `>` and `&` become entities (Plotly decodes them in text, after
 * it has found its tags), and `%` becomes `&#37;`, so no `%{` is left to fill. */
export function plotlyText(text) {
  return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/%/g, "&#37;");
}

/** Our series shape, the same for raw and bucketed answers: per point or bucket its
 * first step, last step, owner, wall time (of the bucket's first point), mean, min,
 * max and count. Non-finite values become NaN (drawn as gaps). */
export function normalise(series) {
  const bucketed = series.counts && series.counts.length > 0;
  const n = series.steps.length;
  const mean = bucketed ? series.means.map(num) : series.values.map(num);
  return {
    writer: series.writer,
    steps: series.steps.slice(),
    last: bucketed ? series.last_steps.slice() : series.steps.slice(),
    owners: series.owners.slice(),
    times: (series.times && series.times.length === n) ? series.times.slice() : [],
    mean,
    min: bucketed ? series.mins.map(num) : mean.slice(),
    max: bucketed ? series.maxs.map(num) : mean.slice(),
    count: bucketed ? series.counts.slice() : new Array(n).fill(1),
  };
}

/** Append series `b` (later steps) to `a`, writer by writer. */
export function appendSeries(a, b) {
  for (const field of ["steps", "last", "owners", "times", "mean", "min", "max", "count"]) {
    a[field] = a[field].concat(b[field]);
  }
}

export function lastStep(seriesList) {
  let last = -Infinity;
  for (const s of seriesList) if (s.last.length) last = Math.max(last, s.last[s.last.length - 1]);
  return last;
}

/** The lowest of the writers' last steps: where a live poll starts, so that a rank which
 * lags behind the others still gets its new points (-Infinity: nothing held). */
export function lowestLastStep(seriesList) {
  let low = Infinity;
  for (const s of seriesList) if (s.last.length) low = Math.min(low, s.last[s.last.length - 1]);
  return isFinite(low) ? low : -Infinity;
}

/** The part of `fresh` (a later answer for the writer of `held`) after the last step
 * `held` has, to append; null when one of its buckets straddles that step (appending it
 * would count points twice, dropping it would lose some: ask again for this writer). */
export function newerPart(held, fresh) {
  const after = held.last.length ? held.last[held.last.length - 1] : -Infinity;
  let k = 0;
  while (k < fresh.steps.length && fresh.steps[k] <= after) k++;
  if (k > 0 && fresh.last[k - 1] > after) return null;
  const part = { ...fresh };
  for (const field of ["steps", "last", "owners", "times", "mean", "min", "max", "count"]) {
    part[field] = fresh[field].slice(k);
  }
  return part;
}

/** The mean of several writers with a min/max band across them: every writer's buckets
 * are re-binned into `bins` equal step bins over their joint range; a bin's min and max
 * are the extremes of every writer's bucket min/max in it (so a spike of one rank is
 * kept) and its mean is the count-weighted mean of the bucket means. */
export function meanAcrossWriters(seriesList, bins) {
  if (seriesList.length <= 1) return seriesList.slice();
  let lo = Infinity, hi = -Infinity;
  for (const s of seriesList) {
    if (!s.steps.length) continue;
    lo = Math.min(lo, s.steps[0]);
    hi = Math.max(hi, s.last[s.last.length - 1]);
  }
  if (!isFinite(lo)) return [];
  const width = hi - lo + 1;
  const acc = new Map();
  for (const s of seriesList) {
    for (let i = 0; i < s.steps.length; i++) {
      const b = Math.min(bins - 1, Math.floor(((s.steps[i] - lo) * bins) / width));
      let cell = acc.get(b);
      if (!cell) {
        cell = { step: s.steps[i], last: s.last[i], owner: s.owners[i],
                 time: s.times.length ? s.times[i] : NaN,
                 sum: 0, n: 0, min: Infinity, max: -Infinity, count: 0 };
        acc.set(b, cell);
      }
      cell.step = Math.min(cell.step, s.steps[i]);
      cell.last = Math.max(cell.last, s.last[i]);
      if (!isNaN(s.mean[i])) { cell.sum += s.mean[i] * s.count[i]; cell.n += s.count[i]; }
      if (!isNaN(s.min[i])) cell.min = Math.min(cell.min, s.min[i]);
      if (!isNaN(s.max[i])) cell.max = Math.max(cell.max, s.max[i]);
      cell.count += s.count[i];
    }
  }
  const cells = [...acc.entries()].sort((x, y) => x[0] - y[0]).map((e) => e[1]);
  const times = cells.map((c) => c.time);
  return [{
    writer: null,
    writers: seriesList.length,
    steps: cells.map((c) => c.step),
    last: cells.map((c) => c.last),
    owners: cells.map((c) => c.owner),
    times: times.some((t) => isNaN(t)) ? [] : times,
    mean: cells.map((c) => (c.n ? c.sum / c.n : NaN)),
    min: cells.map((c) => (isFinite(c.min) ? c.min : NaN)),
    max: cells.map((c) => (isFinite(c.max) ? c.max : NaN)),
    count: cells.map((c) => c.count),
  }];
}

/** Debiased exponential moving average (as TensorBoard's smoothing slider); NaN kept. */
export function ema(values, weight) {
  if (!(weight > 0)) return values.slice();
  const out = new Array(values.length);
  let last = 0, debias = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (!isFinite(v)) { out[i] = NaN; continue; }
    last = last * weight + (1 - weight) * v;
    debias = debias * weight + (1 - weight);
    out[i] = last / debias;
  }
  return out;
}

/** x of each point or bucket: its step (a bucket's middle step), wall time or time since
 * `t0`. Buckets carry the wall time of their first point. */
export function xValues(s, mode, t0) {
  if (mode === "time") return s.times.map((t) => new Date(t * 1000));
  if (mode === "relative") return s.times.map((t) => t - t0);
  return s.steps.map((first, i) => (first === s.last[i] ? first : (first + s.last[i]) / 2));
}

// -- toolbar state ---------------------------------------------------------------------

/** name -> [URL parameter, default, parse]. */
export const STATE_FIELDS = {
  inherited: ["inherited", true, (v) => v !== "0" && v !== "false"],
  smooth: ["smooth", 0, (v) => Math.min(0.99, Math.max(0, Number(v) || 0))],
  x: ["x", "step", (v) => (["step", "time", "relative"].includes(v) ? v : "step")],
  logy: ["logy", false, (v) => v === "1" || v === "true"],
  agg: ["agg", "none", (v) => (v === "mean" ? "mean" : "none")],
};
const STORAGE_PREFIX = "pluto.charts.";

function encode(value) {
  return typeof value === "boolean" ? (value ? "1" : "0") : String(value);
}

/** The toolbar state: the URL query wins, then localStorage, then the default. */
export function readState() {
  const query = new URLSearchParams(location.search);
  const state = {};
  for (const [name, [param, fallback, parse]] of Object.entries(STATE_FIELDS)) {
    let raw = query.get(param);
    if (raw === null) {
      try { raw = localStorage.getItem(STORAGE_PREFIX + param); } catch { raw = null; }
    }
    state[name] = raw === null ? fallback : parse(raw);
  }
  return state;
}

/** Remember one setting in localStorage and put it in the URL (replaceState: a setting
 * is not a page of its own for the back button). */
export function saveState(name, value) {
  const [param] = STATE_FIELDS[name];
  try { localStorage.setItem(STORAGE_PREFIX + param, encode(value)); } catch { /* private mode */ }
  const url = new URL(location.href);
  url.searchParams.set(param, encode(value));
  history.replaceState(history.state, "", url.pathname + url.search + url.hash);
}

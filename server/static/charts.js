// The dashboard's charts: a run's metrics (stitched across its forks), its system
// metrics, a comparison of runs, and an experiment (a lineage drawn as one series).
// Exported, and exposed as window.PlutoCharts for the shell (app.js) and for tests.
// Docs: docs/dashboard.md, "Charts".

import { Chart } from "./charts_plot.js";
import {
  FORK_COLOR, INHERITED_REGION, PALETTE, api, readState, saveState,
} from "./charts_data.js";

const SYSTEM_PREFIX = "sys/";
const MAX_PARALLEL_LOADS = 4;

/** Settings a page (or a test) may change: `pollMs` is the live refresh period. */
export const config = { pollMs: Number(window.PLUTO_CHARTS_POLL_MS) || 3000 };

const views = new Set();

/** What every view shares: its root element, toolbar state, charts and live refresh. */
class View {
  constructor(container, kind, controls) {
    this.kind = kind;
    this.state = readState();
    this.charts = [];
    this.timer = null;
    this.destroyed = false;
    this.root = document.createElement("div");
    this.root.className = `pluto-charts pluto-charts-${kind}`;
    this.root.dataset.chartsState = "loading";
    this.toolbar = toolbar(this, controls);
    this.note = document.createElement("p");
    this.note.className = "pluto-charts-note muted";
    this.grid = document.createElement("div");
    this.grid.className = "pluto-chart-grid";
    this.root.append(this.toolbar, this.note, this.grid);
    container.append(this.root);
    views.add(this);
  }

  get alive() { return !this.destroyed && this.root.isConnected; }

  addChart(key, options) {
    const chart = new Chart(this.grid, { key, view: this, ...options });
    this.charts.push(chart);
    return chart;
  }

  /** Load charts a few at a time (the browser queues the rest anyway). */
  async loadAll(charts = this.charts) {
    const queue = charts.slice();
    const worker = async () => {
      while (queue.length && this.alive) {
        const chart = queue.shift();
        await chart.load().catch((err) => console.error(err));
      }
    };
    await Promise.all(Array.from({ length: MAX_PARALLEL_LOADS }, worker));
    if (this.alive) this.root.dataset.chartsState = "ready";
  }

  /** Re-query every `config.pollMs` while `isLive()` says so; `refresh` may add charts. */
  startLive(isLive, refresh) {
    const tick = async () => {
      this.timer = null;
      if (!this.alive) { this.destroy(); return; }
      let live = true;
      try {
        live = await isLive();
        if (refresh) await refresh();
        await Promise.all(this.charts.map((c) => c.poll().catch((err) => console.error(err))));
      } catch (err) {
        console.error(err);
      }
      if (live && this.alive) this.timer = setTimeout(tick, config.pollMs);
    };
    this.timer = setTimeout(tick, config.pollMs);
    this.root.dataset.live = "1";
  }

  /** A toolbar setting changed: remember it, then redraw or re-query what it affects. */
  set(name, value) {
    this.state[name] = value;
    saveState(name, value);
    for (const chart of this.charts) {
      if (name === "inherited" || (name === "x" && chart.range)) {
        if (name === "x") { chart.range = null; chart.yrange = null; }
        chart.load().catch((err) => console.error(err));
      } else if (chart.el.dataset.state === "ready") {
        chart.draw().catch((err) => console.error(err));
      }
    }
  }

  destroy() {
    this.destroyed = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    for (const chart of this.charts) chart.destroy();
    views.delete(this);
  }

  handle() {
    return { root: this.root, charts: this.charts, state: this.state,
             destroy: () => { this.destroy(); this.root.remove(); } };
  }
}

function control(labelText, input, extra) {
  const label = document.createElement("label");
  label.className = "pluto-control";
  label.style.cssText = "display:inline-flex;align-items:center;gap:0.35em;white-space:nowrap";
  if (input.type === "checkbox") label.append(input, ` ${labelText}`);
  else label.append(`${labelText} `, input);
  if (extra) label.append(extra);
  return label;
}

/** The toolbar: `controls` names the settings this view offers. */
function toolbar(view, controls) {
  const bar = document.createElement("div");
  bar.className = "pluto-toolbar";
  bar.style.cssText = "display:flex;flex-wrap:wrap;align-items:center;gap:0.5em 1.5em;" +
    "margin:0.25em 0 0.75em";
  const state = view.state;
  if (controls.includes("inherited")) {
    const box = document.createElement("input");
    box.type = "checkbox";
    box.name = "inherited";
    box.checked = state.inherited;
    box.addEventListener("change", () => view.set("inherited", box.checked));
    bar.append(control("Show inherited datapoints", box));
  }
  const slider = document.createElement("input");
  Object.assign(slider, { type: "range", name: "smooth", min: "0", max: "0.99", step: "0.01" });
  slider.value = String(state.smooth);
  const shown = document.createElement("output");
  shown.textContent = state.smooth.toFixed(2);
  slider.addEventListener("input", () => { shown.textContent = Number(slider.value).toFixed(2); });
  slider.addEventListener("change", () => view.set("smooth", Number(slider.value)));
  bar.append(control("Smoothing", slider, shown));
  const xsel = document.createElement("select");
  xsel.name = "x";
  for (const [value, text] of [["step", "Step"], ["time", "Wall time"],
                               ["relative", "Relative time"]]) {
    xsel.append(new Option(text, value, false, state.x === value));
  }
  xsel.addEventListener("change", () => view.set("x", xsel.value));
  bar.append(control("X axis", xsel));
  const logy = document.createElement("input");
  logy.type = "checkbox";
  logy.name = "logy";
  logy.checked = state.logy;
  logy.addEventListener("change", () => view.set("logy", logy.checked));
  bar.append(control("Log scale y", logy));
  const agg = document.createElement("select");
  agg.name = "agg";
  for (const [value, text] of [["none", "One line per rank"],
                               ["mean", "Mean of ranks, min/max band"]]) {
    agg.append(new Option(text, value, false, state.agg === value));
  }
  agg.addEventListener("change", () => view.set("agg", agg.value));
  bar.append(control("Ranks", agg));
  return bar;
}

/** Fork markers of a lineage (`ancestors`: the run itself first, up to the root);
 * `ownOnly`: only the run's own fork (where its own points start). */
function forkMarkers(ancestors, ownOnly) {
  const marks = [];
  const upto = ownOnly ? Math.min(1, ancestors.length) : ancestors.length;
  for (let i = 0; i < upto; i++) {
    const a = ancestors[i];
    if (a.fork_step === null || a.fork_step === undefined) continue;
    const parent = ancestors[i + 1] ? ancestors[i + 1].display_id : "its parent";
    marks.push({ step: a.fork_step,
                 text: `${a.display_id} forked from ${parent} at step ${a.fork_step}` });
  }
  return marks;
}

const labelsOf = (ancestors) => new Map(ancestors.map((a) => [a.id, a.display_id]));
const isRunning = (run) => run && run.status === "RUNNING";

async function runRef(run, project) {
  return typeof run === "object" && run !== null ? run : api.run(run, project);
}

// -- views -----------------------------------------------------------------------------

/** One chart per metric key of the run's lineage (no `sys/` keys), stitched by default. */
export function renderRun(container, { project, run }) {
  const view = new View(container, "run", ["inherited", "smooth", "x", "logy", "agg"]);
  const start = async () => {
    let info = await runRef(run, project);
    const [lineage, keys] = await Promise.all([api.lineage(info.id), api.keys(info.id, true)]);
    const ancestors = lineage.ancestors;
    const labels = labelsOf(ancestors);
    const sources = (state) => [{
      id: info.id, label: info.display_id, color: PALETTE[0], labels,
      lineage: state.inherited, forks: forkMarkers(ancestors, !state.inherited),
      inheritedUntil: state.inherited ? info.fork_step : null,
    }];
    const known = new Set();
    const addKeys = (names) => {
      const added = [];
      for (const key of names) {
        if (key.startsWith(SYSTEM_PREFIX) || known.has(key)) continue;
        known.add(key);
        added.push(view.addChart(key, { sources }));
      }
      return added;
    };
    addKeys(keys.keys);
    view.note.textContent = known.size ? "" : "No metrics logged yet.";
    await view.loadAll();
    if (isRunning(info)) {
      view.startLive(async () => {
        info = await api.run(info.id);
        return isRunning(info);
      }, async () => {
        const fresh = addKeys((await api.keys(info.id, true)).keys);
        if (fresh.length) { view.note.textContent = ""; await view.loadAll(fresh); }
      });
    }
  };
  view.ready = start().catch((err) => fail(view, err));
  return view.handle();
}

/** The run's `sys/` keys: one chart per key, one line per node (writer = node rank). */
export function renderSystem(container, { project, run, keys }) {
  const view = new View(container, "system", ["smooth", "x", "logy", "agg"]);
  const start = async () => {
    let info = await runRef(run, project);
    const names = (keys || (await api.keys(info.id, false)).keys)
      .filter((k) => k.startsWith(SYSTEM_PREFIX));
    const sources = () => [{ id: info.id, label: info.display_id, color: PALETTE[0],
                             lineage: false, forks: [] }];
    for (const key of names) view.addChart(key, { sources, writerLabel: (w) => `node ${w}` });
    view.note.textContent = names.length ? "" : "No system metrics.";
    await view.loadAll();
    if (isRunning(info)) {
      view.startLive(async () => { info = await api.run(info.id); return isRunning(info); });
    }
  };
  view.ready = start().catch((err) => fail(view, err));
  return view.handle();
}

/** Several runs on one chart per metric: each its own colour, its own points only,
 * its own fork marker. `runs`: RunInfo objects or references (id, display id). */
export function renderCompare(container, { project, runs }) {
  const view = new View(container, "compare", ["smooth", "x", "logy", "agg"]);
  const start = async () => {
    let infos = await Promise.all(runs.map((r) => runRef(r, project)));
    const keySets = await Promise.all(infos.map((r) => api.keys(r.id, false)));
    const keys = [...new Set(keySets.flatMap((k) => k.keys))]
      .filter((k) => !k.startsWith(SYSTEM_PREFIX)).sort();
    const sources = () => infos.map((r, i) => ({
      id: r.id, label: r.name && r.name !== r.display_id ? `${r.display_id} ${r.name}` : r.display_id,
      color: PALETTE[i % PALETTE.length], lineage: false,
      labels: new Map([[r.id, r.display_id]]),
      forks: r.fork_step === null || r.fork_step === undefined ? [] : [{
        step: r.fork_step,
        text: `${r.display_id} forked from ${r.forked_from_display_id || r.forked_from} ` +
              `at step ${r.fork_step}`,
      }],
    }));
    for (const key of keys) view.addChart(key, { sources });
    view.note.textContent = keys.length ? "" : "These runs have no metrics.";
    await view.loadAll();
    if (infos.some(isRunning)) {
      view.startLive(async () => {
        infos = await Promise.all(infos.map((r) => api.run(r.id)));
        return infos.some(isRunning);
      });
    }
  };
  view.ready = start().catch((err) => fail(view, err));
  return view.handle();
}

/** The runs of a project named `name`, grouped by lineage: each lineage is one
 * experiment, one colour, one stitched series per leaf run (its lineage up to the root,
 * so the forks read as one continuous line), with every fork marked. */
export function renderExperiment(container, { project, name }) {
  const view = new View(container, "experiment", ["smooth", "x", "logy", "agg"]);
  const start = async () => {
    const all = (await api.runs(project)).runs.filter((r) => r.name === name);
    const byId = new Map(all.map((r) => [r.id, r]));
    const root = (r) => {
      while (r.forked_from !== null && r.forked_from !== undefined && byId.has(r.forked_from)) {
        r = byId.get(r.forked_from);
      }
      return r;
    };
    const parents = new Set(all.map((r) => r.forked_from));
    const groups = new Map(); // root id -> leaf runs
    for (const r of all.slice().sort((a, b) => a.id - b.id)) {
      if (parents.has(r.id)) continue; // not a leaf
      const top = root(r);
      if (!groups.has(top.id)) groups.set(top.id, { root: top, leaves: [] });
      groups.get(top.id).leaves.push(r);
    }
    const ordered = [...groups.values()].sort((a, b) => a.root.id - b.root.id);
    const leaves = ordered.flatMap((g) => g.leaves);
    const lineages = await Promise.all(leaves.map((r) => api.lineage(r.id)));
    const ancestorsOf = new Map(leaves.map((r, i) => [r.id, lineages[i].ancestors]));
    const keySets = await Promise.all(leaves.map((r) => api.keys(r.id, true)));
    const keys = [...new Set(keySets.flatMap((k) => k.keys))]
      .filter((k) => !k.startsWith(SYSTEM_PREFIX)).sort();
    const sources = () => ordered.flatMap((g, gi) => {
      const seen = new Set();
      return g.leaves.map((leaf, li) => {
        const ancestors = ancestorsOf.get(leaf.id);
        const forks = forkMarkers(ancestors, false).filter((f) => {
          const dup = seen.has(f.text);
          seen.add(f.text);
          return !dup;
        });
        return {
          id: leaf.id, label: `${name} (${g.root.display_id})`, legend: li === 0,
          color: PALETTE[gi % PALETTE.length], lineage: true, labels: labelsOf(ancestors),
          forks,
        };
      });
    });
    for (const key of keys) view.addChart(key, { sources });
    view.note.textContent = all.length ? "" : `No runs named ${name}.`;
    await view.loadAll();
    if (all.some(isRunning)) {
      view.startLive(async () => {
        const fresh = await Promise.all(leaves.map((r) => api.run(r.id)));
        return fresh.some(isRunning);
      });
    }
  };
  view.ready = start().catch((err) => fail(view, err));
  return view.handle();
}

function fail(view, err) {
  console.error(err);
  view.root.dataset.chartsState = "error";
  view.note.textContent = `Charts could not be loaded: ${err.message}`;
}

/** Every live view (tests and the shell can reach the charts through it). */
export function activeViews() {
  return [...views].filter((v) => v.alive);
}

export const colors = { palette: PALETTE, fork: FORK_COLOR, inheritedRegion: INHERITED_REGION };

window.PlutoCharts = {
  renderRun, renderSystem, renderCompare, renderExperiment, activeViews, colors, config,
};

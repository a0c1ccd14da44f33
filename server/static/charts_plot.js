// One metric chart: queries (downsampled to its pixel width), zoom re-queries, live
// extension, and the Plotly figure (lines, min/max bands, fork markers).

import {
  DEFAULT_BUCKETS, FORK_COLOR, INHERITED_REGION, PALETTE, api, appendSeries, ema,
  lowestLastStep, meanAcrossWriters, newerPart, normalise, plotlyText, xValues,
} from "./charts_data.js";

const FORK_HOVER_POINTS = 24; // invisible points along a fork line that carry its tooltip

function plotly() {
  if (!window.Plotly) throw new Error("Plotly is not loaded (/static/vendor/plotly.min.js)");
  return window.Plotly;
}

function rgba(hex, alpha) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${(n >> 16) & 255}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
}

/**
 * A chart of one metric key drawn from one or more sources. A source is
 * `{id, label, color, lineage, forks: [{step, text}], inheritedUntil, labels: Map}`:
 * a run queried with or without its stitched lineage. `sources()` is called on every
 * (re)load, so the toolbar state can change what is asked for.
 */
export class Chart {
  constructor(host, { key, sources, view, writerLabel }) {
    this.key = key;
    this.sourcesOf = sources;
    this.view = view; // the owning view: its state (toolbar) and kind
    this.writerLabel = writerLabel || ((w) => `rank ${w}`);
    this.el = document.createElement("div");
    this.el.className = "pluto-chart";
    this.el.dataset.key = key;
    this.el.dataset.state = "loading";
    this.el.dataset.draws = "0";
    host.append(this.el);
    this.range = null; // zoomed step range [min, max], or null: everything
    this.yrange = null;
    this.data = []; // [{source, series: [normalised]}]
    this.t0 = new Map(); // source id -> first wall time (relative time axis)
    this.seq = 0; // only the newest answer is drawn
    this.listening = false;
  }

  get state() { return this.view.state; }

  /** Buckets to ask for: about the chart's width in pixels. */
  get buckets() {
    const width = Math.round(this.el.clientWidth || 0);
    return width > 0 ? Math.max(200, Math.min(4000, width)) : DEFAULT_BUCKETS;
  }

  /** (Re)query everything in view: the zoomed step range, or all of it. */
  async load() {
    const seq = ++this.seq;
    const sources = this.sourcesOf(this.state);
    this.el.dataset.state = "loading";
    try {
      const answers = await Promise.all(sources.map((source) => api.metrics(source.id, {
        key: this.key, lineage: source.lineage, buckets: this.buckets,
        step_min: this.range ? this.range[0] : undefined,
        step_max: this.range ? this.range[1] : undefined,
      })));
      if (seq !== this.seq) return; // a newer query (another zoom) is on its way
      this.data = sources.map((source, i) => ({
        source,
        series: answers[i].series.filter((s) => s.key === this.key).map(normalise),
      }));
      if (!this.range) {
        for (const { source, series } of this.data) {
          const times = series.flatMap((s) => (s.times.length ? [s.times[0]] : []));
          if (times.length) this.t0.set(source.id, Math.min(...times));
        }
      }
      await this.draw();
    } catch (err) {
      if (seq !== this.seq) return;
      this.el.dataset.state = "error";
      this.el.textContent = `${this.key}: ${err.message}`;
      throw err;
    }
  }

  /** Live: ask for the steps after the last one seen, and extend the lines. The ranks
   * may be at different steps: the query starts after the lowest of their last steps (a
   * lagging rank's new points are below the others' last step), and each rank keeps only
   * the points after its own last one. A rank whose answer straddles its last step in one
   * bucket, or a rank seen for the first time, is asked for again on its own. */
  async poll() {
    if (this.range || this.el.dataset.state !== "ready") return; // zoomed: leave the view be
    const seq = this.seq;
    const ask = (source, extra) => api.metrics(source.id, {
      key: this.key, lineage: source.lineage, buckets: this.buckets, ...extra });
    const after = (s) => (s && s.last.length ? s.last[s.last.length - 1] : -Infinity);
    const answers = await Promise.all(this.data.map(({ source, series }) => {
      const low = lowestLastStep(series);
      return ask(source, { step_min: isFinite(low) ? low + 1 : undefined });
    }));
    if (seq !== this.seq) return;
    let grew = false;
    const again = []; // [data index, writer]: asked for on their own
    const take = (i, fresh, retry) => {
      const held = this.data[i];
      const same = held.series.find((s) => s.writer === fresh.writer);
      if (!same && !retry) { again.push([i, fresh.writer]); return; } // all of a new rank
      const part = same ? newerPart(same, fresh) : fresh;
      if (part === null) { if (!retry) again.push([i, fresh.writer]); return; }
      if (!part.steps.length) return;
      grew = true;
      if (same) appendSeries(same, part);
      else held.series.push(part);
      if (!this.t0.has(held.source.id) && part.times.length) {
        this.t0.set(held.source.id, part.times[0]);
      }
    };
    answers.forEach((answer, i) => {
      for (const raw of answer.series.filter((s) => s.key === this.key)) {
        const fresh = normalise(raw);
        if (fresh.steps.length) take(i, fresh, false);
      }
    });
    if (again.length) {
      const more = await Promise.all(again.map(([i, writer]) => {
        const last = after(this.data[i].series.find((s) => s.writer === writer));
        return ask(this.data[i].source, { writer, step_min: isFinite(last) ? last + 1 : undefined });
      }));
      if (seq !== this.seq) return;
      more.forEach((answer, j) => {
        const [i, writer] = again[j];
        for (const raw of answer.series.filter((s) => s.key === this.key && s.writer === writer)) {
          const fresh = normalise(raw);
          if (fresh.steps.length) take(i, fresh, true);
        }
      });
    }
    if (!grew) return;
    let total = 0;
    for (const { series } of this.data) for (const s of series) total = Math.max(total, s.steps.length);
    // Appended buckets are finer than the first ones: re-bucket once they pile up.
    if (total > 2 * this.buckets) await this.load();
    else await this.draw();
  }

  /** Everything a figure needs, from the data held and the toolbar state. */
  figure() {
    const state = this.state;
    const multiSource = this.data.length > 1;
    const traces = [];
    const shapes = [];
    const annotations = [];
    const forkHover = [];
    let ylo = Infinity, yhi = -Infinity;
    let legendEntries = 0;
    for (const { source, series } of this.data) {
      const list = state.agg === "mean" ? meanAcrossWriters(series, this.buckets) : series;
      const perWriter = series.length > 1 && state.agg !== "mean";
      const t0 = this.t0.get(source.id) ?? 0;
      list.forEach((s, wi) => {
        if (state.x !== "step" && !s.times.length) return;
        const color = perWriter && !multiSource ? PALETTE[wi % PALETTE.length] : source.color;
        const xs = xValues(s, state.x, t0);
        const label = source.labels || new Map();
        const ownerText = s.owners.map((o) => plotlyText(label.get(o) || String(o)));
        let name = source.label;
        if (perWriter) name = multiSource ? `${source.label} ${this.writerLabel(s.writer)}`
          : this.writerLabel(s.writer);
        else if (s.writers > 1) name = `${source.label} mean of ${s.writers}`;
        name = plotlyText(name); // run names are user text: shown as written
        const meta = { role: "series", run: source.id, writer: s.writer, key: this.key,
                       lineage: Boolean(source.lineage), color };
        const wide = s.count.some((c) => c > 1) || s.writers > 1;
        if (wide) {
          const idx = [];
          s.min.forEach((v, i) => { if (isFinite(v) && isFinite(s.max[i])) idx.push(i); });
          const back = idx.slice().reverse();
          traces.push({
            type: "scatter", mode: "lines", x: idx.map((i) => xs[i]).concat(back.map((i) => xs[i])),
            y: idx.map((i) => s.max[i]).concat(back.map((i) => s.min[i])),
            fill: "toself", fillcolor: rgba(color, 0.18), line: { width: 0, color },
            hoverinfo: "skip", showlegend: false, legendgroup: name,
            meta: { ...meta, role: "band" },
          });
        }
        const smoothed = ema(s.mean, state.smooth);
        if (state.smooth > 0) {
          traces.push({
            type: "scatter", mode: "lines", x: xs, y: s.mean.map((v) => (isFinite(v) ? v : null)),
            line: { color, width: 1 }, opacity: 0.3, hoverinfo: "skip", showlegend: false,
            legendgroup: name, meta: { ...meta, role: "raw" },
          });
        }
        const showInLegend = source.legend !== false || wi > 0;
        if (showInLegend) legendEntries += 1;
        traces.push({
          type: "scatter", mode: s.steps.length < 60 ? "lines+markers" : "lines",
          name, x: xs, y: smoothed.map((v) => (isFinite(v) ? v : null)),
          line: { color, width: 2 }, marker: { color, size: 4 },
          // per point: [first step, owner run id, last step] (hover, and tests read it)
          customdata: s.steps.map((st, i) => [st, s.owners[i], s.last[i]]), text: ownerText,
          hovertemplate: `step %{customdata[0]}<br>%{y}<br>%{text}<extra>${name}</extra>`,
          // The whole name: Plotly would cut it at 15 characters of its escaped text.
          hoverlabel: { namelength: -1 },
          showlegend: showInLegend, legendgroup: name, meta,
        });
        for (let i = 0; i < s.min.length; i++) {
          if (isFinite(s.min[i])) ylo = Math.min(ylo, s.min[i]);
          if (isFinite(s.max[i])) yhi = Math.max(yhi, s.max[i]);
        }
      });
      const forkX = (step) => {
        if (state.x === "step") return step;
        const s = series.find((x) => x.times.length);
        if (!s) return null;
        const i = s.steps.findIndex((st) => st > step); // the first point after the fork
        if (i < 0) return null;
        return xValues({ ...s, steps: [s.steps[i]], last: [s.last[i]], times: [s.times[i]] },
                       state.x, t0)[0];
      };
      if (source.inheritedUntil !== null && source.inheritedUntil !== undefined && series.length) {
        const x1 = forkX(source.inheritedUntil);
        const x0 = xValues(series[0], state.x, t0)[0];
        if (x1 !== null && x0 !== undefined) {
          shapes.push({ type: "rect", xref: "x", yref: "paper", x0, x1, y0: 0, y1: 1,
                        fillcolor: INHERITED_REGION, line: { width: 0 }, layer: "below" });
        }
      }
      for (const fork of source.forks || []) {
        const x = forkX(fork.step);
        if (x === null) continue;
        shapes.push({ type: "line", xref: "x", yref: "paper", x0: x, x1: x, y0: 0, y1: 1,
                      line: { color: FORK_COLOR, width: 2, dash: "dash" }, layer: "above" });
        annotations.push({ x, y: 1, xref: "x", yref: "paper", yanchor: "bottom",
                           text: "fork", showarrow: false, hovertext: plotlyText(fork.text),
                           font: { color: FORK_COLOR, size: 10 } });
        forkHover.push({ x, fork });
      }
    }
    if (!isFinite(ylo)) { ylo = 0; yhi = 1; }
    for (const { x, fork } of forkHover) {
      const ys = [];
      for (let i = 0; i < FORK_HOVER_POINTS; i++) {
        const f = i / (FORK_HOVER_POINTS - 1);
        ys.push(this.state.logy && ylo > 0 ? ylo * (yhi / ylo) ** f : ylo + (yhi - ylo) * f);
      }
      traces.push({
        type: "scatter", mode: "markers", x: ys.map(() => x), y: ys,
        marker: { size: 12, color: FORK_COLOR, opacity: 0 }, showlegend: false,
        hovertemplate: `${plotlyText(fork.text)}<extra></extra>`, hoverlabel: { bgcolor: "#ffffff" },
        meta: { role: "fork", step: fork.step, text: fork.text },
      });
    }
    const xaxis = {
      type: state.x === "time" ? "date" : "linear",
      title: { text: { step: "step", time: "wall time", relative: "time (s)" }[state.x] },
      gridcolor: "#eeeeee", zeroline: false, showline: true, linecolor: "#cccccc",
    };
    if (this.range && state.x === "step") Object.assign(xaxis, { range: this.range, autorange: false });
    else xaxis.autorange = true;
    const yaxis = { type: state.logy ? "log" : "linear", gridcolor: "#eeeeee", zeroline: false,
                    showline: true, linecolor: "#cccccc", autorange: true };
    if (this.yrange && this.range) Object.assign(yaxis, { range: this.yrange, autorange: false });
    const layout = {
      title: { text: plotlyText(this.key), font: { size: 13 }, x: 0.01, xanchor: "left" },
      height: 300, margin: { l: 60, r: 20, t: 36, b: legendEntries > 1 ? 70 : 44 },
      paper_bgcolor: "#ffffff", plot_bgcolor: "#ffffff",
      showlegend: legendEntries > 1, legend: { orientation: "h", y: -0.3 },
      hovermode: "closest", xaxis, yaxis, shapes, annotations,
    };
    return { traces, layout };
  }

  async draw() {
    const { traces, layout } = this.figure();
    await plotly().react(this.el, traces, layout,
                         { displaylogo: false, responsive: true, doubleClick: "reset" });
    if (!this.listening) {
      this.listening = true;
      this.el.on("plotly_relayout", (ev) => this.onRelayout(ev));
    }
    this.el.dataset.state = "ready";
    this.el.dataset.draws = String(Number(this.el.dataset.draws) + 1);
    this.el.dispatchEvent(new CustomEvent("pluto-chart-drawn", { bubbles: true }));
  }

  /** Zoom (drag or API) re-queries the zoomed steps at full resolution; a double-click
   * (autorange) goes back to everything. Only the step axis re-queries: wall-time axes
   * zoom into the points already drawn. */
  onRelayout(ev) {
    if (this.state.x !== "step") return;
    if (ev["xaxis.autorange"] === true || ev["xaxis.autorange"] === "reversed") {
      if (this.range) { this.range = null; this.yrange = null; this.load().catch(console.error); }
      return;
    }
    const r = ev["xaxis.range"] || [ev["xaxis.range[0]"], ev["xaxis.range[1]"]];
    if (r[0] === undefined || r[1] === undefined) return;
    const lo = Math.max(0, Math.floor(Math.min(r[0], r[1])));
    const hi = Math.ceil(Math.max(r[0], r[1]));
    const y = ev["yaxis.range"] || [ev["yaxis.range[0]"], ev["yaxis.range[1]"]];
    this.yrange = y[0] !== undefined && y[1] !== undefined ? [y[0], y[1]] : null;
    this.range = [lo, hi];
    this.load().catch(console.error);
  }

  destroy() {
    this.seq += 1;
    try { plotly().purge(this.el); } catch { /* already gone */ }
    this.el.remove();
  }
}

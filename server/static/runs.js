// "/projects/{project}": the runs table. Filters, sort and the chosen metrics live in
// the URL query (?q=&status=&tag=&sort=&dir=&metric=loss&metric=acc), so a view can be
// shared and survives a reload.

import { get, getAllRuns } from "./api.js";
import {
  enc, experimentPath, fmtDuration, fmtTime, fmtValue, h, link, projectPath, runDuration,
  runPath, statusBadge, tagChips,
} from "./dom.js";

const STATUSES = ["RUNNING", "COMPLETED", "FAILED", "TERMINATED"];

const COLUMNS = [
  { key: "id", title: "Run", value: (r) => r.id },
  { key: "name", title: "Name", value: (r) => r.name.toLowerCase() },
  { key: "status", title: "Status", value: (r) => r.status },
  { key: "tags", title: "Tags", value: (r) => r.tags.join(",") },
  { key: "created", title: "Created", value: (r) => r.created_at },
  { key: "duration", title: "Duration", value: (r) => runDuration(r) },
  { key: "parent", title: "Forked from", value: (r) => r.forked_from ?? -1 },
  { key: "fork_step", title: "Fork step", value: (r) => r.fork_step ?? -1 },
  { key: "last_step", title: "Last step", value: (r) => r.last_step ?? -1 },
];

function metricColumn(name) {
  return {
    key: `metric:${name}`, title: name, metric: name,
    value: (r) => {
      const v = (r.last_values || {})[name];
      return typeof v === "number" ? v : null;
    },
  };
}

/** The view's state, read from the URL query. */
export function readState(query) {
  return {
    q: query.get("q") || "",
    status: query.get("status") || "",
    tag: query.get("tag") || "",
    sort: query.get("sort") || "created",
    dir: query.get("dir") === "asc" ? "asc" : "desc",
    metrics: query.getAll("metric").flatMap((m) => m.split(",")).map((m) => m.trim())
      .filter(Boolean),
  };
}

function writeState(state) {
  const query = new URLSearchParams();
  if (state.q) query.set("q", state.q);
  if (state.status) query.set("status", state.status);
  if (state.tag) query.set("tag", state.tag);
  if (state.sort !== "created") query.set("sort", state.sort);
  if (state.dir !== "desc") query.set("dir", state.dir);
  for (const m of state.metrics) query.append("metric", m);
  return query;
}

export function filterRuns(runs, state) {
  const needle = state.q.toLowerCase();
  return runs.filter((r) =>
    (!state.status || r.status === state.status) &&
    (!state.tag || r.tags.includes(state.tag)) &&
    (!needle || r.name.toLowerCase().includes(needle) ||
      r.display_id.toLowerCase().includes(needle) ||
      (r.run_id || "").toLowerCase().includes(needle)));
}

export function sortRuns(runs, columns, state) {
  const column = columns.find((c) => c.key === state.sort) || columns[4];
  const sign = state.dir === "asc" ? 1 : -1;
  return [...runs].sort((a, b) => {
    const x = column.value(a);
    const y = column.value(b);
    if (x === y) return b.id - a.id;
    if (x === null) return 1; // missing values last, whatever the direction
    if (y === null) return -1;
    return (x < y ? -1 : 1) * sign;
  });
}

export async function runsView(page, [project], ctx) {
  const state = readState(ctx.query);
  ctx.crumbs([{ text: "Projects", href: "/" }, { text: project }]);
  document.title = `${project} · Pluto`;
  const { runs } = await getAllRuns(project, { metrics: state.metrics });
  const byId = new Map(runs.map((r) => [r.id, r]));
  const tags = [...new Set(runs.flatMap((r) => r.tags))].sort();

  const selected = new Set();
  const nameInput = h("input", { id: "filter-name", type: "search", value: state.q,
                                 placeholder: "name or id contains…" });
  const statusSelect = h("select", { id: "filter-status" },
    h("option", { value: "" }, "any status"),
    STATUSES.map((s) => h("option", { value: s, selected: s === state.status }, s)));
  const tagSelect = h("select", { id: "filter-tag" },
    h("option", { value: "" }, "any tag"),
    [...new Set([...tags, state.tag].filter(Boolean))]
      .map((t) => h("option", { value: t, selected: t === state.tag }, t)));
  const metricInput = h("input", { id: "metric-input", type: "text", list: "metric-keys",
                                   value: state.metrics.join(", "),
                                   placeholder: "metrics to show, e.g. loss, acc" });
  const metricKeys = h("datalist", { id: "metric-keys" });
  const compareLink = h("a", { id: "compare-button", class: "button disabled",
                               "data-link": true, href: "#", "aria-disabled": "true" },
                        "Compare");
  const count = h("span", { id: "runs-count", class: "muted" });
  const table = h("table", { id: "runs-table", class: "grid runs" });

  page.append(
    h("div", { class: "title-row" }, h("h1", {}, project), count),
    h("div", { class: "toolbar", id: "runs-toolbar" },
      h("label", {}, "Filter ", nameInput), statusSelect, tagSelect,
      h("label", { class: "grow" }, "Metrics ", metricInput), metricKeys, compareLink));

  const apply = () => {
    ctx.setQuery(writeState(state));
    draw();
  };
  nameInput.addEventListener("input", () => { state.q = nameInput.value.trim(); apply(); });
  statusSelect.addEventListener("change", () => { state.status = statusSelect.value; apply(); });
  tagSelect.addEventListener("change", () => { state.tag = tagSelect.value; apply(); });
  metricInput.addEventListener("change", () => {
    state.metrics = metricInput.value.split(",").map((m) => m.trim()).filter(Boolean);
    ctx.setQuery(writeState(state));
    window.PlutoApp.render(); // the API fills last_values for the chosen metrics
  });

  function updateCompare() {
    const ids = runs.filter((r) => selected.has(r.id)).map((r) => r.display_id);
    const ok = ids.length >= 1;
    compareLink.classList.toggle("disabled", !ok);
    compareLink.setAttribute("aria-disabled", String(!ok));
    compareLink.href = ok
      ? `/compare?project=${enc(project)}&runs=${ids.map(enc).join(",")}` : "#";
    compareLink.textContent = ids.length ? `Compare (${ids.length})` : "Compare";
  }
  compareLink.addEventListener("click", (event) => {
    if (compareLink.classList.contains("disabled")) {
      event.preventDefault();
      event.stopPropagation();
    }
  }, true);

  function draw() {
    const columns = [...COLUMNS, ...state.metrics.map(metricColumn)];
    const shown = sortRuns(filterRuns(runs, state), columns, state);
    count.textContent = `${shown.length} of ${runs.length} runs`;
    const head = h("tr", {}, h("th", { class: "select" }, ""),
      columns.map((c) => {
        const active = c.key === state.sort;
        const th = h("th", {
          "data-sort": c.key, class: `sortable${c.metric ? " num" : ""}`,
          "aria-sort": active ? (state.dir === "asc" ? "ascending" : "descending") : "none",
          title: "sort by this column",
        }, c.title, active ? (state.dir === "asc" ? " ▲" : " ▼") : "");
        th.addEventListener("click", () => {
          if (state.sort === c.key) state.dir = state.dir === "asc" ? "desc" : "asc";
          else { state.sort = c.key; state.dir = c.key === "created" ? "desc" : "asc"; }
          apply();
        });
        return th;
      }));
    const rows = shown.map((r) => {
      const box = h("input", { type: "checkbox", class: "run-select",
                               dataset: { run: r.display_id }, checked: selected.has(r.id),
                               "aria-label": `select ${r.display_id}` });
      box.addEventListener("change", () => {
        if (box.checked) selected.add(r.id); else selected.delete(r.id);
        updateCompare();
      });
      const parent = r.forked_from !== null && r.forked_from !== undefined
        ? (byId.get(r.forked_from)?.display_id || r.forked_from_display_id) : null;
      return h("tr", { dataset: { run: r.display_id, status: r.status } },
        h("td", { class: "select" }, box),
        h("td", { "data-col": "id" }, link(runPath(project, r.display_id), r.display_id,
                                           { class: "run-link" })),
        h("td", { "data-col": "name" }, link(experimentPath(project, r.name), r.name,
                                             { title: "every run of this experiment" })),
        h("td", { "data-col": "status" }, statusBadge(r.status)),
        h("td", { "data-col": "tags" }, tagChips(r.tags)),
        h("td", { "data-col": "created" }, fmtTime(r.created_at)),
        h("td", { "data-col": "duration" }, fmtDuration(runDuration(r))),
        h("td", { "data-col": "parent" },
          parent ? link(runPath(project, parent), parent, { class: "parent-link" }) : ""),
        h("td", { "data-col": "fork_step", class: "num" }, r.fork_step ?? ""),
        h("td", { "data-col": "last_step", class: "num" }, r.last_step ?? ""),
        state.metrics.map((m) => h("td", { "data-col": `metric:${m}`, "data-metric": m,
                                           class: "num" },
          fmtValue((r.last_values || {})[m]))));
    });
    table.replaceChildren(h("thead", {}, head), h("tbody", {}, rows));
    if (!shown.length) {
      table.append(h("tbody", {}, h("tr", { class: "empty" },
        h("td", { colspan: columns.length + 1 }, runs.length
          ? "No run matches these filters." : "No runs in this project yet."))));
    }
  }

  page.append(table);
  draw();
  updateCompare();

  // Offer the metric keys of the newest run in the metric box (best effort).
  if (runs.length) {
    get(`/runs/${runs[0].id}/keys`).then(({ keys }) => {
      metricKeys.replaceChildren(...keys.filter((k) => !k.startsWith("sys/"))
        .map((k) => h("option", { value: k })));
    }).catch(() => {});
  }
}

export { projectPath };

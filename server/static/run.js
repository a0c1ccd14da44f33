// "/projects/{project}/runs/{display_id}": one run. Config, tags, status history,
// lineage, checkpoints, charts (charts.js), console log (logs.js), system metrics.

import { get } from "./api.js";
import {
  enc, experimentPath, fmtBytes, fmtDuration, fmtTime, h, link, projectPath, runDuration,
  runPath, statusBadge, tagChips,
} from "./dom.js";
import { logPanel } from "./logs.js";

function section(id, title, ...content) {
  return h("section", { id, class: "card" }, h("h2", {}, title), ...content);
}

/** Call a PlutoCharts function into `container`, or say clearly that charts are missing. */
export function callCharts(fn, container, options, ctx) {
  const charts = window.PlutoCharts;
  if (!charts || typeof charts[fn] !== "function") {
    container.replaceChildren(h("p", { class: "placeholder charts-missing" },
      `Charts are not available: the charts module (/static/charts.js) did not load ` +
      `or has no PlutoCharts.${fn}.`));
    return;
  }
  try {
    Promise.resolve(charts[fn](container, options)).then((handle) => {
      if (!handle) return;
      const stop = typeof handle === "function" ? handle : handle.destroy?.bind(handle);
      if (stop) ctx.onLeave(stop);
    }).catch((err) => showChartError(container, err));
  } catch (err) {
    showChartError(container, err);
  }
}

function showChartError(container, err) {
  console.error(err);
  container.append(h("p", { class: "error" }, `Charts failed: ${err.message || err}`));
}

export function lineageTree(project, lineage, currentId) {
  // Ancestors come from the run up to the root: show them root first.
  const chain = [...lineage.ancestors].reverse();
  const ancestors = h("ol", { id: "lineage-ancestors", class: "chain" },
    chain.map((a) => h("li", { dataset: { run: a.display_id }, class: a.id === currentId
      ? "current" : "" },
      a.id === currentId ? h("strong", {}, a.display_id) : link(runPath(project, a.display_id),
        a.display_id, { class: "lineage-link" }),
      " ", h("span", { class: "muted" }, a.name),
      a.until_step !== null && a.until_step !== undefined
        ? h("span", { class: "muted" }, ` · steps ≤ ${a.until_step}`) : "",
      a.fork_step !== null && a.fork_step !== undefined
        ? h("span", { class: "muted" }, ` · forked at ${a.fork_step}`) : "")));
  // Descendants: pre-order with depths; nest a <ul> per level.
  const top = h("ul", { id: "lineage-descendants", class: "tree" });
  const stack = [top];
  let last = null;
  for (const node of lineage.descendants) {
    while (stack.length > node.depth + 1) stack.pop();
    if (stack.length < node.depth + 1 && last) {
      const ul = h("ul", {});
      last.append(ul);
      stack.push(ul);
    }
    const isCurrent = node.id === currentId;
    last = h("li", { dataset: { run: node.display_id, depth: node.depth } },
      isCurrent ? h("strong", {}, node.display_id) : link(runPath(project, node.display_id),
        node.display_id, { class: "lineage-link" }),
      " ", h("span", { class: "muted" }, node.name),
      node.fork_step !== null && node.depth > 0
        ? h("span", { class: "muted" }, ` · forked at ${node.fork_step}`) : "");
    stack[stack.length - 1].append(last);
  }
  return h("div", { class: "lineage" },
    h("h3", {}, "Ancestors"), ancestors,
    h("h3", {}, "Descendants"),
    lineage.descendants.length > 1 ? top : h("p", { class: "muted" }, "No forks of this run."));
}

function checkpointsTable(project, checkpoints) {
  if (!checkpoints.length) return h("p", { class: "muted", id: "no-checkpoints" },
    "No checkpoints.");
  return h("table", { id: "checkpoints-table", class: "grid" },
    h("thead", {}, h("tr", {}, h("th", { class: "num" }, "Step"), h("th", { class: "num" },
      "Size"), h("th", {}, "Files"), h("th", {}, "Forked from"), h("th", {}, "Created"))),
    h("tbody", {}, checkpoints.map((c) => h("tr", { dataset: { step: c.step } },
      h("td", { class: "num", "data-col": "step" }, c.step),
      h("td", { class: "num", "data-col": "size" }, fmtBytes(c.size)),
      h("td", { "data-col": "files" }, h("details", {},
        h("summary", {}, `${c.files.length} file${c.files.length === 1 ? "" : "s"}`),
        h("ul", { class: "files" }, c.files.map((f) => h("li", {}, h("code", {}, f.path),
          " ", h("span", { class: "muted" }, fmtBytes(f.size))))))),
      h("td", { "data-col": "source" },
        c.source_display_id
          // A checkpoint may be forked from another project's run (`from_project`).
          ? [link(runPath(c.source_project || project, c.source_display_id),
            c.source_project && c.source_project !== project
              ? `${c.source_project} / ${c.source_display_id}` : c.source_display_id),
            c.source_step !== null ? ` @ ${c.source_step}` : ""]
          : (c.source_uri || "")),
      h("td", { "data-col": "created" }, fmtTime(c.created_at))))));
}

export async function runView(page, [project, displayId], ctx) {
  ctx.crumbs([{ text: "Projects", href: "/" }, { text: project, href: projectPath(project) },
              { text: displayId }]);
  const run = await get(`/runs/${enc(displayId)}`, { project });
  document.title = `${run.display_id} ${run.name} · Pluto`;
  const [lineage, checkpoints, keys] = await Promise.all([
    get(`/runs/${run.id}/lineage`),
    get(`/runs/${run.id}/checkpoints`),
    get(`/runs/${run.id}/keys`),
  ]);

  const parent = run.forked_from_display_id;
  page.dataset.run = run.display_id;
  page.dataset.runId = run.id;
  page.append(h("div", { id: "run-header", class: "title-row" },
    h("h1", {}, h("span", { class: "display-id" }, run.display_id), " ", run.name),
    statusBadge(run.status)));
  page.append(h("dl", { id: "run-facts", class: "facts" },
    h("dt", {}, "External id"), h("dd", {}, run.run_id || "—"),
    h("dt", {}, "Experiment"), h("dd", {}, link(experimentPath(project, run.name), run.name)),
    h("dt", {}, "Created"), h("dd", {}, fmtTime(run.created_at)),
    h("dt", {}, "Duration"), h("dd", {}, fmtDuration(runDuration(run))),
    h("dt", {}, "Steps"), h("dd", {}, run.first_step === null || run.first_step === undefined
      ? "—" : `${run.first_step} … ${run.last_step}`),
    h("dt", {}, "Forked from"), h("dd", { id: "run-parent" }, parent
      ? [link(runPath(project, parent), parent), ` at step ${run.fork_step}`] : "—")));

  const grid = h("div", { class: "two-col" },
    section("run-config", "Config",
      h("pre", { class: "json", id: "config-json" }, JSON.stringify(run.config, null, 2))),
    h("div", {},
      section("run-tags", "Tags", run.tags.length ? h("div", { class: "tags" },
        tagChips(run.tags)) : h("p", { class: "muted" }, "No tags.")),
      section("run-status-history", "Status history",
        h("table", { class: "grid compact", id: "status-history" },
          h("tbody", {}, (run.status_history.length ? run.status_history
            : [{ status: run.status, at: run.updated_at }]).map((s) =>
            h("tr", { dataset: { status: s.status } }, h("td", {}, statusBadge(s.status)),
              h("td", {}, fmtTime(s.at))))))),
      section("run-lineage", "Lineage", lineageTree(project, lineage, run.id))));
  page.append(grid);

  const charts = h("div", { id: "run-charts", class: "charts", dataset: {
    project, run: run.display_id, runId: run.id } });
  page.append(section("run-charts-section", "Metrics", charts));

  page.append(section("run-checkpoints", "Checkpoints",
    checkpointsTable(project, checkpoints.checkpoints)));

  page.append(section("run-logs", "Console", logPanel(run, ctx)));

  const sysKeys = keys.keys.filter((k) => k.startsWith("sys/"));
  const system = h("div", { id: "run-system", class: "charts", dataset: {
    project, run: run.display_id, runId: run.id } });
  page.append(section("run-system-section", "System (per node)", sysKeys.length ? system
    : h("p", { class: "muted", id: "no-system" }, "No system metrics (sys/…) for this run.")));

  // The charts render once the page is in the document (Plotly measures its container).
  ctx.afterMount(() => {
    callCharts("renderRun", charts, { project, run }, ctx);
    if (sysKeys.length) callCharts("renderSystem", system, { project, run, keys: sysKeys }, ctx);
  });
}

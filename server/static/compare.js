// "/compare?project=P&runs=P-1,P-2" and "/projects/{project}/experiments/{name}":
// thin pages around the charts module.

import { get, getAllRuns } from "./api.js";
import {
  enc, experimentPath, fmtTime, h, link, projectPath, runPath, statusBadge,
} from "./dom.js";
import { callCharts } from "./run.js";

function runList(project, runs) {
  return h("table", { id: "compare-runs", class: "grid compact" },
    h("thead", {}, h("tr", {}, h("th", {}, "Run"), h("th", {}, "Name"), h("th", {}, "Status"),
      h("th", {}, "Forked from"), h("th", {}, "Created"))),
    h("tbody", {}, runs.map((r) => h("tr", { dataset: { run: r.display_id } },
      h("td", {}, link(runPath(project, r.display_id), r.display_id)),
      h("td", {}, r.name), h("td", {}, statusBadge(r.status)),
      h("td", {}, r.forked_from_display_id
        ? [link(runPath(project, r.forked_from_display_id), r.forked_from_display_id),
          ` @ ${r.fork_step}`] : ""),
      h("td", {}, fmtTime(r.created_at))))));
}

/** Config keys whose values differ between the runs: what makes them different. */
function configDiff(runs) {
  const flat = (obj, prefix = "", out = {}) => {
    for (const [k, v] of Object.entries(obj || {})) {
      if (v && typeof v === "object" && !Array.isArray(v)) flat(v, `${prefix}${k}.`, out);
      else out[`${prefix}${k}`] = JSON.stringify(v);
    }
    return out;
  };
  const flats = runs.map((r) => flat(r.config));
  const keys = [...new Set(flats.flatMap((f) => Object.keys(f)))].sort()
    .filter((k) => new Set(flats.map((f) => f[k])).size > 1);
  if (!keys.length) return h("p", { class: "muted" }, "Same config.");
  return h("table", { id: "config-diff", class: "grid compact" },
    h("thead", {}, h("tr", {}, h("th", {}, "Config"), runs.map((r) => h("th", {},
      r.display_id)))),
    h("tbody", {}, keys.map((k) => h("tr", { dataset: { key: k } }, h("td", {}, h("code", {}, k)),
      flats.map((f) => h("td", {}, f[k] ?? "—"))))));
}

export async function compareView(page, _params, ctx) {
  const project = ctx.query.get("project") || "";
  const refs = (ctx.query.get("runs") || "").split(",").map((r) => r.trim()).filter(Boolean);
  ctx.crumbs([{ text: "Projects", href: "/" },
              project ? { text: project, href: projectPath(project) } : null,
              { text: "Compare" }].filter(Boolean));
  if (!project || !refs.length) {
    page.append(h("h1", {}, "Compare"), h("p", { class: "empty" },
      "Pick runs in a project's runs table and press Compare (",
      h("code", {}, "/compare?project=P&runs=P-1,P-2"), ")."));
    return;
  }
  const runs = await Promise.all(refs.map((ref) => get(`/runs/${enc(ref)}`, { project })));
  document.title = `Compare ${refs.join(", ")} · Pluto`;
  const charts = h("div", { id: "compare-charts", class: "charts",
                            dataset: { project, runs: refs.join(",") } });
  page.append(h("h1", {}, "Compare ", h("span", { class: "muted" }, refs.join(", "))),
    runList(project, runs),
    h("section", { class: "card", id: "compare-config" }, h("h2", {}, "Config differences"),
      configDiff(runs)),
    h("section", { class: "card" }, h("h2", {}, "Metrics"), charts));
  ctx.afterMount(() => callCharts("renderCompare", charts, { project, runs }, ctx));
}

export async function experimentView(page, [project, name], ctx) {
  ctx.crumbs([{ text: "Projects", href: "/" }, { text: project, href: projectPath(project) },
              { text: `experiment ${name}` }]);
  document.title = `${name} · ${project} · Pluto`;
  const { runs } = await getAllRuns(project);
  const mine = runs.filter((r) => r.name === name);
  const charts = h("div", { id: "experiment-charts", class: "charts",
                            dataset: { project, experiment: name } });
  page.append(h("h1", {}, name, " ", h("span", { class: "muted" }, "experiment")),
    h("p", { class: "muted" }, "Every run named ", h("code", {}, name),
      " (forks share their parent's name). ",
      link(`${projectPath(project)}?q=${enc(name)}`, "In the runs table")),
    mine.length ? runList(project, mine) : h("p", { class: "empty" }, "No run has this name."),
    h("section", { class: "card" }, h("h2", {}, "Metrics"), charts));
  ctx.afterMount(() => callCharts("renderExperiment", charts, { project, name }, ctx));
}

export { experimentPath };

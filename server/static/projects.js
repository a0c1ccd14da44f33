// "/": every project, with its run count and creation time.

import { get } from "./api.js";
import { fmtTime, h, link, projectPath } from "./dom.js";

export async function projectsView(page, _params, ctx) {
  ctx.crumbs([{ text: "Projects" }]);
  const { projects } = await get("/projects");
  page.append(h("h1", {}, "Projects"));
  if (!projects.length) {
    page.append(h("p", { class: "empty", id: "no-projects" },
      "No projects yet. Start a run with ", h("code", {}, "pluto.init(project=...)"), "."));
    return;
  }
  const rows = projects.map((p) => h("tr", { dataset: { project: p.name } },
    h("td", { "data-col": "name" }, link(projectPath(p.name), p.name)),
    h("td", { "data-col": "prefix" }, p.prefix),
    h("td", { "data-col": "runs", class: "num" }, p.runs),
    h("td", { "data-col": "created" }, fmtTime(p.created_at))));
  page.append(h("table", { id: "projects-table", class: "grid" },
    h("thead", {}, h("tr", {}, h("th", {}, "Project"), h("th", {}, "Prefix"),
      h("th", { class: "num" }, "Runs"), h("th", {}, "Created"))),
    h("tbody", {}, rows)));
}

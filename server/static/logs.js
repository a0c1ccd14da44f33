// The console log of a run: pages of lines (`after`), filtered by rank (`writer`) and by
// a case-insensitive search (`q`). Rank and search live in the URL query (?rank=1&q=nan).
// While the run is RUNNING, new lines are polled for.

import { get } from "./api.js";
import { fmtTime, h } from "./dom.js";

const PAGE = 500;
const POLL_MS = 5000;

const MAX_RANK = 2 ** 31 - 1; // a writer is a 32-bit integer (the API's bound)

/** A rank from the URL: a whole number >= 0 ("1"), or "" (all ranks) for anything else
 * (?rank=abc is ignored, not sent to the server nor listed as a rank). */
function parseRank(raw) {
  if (raw === null || !/^\d+$/.test(raw)) return "";
  const rank = Number(raw);
  return rank <= MAX_RANK ? String(rank) : "";
}

export function logPanel(run, ctx) {
  const state = { rank: parseRank(ctx.query.get("rank")), q: ctx.query.get("q") ?? "" };
  const rankSelect = h("select", { id: "log-rank", "aria-label": "rank" },
    h("option", { value: "" }, "all ranks"));
  const search = h("input", { id: "log-search", type: "search", value: state.q,
                              placeholder: "search the log…", "aria-label": "search" });
  const lines = h("div", { id: "log-lines", class: "log", role: "log" });
  const status = h("span", { id: "log-status", class: "muted" });
  const more = h("button", { type: "button", id: "log-more", hidden: true }, "Load more");
  const ranks = new Set();
  let after = null;
  let token = 0;
  let count = 0;

  function setRanks() {
    if (state.rank !== "") ranks.add(Number(state.rank));
    const current = rankSelect.value || state.rank;
    rankSelect.replaceChildren(h("option", { value: "" }, "all ranks"),
      ...[...ranks].sort((a, b) => a - b).map((r) =>
        h("option", { value: String(r), selected: String(r) === current }, `rank ${r}`)));
  }

  function params(extra) {
    return { writer: state.rank === "" ? undefined : state.rank, q: state.q || undefined,
             limit: PAGE, ...extra };
  }

  function lineEl(rec) {
    return h("div", { class: `log-line${rec.stream === 2 ? " stderr" : ""}`,
                      dataset: { id: rec.id, writer: rec.writer } },
      h("span", { class: "log-time", title: fmtTime(rec.time) }, fmtTime(rec.time).slice(11)),
      h("span", { class: "log-rank" }, `[${rec.writer}]`),
      h("span", { class: "log-text" }, rec.line));
  }

  async function load({ reset }) {
    const mine = reset ? ++token : token;
    if (reset) { after = null; count = 0; }
    const page = await get(`/runs/${run.id}/logs`, params({ after: after ?? undefined }));
    if (mine !== token || !ctx.current()) return;
    if (reset) lines.replaceChildren();
    for (const rec of page.lines) ranks.add(rec.writer);
    lines.append(...page.lines.map(lineEl));
    count += page.lines.length;
    if (page.lines.length) after = page.lines[page.lines.length - 1].id;
    more.hidden = page.next_after === null;
    status.textContent = count ? `${count} line${count === 1 ? "" : "s"}`
      : (state.q || state.rank !== "" ? "No line matches." : "No console output.");
    lines.dataset.loaded = "true";
    setRanks();
  }

  function reload() {
    const query = new URLSearchParams(location.search);
    for (const [name, value] of [["rank", state.rank], ["q", state.q]]) {
      if (value === "") query.delete(name); else query.set(name, value);
    }
    ctx.setQuery(query);
    lines.dataset.loaded = "false";
    load({ reset: true }).catch(showError);
  }

  function showError(err) {
    status.textContent = `Could not read the log: ${err.message || err}`;
  }

  let timer = null;
  rankSelect.addEventListener("change", () => { state.rank = rankSelect.value; reload(); });
  search.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => { state.q = search.value; reload(); }, 250);
  });
  more.addEventListener("click", () => load({ reset: false }).catch(showError));

  // Discover the ranks that wrote (the select lists them), then load the filtered view.
  setRanks();
  const discover = state.rank === "" ? Promise.resolve()
    : get(`/runs/${run.id}/logs`, { limit: 1000 })
      .then((p) => { for (const rec of p.lines) ranks.add(rec.writer); });
  discover.catch(() => {}).then(() => load({ reset: true })).catch(showError);

  if (run.status === "RUNNING") {
    const poll = setInterval(() => {
      if (more.hidden && !document.hidden) load({ reset: false }).catch(() => {});
    }, POLL_MS);
    ctx.onLeave(() => clearInterval(poll));
  }
  ctx.onLeave(() => clearTimeout(timer));

  return h("div", { class: "log-panel" },
    h("div", { class: "toolbar" }, rankSelect, search, status), lines, more);
}

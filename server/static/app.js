// The dashboard shell: router, breadcrumbs, the API key prompt.
// Every view has a stable URL: the path picks the view, the query holds its state.

import { AuthRequired, get, getKey, setKey } from "./api.js";
import { h, link } from "./dom.js";
import { projectsView } from "./projects.js";
import { runsView } from "./runs.js";
import { runView } from "./run.js";
import { compareView, experimentView } from "./compare.js";

const ROUTES = [
  [/^\/$/, "projects", projectsView],
  [/^\/projects\/([^/]+)\/?$/, "runs", runsView],
  [/^\/projects\/([^/]+)\/runs\/([^/]+)\/?$/, "run", runView],
  [/^\/projects\/([^/]+)\/experiments\/([^/]+)\/?$/, "experiment", experimentView],
  [/^\/compare\/?$/, "compare", compareView],
];

const root = document.getElementById("app");
let generation = 0;
let leaving = [];
let mounted = [];

function leave() {
  for (const fn of leaving.splice(0)) {
    try { fn(); } catch (err) { console.error(err); }
  }
}

/** Navigate inside the app (no page load). */
export function navigate(url, { replace = false } = {}) {
  if (replace) history.replaceState(null, "", url);
  else history.pushState(null, "", url);
  render();
}

function setCrumbs(items) {
  const nav = document.getElementById("breadcrumbs");
  nav.replaceChildren(...items.flatMap((item, i) => [
    i ? h("span", { class: "sep" }, "/") : null,
    item.href ? link(item.href, item.text) : h("span", {}, item.text),
  ].filter(Boolean)));
}

function context(gen) {
  const query = new URLSearchParams(location.search);
  return {
    query,
    /** Write the view's state into the URL query (replaceState: no history entry). */
    setQuery(params, { push = false } = {}) {
      const qs = params.toString();
      const url = `${location.pathname}${qs ? `?${qs}` : ""}`;
      if (push) history.pushState(null, "", url);
      else history.replaceState(null, "", url);
    },
    crumbs: setCrumbs,
    /** Called when the user leaves the view: stop timers, free charts. */
    onLeave(fn) { leaving.push(fn); },
    /** Run once the view's page is in the document (charts measure their container). */
    afterMount(fn) { mounted.push(fn); },
    /** False once the user navigated away: stop writing into the page. */
    current() { return gen === generation; },
  };
}

export async function render() {
  leave();
  const gen = ++generation;
  mounted = [];
  const path = location.pathname;
  root.removeAttribute("data-ready");
  root.replaceChildren(h("p", { class: "muted" }, "Loading…"));
  let matched = null;
  for (const [pattern, name, view] of ROUTES) {
    const m = path.match(pattern);
    if (m) { matched = { name, view, params: m.slice(1).map(decodeURIComponent) }; break; }
  }
  if (!matched) {
    root.dataset.view = "not-found";
    setCrumbs([]);
    root.replaceChildren(h("h1", {}, "Not found"),
      h("p", {}, "No page at ", h("code", {}, path), ". ", link("/", "All projects")));
    root.dataset.ready = "true";
    return;
  }
  root.dataset.view = matched.name;
  document.title = "Pluto";
  try {
    const page = h("div", { class: "view" });
    const ctx = context(gen);
    await matched.view(page, matched.params, ctx);
    if (gen !== generation) return;
    root.replaceChildren(page);
    for (const fn of mounted.splice(0)) {
      try { fn(); } catch (err) { console.error(err); }
    }
  } catch (err) {
    if (gen !== generation) return;
    if (err instanceof AuthRequired) showKeyForm(err);
    else showError(err);
  }
  if (gen === generation) root.dataset.ready = "true";
  updateKeyButton();
}

function showError(err) {
  console.error(err);
  root.replaceChildren(h("div", { class: "error", id: "error", role: "alert" },
    h("strong", {}, "Could not load this page. "), String(err.message || err)));
}

function showKeyForm(err) {
  root.dataset.view = "auth";
  const input = h("input", { id: "api-key-input", type: "password", autocomplete: "off",
                             placeholder: "pluto_…", size: 48, required: true });
  const form = h("form", { id: "auth-form", class: "card auth" },
    h("h1", {}, "API key needed"),
    h("p", {}, err.hadKey
      ? "The server refused the stored key: " + err.message
      : "This server requires an API key. Create one with ",
      err.hadKey ? null : h("code", {}, "pluto keys create --name dashboard"),
      err.hadKey ? null : " and paste it here."),
    h("p", { class: "muted" }, "The key is kept in this browser (localStorage) and sent as ",
      h("code", {}, "Authorization: Bearer"), " to this server only."),
    h("div", { class: "row" }, input,
      h("button", { type: "submit", id: "api-key-submit" }, "Use key")));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setKey(input.value.trim());
    render();
  });
  root.replaceChildren(form);
  input.focus();
}

let authOn = null;

async function updateKeyButton() {
  const button = document.getElementById("key-button");
  if (authOn === null) {
    try { authOn = Boolean((await get("/health")).auth); } catch { authOn = false; }
  }
  button.hidden = !(authOn || getKey());
  button.textContent = getKey() ? "Forget API key" : "API key";
}

document.getElementById("key-button").addEventListener("click", () => {
  setKey("");
  render();
});

document.addEventListener("click", (event) => {
  const a = event.target.closest("a[data-link]");
  if (!a || event.defaultPrevented || event.button !== 0 ||
      event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
  const url = new URL(a.href, location.href);
  if (url.origin !== location.origin) return;
  event.preventDefault();
  navigate(url.pathname + url.search);
});

window.addEventListener("popstate", render);
window.PlutoApp = { navigate, render };
render();

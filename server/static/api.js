// The JSON API under /api/v1, with the API key (if any) from localStorage.
// The dashboard uses nothing else: what it shows, any client can get.
// Also exposed as window.PlutoApi for classic scripts (the charts module).

export const API = "/api/v1";
const KEY_STORAGE = "pluto.apiKey";

export class AuthRequired extends Error {
  constructor(message, hadKey) {
    super(message);
    this.name = "AuthRequired";
    this.hadKey = hadKey;
  }
}

export class ApiError extends Error {
  constructor(status, detail, path) {
    super(`${status}: ${detail}`);
    this.name = "ApiError";
    this.status = status;
    this.detail = detail;
    this.path = path;
  }
}

export function getKey() {
  try { return localStorage.getItem(KEY_STORAGE) || ""; } catch { return ""; }
}

export function setKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

export function headers() {
  const key = getKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** The URL of an API path with a query: params values may be arrays (repeated). */
export function apiUrl(path, params = {}) {
  const query = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value === undefined || value === null || value === "") continue;
    for (const v of Array.isArray(value) ? value : [value]) query.append(name, String(v));
  }
  const qs = query.toString();
  return `${API}${path}${qs ? `?${qs}` : ""}`;
}

/** GET an API path, answer its JSON; 401 raises AuthRequired, other errors ApiError. */
export async function get(path, params = {}) {
  const response = await fetch(apiUrl(path, params), { headers: headers() });
  if (response.status === 401) {
    const body = await response.json().catch(() => ({}));
    throw new AuthRequired(body.detail || "an API key is required", Boolean(getKey()));
  }
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new ApiError(response.status, body.detail || response.statusText, path);
  }
  return response.json();
}

/** Every run of a project, newest first: the API answers a page at a time (up to 1000
 * runs), with `next_cursor` naming the next page until the last. Answers `{ runs }`. */
export async function getAllRuns(project, params = {}) {
  const runs = [];
  let cursor;
  do {
    const page = await get(`/projects/${encodeURIComponent(project)}/runs`,
      { ...params, cursor });
    runs.push(...page.runs);
    cursor = page.next_cursor;
  } while (cursor);
  return { runs };
}

/** JSON numbers for the strings "NaN", "Infinity", "-Infinity" the API uses in JSON. */
export function num(value) {
  if (typeof value === "number") return value;
  if (value === "NaN" || value === null) return NaN;
  if (value === "Infinity") return Infinity;
  if (value === "-Infinity") return -Infinity;
  return Number(value);
}

window.PlutoApi = {
  API, get, getAllRuns, apiUrl, headers, getKey, setKey, num, AuthRequired, ApiError,
};

"""The emulated Kubernetes API server for operator tests: kmock's scaffold, made stateful.

The operator is tested as it runs in a cluster: the real ``kopf run`` (or ``pluto operator``)
in its own process, talking HTTP to an API server on 127.0.0.1. That server is
:class:`ApiServer`, a `kmock <https://kmock.readthedocs.io>`_ handler, in a process of its own:
this module's command, ``python -m support.kube_apiserver``. Tests never call it in-process;
:class:`support.kube_emulator.KubeEmulator` starts that command, writes a kubeconfig, and offers
small HTTP helpers.

Why a process: the operator under test is a separate process anyway, so state is inspected over
HTTP either way; a process gives each test a fresh server in about half a second, keeps kmock's
event loop away from pytest's, and can be killed without leaving a thread behind. The same
command runs it by hand for development (``--port 8001 --kubeconfig kc``).

For assertions on how an operator used the API, the server also answers (without a token)
``/_emulator/requests`` (every request: method, path, query, content type, user agent,
status, body),
``/_emulator/changes`` (every committed write, in resourceVersion order) and
``/_emulator/watches`` (the watch streams open now).

What both sides of the wire must agree on lives here, the lower layer, and the harness imports
it: the resource names (``PODS``, ``PLUTORUNS``, ...), the defaults, the kubeconfig. Selector
parsing and matching, which needs no server state, is :mod:`support.kube_selectors`.

What kmock 0.8 provides and what is added here
---------------------------------------------
Used from kmock: the aiohttp server (:class:`kmock.Server`), request parsing and routing with
fallback reactions (its DSL), API discovery (``/api``, ``/apis``, ``/apis/GROUP/VERSION``) and
Kubernetes ``Status`` errors (:class:`kmock.KubernetesScaffold`), the bundled built-in resource
table (``ResourcesArray.load_bundled``) and object storage with history
(:class:`kmock.ObjectsArray`).

kmock's own stateful :class:`kmock.KubernetesEmulator` is not used: its writes happen inside its
request dispatch for every request, so they cannot be replaced by reactions, and kopf needs what
it lacks. :class:`ApiServer` subclasses the stateless scaffold instead and registers its own
fallback reactions (kmock's documented extension point) for these semantics:

* ``metadata.resourceVersion`` (one global counter), ``uid``, ``creationTimestamp``,
  ``generation`` and ``namespace`` are set by the server. kopf adds and removes finalizers with
  a JSON patch that starts with ``test /metadata/resourceVersion``: a failing test is a 422, as
  kopf expects (kmock answers 500 and sets no resource versions at all);
* merge, JSON and strategic-merge patches (the last as a merge patch: lists are replaced, not
  merged by key; refused with 415 on custom resources, as Kubernetes does), PUT, no-op writes
  that change nothing and emit nothing, optimistic concurrency (409) on a stale
  ``resourceVersion``;
* the ``status`` subresource: where a resource has one, writes to the object keep its status
  and writes to ``/status`` change only the status; ``generation`` grows on other changes only;
* deletion honours finalizers: ``deletionTimestamp`` is set while any remain, the object goes
  when the last one is removed; no new finalizer may be added while deleting;
* LIST and WATCH honour ``labelSelector`` and ``fieldSelector`` (an object leaving a watch's
  selector is a DELETED event, entering it an ADDED one); WATCH resumes from
  ``resourceVersion``, sends BOOKMARKs when allowed, honours ``timeoutSeconds`` and
  ``sendInitialEvents``;
* a CustomResourceDefinition created through the API is served at once (and marked
  Established); PlutoRun and JobSet CRDs are present from the start;
* ``/version`` reports a configurable ``gitVersion``; a bearer token is required;
* kmock 0.8 cannot parse ``/api/v1/namespaces`` (a 500) and reads ``/api/v1/namespaces/NAME``
  as a namespace rather than a namespace object: :meth:`ApiServer.__call__` rewrites those paths
  to a form it parses (inside a pseudo-namespace, which the reactions ignore).

Not emulated: controllers (no garbage collection, no pods from Jobs, no kubelet: a pod without
finalizers goes at once on DELETE), admission webhooks, schema validation of custom resources,
LIST pagination (``limit`` is ignored), and the sharing of events between ``v1`` and
``events.k8s.io/v1``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import copy
import dataclasses
import datetime
import json
import logging
import os
import re
import secrets
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
import yaml

from .kube_selectors import Selection, parse_field_selector, parse_label_selector

__all__ = [
    "CRDS",
    "DEFAULT_GIT_VERSION",
    "DEFAULT_NAMESPACES",
    "EVENTS",
    "JOBS",
    "JOBSETS",
    "NAMESPACES",
    "PLUTORUNS",
    "PODS",
    "ApiServer",
    "load_crds",
    "main",
    "write_kubeconfig",
]

logger = logging.getLogger("kube_apiserver")

DEFAULT_GIT_VERSION = "v1.31.0"
DEFAULT_NAMESPACES = ("default", "kube-system")

# Resources as "group/version/plural" ("version/plural" for the core group): what
# kmock.resource() parses here and the harness's helpers take. Defined here, though the server
# itself needs only a few, so that the names tests use are the names the server serves.
PODS = "v1/pods"
NAMESPACES = "v1/namespaces"
EVENTS = "v1/events"
JOBS = "batch/v1/jobs"
JOBSETS = "jobset.x-k8s.io/v1alpha2/jobsets"
PLUTORUNS = "pluto.dev/v1alpha1/plutoruns"
CRDS = "apiextensions.k8s.io/v1/customresourcedefinitions"

#: Must be in the resource table, or the server refuses to start (a kmock upgrade dropped one).
REQUIRED_BUILTINS = (
    "v1/pods", "v1/namespaces", "v1/events", "v1/secrets", "v1/services", "v1/configmaps",
    "events.k8s.io/v1/events", "batch/v1/jobs", "coordination.k8s.io/v1/leases",
    "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations", CRDS,
)
_ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
# Paths kmock 0.8 misparses are served under this pseudo-namespace (not a valid namespace name).
_CLUSTER_ALIAS = "_cluster_"
_ANONYMOUS_PATHS = frozenset({"/version", "/version/", "/healthz", "/livez", "/readyz"})

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_PART = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")


def _crd(group: str, version: str, plural: str, kind: str, *, short_names: Sequence[str] = (),
         categories: Sequence[str] = ()) -> dict[str, Any]:
    """A minimal namespaced CRD with a status subresource and no schema to enforce."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind,
                      "listKind": f"{kind}List", "shortNames": list(short_names),
                      "categories": list(categories)},
            "versions": [{
                "name": version, "served": True, "storage": True,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object",
                                               "x-kubernetes-preserve-unknown-fields": True}},
            }],
        },
    }


#: Installed at start (a ``crds=`` file with the same name replaces one).
DEFAULT_CRDS = (
    _crd("pluto.dev", "v1alpha1", "plutoruns", "PlutoRun", short_names=["prun"],
         categories=["pluto"]),
    _crd("jobset.x-k8s.io", "v1alpha2", "jobsets", "JobSet"),
)


def _api_error(status: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message,
                                 details=details or {"causes": []})


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _api_version(res: kmock.resource) -> str:
    return f"{res.group}/{res.version}" if res.group else str(res.version)


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: ``null`` deletes a key, anything but an object replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _is_label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        return False
    return len(name) <= 63 and bool(_LABEL_PART.fullmatch(name))


def _validate_metadata(meta: Mapping[str, Any], *, dns_label: bool) -> None:
    name = meta.get("name", "")
    pattern, limit = (_DNS_LABEL, 63) if dns_label else (_DNS_SUBDOMAIN, 253)
    if len(name) > limit or not pattern.fullmatch(name):
        raise _api_error(422, "Invalid", f"metadata.name: Invalid value: {name!r}: must be a"
                         f" lowercase RFC 1123 {'label' if dns_label else 'subdomain'}")
    for key, value in (meta.get("labels") or {}).items():
        if not _is_label_key(key):
            raise _api_error(422, "Invalid", f"metadata.labels: Invalid value: {key!r}")
        if not isinstance(value, str) or (value and (
                len(value) > 63 or not _LABEL_PART.fullmatch(value))):
            raise _api_error(422, "Invalid", f"metadata.labels: Invalid value: {value!r}")


def _spec_part(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What ``metadata.generation`` counts changes of: all but metadata and status."""
    return {key: value for key, value in obj.items() if key not in ("metadata", "status")}


@dataclasses.dataclass(frozen=True)
class _Change:
    """One committed write, as watchers see it: ``old`` is the state before (or None)."""

    rv: int
    type: str
    resource: kmock.resource
    obj: dict[str, Any]
    old: dict[str, Any] | None




ObjectKey = tuple[kmock.resource, str | None, str]


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesScaffold):
    """The emulated API server: kmock's scaffold (discovery, errors, HTTP) plus state.

    Serve it with ``async with server, kmock.Server(server, port=...)``; call :meth:`seed`
    once inside, and :meth:`close` before leaving so that open watches end.
    """

    git_version: str = DEFAULT_GIT_VERSION
    token: str | None = None
    bookmark_interval: float = 30.0

    _store: kmock.ObjectsArray = attrs.field(factory=kmock.ObjectsArray, init=False)
    _revision: int = attrs.field(default=0, init=False)
    _changes: list[_Change] = attrs.field(factory=list, init=False)
    _wakeup: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _closing: bool = attrs.field(default=False, init=False)
    _watches: list[dict[str, Any]] = attrs.field(factory=list, init=False)
    _request_log: list[dict[str, Any]] = attrs.field(factory=list, init=False)
    _custom: dict[str, set[kmock.resource]] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()
        missing = [name for name in REQUIRED_BUILTINS if name not in self.resources]
        if missing:
            raise RuntimeError(f"kmock's bundled resource table lacks {missing}")
        self["get /version"] << self._serve_version_info
        self["get /version/"] << self._serve_version_info  # the python client adds the slash
        for probe in ("/healthz", "/livez", "/readyz"):
            self[f"get {probe}"] << b"ok"
        self["get /_emulator/requests"] << (lambda: self._request_log)
        self["get /_emulator/changes"] << self._serve_changes
        self["get /_emulator/watches"] << (lambda: self._watches)
        self.fallback[kmock.action.LIST] << self._serve_list
        self.fallback[kmock.action.WATCH] << {"Content-Type": "application/json"} << (
            self._serve_watch)
        self.fallback[kmock.action.FETCH] << self._serve_get
        self.fallback[kmock.action.CREATE] << 201 << self._serve_create
        self.fallback[kmock.action.UPDATE] << self._serve_patch
        self.fallback[kmock.method.PUT] << self._serve_replace
        self.fallback[kmock.method.DELETE] << self._serve_delete

    # -- entry points ------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        parts = raw_request.path.strip("/").split("/")
        if parts[:3] == ["api", "v1", "namespaces"] and (
                len(parts) <= 4 or (len(parts) == 5 and parts[4] in ("status", "finalize"))):
            # kmock 0.8 reads /api/v1/namespaces[/NAME[/SUB]] wrongly (or fails): serve it as
            # the same resource inside a pseudo-namespace, which _namespace() ignores.
            aliased = "/".join(["", "api", "v1", "namespaces", _CLUSTER_ALIAS, *parts[2:]])
            raw_request = raw_request.clone(
                rel_url=raw_request.rel_url.with_path(aliased, keep_query=True))
        return await super().__call__(raw_request)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        path = request.url.path.replace(f"/namespaces/{_CLUSTER_ALIAS}/", "/", 1)
        query = request.url.query_string
        line = f"{request.method.value} {path}{'?' + query if query else ''}"
        entry: dict[str, Any] = {
            "method": str(request.method.value), "path": path, "query": dict(request.params),
            "contentType": _header(request, "content-type"), "status": None,
            # Who asked: tells an operator's requests from a test's own (tests/test_rbac.py).
            "userAgent": _header(request, "user-agent"),
        }
        if request.method.value in ("POST", "PUT", "PATCH", "DELETE"):
            entry["data"] = request.data
        internal = path.startswith("/_emulator/")
        if not internal:
            self._request_log.append(entry)
        if request.action == kmock.action.WATCH:
            logger.info("%s: watching", line)
        try:
            self._authenticate(request, path)
            response = await super()._handle(request)
        except Exception as exc:
            # kmock wraps errors of streams in its own exception (a cause of it).
            error = exc if isinstance(exc, kmock.KubernetesError) else exc.__cause__
            if not isinstance(error, kmock.KubernetesError):
                entry["status"] = 500
                logger.exception("%s: failed in the emulator", line)
                raise
            entry["status"] = error.status
            logger.info("%s -> %s %s", line, error.status, error.message)
            raise
        entry["status"] = response.status
        if not internal:
            logger.info("%s -> %s", line, response.status)
        return response

    def _authenticate(self, request: kmock.Request, path: str) -> None:
        if self.token is None or path in _ANONYMOUS_PATHS or path.startswith("/_emulator/"):
            return
        if _header(request, "authorization") != f"Bearer {self.token}":
            raise _api_error(401, "Unauthorized", "Unauthorized")

    # -- lifecycle ---------------------------------------------------------------------

    def seed(self, *, namespaces: Sequence[str] = DEFAULT_NAMESPACES,
             crds: Sequence[Mapping[str, Any]] = ()) -> None:
        """Create the namespaces and the CRDs (the defaults, replaced by same-named ``crds``)."""
        by_name = {crd["metadata"]["name"]: crd for crd in (*DEFAULT_CRDS, *crds)}
        for crd in by_name.values():
            self.create_object(kmock.resource(CRDS), None, crd)
        for namespace in namespaces:
            self.create_object(kmock.resource(NAMESPACES), None, {"metadata": {"name": namespace}})

    def close(self) -> None:
        """End every open watch (so that the HTTP server can stop at once)."""
        self._closing = True
        self._wakeup.set()

    # -- state -------------------------------------------------------------------------

    def _info(self, res: kmock.resource | None) -> kmock.ResourceInfo:
        if res is None or res.plural is None or res not in self.resources:
            raise _api_error(404, "NotFound", "the server could not find the requested resource")
        return self.resources[res]

    def _require(self, info: kmock.ResourceInfo, verb: str) -> None:
        if info.verbs and verb not in info.verbs:
            raise _api_error(405, "MethodNotAllowed",
                             f"the server does not allow this method on the requested resource"
                             f" ({verb})")

    def _scoped(self, info: kmock.ResourceInfo, namespace: str | None) -> str | None:
        if not info.namespaced and namespace is not None:
            raise _api_error(404, "NotFound", "the server could not find the requested resource")
        return namespace

    def live(self, key: ObjectKey) -> dict[str, Any] | None:
        """The current state of an object, or None (never created, or deleted)."""
        if key not in self._store:
            return None
        obj = self._store[key]
        return None if obj.deleted else obj.last.raw

    def _existing(self, key: ObjectKey) -> dict[str, Any]:
        body = self.live(key)
        if body is None:
            res, _, name = key
            raise _api_error(404, "NotFound", f'{res.plural}.{res.group} "{name}" not found'
                             if res.group else f'{res.plural} "{name}" not found',
                             name=name, group=res.group, kind=res.plural)
        return body

    def _commit(self, type_: str, key: ObjectKey, obj: dict[str, Any],
                old: dict[str, Any] | None) -> dict[str, Any]:
        """Store a new version under a new resourceVersion and tell the watchers."""
        self._revision += 1
        obj["metadata"]["resourceVersion"] = str(self._revision)
        if type_ == "DELETED":
            self._store[key].delete()
        elif key in self._store:
            self._store[key].history.append(obj)
        else:
            self._store[key] = obj
        self._changes.append(_Change(self._revision, type_, key[0], obj, old))
        self._wakeup.set()
        self._wakeup = asyncio.Event()
        if key[0] == CRDS:
            self._sync_crd(type_, obj)
        return obj

    def create_object(self, res: kmock.resource, namespace: str | None,
                      body: Any) -> dict[str, Any]:
        """Create as the API server does: validate, fill the server's fields, announce."""
        info = self._info(res)
        self._require(info, "create")
        if not isinstance(body, dict):
            raise _api_error(400, "BadRequest", "the body of a create must be an object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if info.namespaced:
            if namespace is None:
                raise _api_error(405, "MethodNotAllowed",
                                 "a namespaced object is created in a namespace's collection")
            if meta.get("namespace") not in (None, "", namespace):
                raise _api_error(400, "BadRequest", "the namespace of the provided object does"
                                 " not match the namespace sent on the request")
            if self.live((kmock.resource(NAMESPACES), None, namespace)) is None:
                raise _api_error(404, "NotFound", f'namespaces "{namespace}" not found',
                                 name=namespace, kind="namespaces")
            meta["namespace"] = namespace
        else:
            self._scoped(info, namespace)
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            alphabet = "bcdfghjklmnpqrstvwxz2456789"
            meta["name"] = meta["generateName"] + "".join(secrets.choice(alphabet)
                                                          for _ in range(5))
        if not meta.get("name"):
            raise _api_error(422, "Invalid", "metadata.name: Required value: name or"
                             " generateName is required")
        _validate_metadata(meta, dns_label=res.plural in ("namespaces", "services"))
        key: ObjectKey = (res, meta.get("namespace"), meta["name"])
        if self.live(key) is not None:
            raise _api_error(409, "AlreadyExists", f'{res.plural} "{meta["name"]}" already'
                             " exists", name=meta["name"], kind=res.plural)
        for server_field in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion"):
            meta.pop(server_field, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        obj.setdefault("apiVersion", _api_version(res))
        obj.setdefault("kind", info.kind)
        if "status" in info.subresources:
            obj.pop("status", None)  # "create cannot set status", as in the real API server
        if res == NAMESPACES:
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
            obj["spec"] = {"finalizers": ["kubernetes"]}
            obj["status"] = {"phase": "Active"}
        elif res == PODS:
            obj["status"] = {"phase": "Pending"}
        return self._commit("ADDED", key, obj, None)

    def update_object(self, key: ObjectKey, new: Any, *, subresource: str | None) -> dict[str, Any]:
        """Apply a full new state (from a patch or a PUT) with the API server's rules."""
        res = key[0]
        info = self._info(res)
        old = self._existing(key)
        if not isinstance(new, dict) or not isinstance(new.get("metadata", {}), dict):
            raise _api_error(422, "Invalid", "the patched object is not an object")
        new = copy.deepcopy(new)
        meta = new.setdefault("metadata", {})
        old_meta = old["metadata"]
        wanted_rv = meta.get("resourceVersion")
        if wanted_rv not in (None, "") and wanted_rv != old_meta["resourceVersion"]:
            raise _api_error(409, "Conflict", f'Operation cannot be fulfilled on {res.plural}'
                             f' "{key[2]}": the object has been modified; please apply your'
                             " changes to the latest version and try again",
                             name=key[2], kind=res.plural)
        if subresource == "status":
            status = new.get("status")
            new = copy.deepcopy(old)
            meta = new["metadata"]
            if status is None:
                new.pop("status", None)
            else:
                new["status"] = status
        elif "status" in info.subresources:
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        for server_field in ("name", "namespace", "uid", "creationTimestamp", "generation",
                             "deletionTimestamp", "deletionGracePeriodSeconds",
                             "resourceVersion"):
            if server_field in old_meta:
                meta[server_field] = old_meta[server_field]
            else:
                meta.pop(server_field, None)
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        if not meta.get("finalizers"):
            meta.pop("finalizers", None)
        _validate_metadata(meta, dns_label=res.plural in ("namespaces", "services"))
        finalizers = meta.get("finalizers", [])
        if old_meta.get("deletionTimestamp") and set(finalizers) - set(
                old_meta.get("finalizers", [])):
            raise _api_error(422, "Forbidden", "metadata.finalizers: Forbidden: no new"
                             " finalizers can be added if the object is being deleted")
        if _spec_part(new) != _spec_part(old):
            meta["generation"] = old_meta.get("generation", 1) + 1
        if new == old:
            return old  # a no-op write: no new resourceVersion, no event
        if meta.get("deletionTimestamp") and not finalizers:
            return self._commit("DELETED", key, new, old)
        return self._commit("MODIFIED", key, new, old)

    def delete_object(self, key: ObjectKey, options: Any = None) -> dict[str, Any]:
        """Delete now, or (while finalizers remain) only mark with ``deletionTimestamp``."""
        old = self._existing(key)
        preconditions = (options or {}).get("preconditions") or {}
        for field in ("uid", "resourceVersion"):
            if preconditions.get(field) not in (None, old["metadata"].get(field)):
                raise _api_error(409, "Conflict", f"Precondition failed: {field} in"
                                 f" precondition: {preconditions[field]}, in object meta:"
                                 f" {old['metadata'].get(field)}")
        if old["metadata"].get("deletionTimestamp"):
            return old  # already being deleted; waiting for its finalizers
        new = copy.deepcopy(old)
        if old["metadata"].get("finalizers"):
            new["metadata"].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0)
            return self._commit("MODIFIED", key, new, old)
        return self._commit("DELETED", key, new, old)

    def select(self, selection: Selection) -> list[dict[str, Any]]:
        """The live objects a LIST selects, in the API server's order (namespace, name)."""
        found = []
        for (res, namespace, name), obj in self._store.items():
            if res == selection.resource and not obj.deleted and selection(obj.last.raw):
                found.append(((namespace or "", name), obj.last.raw))
        return [body for _, body in sorted(found, key=lambda pair: pair[0])]

    def _sync_crd(self, type_: str, crd: dict[str, Any]) -> None:
        """Serve (or stop serving) what a CRD defines, and mark it Established."""
        name = crd["metadata"]["name"]
        for res in self._custom.pop(name, set()):
            del self.resources[res]
            if type_ == "DELETED":
                for key, obj in list(self._store.items()):
                    if key[0] == res and not obj.deleted:
                        self._commit("DELETED", key, copy.deepcopy(obj.last.raw), obj.last.raw)
        if type_ == "DELETED":
            return
        spec = crd.get("spec", {})
        names = spec.get("names", {})
        served: set[kmock.resource] = set()
        for version in spec.get("versions", []):
            if not version.get("served", True):
                continue
            res = kmock.resource(spec["group"], version["name"], names["plural"])
            self.resources[res] = kmock.ResourceInfo(
                kind=names["kind"], singular=names.get("singular") or names["kind"].lower(),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced", verbs=_ALL_VERBS,
                shortnames=names.get("shortNames", []), categories=names.get("categories", []),
                subresources=[sub for sub in ("status", "scale")
                              if sub in (version.get("subresources") or {})],
            )
            served.add(res)
        self._custom[name] = served
        if not crd.get("status", {}).get("conditions"):
            status = {
                "acceptedNames": names,
                "storedVersions": [v["name"] for v in spec.get("versions", []) if v.get("storage")],
                "conditions": [{"type": t, "status": "True", "lastTransitionTime": _now(),
                                "reason": r, "message": m} for t, r, m in (
                    ("NamesAccepted", "NoConflicts", "no conflicts found"),
                    ("Established", "InitialNamesAccepted", "the initial names have been"
                     " accepted"))],
            }
            self.update_object((kmock.resource(CRDS), None, name), {**crd, "status": status},
                               subresource="status")

    # -- reactions ---------------------------------------------------------------------

    def _key(self, request: kmock.Request, info: kmock.ResourceInfo) -> ObjectKey:
        assert request.resource is not None and request.name is not None
        return (request.resource, self._scoped(info, _namespace(request)), request.name)

    def _selection(self, request: kmock.Request, info: kmock.ResourceInfo) -> Selection:
        assert request.resource is not None
        try:
            labels = parse_label_selector(request.params.get("labelSelector", ""))
            fields = parse_field_selector(request.params.get("fieldSelector", ""))
        except ValueError as exc:
            raise _api_error(400, "BadRequest", str(exc)) from None
        return Selection(request.resource, self._scoped(info, _namespace(request)),
                          request.name, labels, fields)

    def _list_of(self, request: kmock.Request, info: kmock.ResourceInfo,
                 items: list[dict[str, Any]]) -> dict[str, Any]:
        assert request.resource is not None
        return {"apiVersion": _api_version(request.resource), "kind": f"{info.kind}List",
                "metadata": {"resourceVersion": str(self._revision)}, "items": items}

    def _serve_version_info(self) -> dict[str, Any]:
        match = re.match(r"v?(\d+)\.(\d+)", self.git_version)
        major, minor = match.groups() if match else ("1", "0")
        return {"major": major, "minor": minor, "gitVersion": self.git_version,
                "gitCommit": "0" * 40, "gitTreeState": "clean",
                "buildDate": "2024-01-01T00:00:00Z", "goVersion": "go1.22.0",
                "compiler": "gc", "platform": "linux/amd64"}

    def _serve_changes(self) -> list[dict[str, Any]]:
        return [{"resourceVersion": c.rv, "type": c.type, "resource": _api_version(c.resource)
                 + f"/{c.resource.plural}", "namespace": c.obj["metadata"].get("namespace"),
                 "name": c.obj["metadata"]["name"], "object": c.obj} for c in self._changes]

    def _serve_list(self, request: kmock.Request) -> dict[str, Any]:
        info = self._info(request.resource)
        self._require(info, "list")
        return self._list_of(request, info, self.select(self._selection(request, info)))

    def _serve_get(self, request: kmock.Request) -> dict[str, Any]:
        info = self._info(request.resource)
        self._require(info, "get")
        if request.subresource not in (None, *info.subresources):
            raise _api_error(404, "NotFound", "the server could not find the requested resource")
        return self._existing(self._key(request, info))

    def _serve_create(self, request: kmock.Request) -> dict[str, Any]:
        if request.subresource is not None:
            raise _api_error(404, "NotFound", "the server could not find the requested resource")
        return self.create_object(request.resource or kmock.resource(), _namespace(request),
                                  request.data)

    def _serve_patch(self, request: kmock.Request) -> dict[str, Any]:
        info = self._info(request.resource)
        self._require(info, "patch")
        if request.subresource not in (None, "status") or (
                request.subresource == "status" and "status" not in info.subresources):
            raise _api_error(404, "NotFound", "the server could not find the requested resource")
        key = self._key(request, info)
        current = self._existing(key)
        content_type = (_header(request, "content-type") or "").split(";")[0].strip()
        patch = request.data
        if content_type == "application/json-patch+json":
            if not isinstance(patch, list):
                raise _api_error(400, "BadRequest", "a JSON patch must be a list of operations")
            try:
                new = jsonpatch.apply_patch(copy.deepcopy(current), patch)
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
                raise _api_error(422, "Invalid", f"the server rejected our request due to an"
                                 f" error in our request: {exc}") from None
        elif content_type in ("application/merge-patch+json",
                              "application/strategic-merge-patch+json"):
            if content_type.startswith("application/strategic") and any(
                    key[0] in served for served in self._custom.values()):
                raise _api_error(415, "UnsupportedMediaType", "the body of the request was in"
                                 " an unknown format - accepted media types include:"
                                 " application/json-patch+json, application/merge-patch+json")
            if not isinstance(patch, dict):
                raise _api_error(400, "BadRequest", "a merge patch must be an object")
            new = _merge_patch(current, patch)
        else:
            raise _api_error(415, "UnsupportedMediaType",
                             f"unsupported patch type {content_type!r} in the emulator")
        return self.update_object(key, new, subresource=request.subresource)

    def _serve_replace(self, request: kmock.Request) -> dict[str, Any]:
        info = self._info(request.resource)
        self._require(info, "update")
        if request.name is None or request.subresource not in (None, "status"):
            raise _api_error(405, "MethodNotAllowed", "PUT needs an object's path")
        body = request.data
        if not isinstance(body, dict) or body.get("metadata", {}).get("name") != request.name:
            raise _api_error(400, "BadRequest", "the name of the object does not match the URL")
        return self.update_object(self._key(request, info), body, subresource=request.subresource)

    def _serve_delete(self, request: kmock.Request) -> dict[str, Any]:
        info = self._info(request.resource)
        if request.name is not None:
            self._require(info, "delete")
            return self.delete_object(self._key(request, info), request.data)
        self._require(info, "deletecollection")
        selected = self.select(self._selection(request, info))
        assert request.resource is not None
        deleted = [self.delete_object((request.resource, body["metadata"].get("namespace"),
                                       body["metadata"]["name"])) for body in selected]
        return self._list_of(request, info, deleted)

    def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        # Validated here, before the stream starts: an error is still a plain HTTP error.
        info = self._info(request.resource)
        self._require(info, "watch")
        selection = self._selection(request, info)
        params = request.params
        since = params.get("resourceVersion") or "0"
        initial_bookmark = params.get("sendInitialEvents") == "true"
        bookmarks = params.get("allowWatchBookmarks") == "true"
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        if since == "0" or initial_bookmark:
            initial, position = self.select(selection), self._revision
        elif since.isdigit():
            initial, position = [], int(since)
        else:
            raise _api_error(400, "BadRequest", f"invalid resourceVersion {since!r}")
        return self._stream(request, info, selection, initial, position, timeout=timeout,
                            bookmarks=bookmarks, initial_bookmark=initial_bookmark)

    async def _stream(self, request: kmock.Request, info: kmock.ResourceInfo,
                      selection: Selection, initial: list[dict[str, Any]], position: int, *,
                      timeout: float | None, bookmarks: bool,
                      initial_bookmark: bool) -> AsyncIterator[Any]:
        index = bisect.bisect_right(self._changes, position, key=lambda change: change.rv)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        watch = {"resource": f"{_api_version(selection.resource)}/{selection.resource.plural}",
                 "namespace": selection.namespace, "query": dict(request.params)}
        self._watches.append(watch)
        try:
            yield b""  # the headers go out now, before any event
            for obj in initial:
                yield {"type": "ADDED", "object": obj}
            if initial_bookmark:
                yield self._bookmark(request, info, position, initial_events_end=True)
            while not self._closing:
                wakeup = self._wakeup
                while index < len(self._changes):
                    change = self._changes[index]
                    index, position = index + 1, change.rv
                    event = self._as_event(change, selection)
                    if event is not None:
                        yield event
                waits = [t for t in (None if deadline is None else deadline - loop.time(),
                                     self.bookmark_interval if bookmarks else None)
                         if t is not None]
                try:
                    await asyncio.wait_for(wakeup.wait(), min(waits) if waits else None)
                except TimeoutError:
                    if deadline is not None and loop.time() >= deadline:
                        return
                    yield self._bookmark(request, info, position)
        finally:
            self._watches.remove(watch)

    @staticmethod
    def _bookmark(request: kmock.Request, info: kmock.ResourceInfo, position: int, *,
                  initial_events_end: bool = False) -> dict[str, Any]:
        """A BOOKMARK: this watch has seen every change up to ``position``."""
        assert request.resource is not None
        meta: dict[str, Any] = {"resourceVersion": str(position)}
        if initial_events_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        return {"type": "BOOKMARK", "object": {"apiVersion": _api_version(request.resource),
                                               "kind": info.kind, "metadata": meta}}

    @staticmethod
    def _as_event(change: _Change, selection: Selection) -> dict[str, Any] | None:
        """The event a watch with ``selection`` sees for a change, if any."""
        if change.resource != selection.resource:
            return None
        now = selection(change.obj)
        before = change.old is not None and selection(change.old)
        if change.type == "MODIFIED":
            kind = "MODIFIED" if now and before else "ADDED" if now else (
                "DELETED" if before else None)
        else:
            kind = change.type if now or before else None
        return None if kind is None else {"type": kind, "object": change.obj}


def _namespace(request: kmock.Request) -> str | None:
    """The request's namespace; None for the paths served under the pseudo-namespace."""
    return None if request.namespace == _CLUSTER_ALIAS else request.namespace


def _header(request: kmock.Request, name: str) -> str | None:
    for key, value in request.headers.items():
        if key.lower() == name:
            return value
    return None


def load_crds(path: Path) -> list[dict[str, Any]]:
    """The CustomResourceDefinitions in a YAML or JSON file (several documents allowed)."""
    with open(path, encoding="utf-8") as stream:
        docs = [doc for doc in yaml.safe_load_all(stream) if doc]
    for doc in docs:
        if doc.get("kind") != "CustomResourceDefinition":
            raise ValueError(f"{path}: {doc.get('kind')!r} is not a CustomResourceDefinition")
    return docs


def write_kubeconfig(path: Path, server: str, token: str | None,
                     namespace: str = "default") -> Path:
    """A kubeconfig (JSON, which is YAML) for ``server``: kopf and the python client read it."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kube-emulator", "cluster": {"server": server}}],
        "users": [{"name": "kube-emulator", "user": {"token": token} if token else {}}],
        "contexts": [{"name": "kube-emulator", "context": {
            "cluster": "kube-emulator", "user": "kube-emulator", "namespace": namespace}}],
        "current-context": "kube-emulator",
        "preferences": {},
    }
    path.write_text(json.dumps(config, indent=2))
    return path


async def _serve(args: argparse.Namespace, token: str | None) -> None:
    crds = [crd for path in args.crd for crd in load_crds(Path(path))]
    server = ApiServer(git_version=args.git_version, token=token,
                       bookmark_interval=args.bookmark_interval)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server, kmock.Server(server, host=args.host, port=args.port) as http:
        server.seed(namespaces=args.namespace or DEFAULT_NAMESPACES, crds=crds)
        url = f"http://{args.host}:{http.port}"
        if args.kubeconfig:
            write_kubeconfig(Path(args.kubeconfig), url, token)
        if args.port_file:
            tmp = Path(args.port_file + ".tmp")
            tmp.write_text(json.dumps({"port": http.port, "pid": os.getpid()}))
            tmp.replace(args.port_file)
        logger.info("serving the Kubernetes API on %s (gitVersion %s)", url, args.git_version)
        await stop.wait()
        logger.info("stopping")
        server.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m support.kube_apiserver",
        description="An emulated Kubernetes API server (kmock) on 127.0.0.1. The bearer token"
                    " comes from $KUBE_EMULATOR_TOKEN (unset or empty: no authentication).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 (default): a free port")
    parser.add_argument("--port-file", help="write {port, pid} here once serving")
    parser.add_argument("--kubeconfig", help="write a kubeconfig for this server here")
    parser.add_argument("--git-version", default=DEFAULT_GIT_VERSION)
    parser.add_argument("--namespace", action="append", default=[],
                        help="namespace to create at start (repeatable; default:"
                             f" {', '.join(DEFAULT_NAMESPACES)})")
    parser.add_argument("--crd", action="append", default=[],
                        help="a CRD file to install at start (repeatable)")
    parser.add_argument("--bookmark-interval", type=float, default=30.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # we log each request
    asyncio.run(_serve(args, os.environ.get("KUBE_EMULATOR_TOKEN") or None))


if __name__ == "__main__":
    main()

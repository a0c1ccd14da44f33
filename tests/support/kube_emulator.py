"""The test harness for the emulated Kubernetes API server: start it, talk to it, run operators.

The server itself, :class:`support.kube_apiserver.ApiServer`, runs in a process of its own
(``python -m support.kube_apiserver``). :class:`KubeEmulator` starts that process in a test's
directory, writes a kubeconfig for it, and offers small HTTP helpers
(create/get/list/patch/delete/watch) and what the server saw (its ``/_emulator/`` endpoints);
:func:`wait_for` polls for a condition; :class:`OperatorProcess` runs the operator under test
(``kopf run`` or ``pluto operator``) against it.

This module talks to the server only over HTTP and imports from :mod:`support.kube_apiserver`
just the conventions both sides share: resource names, defaults, the kubeconfig. The resource
names (``PODS``, ``PLUTORUNS``, ...) are re-exported here, where tests import them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from support.processes import die_with_parent, tail, terminate

from .kube_apiserver import (
    CRDS,
    DEFAULT_GIT_VERSION,
    DEFAULT_NAMESPACES,
    EVENTS,
    JOBS,
    JOBSETS,
    NAMESPACES,
    PLUTORUNS,
    PODS,
    write_kubeconfig,
)
from .server_process import clean_env

__all__ = [
    "CRDS",
    "DEFAULT_GIT_VERSION",
    "EVENTS",
    "JOBS",
    "JOBSETS",
    "NAMESPACES",
    "PLUTORUNS",
    "PODS",
    "KubeApiError",
    "KubeEmulator",
    "KubeEmulatorStartError",
    "OperatorProcess",
    "WatchStream",
    "wait_for",
    "write_kubeconfig",
]

TESTS_DIR = Path(__file__).resolve().parent.parent


class KubeApiError(Exception):
    """A non-2xx answer from the API server, with its ``Status`` fields."""

    def __init__(self, status: int, reason: str, message: str, body: Any = None) -> None:
        super().__init__(f"HTTP {status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.body = body


class KubeEmulatorStartError(RuntimeError):
    """The emulator process exited or never reported its port; carries its log."""


T = TypeVar("T")


def wait_for(predicate: Callable[[], T | None], timeout: float = 10.0, *, interval: float = 0.05,
             message: str | Callable[[], str] = "",
             ignore: tuple[type[BaseException], ...] = (AssertionError,)) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Exceptions of the ``ignore`` types count as "not yet". On timeout, a ``TimeoutError``
    says what was awaited (``message`` if a string, else the predicate's name) and the last
    value or exception; a callable ``message`` is called then and its text appended (e.g. an
    operator's log).
    """
    deadline = time.monotonic() + timeout
    last: object = None
    error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except ignore as exc:
            error = exc
        else:
            if value:
                return value
            last, error = value, None
        if time.monotonic() >= deadline:
            what = message if isinstance(message, str) and message else getattr(
                predicate, "__name__", "condition")
            got = f"{type(error).__name__}: {error}" if error is not None else repr(last)
            detail = f"\n{message()}" if callable(message) else ""
            raise TimeoutError(
                f"{what}: not true within {timeout:g}s (last: {got}){detail}") from error
        time.sleep(interval)


def _split_resource(resource: str) -> tuple[str, str, str]:
    parts = resource.split("/")
    if len(parts) == 2:
        return "", parts[0], parts[1]
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    raise ValueError(f"resource must be 'group/version/plural' or 'v1/plural': {resource!r}")


class WatchStream:
    """An open watch; :meth:`next` reads one event, :meth:`take` several."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.iter_lines()

    def next(self) -> dict[str, Any]:
        """The next event; ``httpx.ReadTimeout`` if none arrives within the watch's timeout."""
        for line in self._lines:
            if line.strip():
                event: dict[str, Any] = json.loads(line)
                return event
        raise EOFError("the watch stream ended")

    def take(self, count: int, *, skip_bookmarks: bool = True) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        while len(events) < count:
            event = self.next()
            if not (skip_bookmarks and event["type"] == "BOOKMARK"):
                events.append(event)
        return events


class KubeEmulator:
    """The emulated API server in a subprocess, and a small client for tests.

    ``auth`` makes the server require a bearer token (random, written to the kubeconfig).
    The port is chosen by the server (it binds port 0) and reported through a file, so
    there is no race for it; everything listens on 127.0.0.1 only.
    """

    def __init__(self, directory: Path, *, git_version: str = DEFAULT_GIT_VERSION,
                 namespaces: Sequence[str] = DEFAULT_NAMESPACES, crds: Sequence[Path] = (),
                 auth: bool = True, bookmark_interval: float = 30.0,
                 startup_timeout: float = 15.0) -> None:
        self.directory = Path(directory)
        self.git_version = git_version
        self.namespaces = tuple(namespaces)
        self.crds = [Path(crd).resolve() for crd in crds]  # the server runs in ``directory``
        self.token = secrets.token_hex(16) if auth else None
        self.bookmark_interval = bookmark_interval
        self.startup_timeout = startup_timeout
        self.host = "127.0.0.1"
        self.port = 0
        self.kubeconfig = self.directory / "kubeconfig"
        self.log_path = self.directory / "kube-emulator.log"
        self._port_file = self.directory / "kube-emulator.port"
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None

    # -- process -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def env(self) -> dict[str, str]:
        """An environment for a subprocess that uses this server (``KUBECONFIG`` set).

        No ``PLUTO_*``/``MLOP_*`` from the test's environment, and no in-cluster service
        variables (kopf and the python client would prefer those over the kubeconfig).
        """
        env = clean_env()
        for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
            env.pop(name, None)
        env.update(KUBECONFIG=str(self.kubeconfig), NO_PROXY="127.0.0.1,localhost",
                   no_proxy="127.0.0.1,localhost", PYTHONUNBUFFERED="1")
        return env

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "support.kube_apiserver", "--host", self.host,
                "--port-file", str(self._port_file), "--git-version", self.git_version,
                "--bookmark-interval", str(self.bookmark_interval)]
        for namespace in self.namespaces:
            argv += ["--namespace", namespace]
        for crd in self.crds:
            argv += ["--crd", str(crd)]
        return argv

    def start(self) -> KubeEmulator:
        if self.running:
            raise RuntimeError(f"the emulator is already running (pid {self.pid})")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._port_file.unlink(missing_ok=True)
        env = clean_env()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR),
                                                          env.get("PYTHONPATH")]))
        env["KUBE_EMULATOR_TOKEN"] = self.token or ""
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.directory, env=env, start_new_session=True,
                preexec_fn=die_with_parent())
        deadline = time.monotonic() + self.startup_timeout
        while not self._port_file.exists():
            if not self.running or time.monotonic() > deadline:
                code = self._proc.poll()
                self.stop()
                what = (f"exited with code {code}" if code is not None
                        else f"did not start within {self.startup_timeout:g}s")
                raise KubeEmulatorStartError(
                    f"the emulator {what}\ncommand: {' '.join(self.argv())}\n"
                    f"log:\n{self.logs(limit=6000)}")
            time.sleep(0.01)
        self.port = int(json.loads(self._port_file.read_text())["port"])
        write_kubeconfig(self.kubeconfig, self.url, self.token)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._client = httpx.Client(base_url=self.url, headers=headers, trust_env=False,
                                    timeout=10.0)
        return self

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the emulator (its own pid only), SIGKILL after ``timeout``."""
        if self._client is not None:
            self._client.close()
            self._client = None
        return terminate(self._proc, timeout) if self._proc is not None else None

    def logs(self, limit: int = 20000) -> str:
        return tail(self.log_path, limit)

    def __enter__(self) -> KubeEmulator:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<KubeEmulator {self.url} pid {self.pid}>"

    # -- HTTP --------------------------------------------------------------------------

    @property
    def client(self) -> httpx.Client:
        """An httpx client with the base URL and the token set."""
        if self._client is None:
            raise RuntimeError("the emulator is not started")
        return self._client

    @staticmethod
    def path(resource: str, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        group, version, plural = _split_resource(resource)
        parts = ["api", version] if not group else ["apis", group, version]
        if namespace is not None:
            parts += ["namespaces", namespace]
        parts += [plural, *([name] if name else []), *([subresource] if subresource else [])]
        return "/" + "/".join(parts)

    def request(self, method: str, path: str, *, json_body: Any = None,
                params: Mapping[str, str] | None = None,
                content_type: str | None = None) -> Any:
        """One API call; the decoded JSON answer, or :class:`KubeApiError`."""
        headers = {"Content-Type": content_type} if content_type else {}
        content = None if json_body is None else json.dumps(json_body).encode()
        response = self.client.request(method, path, content=content, params=params,
                                       headers=headers)
        try:
            data = response.json()
        except ValueError:
            data = response.text
        if response.status_code >= 400:
            status = data if isinstance(data, dict) else {}
            raise KubeApiError(response.status_code, str(status.get("reason", "")),
                               str(status.get("message", data)), data)
        return data

    def create(self, resource: str, body: Mapping[str, Any], *,
               namespace: str | None = None) -> dict[str, Any]:
        namespace = namespace or body.get("metadata", {}).get("namespace")
        result: dict[str, Any] = self.request("POST", self.path(resource, namespace),
                                              json_body=body, content_type="application/json")
        return result

    def get(self, resource: str, name: str, *, namespace: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", self.path(resource, namespace, name))
        return result

    def find(self, resource: str, name: str, *,
             namespace: str | None = None) -> dict[str, Any] | None:
        """Like :meth:`get`, but None when there is no such object."""
        try:
            return self.get(resource, name, namespace=namespace)
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list_objects(self, resource: str, *, namespace: str | None = None,
             label_selector: str | None = None,
             field_selector: str | None = None) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("labelSelector", label_selector),
                                    ("fieldSelector", field_selector)) if v is not None}
        result: dict[str, Any] = self.request("GET", self.path(resource, namespace),
                                              params=params)
        items: list[dict[str, Any]] = result["items"]
        return items

    def patch(self, resource: str, name: str, patch: Any, *, namespace: str | None = None,
              subresource: str | None = None, patch_type: str = "merge") -> dict[str, Any]:
        """``patch_type``: ``merge``, ``json`` (a list of operations) or ``strategic``."""
        content_type = {"merge": "application/merge-patch+json",
                        "json": "application/json-patch+json",
                        "strategic": "application/strategic-merge-patch+json"}[patch_type]
        result: dict[str, Any] = self.request(
            "PATCH", self.path(resource, namespace, name, subresource), json_body=patch,
            content_type=content_type)
        return result

    def delete(self, resource: str, name: str, *, namespace: str | None = None,
               options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "DELETE", self.path(resource, namespace, name), json_body=options,
            content_type="application/json" if options is not None else None)
        return result

    def version(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/version")
        return result

    @contextlib.contextmanager
    def watch(self, resource: str, *, namespace: str | None = None,
              resource_version: str | None = None, label_selector: str | None = None,
              timeout: float = 5.0, **params: str) -> Iterator[WatchStream]:
        """A watch stream; reading waits at most ``timeout`` seconds for each event."""
        query = {"watch": "true", **params}
        if resource_version is not None:
            query["resourceVersion"] = resource_version
        if label_selector is not None:
            query["labelSelector"] = label_selector
        with self.client.stream("GET", self.path(resource, namespace), params=query,
                                timeout=httpx.Timeout(timeout)) as response:
            if response.status_code >= 400:
                response.read()
                raise KubeApiError(response.status_code, "", response.text, response.text)
            yield WatchStream(response)

    # -- what the server saw -----------------------------------------------------------

    def requests_log(self) -> list[dict[str, Any]]:
        """Every API request served so far: method, path, query, contentType, status, data."""
        result: list[dict[str, Any]] = self.request("GET", "/_emulator/requests")
        return result

    def changes(self) -> list[dict[str, Any]]:
        """Every committed write, in order: resourceVersion, type, resource, name, object."""
        result: list[dict[str, Any]] = self.request("GET", "/_emulator/changes")
        return result

    def watches(self) -> list[dict[str, Any]]:
        """The watch streams open now: resource, namespace, query."""
        result: list[dict[str, Any]] = self.request("GET", "/_emulator/watches")
        return result

    def wait_watching(self, resource: str, *, namespace: str | None = None,
                      timeout: float = 15.0) -> None:
        """Wait until some client (an operator) watches ``resource``."""
        group, version, plural = _split_resource(resource)
        wanted = f"{group + '/' if group else ''}{version}/{plural}"
        wait_for(lambda: any(w["resource"] == wanted and w["namespace"] == namespace
                             for w in self.watches()),
                 timeout, message=f"nobody watches {wanted}")


class OperatorProcess:
    """An operator (``kopf run ...``, ``pluto operator ...``) in a subprocess.

    Its stdout and stderr go to ``log_path``; :meth:`tracebacks` finds the Python
    tracebacks in it. :meth:`stop` sends SIGTERM to this process only.
    """

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str], log_path: Path,
                 cwd: Path | None = None) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self.cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def start(self) -> OperatorProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.cwd, env=self.env, start_new_session=True,
                preexec_fn=die_with_parent())
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        return terminate(self._proc, timeout) if self._proc is not None else None

    def logs(self, limit: int = 20000) -> str:
        return tail(self.log_path, limit)

    def wait_ready(self, health_url: str, timeout: float) -> None:
        """Wait until its ``/readyz`` (at ``health_url``) answers 200; the log on timeout."""

        def ready() -> bool:
            assert self.running, self.logs()
            try:
                return httpx.get(health_url + "/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout, message=self.logs)

    def tracebacks(self) -> list[str]:
        """Each ``Traceback (most recent call last)`` block in the log."""
        blocks = re.split(r"(?=Traceback \(most recent call last\))", self.logs(limit=10**7))
        return [block[:3000] for block in blocks[1:]]

    def __enter__(self) -> OperatorProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


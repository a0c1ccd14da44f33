"""A local kubelet: runs a pod spec's containers as processes on this machine.

Why: the operator's webhook rewrites pod specs, and what matters is whether the *rewritten*
pod works: does the sidecar start before the ranks, do they find its socket, does the
sidecar get SIGTERM and drain once training ends. A unit test of the patch cannot say; a
real cluster is too heavy for a test suite. This module does what the kubelet does with a
pod spec, with processes instead of containers, so that a test can feed it any mutated pod
(hand-written or the webhook's real output) and check the outcome::

    result = run_pod(pod, workdir=tmp_path / "pod", secrets={"pluto-api-key": {...}})
    assert result.phase == "Succeeded", result.describe()

What it does, as the kubelet does it
------------------------------------
* **Env**: ``envFrom`` (configMapRef/secretRef, prefix), then ``env`` in order: ``value``
  with ``$(VAR)`` expansion of the variables defined before it (``$$`` escapes, an
  undefined reference stays literal), ``valueFrom`` ``fieldRef`` (metadata.name/namespace/
  uid/labels['k']/annotations['k'], spec.nodeName, spec.serviceAccountName, status.podIP
  and status.hostIP = 127.0.0.1), ``secretKeyRef``/``configMapKeyRef`` (``optional: true``
  and missing: unset; missing otherwise: :class:`CreateContainerConfigError`), and
  ``resourceFieldRef`` (best effort: a missing limit reads as this machine's capacity).
  ``command`` and ``args`` get ``$(VAR)`` expansion against the container's final env.
* **Start order**: ``initContainers`` in order. A regular init container runs to completion
  (non-zero: the pod fails, ``Init:Error``). A native sidecar (``restartPolicy: Always``)
  is started; with a ``startupProbe`` the next container waits until it passes, without
  one only until the process (and its ``postStart`` hook) started. Then every regular
  container starts. A native sidecar that exits while the pod runs is restarted with the
  kubelet's doubling back-off (scaled by ``time_scale``).
* **Probes**: ``httpGet`` (127.0.0.1 unless ``host`` says otherwise, port number or named
  ``containerPort``, HTTP or HTTPS without verification, 200-399 passes), ``tcpSocket``,
  ``exec`` (in the container's env). Startup gates readiness and liveness; a failed
  startup or liveness probe kills the container (restarted if it is a native sidecar).
  Readiness transitions are recorded per container.
* **Termination**: once every regular container has exited, native sidecars get SIGTERM
  one by one in reverse order (``preStop`` first), sharing one
  ``terminationGracePeriodSeconds`` (default 30) deadline (but at least 2 s each, as the
  kubelet's minimum), then SIGKILL. SIGTERM goes to
  the container's main process only (as the runtime signals PID 1); SIGKILL, and the
  clean-up after a main process exits, go to its whole process group (as a runtime tears
  down the container). Phase: ``Succeeded`` when every regular container exited 0, else
  ``Failed``; native sidecars' exit codes do not count.

Deviations from a real kubelet (each with why)
----------------------------------------------
* **Mounts are rewritten, not mounted.** Processes share this host's filesystem, so a
  container cannot see a volume at its ``mountPath``. Instead every occurrence of a
  container's ``mountPath`` (as a whole path prefix: ``/var/run/pluto`` matches
  ``/var/run/pluto/pluto.sock``, not ``/var/run/plutonium``) in its env *values*,
  ``command``, ``args``, ``workingDir``, and exec probe/hook commands is replaced by the
  volume's directory under ``workdir``. Values that come from Secrets, ConfigMaps or the
  downward API are left alone (they are data, not spec). A path the program builds itself
  from a default (never written in the spec) is *not* redirected: the product must be
  configured through the spec, which is what this is meant to check. ``readOnly`` is not
  enforced. Volumes: ``emptyDir`` (a fresh directory), ``secret`` and ``configMap`` (files
  written from the given mappings); anything else is a :class:`PodSpecError`.
* **Ports are remapped.** Containers of all pods here share one network namespace (this
  host), so a fixed port such as the sidecar's 7301 could collide with another test.
  ``port_remap="auto"`` (default) gives every declared ``containerPort`` that appears in
  the pod's spec strings a free local port, and rewrites that number (as a whole token:
  ``7301`` in ``--health-port=7301`` or ``http://127.0.0.1:7301/x``, not in ``17301``)
  in *every* container's env values, command, args and in the probes. Pod-wide, because a
  pod's containers share localhost: ``localhost:7301`` in the app means the sidecar. A
  declared port that appears nowhere (the program listens on it by default) cannot be
  moved and is kept; :attr:`PodResult.port_map` shows the outcome. A mapping gives the
  numbers explicitly; ``None`` turns remapping off.
* **0.0.0.0 becomes 127.0.0.1** (``loopback_only=True``, default) in the same strings: in
  a pod, 0.0.0.0 means the pod's own network namespace; here it would mean every interface
  of the developer's machine, and the test servers listen on loopback only.
* **No image**: every container runs from this checkout and its virtualenv (``python``,
  ``pluto``, ``torchrun`` resolve to the venv's ``bin``), in ``workingDir`` or else
  ``image_workdir`` (default: the repository root). There is no image to read an
  ``ENTRYPOINT`` from: a container without ``command`` takes it from ``image_commands``
  (image name without tag -> command, e.g. ``{"ghcr.io/pluto-dev/pluto": ["pluto"]}``),
  else it is a :class:`PodSpecError`. The process env is a minimal
  base (``PATH`` with the venv first, ``HOME`` under ``workdir``, ``HOSTNAME``), then
  ``node_env`` (what an image's ``ENV`` would give), then the container's own env.
* **Restart policies**: the pod's ``restartPolicy`` must be ``Never`` or ``OnFailure``
  (``Always``, the API default, never completes). ``OnFailure`` is treated as ``Never``:
  a failed regular container fails the pod instead of being restarted in place.
  Restarting native sidecars is supported, up to ``max_restarts`` times, after which
  :class:`CrashLoopBackOff` is raised (a real kubelet would back off forever).
* **A pod that never completes** (a classic sidecar, a regular container that outlives
  the others by ``stuck_after`` seconds) is reported rather than waited for: phase
  ``Running``, :attr:`PodResult.stuck_containers`, then those containers are stopped.
* **Timing**: probe periods, initial delays and restart back-off are multiplied by
  ``time_scale`` (default 0.1) so tests stay quick; probe timeouts and the termination
  grace period are *not* scaled, because the program under test sizes its own shutdown
  (e.g. the sidecar's ``--drain-seconds``) to the real grace period.
* Not supported: grpc probes, ``hostPath``/PVC/projected volumes, ``activeDeadlineSeconds``,
  resource limits (not enforced), service env vars (``FOO_SERVICE_HOST``).

Processes run in their own process groups and get ``PR_SET_PDEATHSIG``: if the test
process dies they go too. That signal is tied to the *thread* that started them, so call
:meth:`LocalKubelet.run` from a thread that outlives the pod (the main thread in a test).
This module is longer than most because it is one concept (the kubelet's pod lifecycle)
whose parts (env, volumes, probes, ordering, termination) only make sense together.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import httpx

from .postgres import free_port

__all__ = [
    "DEFAULT_NODE_ENV",
    "VENV_BIN",
    "ContainerResult",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "LocalKubelet",
    "PodError",
    "PodResult",
    "PodSpecError",
    "PodTimeout",
    "expand",
    "run_pod",
]

ROOT = Path(__file__).resolve().parents[2]
#: The venv running the tests: its bin directory stands in for every image's PATH.
VENV_BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
#: What an image's ``ENV`` would give every container: prompt logs, modest CPU use.
DEFAULT_NODE_ENV: Mapping[str, str] = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

Kind = Literal["init", "sidecar", "container"]
Phase = Literal["Succeeded", "Failed", "Running"]
_PR_SET_PDEATHSIG = 1
_POLL = 0.02
_MIN_GRACE = 2.0  # the kubelet's minimumGracePeriodInSeconds
_BACKOFF_BASE, _BACKOFF_MAX = 10.0, 300.0  # the kubelet's crash-loop back-off, seconds


# -- errors ---------------------------------------------------------------------------


class PodError(RuntimeError):
    """The pod could not be run to an outcome; ``result`` holds what happened so far."""

    def __init__(self, message: str, result: PodResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class PodSpecError(PodError):
    """The spec asks for something this local kubelet cannot do (or is invalid)."""


class CreateContainerConfigError(PodError):
    """A non-optional Secret/ConfigMap key is missing (the kubelet's container state)."""


class CrashLoopBackOff(PodError):
    """A native sidecar kept dying (or failing its startup probe) past ``max_restarts``."""


class PodTimeout(PodError):
    """The pod did not finish within the timeout; everything was killed."""


# -- results --------------------------------------------------------------------------


@dataclass
class ContainerResult:
    """One container's life. Times are wall-clock (``time.time()``) seconds."""

    name: str
    kind: Kind
    stdout_path: Path
    stderr_path: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    started_at: float | None = None
    #: When the startup probe passed (or, without one, when the process started).
    startup_passed_at: float | None = None
    finished_at: float | None = None
    #: As a container runtime reports it: a signal N reads as 128 + N.
    exit_code: int | None = None
    #: ``Completed``, ``Error``, ``StartError`` (could not exec) or ``Killed`` (by the kubelet).
    reason: str | None = None
    restarts: int = 0
    #: Process ids of the container's main process, one per start.
    pids: list[int] = field(default_factory=list)
    #: Signals the kubelet sent, in order: ``"SIGTERM"``, ``"SIGKILL"``.
    signals: list[str] = field(default_factory=list)
    #: ``(time, ready)`` each time readiness changed; starts not ready.
    readiness: list[tuple[float, bool]] = field(default_factory=list)

    def stdout(self) -> str:
        return _read(self.stdout_path)

    def stderr(self) -> str:
        return _read(self.stderr_path)

    @property
    def ready(self) -> bool:
        return bool(self.readiness) and self.readiness[-1][1]

    def describe(self, tail: int = 3000) -> str:
        head = (f"[{self.kind}] {self.name}: exit {self.exit_code} ({self.reason}), "
                f"restarts {self.restarts}, signals {self.signals}\n  argv: {self.argv}")
        return (f"{head}\n  --- stdout\n{self.stdout()[-tail:]}"
                f"\n  --- stderr\n{self.stderr()[-tail:]}")


@dataclass
class PodResult:
    name: str
    phase: Phase
    #: ``Init:Error``, ``Error`` (a regular container failed), ``NeverCompletes`` ... or None.
    reason: str | None
    containers: dict[str, ContainerResult]
    volumes: dict[str, Path]
    #: declared containerPort -> the local port its container got (identity: not moved).
    port_map: dict[int, int]
    #: Regular containers still running ``stuck_after`` s after the others exited.
    stuck_containers: list[str] = field(default_factory=list)
    started_at: float = 0.0
    finished_at: float = 0.0

    def __getitem__(self, name: str) -> ContainerResult:
        return self.containers[name]

    def describe(self, tail: int = 3000) -> str:
        """Status and log tails of every container, for assertion messages."""
        lines = [f"pod {self.name}: {self.phase} ({self.reason}); stuck: {self.stuck_containers}"]
        lines += [c.describe(tail) for c in self.containers.values()]
        return "\n".join(lines)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


# -- spec strings: $(VAR), mounts, ports --------------------------------------------


def expand(template: str, defined: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: ``$$`` is a literal ``$`` (so ``$$(A)`` stays
    ``$(A)``), an undefined or unterminated reference stays as written, and any other
    ``$x`` is left alone."""
    out: list[str] = []
    i, n = 0, len(template)
    while i < n:
        if template[i] != "$" or i + 1 == n:
            out.append(template[i])
            i += 1
            continue
        nxt = template[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(" and (close := template.find(")", i + 2)) != -1:
            name = template[i + 2:close]
            out.append(defined.get(name, f"$({name})"))
            i = close + 1
        else:
            out.append("$" + nxt)
            i += 2
    return "".join(out)


def _token_rewriter(replacements: Mapping[str, str], *, boundary: str) -> Callable[[str], str]:
    """Replaces each key where it stands as a whole token (not preceded or followed by a
    character of ``boundary``); longer keys win, so nested mount paths resolve right."""
    if not replacements:
        return lambda s: s
    alternatives = "|".join(re.escape(k) for k in sorted(replacements, key=len, reverse=True))
    pattern = re.compile(f"(?<![{boundary}])({alternatives})(?![{boundary}])")
    return lambda s: pattern.sub(lambda m: replacements[m.group(1)], s)


_PATH_CHARS = r"\w.\-"  # a mount path ends where the path segment ends
_NUMBER_CHARS = r"\w."  # 7301 is a port in ":7301/" or "=7301", not in "17301" or "1.7301"


# -- resource quantities (for resourceFieldRef) --------------------------------------

_SUFFIXES = {
    "": Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
    "k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12, "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40, "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
}


def _quantity(text: str | int | float) -> Decimal:
    match = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)", str(text).strip())
    if match is None or match.group(2) not in _SUFFIXES:
        raise PodSpecError(f"not a resource quantity: {text!r}")
    return Decimal(match.group(1)) * _SUFFIXES[match.group(2)]


def _node_capacity(resource: str) -> Decimal:
    if resource == "cpu":
        return Decimal(os.cpu_count() or 1)
    if resource == "memory":
        return Decimal(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return Decimal(2) ** 40  # ephemeral-storage: "plenty"


# -- processes -------------------------------------------------------------------------


def _load_prctl() -> Callable[..., int] | None:
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


# Looked up once, here: the child between fork and exec must not dlopen() anything while
# probe threads of the parent may hold loader locks.
_PRCTL = _load_prctl()


def _die_with_parent() -> None:
    # If pytest dies without cleaning up, the pod's processes must not outlive it.
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def _image_name(image: str) -> str:
    """``registry:5000/repo/name:tag@sha256:...`` -> ``registry:5000/repo/name``."""
    image = image.split("@", 1)[0]
    head, _, tag = image.rpartition(":")
    return head if head and "/" not in tag else image


def _runtime_exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class _Handler:
    """A probe or lifecycle-hook action (httpGet, tcpSocket, exec, sleep), resolved."""

    def __init__(self, spec: Mapping[str, Any], *, what: str, port_of: Callable[[Any], int],
                 command_of: Callable[[list[str]], list[str]], env: Mapping[str, str],
                 cwd: Path) -> None:
        self.what = what
        self._env, self._cwd = env, cwd
        self._check: Callable[[float], bool]
        if "httpGet" in spec:
            get = spec["httpGet"]
            scheme = str(get.get("scheme", "HTTP")).lower()
            host = get.get("host") or LOOPBACK
            path = get.get("path", "/")
            headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
            self.url = f"{scheme}://{host}:{port_of(get['port'])}{path}"
            self._check = lambda timeout: self._http(headers, timeout)
        elif "tcpSocket" in spec:
            tcp = spec["tcpSocket"]
            address = (tcp.get("host") or LOOPBACK, port_of(tcp["port"]))
            self._check = lambda timeout: self._tcp(address, timeout)
        elif "exec" in spec:
            argv = command_of(list(spec["exec"].get("command", [])))
            if not argv:
                raise PodSpecError(f"{what}: exec needs a command")
            self._check = lambda timeout: self._exec(argv, timeout)
        elif "sleep" in spec:
            seconds = float(spec["sleep"]["seconds"])
            self._check = lambda timeout: self._sleep(seconds, timeout)
        else:
            raise PodSpecError(f"{what}: only httpGet, tcpSocket, exec and sleep are supported, "
                               f"got {sorted(spec)}")

    def __call__(self, timeout: float) -> bool:
        return self._check(timeout)

    def _http(self, headers: Mapping[str, str], timeout: float) -> bool:
        try:  # the kubelet does not verify probe certificates
            status = httpx.get(self.url, headers=headers, timeout=timeout, verify=False).status_code
        except httpx.HTTPError:
            return False
        return 200 <= status < 400

    @staticmethod
    def _tcp(address: tuple[str, int], timeout: float) -> bool:
        try:
            socket.create_connection(address, timeout=timeout).close()
        except OSError:
            return False
        return True

    @staticmethod
    def _sleep(seconds: float, timeout: float) -> bool:
        time.sleep(min(seconds, timeout))
        return True

    def _exec(self, argv: list[str], timeout: float) -> bool:
        try:
            done = subprocess.run(argv, env=dict(self._env), cwd=self._cwd, timeout=timeout,
                                  stdin=subprocess.DEVNULL, capture_output=True, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0


ProbeKind = Literal["startup", "readiness", "liveness"]
_PROBE_KINDS: tuple[ProbeKind, ...] = ("startup", "readiness", "liveness")


@dataclass
class _Probe:
    kind: ProbeKind
    check: _Handler
    initial_delay: float
    period: float
    timeout: float
    success_threshold: int
    failure_threshold: int


class _Container:
    """One container of the pod, across its restarts."""

    def __init__(self, spec: Mapping[str, Any], kind: Kind, result: ContainerResult) -> None:
        self.spec = spec
        self.kind = kind
        self.name = result.name
        self.result = result
        self.proc: subprocess.Popen[bytes] | None = None
        self.resolved = False
        self.start_error = False  # the command could not be exec'd
        self.probes: list[_Probe] = []
        self.post_start: _Handler | None = None
        self.pre_stop: _Handler | None = None
        self.started = threading.Event()  # startup probe passed (or none)
        self.startup_failed = threading.Event()
        self.liveness_failed = threading.Event()
        self._stop_probes = threading.Event()
        self._prober: threading.Thread | None = None
        self.restart_at: float | None = None  # monotonic time of a pending restart

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start_probes(self) -> None:
        self.started.clear()
        self.startup_failed.clear()
        self.liveness_failed.clear()
        self._stop_probes = threading.Event()
        self.set_ready(False)
        if not any(p.kind == "startup" for p in self.probes):
            self.result.startup_passed_at = time.time()
            self.started.set()
            if not any(p.kind == "readiness" for p in self.probes):
                self.set_ready(True)  # no readiness probe: ready once started
        if self.probes:
            self._prober = threading.Thread(target=self._probe_loop, args=(self._stop_probes,),
                                            name=f"probe-{self.name}", daemon=True)
            self._prober.start()

    def stop_probes(self) -> None:
        self._stop_probes.set()
        if self._prober is not None and self._prober is not threading.current_thread():
            self._prober.join(timeout=10)
        self._prober = None

    def set_ready(self, ready: bool) -> None:
        if not self.result.readiness or self.result.readiness[-1][1] != ready:
            self.result.readiness.append((time.time(), ready))

    def _probe_loop(self, stop: threading.Event) -> None:
        """Startup first; readiness and liveness only once it passed, each on its period."""
        began = time.monotonic()
        due = {id(p): began + p.initial_delay for p in self.probes}
        ok_streak = {id(p): 0 for p in self.probes}
        bad_streak = {id(p): 0 for p in self.probes}
        while not stop.is_set():
            active = [p for p in self.probes if (p.kind == "startup") != self.started.is_set()]
            if not active:
                return
            probe = min(active, key=lambda p: due[id(p)])
            if stop.wait(max(0.0, due[id(probe)] - time.monotonic())):
                return
            passed = probe.check(probe.timeout)
            if stop.is_set():
                return
            due[id(probe)] = time.monotonic() + probe.period
            if passed:
                ok_streak[id(probe)] += 1
                bad_streak[id(probe)] = 0
            else:
                bad_streak[id(probe)] += 1
                ok_streak[id(probe)] = 0
            if probe.kind == "startup":
                if passed:
                    self.result.startup_passed_at = time.time()
                    self.started.set()
                    started = time.monotonic()
                    for other in self.probes:  # their initial delays count from now
                        due[id(other)] = started + other.initial_delay
                    if not any(p.kind == "readiness" for p in self.probes):
                        self.set_ready(True)
                elif bad_streak[id(probe)] >= probe.failure_threshold:
                    self.startup_failed.set()
                    return
            elif probe.kind == "readiness":
                if ok_streak[id(probe)] >= probe.success_threshold:
                    self.set_ready(True)
                elif bad_streak[id(probe)] >= probe.failure_threshold:
                    self.set_ready(False)
            elif bad_streak[id(probe)] >= probe.failure_threshold:
                self.liveness_failed.set()
                return


# -- the kubelet -------------------------------------------------------------------------


class LocalKubelet:
    """Runs one pod spec (a ``Pod`` manifest as a dict) to an outcome; see the module doc.

    Construction validates the spec, creates the volumes under ``workdir`` and picks the
    local ports (:attr:`port_map`, :attr:`volumes`), so a test can know them before
    :meth:`run`. One instance runs its pod once.
    """

    def __init__(
        self,
        pod: Mapping[str, Any],
        *,
        workdir: Path,
        secrets: Mapping[str, Mapping[str, str]] | None = None,
        config_maps: Mapping[str, Mapping[str, str]] | None = None,
        node_env: Mapping[str, str] = DEFAULT_NODE_ENV,
        node_name: str = "local-node",
        image_workdir: Path = ROOT,
        image_commands: Mapping[str, Sequence[str]] | None = None,
        port_remap: Mapping[int, int] | Literal["auto"] | None = "auto",
        loopback_only: bool = True,
        time_scale: float = 0.1,
        stuck_after: float | None = 3.0,
        max_restarts: int = 5,
    ) -> None:
        self.pod: dict[str, Any] = copy.deepcopy(dict(pod))
        self.workdir = Path(workdir)
        self.secrets = secrets or {}
        self.config_maps = config_maps or {}
        self.node_env = dict(node_env)
        self.node_name = node_name
        self.image_workdir = Path(image_workdir)
        self.loopback_only = loopback_only
        self.time_scale = time_scale
        self.stuck_after = stuck_after
        self.max_restarts = max_restarts

        meta = self.pod.setdefault("metadata", {})
        # What the API server fills in before a kubelet ever sees the pod.
        if not meta.get("name"):
            meta["name"] = f"{meta.get('generateName', 'pod-')}{uuid.uuid4().hex[:5]}"
        meta.setdefault("namespace", "default")
        meta.setdefault("uid", str(uuid.uuid4()))
        self.spec: dict[str, Any] = self.pod.setdefault("spec", {})
        self.name: str = meta["name"]
        policy = self.spec.get("restartPolicy", "Always")
        if policy not in ("Never", "OnFailure"):
            raise PodSpecError(
                f"pod {self.name}: restartPolicy {policy!r} never completes; a pod run to an "
                "outcome needs restartPolicy Never or OnFailure (as Job pods have)")
        self.grace = float(self.spec.get("terminationGracePeriodSeconds", 30))

        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        self.home = self.workdir / "home"
        self.home.mkdir(exist_ok=True)
        self.volumes: dict[str, Path] = {}
        self._make_volumes()
        self.port_map: dict[int, int] = self._plan_ports(port_remap)

        self._containers: list[_Container] = []
        seen: set[str] = set()
        for kind_key in ("initContainers", "containers"):
            for spec in self.spec.get(kind_key, []) or []:
                name = spec.get("name")
                if not name or name in seen:
                    raise PodSpecError(f"pod {self.name}: container name {name!r} missing or "
                                       "not unique")
                seen.add(name)
                kind: Kind = "container"
                if kind_key == "initContainers":
                    kind = "sidecar" if spec.get("restartPolicy") == "Always" else "init"
                if not spec.get("command"):
                    image = _image_name(str(spec.get("image", "")))
                    if image not in (image_commands or {}):
                        raise PodSpecError(
                            f"container {name!r} has no command: with no image there is no "
                            f"entrypoint to fall back on; give it a command or pass "
                            f"image_commands={{{image!r}: [...]}}")
                    spec["command"] = list((image_commands or {})[image])
                logs = self.workdir / "logs"
                result = ContainerResult(name, kind, logs / f"{name}.stdout",
                                         logs / f"{name}.stderr")
                self._containers.append(_Container(spec, kind, result))
        if not any(c.kind == "container" for c in self._containers):
            raise PodSpecError(f"pod {self.name} has no containers")
        self._deadline = math.inf
        self._ran = False

    # -- volumes and ports ----------------------------------------------------------

    def _make_volumes(self) -> None:
        root = self.workdir / "vol"  # short: Unix socket paths must stay under 108 bytes
        for volume in self.spec.get("volumes", []) or []:
            name = volume["name"]
            kinds = sorted(set(volume) - {"name"})
            path = root / name
            if "emptyDir" in volume:
                path.mkdir(parents=True)
            elif "secret" in volume:
                src = volume["secret"]
                self._project(path, name, "Secret", src.get("secretName", ""), src, self.secrets)
            elif "configMap" in volume:
                src = volume["configMap"]
                self._project(path, name, "ConfigMap", src.get("name", ""), src, self.config_maps)
            else:
                raise PodSpecError(
                    f"volume {name!r} is {kinds}: the local kubelet supports emptyDir, secret "
                    "and configMap volumes only")
            self.volumes[name] = path

    def _project(self, path: Path, volume: str, what: str, source: str,
                 spec: Mapping[str, Any], store: Mapping[str, Mapping[str, str]]) -> None:
        path.mkdir(parents=True)
        data = store.get(source)
        if data is None:
            if spec.get("optional"):
                return
            raise CreateContainerConfigError(
                f"volume {volume!r}: {what} {source!r} not found (the pod would stay "
                "ContainerCreating with FailedMount)")
        items = spec.get("items") or [{"key": k, "path": k} for k in data]
        mode = int(spec.get("defaultMode", 0o644))
        for item in items:
            if item["key"] not in data:
                if spec.get("optional"):
                    continue
                raise CreateContainerConfigError(
                    f"volume {volume!r}: {what} {source!r} has no key {item['key']!r}")
            target = path / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(data[item["key"]])
            target.chmod(int(item.get("mode", mode)))

    def _spec_strings(self) -> list[str]:
        """Every string of the spec this kubelet rewrites (to see which ports it names)."""
        out: list[str] = []
        for key in ("initContainers", "containers"):
            for c in self.spec.get(key, []) or []:
                out += [str(x) for x in [*(c.get("command") or []), *(c.get("args") or [])]]
                out += [str(e["value"]) for e in c.get("env", []) or [] if "value" in e]
        return out

    def _plan_ports(self, remap: Mapping[int, int] | Literal["auto"] | None) -> dict[int, int]:
        declared = {int(p["containerPort"]) for key in ("initContainers", "containers")
                    for c in self.spec.get(key, []) or [] for p in c.get("ports", []) or []}
        if remap is None:
            return {p: p for p in declared}
        if remap != "auto":
            return {**{p: p for p in declared}, **{int(k): int(v) for k, v in remap.items()}}
        text = "\n".join(self._spec_strings())
        planned: dict[int, int] = {}
        for port in sorted(declared):
            named = re.search(f"(?<![{_NUMBER_CHARS}]){port}(?![{_NUMBER_CHARS}])", text)
            planned[port] = free_port() if named else port
        return planned

    # -- resolving a container ---------------------------------------------------------

    def _literal_rewriter(self, container: _Container) -> Callable[[str], str]:
        """Port and loopback rewrites first, then mounts: a host path inserted by the mount
        rewrite may contain digits (``pytest-7301``) that must not be taken for a port."""
        ports = {str(k): str(v) for k, v in self.port_map.items() if k != v}
        by_port = _token_rewriter(ports, boundary=_NUMBER_CHARS)
        hosts = {"0.0.0.0": LOOPBACK} if self.loopback_only else {}
        by_host = _token_rewriter(hosts, boundary=_NUMBER_CHARS)
        by_mount = _token_rewriter(self._mounts(container), boundary=_PATH_CHARS)
        return lambda s: by_mount(by_host(by_port(s)))

    def _mounts(self, container: _Container) -> dict[str, str]:
        mounts: dict[str, str] = {}
        for mount in container.spec.get("volumeMounts", []) or []:
            volume = mount["name"]
            if volume not in self.volumes:
                raise PodSpecError(f"container {container.name!r} mounts {volume!r}, which is "
                                   "not a volume of the pod")
            where = str(mount["mountPath"]).rstrip("/")
            if not where:
                raise PodSpecError(f"container {container.name!r}: cannot mount over /")
            host = self.volumes[volume]
            if mount.get("subPath"):
                host = host / mount["subPath"]
                host.mkdir(parents=True, exist_ok=True)  # the kubelet creates subPaths
            mounts[where] = str(host)
        return mounts

    def _field(self, path: str) -> str:
        meta = self.pod["metadata"]
        simple = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": self.spec.get("nodeName") or self.node_name,
            "spec.serviceAccountName": self.spec.get("serviceAccountName", "default"),
            "status.podIP": LOOPBACK,
            "status.podIPs": LOOPBACK,
            "status.hostIP": LOOPBACK,
            "status.hostIPs": LOOPBACK,
        }
        if path in simple:
            return str(simple[path])
        match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path)
        if match:  # a missing label or annotation reads as "" (as the kubelet does)
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        raise PodSpecError(f"fieldRef {path!r} is not supported by the downward API here")

    def _resource(self, container: _Container, ref: Mapping[str, Any]) -> str:
        target = container.spec
        if ref.get("containerName"):
            target = next((c.spec for c in self._containers
                           if c.name == ref["containerName"]), target)
        kind, _, resource = str(ref["resource"]).partition(".")
        resources = target.get("resources") or {}
        limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
        if kind == "limits":
            amount = (_quantity(limits[resource]) if resource in limits
                      else _node_capacity(resource))
        else:
            amount = _quantity(requests.get(resource, limits.get(resource, 0)))
        divisor = _quantity(ref.get("divisor", 1))
        return str(math.ceil(amount / divisor))

    def _key_ref(self, container: _Container, var: str, what: str,
                 ref: Mapping[str, Any], store: Mapping[str, Mapping[str, str]]) -> str | None:
        data = store.get(ref.get("name", ""))
        if data is not None and ref["key"] in data:
            return data[ref["key"]]
        if ref.get("optional"):
            return None
        missing = (f"{what} {ref.get('name')!r} not found" if data is None
                   else f"couldn't find key {ref['key']!r} in {what} {ref.get('name')!r}")
        raise CreateContainerConfigError(
            f"container {container.name!r}, env {var}: {missing} (the kubelet would leave the "
            "container waiting with CreateContainerConfigError)")

    def _resolve(self, container: _Container) -> None:
        """argv, env and cwd, as the kubelet computes them when it creates the container."""
        spec = container.spec
        literal = self._literal_rewriter(container)
        env: dict[str, str] = {}
        for source in spec.get("envFrom", []) or []:
            prefix = source.get("prefix", "")
            for what, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if key not in source:
                    continue
                ref = source[key]
                store = self.config_maps if what == "ConfigMap" else self.secrets
                data = store.get(ref.get("name", ""))
                if data is None and not ref.get("optional"):
                    raise CreateContainerConfigError(
                        f"container {container.name!r}: envFrom {what} {ref.get('name')!r} "
                        "not found")
                env.update({prefix + k: v for k, v in (data or {}).items()})
        for var in spec.get("env", []) or []:
            name = var["name"]
            value: str | None
            if "valueFrom" not in var:
                value = expand(literal(str(var.get("value", ""))), env)
            else:
                source = var["valueFrom"]
                if "fieldRef" in source:
                    value = self._field(source["fieldRef"]["fieldPath"])
                elif "secretKeyRef" in source:
                    value = self._key_ref(container, name, "Secret", source["secretKeyRef"],
                                          self.secrets)
                elif "configMapKeyRef" in source:
                    value = self._key_ref(container, name, "ConfigMap",
                                          source["configMapKeyRef"], self.config_maps)
                elif "resourceFieldRef" in source:
                    value = self._resource(container, source["resourceFieldRef"])
                else:
                    raise PodSpecError(f"container {container.name!r}, env {name}: "
                                       f"unsupported valueFrom {sorted(source)}")
            if value is None:
                env.pop(name, None)  # optional and missing: the variable is not set
            else:
                env[name] = value

        def argv_of(words: Sequence[Any]) -> list[str]:
            return [expand(literal(str(w)), env) for w in words]

        argv = argv_of([*spec["command"], *(spec.get("args") or [])])
        cwd = Path(literal(spec["workingDir"])) if spec.get("workingDir") else self.image_workdir
        base = {
            "PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.home),
            "HOSTNAME": self.name,  # what a container runtime sets from the pod name
        }
        full_env = {**base, **self.node_env, **env}
        result = container.result
        result.argv, result.env, result.cwd = argv, full_env, cwd

        def port_of(port: Any) -> int:
            if isinstance(port, str) and not port.isdigit():
                named = [p for p in spec.get("ports", []) or [] if p.get("name") == port]
                if not named:
                    raise PodSpecError(f"container {container.name!r}: no port named {port!r}")
                port = named[0]["containerPort"]
            return self.port_map.get(int(port), int(port))

        def handler(action: Mapping[str, Any], what: str) -> _Handler:
            return _Handler(action, what=f"container {container.name!r}: {what}",
                            port_of=port_of, command_of=argv_of, env=full_env, cwd=cwd)

        container.probes = []
        for kind in _PROBE_KINDS:
            probe = spec.get(f"{kind}Probe")
            if not probe:
                continue
            if "grpc" in probe:
                raise PodSpecError(f"container {container.name!r}: grpc probes are not supported")
            container.probes.append(_Probe(
                kind=kind,
                check=handler(probe, f"{kind} probe"),
                initial_delay=float(probe.get("initialDelaySeconds", 0)) * self.time_scale,
                period=max(0.05, float(probe.get("periodSeconds", 10)) * self.time_scale),
                timeout=float(probe.get("timeoutSeconds", 1)),
                success_threshold=int(probe.get("successThreshold", 1)),
                failure_threshold=int(probe.get("failureThreshold", 3)),
            ))
        hooks = spec.get("lifecycle") or {}
        container.post_start = handler(hooks["postStart"], "postStart") \
            if hooks.get("postStart") else None
        container.pre_stop = handler(hooks["preStop"], "preStop") \
            if hooks.get("preStop") else None

    # -- process control ---------------------------------------------------------------

    def _start(self, container: _Container) -> None:
        if not container.resolved:  # the first start resolves; a restart reuses it
            self._resolve(container)
            container.resolved = True
        elif container.result.started_at is not None:
            container.result.restarts += 1
        result = container.result
        result.finished_at = result.exit_code = result.reason = None
        container.proc, container.start_error = None, False
        with open(result.stdout_path, "ab") as out, open(result.stderr_path, "ab") as err:
            try:
                container.proc = subprocess.Popen(
                    result.argv, env=result.env, cwd=result.cwd, stdin=subprocess.DEVNULL,
                    stdout=out, stderr=err, start_new_session=True, preexec_fn=_die_with_parent)
            except OSError as exc:
                # A runtime reports a command it cannot exec as exit 128, StartError.
                err.write(f"local kubelet: cannot start {result.argv[0]!r}: {exc}\n".encode())
                container.start_error = True
            else:
                result.pids.append(container.proc.pid)
        result.started_at = result.started_at or time.time()
        if container.start_error:
            self._reap(container)
            return
        # The kubelet runs postStart right after the start and waits for it.
        hook = container.post_start
        if hook is not None and not hook(max(0.0, self._deadline - time.monotonic())):
            self._stop(container, grace=self.grace, reason="FailedPostStartHook")
            return
        container.start_probes()

    def _reap(self, container: _Container) -> bool:
        """Records the exit of a container whose main process ended; True if it just did."""
        result = container.result
        if result.exit_code is not None or result.started_at is None:
            return False
        proc = container.proc
        if container.start_error:
            result.exit_code, result.reason = 128, "StartError"
        elif proc is None or proc.poll() is None:
            return False
        else:
            # The main process is gone: the runtime would now take the rest of it down.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            result.exit_code = _runtime_exit_code(proc.returncode)
            if result.reason is None:
                result.reason = "Completed" if result.exit_code == 0 else "Error"
        container.stop_probes()
        result.finished_at = time.time()
        container.set_ready(False)
        return True

    def _signal(self, container: _Container, signum: signal.Signals) -> None:
        proc = container.proc
        if proc is None or proc.poll() is not None:
            return
        container.result.signals.append(signum.name)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if signum == signal.SIGKILL:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole container, like a cgroup kill
            else:
                os.kill(proc.pid, signum)  # the runtime signals the container's PID 1 only

    def _stop(self, container: _Container, *, grace: float, reason: str | None = None,
              deadline: float | None = None) -> None:
        """preStop, SIGTERM, wait up to the grace period, SIGKILL."""
        if not container.running:
            self._reap(container)
            return
        if reason is not None:
            container.result.reason = reason
        # The kubelet always grants a container at least 2 s, even once the pod's shared
        # grace period is used up, to avoid needless SIGKILLs.
        now = time.monotonic()
        end = max(deadline if deadline is not None else now + grace, now + _MIN_GRACE)
        end = min(self._deadline, end)
        container.stop_probes()
        if container.pre_stop is not None:
            container.pre_stop(max(0.0, end - time.monotonic()))
        self._signal(container, signal.SIGTERM)
        while container.running and time.monotonic() < end:
            time.sleep(_POLL)
        self._signal(container, signal.SIGKILL)
        if container.proc is not None:
            container.proc.wait()
        self._reap(container)
        self._check_time(f"container {container.name!r} to stop")

    def _kill_all(self) -> None:
        for container in self._containers:
            self._signal(container, signal.SIGKILL)
            if container.proc is not None:
                container.proc.wait()
            self._reap(container)
            container.stop_probes()

    def _check_time(self, waiting_for: str) -> None:
        if time.monotonic() >= self._deadline:
            raise PodTimeout(f"pod {self.name}: timed out waiting for {waiting_for}")

    def _tend_sidecars(self) -> None:
        """Restarts native sidecars that died or failed a probe, with the kubelet's back-off."""
        for container in self._containers:
            if container.kind != "sidecar" or container.result.started_at is None:
                continue
            if container.running:
                if not (container.liveness_failed.is_set() or container.startup_failed.is_set()):
                    continue
                self._stop(container, grace=self.grace, reason="Killed")
            self._reap(container)
            if container.restart_at is None:
                if container.result.restarts >= self.max_restarts:
                    raise CrashLoopBackOff(
                        f"native sidecar {container.name!r} stopped "
                        f"{container.result.restarts + 1} times (last exit "
                        f"{container.result.exit_code}); the kubelet would keep restarting it")
                backoff = min(_BACKOFF_MAX, _BACKOFF_BASE * 2 ** container.result.restarts)
                container.restart_at = time.monotonic() + backoff * self.time_scale
            elif time.monotonic() >= container.restart_at:
                container.restart_at = None
                self._start(container)

    # -- the pod lifecycle ---------------------------------------------------------------

    def run(self, timeout: float = 120.0) -> PodResult:
        """Runs the pod to an outcome. Raises :class:`PodTimeout` (everything killed) if it
        takes longer than ``timeout`` seconds, :class:`CrashLoopBackOff`,
        :class:`CreateContainerConfigError`, or :class:`PodSpecError`."""
        if self._ran:
            raise PodError("a LocalKubelet runs its pod once; make another one")
        self._ran = True
        self._deadline = time.monotonic() + timeout
        started = time.time()
        phase: Phase = "Failed"
        reason: str | None = None
        stuck: list[str] = []
        try:
            init_error = self._run_init_containers()
            if init_error is not None:
                reason = init_error
            else:
                phase, reason, stuck = self._run_containers()
            self._terminate_sidecars()
        except PodError as exc:
            self._kill_all()
            exc.result = self._result(phase, reason, stuck, started)
            raise type(exc)(f"{exc}\n{exc.result.describe()}", exc.result) from None
        except BaseException:
            self._kill_all()
            raise
        return self._result(phase, reason, stuck, started)

    def _result(self, phase: Phase, reason: str | None, stuck: list[str],
                started: float) -> PodResult:
        return PodResult(
            name=self.name, phase=phase, reason=reason,
            containers={c.name: c.result for c in self._containers},
            volumes=dict(self.volumes), port_map=dict(self.port_map),
            stuck_containers=stuck, started_at=started, finished_at=time.time())

    def _run_init_containers(self) -> str | None:
        """Init containers in order; returns the pod's failure reason, or None."""
        for container in self._containers:
            if container.kind == "container":
                continue
            self._start(container)
            if container.kind == "init":
                while container.result.exit_code is None:
                    self._reap(container)
                    self._check_time(f"init container {container.name!r} to complete")
                    self._tend_sidecars()
                    time.sleep(_POLL)
                if container.result.exit_code != 0:
                    return "Init:Error"
                continue
            while not container.started.is_set():
                self._check_time(f"native sidecar {container.name!r} to pass its startup probe")
                self._tend_sidecars()
                time.sleep(_POLL)
        return None

    def _run_containers(self) -> tuple[Phase, str | None, list[str]]:
        regular = [c for c in self._containers if c.kind == "container"]
        for container in regular:
            self._start(container)
        while True:
            for container in regular:
                if container.running and container.liveness_failed.is_set():
                    self._stop(container, grace=self.grace, reason="Killed")
                self._reap(container)
            # Not ``c.running``: a process that ends between its ``_reap`` and here would be
            # neither running nor reaped, and the pod failed with its exit code unknown.
            running = [c for c in regular if c.result.exit_code is None]
            if not running:
                break
            exits = [c.result.finished_at for c in regular if c.result.finished_at is not None]
            if (self.stuck_after is not None and exits
                    and time.time() - max(exits) >= self.stuck_after):
                # The real pod would never complete; say so rather than wait forever.
                for container in running:
                    self._stop(container, grace=self.grace)
                return "Running", "NeverCompletes", [c.name for c in running]
            self._check_time(f"containers {[c.name for c in running]} to exit")
            self._tend_sidecars()
            time.sleep(_POLL)
        failed = [c.name for c in regular if c.result.exit_code != 0]
        return ("Failed", "Error", []) if failed else ("Succeeded", None, [])

    def _terminate_sidecars(self) -> None:
        """Native sidecars, last first, within one shared grace period."""
        deadline = time.monotonic() + self.grace
        for container in reversed(self._containers):
            container.restart_at = None
            if container.kind == "sidecar":
                self._stop(container, grace=self.grace, deadline=deadline)


def run_pod(
    pod: Mapping[str, Any],
    *,
    workdir: Path,
    secrets: Mapping[str, Mapping[str, str]] | None = None,
    timeout: float = 120.0,
    **options: Any,
) -> PodResult:
    """Runs ``pod`` with a fresh :class:`LocalKubelet` (``options``: its keyword arguments)."""
    return LocalKubelet(pod, workdir=workdir, secrets=secrets, **options).run(timeout)

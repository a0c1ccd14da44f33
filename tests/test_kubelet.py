"""The local kubelet (``tests/support/kubelet.py``) runs pod specs as a kubelet would.

The small pods pin each piece of kubelet behaviour the sidecar injection relies on (env
resolution, volumes, start order, probes, termination) with real processes. The last test
runs what the operator's webhook produces, written by hand from docs/operator.md: a
native ``pluto sidecar`` and a ``torchrun`` training that logs through it into a real
server. :func:`check_training_pod` takes any mutated training pod, so a test of the
webhook's real output is ``check_training_pod(webhook_output, server, tmp_path, ...)``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from support.kubelet import (
    VENV_BIN,
    CreateContainerConfigError,
    PodResult,
    PodSpecError,
    PodTimeout,
    expand,
    run_pod,
)
from support.server_process import ServerProcess
from support.training_pod import check_training_pod, training_pod

Json = dict[str, Any]

#: Prints the container's env, argv (after the command) and interpreter as one JSON line.
DUMP = ("import json, os, sys; "
        "print(json.dumps({'env': dict(os.environ), 'argv': sys.argv[1:], "
        "'exe': sys.executable}))")
#: A native sidecar body: writes its pid to DIR/NAME.up, and on SIGTERM the time to
#: DIR/NAME.term, then exits 0. argv: DIR, NAME.
SIDECAR = """
import os, pathlib, signal, sys, time
out, name = pathlib.Path(sys.argv[1]), sys.argv[2]
def term(*_):
    (out / f"{name}.term").write_text(repr(time.time()))
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
(out / f"{name}.up").write_text(str(os.getpid()))
while True:
    time.sleep(0.05)
"""


def make_pod(*containers: Json, init: tuple[Json, ...] = (), volumes: tuple[Json, ...] = (),
             meta: Json | None = None, **spec: Any) -> Json:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p-0", "namespace": "ns1", **(meta or {})},
        "spec": {"restartPolicy": "Never", "initContainers": list(init),
                 "containers": list(containers), "volumes": list(volumes), **spec},
    }


def container(name: str, *command: str, **fields: Any) -> Json:
    return {"name": name, "image": "ignored:latest", "command": list(command), **fields}


def python(name: str, code: str, *args: str, **fields: Any) -> Json:
    return container(name, "python", "-c", code, *args, **fields)


def native(spec: Json) -> Json:
    return {**spec, "restartPolicy": "Always"}


EMPTY = {"name": "run", "emptyDir": {}}
MOUNT = {"name": "run", "mountPath": "/var/run/pluto"}


def alive(pid: int, *, wait: float = 2.0) -> bool:
    """Whether ``pid`` still runs after up to ``wait`` s (SIGKILL is delivered
    asynchronously); a zombie, killed but not reaped by its new parent, does not count."""
    deadline = time.monotonic() + wait
    while True:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return False
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.02)


def dumped(result: PodResult, name: str) -> Json:
    lines = result[name].stdout().splitlines()
    assert lines, result.describe()
    out: Json = json.loads(lines[-1])
    return out


# -- env ------------------------------------------------------------------------------


@pytest.mark.parametrize(("template", "expected"), [
    ("$(A)", "a"),
    ("x$(A)y$(B)", "xaybb"),
    ("$$(A)", "$(A)"),  # escaped
    ("$$$(A)", "$a"),
    ("$(NOPE)", "$(NOPE)"),  # undefined stays literal
    ("$(A", "$(A"),  # unterminated stays literal
    ("a$b $", "a$b $"),  # a lone $ is just a character
    ("$$", "$"),
])
def test_expand_follows_kubernetes(template: str, expected: str) -> None:
    assert expand(template, {"A": "a", "B": "bb"}) == expected


def test_env_is_resolved_as_the_kubelet_does(tmp_path: Path) -> None:
    pod = make_pod(
        python(
            "app", DUMP, "$(GREETING)", "$$(GREETING)", "$(NOPE)",
            env=[
                {"name": "NAME", "value": "world"},
                {"name": "GREETING", "value": "hello $(NAME), $$(NAME) $(LATER) $(NOPE)"},
                {"name": "LATER", "value": "defined after GREETING"},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "JOB", "valueFrom": {"fieldRef": {
                    "fieldPath": "metadata.labels['job-name']"}}},
                {"name": "INDEX", "valueFrom": {"fieldRef": {
                    "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
                }}},
                {"name": "ABSENT", "valueFrom": {"fieldRef": {
                    "fieldPath": "metadata.annotations['not-there']"}}},
                {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "k"}}},
                {"name": "OPT", "value": "overwritten by nothing"},
                {"name": "OPT", "valueFrom": {"secretKeyRef": {
                    "name": "creds", "key": "missing", "optional": True}}},
                {"name": "NOSECRET", "valueFrom": {"secretKeyRef": {
                    "name": "no-such-secret", "key": "k", "optional": True}}},
                {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "lvl"}}},
                {"name": "MEM_MI", "valueFrom": {"resourceFieldRef": {
                    "resource": "limits.memory", "divisor": "1Mi"}}},
                {"name": "CPU_M", "valueFrom": {"resourceFieldRef": {
                    "resource": "requests.cpu", "divisor": "1m"}}},
                {"name": "FROM_CFG_A", "value": "env wins over envFrom"},
            ],
            envFrom=[{"prefix": "FROM_CFG_", "configMapRef": {"name": "cfg"}}],
            resources={"requests": {"cpu": "250m"}, "limits": {"memory": "64Mi"}},
        ),
        meta={"labels": {"job-name": "train"},
              "annotations": {"batch.kubernetes.io/job-completion-index": "3"}},
    )
    result = run_pod(pod, workdir=tmp_path, timeout=30, node_name="node-a",
                     secrets={"creds": {"k": "s3cret"}},
                     config_maps={"cfg": {"lvl": "debug", "A": "from cfg", "B": "b"}})
    assert result.phase == "Succeeded", result.describe()
    out = dumped(result, "app")
    env = out["env"]
    assert env["GREETING"] == "hello world, $(NAME) $(LATER) $(NOPE)"
    assert out["argv"] == [env["GREETING"], "$(GREETING)", "$(NOPE)"]
    assert (env["POD"], env["NS"], env["NODE"], env["IP"]) == ("p-0", "ns1", "node-a", "127.0.0.1")
    assert len(env["UID"]) == 36  # the API server's uid, made up here
    assert (env["JOB"], env["INDEX"], env["ABSENT"]) == ("train", "3", "")
    assert env["KEY"] == "s3cret" and env["LEVEL"] == "debug"
    assert "OPT" not in env and "NOSECRET" not in env  # optional and missing: unset
    assert (env["MEM_MI"], env["CPU_M"]) == ("64", "250")
    assert (env["FROM_CFG_A"], env["FROM_CFG_B"]) == ("env wins over envFrom", "b")
    # a minimal base, not the test process's environment; the venv first on PATH
    assert "PYTEST_CURRENT_TEST" not in env
    assert env["PATH"].split(":")[0] == str(VENV_BIN)
    assert Path(out["exe"]).parent == VENV_BIN  # "python" is the venv's
    assert env["HOSTNAME"] == "p-0"


def test_missing_secret_is_a_config_error(tmp_path: Path) -> None:
    pod = make_pod(python("app", "pass", env=[
        {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "nope"}}}]))
    with pytest.raises(CreateContainerConfigError, match="couldn't find key 'nope' in Secret"):
        run_pod(pod, workdir=tmp_path, secrets={"creds": {"k": "v"}}, timeout=30)


def test_unsupported_specs_are_refused_clearly(tmp_path: Path) -> None:
    host = make_pod(python("app", "pass"), volumes=({"name": "data", "hostPath": {"path": "/"}},))
    with pytest.raises(PodSpecError, match="volume 'data' is \\['hostPath'\\]"):
        run_pod(host, workdir=tmp_path / "a")
    no_command = make_pod({"name": "app", "image": "python:3.11", "args": ["-c", "pass"]})
    with pytest.raises(PodSpecError, match="'app' has no command"):
        run_pod(no_command, workdir=tmp_path / "b")
    # ... unless told what the image's entrypoint would be
    result = run_pod(no_command, workdir=tmp_path / "b2", image_commands={"python": ["python"]})
    assert result.phase == "Succeeded" and result["app"].argv == ["python", "-c", "pass"]
    always = make_pod(python("app", "pass"), restartPolicy="Always")
    with pytest.raises(PodSpecError, match="never completes"):
        run_pod(always, workdir=tmp_path / "c")


# -- volumes --------------------------------------------------------------------------


def test_mount_paths_are_rewritten_to_the_volume(tmp_path: Path) -> None:
    write = ("import os, sys, pathlib; pathlib.Path(sys.argv[1]).write_text('hi'); "
             "print(open('/etc/creds/api-key').read(), os.getcwd(), os.environ['SOCK'], "
             "os.environ['OTHER'], os.environ['NESTED'])")
    pod = make_pod(
        python("app", write, "/var/run/pluto/out.txt",
               workingDir="/var/run/pluto",
               env=[{"name": "SOCK", "value": "/var/run/pluto/pluto.sock"},
                    {"name": "OTHER", "value": "/var/run/plutonium:/x/var/run/pluto"},
                    {"name": "NESTED", "value": "/var/run/pluto/cache/f"}],
               volumeMounts=[MOUNT,
                             {"name": "run", "mountPath": "/var/run/pluto/cache",
                              "subPath": "c"},
                             {"name": "creds", "mountPath": "/etc/creds", "readOnly": True}]),
        volumes=(EMPTY, {"name": "creds", "secret": {"secretName": "key"}}),
    )
    result = run_pod(pod, workdir=tmp_path, secrets={"key": {"api-key": "k-123"}}, timeout=30)
    assert result.phase == "Succeeded", result.describe()
    run_dir = result.volumes["run"]
    assert (run_dir / "out.txt").read_text() == "hi"
    key, cwd, sock, other, nested = result["app"].stdout().split()
    assert key == "k-123"
    assert Path(cwd) == run_dir
    assert sock == f"{run_dir}/pluto.sock"
    assert other == "/var/run/plutonium:/x/var/run/pluto"  # not this mount: left alone
    assert nested == f"{run_dir}/c/f"  # the longest mountPath wins


# -- start order and termination ------------------------------------------------------


def test_native_sidecar_startup_probe_gates_what_follows(tmp_path: Path) -> None:
    """init containers run in order; the regular ones after a native sidecar wait for its
    startup probe; app containers see what the sidecar wrote to the shared emptyDir."""
    slow_sidecar = ("import time, pathlib; time.sleep(0.8); "
                    "pathlib.Path('/var/run/pluto/socket-ready').write_text('x'); time.sleep(60)")
    stamp = "import time, pathlib, sys; pathlib.Path(sys.argv[1]).write_text(repr(time.time()))"
    check = ("import pathlib, sys; p = pathlib.Path('/var/run/pluto/socket-ready'); "
             "sys.exit(0 if p.exists() else 5)")
    pod = make_pod(
        python("app", check, volumeMounts=[MOUNT]),
        init=(
            python("first", stamp, "/var/run/pluto/first", volumeMounts=[MOUNT]),
            native(python("sidecar", slow_sidecar, volumeMounts=[MOUNT], startupProbe={
                "exec": {"command": ["test", "-f", "/var/run/pluto/socket-ready"]},
                "periodSeconds": 1, "failureThreshold": 30})),
            python("after", check, volumeMounts=[MOUNT]),
        ),
        volumes=(EMPTY,), terminationGracePeriodSeconds=2,
    )
    result = run_pod(pod, workdir=tmp_path, timeout=30)
    assert result.phase == "Succeeded", result.describe()
    first, sidecar, after, app = (result[n] for n in ("first", "sidecar", "after", "app"))
    assert first.finished_at is not None and sidecar.started_at is not None
    assert first.finished_at <= sidecar.started_at
    assert sidecar.startup_passed_at is not None and after.started_at is not None
    assert sidecar.startup_passed_at - sidecar.started_at >= 0.8  # it really waited
    assert after.started_at >= sidecar.startup_passed_at
    assert after.exit_code == 0 and app.exit_code == 0  # both saw the sidecar's file
    # the sidecar ignores nothing: SIGTERM (default action) ends it; its code doesn't count
    assert sidecar.signals == ["SIGTERM"] and sidecar.exit_code == 128 + 15


def test_sidecars_get_sigterm_in_reverse_order_and_a_stubborn_one_is_killed(
    tmp_path: Path,
) -> None:
    stubborn = ("import signal, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "pathlib.Path('/var/run/pluto/stubborn.up').touch(); time.sleep(60)")
    ready = {"exec": {"command": ["test", "-f", "/var/run/pluto/stubborn.up"]},
             "periodSeconds": 1}
    pod = make_pod(
        python("app", "import time; time.sleep(0.3)"),
        init=(
            native(python("s1", SIDECAR, "/var/run/pluto", "s1", volumeMounts=[MOUNT])),
            native(python("s2", SIDECAR, "/var/run/pluto", "s2", volumeMounts=[MOUNT])),
            native(python("stubborn", stubborn, volumeMounts=[MOUNT], startupProbe=ready)),
        ),
        volumes=(EMPTY,), terminationGracePeriodSeconds=2,
    )
    result = run_pod(pod, workdir=tmp_path, timeout=30)
    assert result.phase == "Succeeded", result.describe()
    app, s1, s2, stub = (result[n] for n in ("app", "s1", "s2", "stubborn"))
    run_dir = result.volumes["run"]
    t1, t2 = (float((run_dir / f"{n}.term").read_text()) for n in ("s1", "s2"))
    assert app.finished_at is not None
    assert app.finished_at <= t2 < t1  # after the app, last sidecar first
    assert (s1.signals, s1.exit_code, s2.exit_code) == (["SIGTERM"], 0, 0)
    assert stub.signals == ["SIGTERM", "SIGKILL"] and stub.exit_code == 128 + 9
    assert stub.finished_at is not None and stub.finished_at - app.finished_at >= 1.9
    # The stubborn one used up the shared grace period; the others still get SIGTERM and
    # the kubelet's minimum window of 2 s each, so they drain rather than die.
    assert t2 - app.finished_at >= 1.9
    assert not any(alive(c.pids[-1]) for c in (s1, s2, stub))  # nothing left behind


def test_sigterm_reaches_the_main_process_only_after_pre_stop(tmp_path: Path) -> None:
    """As a runtime signals a container's PID 1: its other processes get no SIGTERM, and
    are SIGKILLed once the main process exits. postStart gates what follows; preStop runs
    before the SIGTERM."""
    wrapper = ('python -c "$SIDECAR" /var/run/pluto child & '
               'trap "test -f /var/run/pluto/pre-stop && exit 0; exit 9" TERM; '
               'while true; do sleep 0.05; done')
    hooks = {"postStart": {"exec": {"command": [
                 "sh", "-c", "sleep 0.5; touch /var/run/pluto/post-start"]}},
             "preStop": {"exec": {"command": ["touch", "/var/run/pluto/pre-stop"]}}}
    pod = make_pod(
        python("app", "import pathlib; assert pathlib.Path('/var/run/pluto/post-start').exists()",
               volumeMounts=[MOUNT]),
        init=(native(container("wrapper", "sh", "-c", wrapper, lifecycle=hooks,
                               env=[{"name": "SIDECAR", "value": SIDECAR}],
                               volumeMounts=[MOUNT])),),
        volumes=(EMPTY,), terminationGracePeriodSeconds=5,
    )
    result = run_pod(pod, workdir=tmp_path, timeout=30)
    assert result.phase == "Succeeded", result.describe()  # the app saw post-start
    wrapper_result = result["wrapper"]
    assert wrapper_result.signals == ["SIGTERM"]
    assert wrapper_result.exit_code == 0  # its trap found pre-stop's file
    run_dir = result.volumes["run"]
    child = int((run_dir / "child.up").read_text())
    assert not (run_dir / "child.term").exists()  # no SIGTERM for a non-main process
    assert not alive(child)  # but gone with its container


def test_failing_liveness_probe_kills_the_container(tmp_path: Path) -> None:
    probe = {"exec": {"command": ["false"]}, "periodSeconds": 1, "failureThreshold": 2}
    pod = make_pod(python("app", "import time; time.sleep(30)", livenessProbe=probe),
                   terminationGracePeriodSeconds=2)
    result = run_pod(pod, workdir=tmp_path, timeout=30)
    assert (result.phase, result.reason) == ("Failed", "Error")
    app = result["app"]
    assert (app.reason, app.signals, app.exit_code) == ("Killed", ["SIGTERM"], 128 + 15)
    assert app.finished_at is not None and app.started_at is not None
    assert app.finished_at - app.started_at < 5


def test_failing_init_container_fails_the_pod(tmp_path: Path) -> None:
    pod = make_pod(
        python("app", "pass"),
        init=(native(python("sidecar", SIDECAR, "/var/run/pluto", "sc", volumeMounts=[MOUNT])),
              python("migrate", "import sys; print('no database'); sys.exit(3)")),
        volumes=(EMPTY,),
    )
    result = run_pod(pod, workdir=tmp_path, timeout=30)
    assert (result.phase, result.reason) == ("Failed", "Init:Error")
    assert result["migrate"].exit_code == 3 and "no database" in result["migrate"].stdout()
    assert result["app"].started_at is None  # never started
    assert result["sidecar"].signals == ["SIGTERM"] and result["sidecar"].exit_code == 0


def test_a_failing_app_container_fails_the_pod(tmp_path: Path) -> None:
    pod = make_pod(python("ok", "pass"), python("bad", "raise SystemExit(2)"),
                   container("gone", "no-such-program-here"))
    result = run_pod(pod, workdir=tmp_path, timeout=30)
    assert (result.phase, result.reason) == ("Failed", "Error")
    assert [result[n].exit_code for n in ("ok", "bad", "gone")] == [0, 2, 128]
    assert result["gone"].reason == "StartError"
    assert "no-such-program-here" in result["gone"].stderr()


def test_classic_sidecar_keeps_the_pod_running_and_is_reported(tmp_path: Path) -> None:
    pod = make_pod(
        python("app", "pass"),
        python("sidecar", SIDECAR, "/var/run/pluto", "classic", volumeMounts=[MOUNT]),
        volumes=(EMPTY,),
    )
    began = time.monotonic()
    result = run_pod(pod, workdir=tmp_path, timeout=30, stuck_after=1.0)
    assert (result.phase, result.reason) == ("Running", "NeverCompletes")
    assert result.stuck_containers == ["sidecar"]
    assert result["app"].exit_code == 0
    assert result["sidecar"].signals == ["SIGTERM"]  # stopped by the harness, afterwards
    assert 1.0 <= time.monotonic() - began < 10


def test_native_sidecar_that_dies_is_restarted(tmp_path: Path) -> None:
    # First start: exit 1. Second: come up. The app only runs once it is up.
    flaky = ("import pathlib, sys, time; d = pathlib.Path('/var/run/pluto'); "
             "tried = (d / 'tried').exists(); (d / 'tried').touch(); "
             "tried or sys.exit(1); (d / 'up').touch(); time.sleep(60)")
    pod = make_pod(
        python("app", "import pathlib; assert pathlib.Path('/var/run/pluto/up').exists()",
               volumeMounts=[MOUNT]),
        init=(native(python("sidecar", flaky, volumeMounts=[MOUNT], startupProbe={
            "exec": {"command": ["test", "-f", "/var/run/pluto/up"]}, "periodSeconds": 1})),),
        volumes=(EMPTY,), terminationGracePeriodSeconds=2,
    )
    result = run_pod(pod, workdir=tmp_path, timeout=30, time_scale=0.02)
    assert result.phase == "Succeeded", result.describe()
    assert result["sidecar"].restarts == 1 and len(result["sidecar"].pids) == 2


def test_timeout_kills_everything_and_reports(tmp_path: Path) -> None:
    pod = make_pod(python("app", "import time; print('training', flush=True); time.sleep(60)"))
    with pytest.raises(PodTimeout, match="timed out") as info:
        run_pod(pod, workdir=tmp_path, timeout=1.5)
    assert "training" in str(info.value)  # the logs come with the error
    assert info.value.result is not None
    app = info.value.result["app"]
    assert app.signals == ["SIGKILL"]
    assert not alive(app.pids[-1])


# -- ports and probes -----------------------------------------------------------------


def test_ports_are_remapped_in_args_env_and_probes(tmp_path: Path) -> None:
    serve = ("import http.server, sys; http.server.ThreadingHTTPServer("
             "(sys.argv[1], int(sys.argv[2])), http.server.SimpleHTTPRequestHandler"
             ").serve_forever()")
    fetch = ("import os, urllib.request; "
             "print(urllib.request.urlopen(os.environ['URL'], timeout=5).status)")
    probe = {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}
    pod = make_pod(
        python("app", fetch, env=[{"name": "URL", "value": "http://localhost:7301/"}]),
        init=(native(python("web", serve, "0.0.0.0", "7301",
                            ports=[{"name": "http", "containerPort": 7301}],
                            startupProbe=probe, readinessProbe=probe)),),
        terminationGracePeriodSeconds=2,
    )
    result = run_pod(pod, workdir=tmp_path, timeout=30)
    assert result.phase == "Succeeded", result.describe()
    local = result.port_map[7301]
    assert local != 7301
    assert result["web"].argv[-2:] == ["127.0.0.1", str(local)]  # 0.0.0.0 -> loopback
    assert result["app"].env["URL"] == f"http://localhost:{local}/"  # pod-wide: shared localhost
    assert result["app"].stdout().strip() == "200"
    web = result["web"]
    assert [ready for _, ready in web.readiness] == [False, True, False]  # up, then stopped
    assert web.startup_passed_at is not None and web.readiness[1][0] >= web.startup_passed_at


def test_readiness_follows_the_probe(tmp_path: Path) -> None:
    # ready while the file exists; the container notes when it made and removed it
    toggle = ("import pathlib, time; d = pathlib.Path('/var/run/pluto'); f = d / 'ok'; "
              "time.sleep(0.3); f.touch(); up = time.time(); time.sleep(0.8); f.unlink(); "
              "down = time.time(); (d / 'times').write_text(f'{up} {down}'); time.sleep(1)")
    probe = {"exec": {"command": ["test", "-f", "/var/run/pluto/ok"]}, "periodSeconds": 1,
             "failureThreshold": 1}
    pod = make_pod(python("app", toggle, volumeMounts=[MOUNT], readinessProbe=probe),
                   volumes=(EMPTY,))
    result = run_pod(pod, workdir=tmp_path, timeout=30)
    assert result.phase == "Succeeded", result.describe()
    app = result["app"]
    up, down = map(float, (result.volumes["run"] / "times").read_text().split())
    assert [ready for _, ready in app.readiness] == [False, True, False]
    # each change seen within a few probe periods (0.1 s at time_scale 0.1)
    assert up <= app.readiness[1][0] < up + 0.6
    assert down <= app.readiness[2][0] < down + 0.6


# -- the real product -----------------------------------------------------------------


def inject_by_hand(pod: Json, *, server_url: str, run_id: str, project: str) -> Json:
    """What docs/operator.md says the webhook adds to a pod (native sidecar mode)."""
    pod = json.loads(json.dumps(pod))
    socket_env = {"name": "PLUTO_SIDECAR_SOCKET", "value": "/var/run/pluto/pluto.sock"}
    mount = {"name": "pluto-run", "mountPath": "/var/run/pluto"}
    spec = pod["spec"]
    pod["metadata"].setdefault("annotations", {})["pluto.dev/injected"] = run_id
    spec.setdefault("volumes", []).extend([
        {"name": "pluto-run", "emptyDir": {}},
        {"name": "pluto-api-key", "secret": {"secretName": "pluto-api-key", "optional": True,
                                             "items": [{"key": "api-key", "path": "api-key"}]}},
    ])
    for app in spec["containers"]:
        env = app.setdefault("env", [])
        have = {e["name"] for e in env}
        env += [e for e in ({"name": "PLUTO_RUN_ID", "value": run_id},
                            {"name": "PLUTO_PROJECT", "value": project}, socket_env)
                if e["name"] not in have]
        app.setdefault("volumeMounts", []).append(mount)
    readyz = {"httpGet": {"path": "/readyz", "port": "pluto-health"}}
    sidecar = {
        "name": "pluto-sidecar",
        "image": "ghcr.io/pluto-dev/pluto:dev",
        "restartPolicy": "Always",
        "command": ["pluto", "sidecar"],
        "args": ["--health-host", "0.0.0.0", "--health-port", "7301",
                 "--api-key-file", "/var/run/pluto-api-key/api-key", "--api-key-optional"],
        "env": [
            {"name": "PLUTO_URL", "value": server_url},
            {"name": "PLUTO_SPOOL_DIR", "value": "/var/run/pluto/spool"},
            socket_env,
            {"name": "PLUTO_NODE_RANK", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
            {"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"},
        ],
        "ports": [{"name": "pluto-health", "containerPort": 7301}],
        "startupProbe": {**readyz, "periodSeconds": 1, "failureThreshold": 60},
        "readinessProbe": {**readyz, "periodSeconds": 5},
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"},
                      "limits": {"memory": "256Mi"}},
        "volumeMounts": [mount, {"name": "pluto-api-key", "mountPath": "/var/run/pluto-api-key",
                                 "readOnly": True}],
    }
    spec["initContainers"] = [sidecar, *spec.get("initContainers", [])]
    return pod


def test_training_pod_logs_through_the_injected_sidecar(
    server: ServerProcess, tmp_path: Path
) -> None:
    pod = inject_by_hand(training_pod(steps=5, job="train-kubelet"), server_url=server.url,
                         run_id="train-kubelet", project="kubelet")
    result = check_training_pod(pod, server, tmp_path / "pod", run_id="train-kubelet",
                                project="kubelet", steps=5)
    # the pod's fixed health port was moved off 7301 and the probes followed it
    assert result.port_map[7301] != 7301
    assert [ready for _, ready in result["pluto-sidecar"].readiness][:2] == [False, True]

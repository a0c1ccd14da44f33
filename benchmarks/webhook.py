"""Admission latency of the pod webhook, and the operator's memory.

    .venv/bin/python benchmarks/webhook.py [--rates 100,500] [--seconds 10] [--plutoruns 200]

A real ``pluto operator --role webhook --dev`` process (kopf, warm caches, HTTPS with its
generated certificate) runs against the Kubernetes emulator of the test suite
(tests/support/kube_emulator.py), which holds ``--plutoruns`` PlutoRuns over 20 namespaces.
A load generator (aiohttp, keep-alive connections as the API server keeps them, verifying the
webhook's CA) sends AdmissionReview v1 requests for pod CREATEs at a fixed rate, open loop:
request ``i`` is due at ``start + i / rate`` whatever the answers do, and its latency is
measured from when it was due to when its answer arrived, so a stalled webhook shows up as
latency rather than as a lower request rate. Half the pods are covered (a Konduktor pod
rendered from konduktor-nightly's templates, label route: patched), half are not (unchanged).

Every answer is checked (HTTP 200, the request's uid, allowed, a patch exactly for the covered
pods). Printed: p50/p99/max latency and the achieved rate per target rate, and the operator's
resident memory (RSS after the load, and its peak, VmHWM). Target (issue 4): p99 <= 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import ssl
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import aiohttp
import psutil
from _server import free_port
from rich.console import Console
from rich.table import Table
from support import pod_specs
from support.kube_emulator import PLUTORUNS, KubeEmulator, OperatorProcess

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
NAMESPACES = [f"team-{i:02d}" for i in range(20)]


def review(pod: dict[str, Any], namespace: str) -> tuple[str, bytes]:
    uid = str(uuid.uuid4())
    body = {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace, "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:job-controller"},
            "object": pod, "dryRun": False,
        },
    }
    return uid, json.dumps(body).encode()


def workload(count: int) -> list[tuple[str, bytes, bool]]:
    """(uid, body, covered) for ``count`` requests: covered and uncovered pods alternate."""
    covered = pod_specs.konduktor_pod()
    covered["metadata"]["labels"]["pluto.dev/run"] = "run-000"
    plain = pod_specs.plain_pod()
    requests = []
    for i in range(count):
        pod, namespace = (covered, NAMESPACES[0]) if i % 2 == 0 else (plain, NAMESPACES[1])
        uid, body = review(pod, namespace)
        requests.append((uid, body, i % 2 == 0))
    return requests


async def load(url: str, ca: str, rate: float, seconds: float,
               connections: int) -> tuple[list[float], float]:
    requests = workload(int(rate * seconds))
    context = ssl.create_default_context(cadata=ca)
    connector = aiohttp.TCPConnector(limit=connections, ssl=context)
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(due: float, uid: str, body: bytes, covered: bool) -> None:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            async with session.post(url, data=body,
                                    headers={"content-type": "application/json"}) as resp:
                answer = await resp.json()
            latencies.append(time.perf_counter() - due)
            assert resp.status == 200, resp.status
            response = answer["response"]
            assert response["uid"] == uid and response["allowed"] is True, response
            assert ("patch" in response) is covered, response

        # Warm the connections and the operator's code paths before measuring.
        await asyncio.gather(*(one(time.perf_counter(), *r) for r in workload(connections * 4)))
        latencies.clear()
        start = time.perf_counter() + 0.2
        await asyncio.gather(*(one(start + i / rate, *r) for i, r in enumerate(requests)))
        elapsed = time.perf_counter() - start
    return latencies, len(requests) / elapsed


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="100,500", help="admission requests/s to offer")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per rate")
    parser.add_argument("--plutoruns", type=int, default=200, help="PlutoRuns in the caches")
    parser.add_argument("--connections", type=int, default=8,
                        help="keep-alive connections (the API server pools its own)")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="pluto-bench-webhook-") as tmp:
        work = Path(tmp)
        kube = KubeEmulator(work / "kube", namespaces=("default", *NAMESPACES),
                            crds=[ROOT / "crds" / "plutorun.yaml"]).start()
        operator: OperatorProcess | None = None
        try:
            for i in range(args.plutoruns):
                namespace = NAMESPACES[i % len(NAMESPACES)]
                kube.create(PLUTORUNS, {
                    "apiVersion": "pluto.dev/v1alpha1", "kind": "PlutoRun",
                    "metadata": {"name": f"run-{i:03d}", "namespace": namespace},
                    "spec": {"project": "bench", "selector": {"matchLabels": {
                        "batch.kubernetes.io/job-name": f"job-{i:03d}"}}},
                }, namespace=namespace)
            webhook_port, health_port = free_port(), free_port()
            url = f"https://127.0.0.1:{webhook_port}"
            operator = OperatorProcess(
                [sys.executable, "-m", "pluto", "operator", "--role", "webhook", "--dev",
                 "--webhook-url", url, "--webhook-host", "127.0.0.1",
                 "--health-host", "127.0.0.1", "--health-port", str(health_port),
                 "--log-level", "WARNING"],
                env=kube.env, log_path=work / "operator.log", cwd=ROOT).start()
            assert operator.pid is not None

            operator.wait_ready(f"http://127.0.0.1:{health_port}", 60)
            idle_rss = psutil.Process(operator.pid).memory_info().rss
            config = kube.get(CONFIGS, "pluto-dev-webhook")
            ca = base64.b64decode(config["webhooks"][0]["clientConfig"]["caBundle"]).decode()
            table = Table(title=f"pod webhook, {args.plutoruns} PlutoRuns cached, "
                                f"{args.seconds:g} s per rate, {args.connections} connections")
            for column in ("offered req/s", "achieved req/s", "p50 ms", "p99 ms", "max ms"):
                table.add_column(column, justify="right")
            for rate in (float(r) for r in args.rates.split(",")):
                latencies, achieved = asyncio.run(
                    load(url + "/mutate-pods", ca, rate, args.seconds, args.connections))
                q = statistics.quantiles(latencies, n=100)
                table.add_row(f"{rate:g}", f"{achieved:.0f}", f"{q[49] * 1e3:.2f}",
                              f"{q[98] * 1e3:.2f}", f"{max(latencies) * 1e3:.2f}")
            console.print(table)
            rss = psutil.Process(operator.pid).memory_info().rss
            console.print(
                f"operator (role webhook) RSS: {idle_rss / 2**20:.1f} MiB ready, "
                f"{rss / 2**20:.1f} MiB after the load, peak {peak_rss(operator.pid) / 2**20:.1f}"
                f" MiB; target p99 <= 5 ms")
            console.print(f"[dim]{platform.machine()}, {os.cpu_count()} cores, Python "
                          f"{platform.python_version()}, load generator on the same machine"
                          "[/dim]")
        finally:
            if operator is not None:
                operator.stop()
            kube.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

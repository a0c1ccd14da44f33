"""The ``pluto operator`` command line: flags to ``OperatorSettings`` (docs/operator.md).

Imports nothing beyond the standard library, the settings and the key reader, so
``pluto --help`` stays fast and works without the operator's dependencies installed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from pluto.cli import LOG_LEVELS
from pluto.credentials import api_key_from_flags
from pluto_operator.settings import DEFAULT_IMAGE, DEFAULT_SERVER_URL, OperatorSettings, SecretRef


def add_parser(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser(
        "operator", help="run the Kubernetes operator (PlutoRun reconciler, pod webhook)")
    parser.add_argument("--role", choices=["all", "reconciler", "webhook"], default="all",
                        help="what this process does (default all)")
    parser.add_argument("--namespace", action="append", default=[], metavar="NS",
                        help="watch this namespace (repeatable; default: all namespaces)")
    parser.add_argument("--server-url", default=None,
                        help=f"tracking server of PlutoRuns that name none (env PLUTO_URL; "
                             f"default {DEFAULT_SERVER_URL})")
    parser.add_argument("--api-key-file", type=Path, default=None,
                        help="file with the operator's own API key (else env PLUTO_API_KEY); "
                             "read again when it changes")
    parser.add_argument("--api-key-optional", action="store_true",
                        help="a missing --api-key-file is no key until the file appears (a "
                             "Secret mounted with optional: true), not an error")
    parser.add_argument("--api-key-secret", default="pluto-api-key:api-key", metavar="NAME:KEY",
                        help="Secret key the sidecars read when the PlutoRun names none "
                             "(default pluto-api-key:api-key)")
    parser.add_argument("--default-project", default=None,
                        help="project of namespace-mode runs (default: the namespace's name)")
    parser.add_argument("--sidecar-image", default=None,
                        help=f"sidecar image (env PLUTO_SIDECAR_IMAGE; default {DEFAULT_IMAGE})")
    parser.add_argument("--sidecar-mode", choices=["auto", "native", "classic"], default="auto",
                        help="native sidecars (1.29+), classic containers, or ask the API "
                             "server (default auto)")
    parser.add_argument("--sidecar-resources", default=None, metavar="JSON",
                        help="requests/limits of sidecars whose PlutoRun sets none, e.g. "
                             "'{\"requests\": {\"cpu\": \"50m\"}}' (env "
                             "PLUTO_SIDECAR_RESOURCES; default requests cpu 50m, memory 64Mi, "
                             "limit memory 256Mi)")
    parser.add_argument("--webhook-host", default="0.0.0.0",
                        help="address of the HTTPS webhook (default 0.0.0.0)")
    parser.add_argument("--webhook-port", type=int, default=9443,
                        help="port of the HTTPS webhook (default 9443)")
    parser.add_argument("--tls-cert-file", type=Path, default=None,
                        help="webhook certificate (PEM); re-read when it changes")
    parser.add_argument("--tls-key-file", type=Path, default=None,
                        help="webhook private key (PEM)")
    parser.add_argument("--dev", action="store_true",
                        help="development mode: generate a certificate and manage the webhook "
                             "configuration (needs --webhook-url)")
    parser.add_argument("--webhook-url", default=None, metavar="https://HOST:PORT",
                        help="URL the API server reaches this process at (--dev)")
    parser.add_argument("--webhook-config-name", default="pluto-dev-webhook",
                        help="name of the MutatingWebhookConfiguration --dev manages")
    parser.add_argument("--failure-policy", choices=["Ignore", "Fail"], default="Ignore",
                        help="on an internal error: allow the pod unchanged (Ignore, default) "
                             "or refuse it (Fail)")
    parser.add_argument("--health-host", default="0.0.0.0",
                        help="address of /healthz and /readyz (default 0.0.0.0)")
    parser.add_argument("--health-port", type=int, default=8081,
                        help="port of /healthz and /readyz (default 8081; 0: any)")
    parser.add_argument("--poll-interval", type=float, default=10.0,
                        help="seconds between looks at a PlutoRun's pods and Job (default 10)")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="the least severe events logged (default INFO)")


def _resources(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--sidecar-resources / PLUTO_SIDECAR_RESOURCES is not JSON: {exc}; "
                         'expected e.g. {"requests": {"cpu": "50m"}}') from exc
    if not isinstance(value, dict) or set(value) - {"requests", "limits", "claims"}:
        raise SystemExit("--sidecar-resources / PLUTO_SIDECAR_RESOURCES: expected an object "
                         'with "requests" and/or "limits", e.g. {"limits": {"memory": "256Mi"}}')
    return value


def settings_from(args: argparse.Namespace) -> OperatorSettings:
    api_key = api_key_from_flags(os.environ.get("PLUTO_API_KEY"), args.api_key_file,
                                 args.api_key_optional)
    return OperatorSettings(
        role=args.role,
        namespaces=tuple(args.namespace),
        server_url=args.server_url or os.environ.get("PLUTO_URL") or DEFAULT_SERVER_URL,
        api_key=api_key,
        api_key_secret=SecretRef.parse(args.api_key_secret),
        default_project=args.default_project,
        sidecar_image=(args.sidecar_image or os.environ.get("PLUTO_SIDECAR_IMAGE")
                       or DEFAULT_IMAGE),
        sidecar_mode=args.sidecar_mode,
        sidecar_resources=_resources(args.sidecar_resources
                                     or os.environ.get("PLUTO_SIDECAR_RESOURCES")),
        webhook_host=args.webhook_host,
        webhook_port=args.webhook_port,
        tls_cert_file=args.tls_cert_file,
        tls_key_file=args.tls_key_file,
        dev=args.dev,
        webhook_url=args.webhook_url,
        webhook_config_name=args.webhook_config_name,
        failure_policy=args.failure_policy,
        health_host=args.health_host,
        health_port=args.health_port,
        poll_interval=args.poll_interval,
        log_level=args.log_level,
    )


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if settings.dev and not settings.webhook_url:
        raise SystemExit("pluto operator --dev needs --webhook-url https://HOST:PORT, the "
                         "address the API server can reach this machine at")
    from pluto_operator.main import run as run_operator

    return run_operator(settings)

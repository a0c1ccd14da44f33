"""Operator settings: the flags of ``pluto operator`` (docs/operator.md lists them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pluto import __version__
from pluto.credentials import ApiKey

Role = Literal["all", "reconciler", "webhook"]
SidecarMode = Literal["auto", "native", "classic"]
FailurePolicy = Literal["Ignore", "Fail"]

DEFAULT_SERVER_URL = "http://pluto-server.pluto.svc:7300"
#: The image the chart publishes; its tag follows the package version.
DEFAULT_IMAGE = f"ghcr.io/pluto-dev/pluto:{__version__}"


@dataclass(frozen=True)
class SecretRef:
    """A key of a Secret in the pod's namespace."""

    name: str
    key: str

    @classmethod
    def parse(cls, text: str) -> SecretRef:
        """``NAME:KEY``, the form of ``--api-key-secret``."""
        name, sep, key = text.partition(":")
        if not sep or not name or not key:
            raise ValueError(
                f"--api-key-secret {text!r}: expected NAME:KEY, e.g. pluto-api-key:api-key"
            )
        return cls(name, key)


@dataclass
class OperatorSettings:
    role: Role = "all"
    #: Watched namespaces; empty: all of them.
    namespaces: tuple[str, ...] = ()
    server_url: str = DEFAULT_SERVER_URL
    #: The operator's own API key for its calls to the server (never given to pods); one
    #: from a file follows the file (a mounted Secret that is rotated).
    api_key: ApiKey = field(default_factory=lambda: ApiKey(None))
    #: The Secret key sidecars read their API key from, unless the PlutoRun names one.
    api_key_secret: SecretRef = field(default_factory=lambda: SecretRef("pluto-api-key", "api-key"))
    #: Project of namespace-mode runs when the namespace has no pluto.dev/project annotation;
    #: None: the namespace's name.
    default_project: str | None = None
    sidecar_image: str = DEFAULT_IMAGE
    sidecar_mode: SidecarMode = "auto"
    #: Requests/limits of sidecars whose PlutoRun sets none; None: the built-in defaults.
    sidecar_resources: dict[str, Any] | None = None
    webhook_host: str = "0.0.0.0"
    webhook_port: int = 9443
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: Development mode: generate a certificate and manage the webhook configuration.
    dev: bool = False
    webhook_url: str | None = None
    webhook_config_name: str = "pluto-dev-webhook"
    failure_policy: FailurePolicy = "Ignore"
    health_host: str = "0.0.0.0"
    health_port: int = 8081
    #: How often the reconciler looks at a PlutoRun's pods and their Job/JobSet.
    poll_interval: float = 10.0
    log_level: str = "INFO"

    @property
    def runs_reconciler(self) -> bool:
        return self.role in ("all", "reconciler")

    @property
    def runs_webhook(self) -> bool:
        return self.role in ("all", "webhook")

"""Shared fixtures: a real PostgreSQL cluster and real ``pluto server`` processes.

Fixture map (scopes in brackets):

``pg_cluster`` [session]
    One throwaway PostgreSQL cluster for the whole run (127.0.0.1, free port,
    trust auth). ``pg_cluster.create_database("hint")`` makes a fresh database
    and returns its URL: use it for a per-class database
    (a class-scoped fixture of your own) or anything finer-grained.
``pg_url`` [module]
    URL of a fresh database made for the requesting module
    (``postgresql+psycopg://pluto@127.0.0.1:PORT/DB``).
``fresh_pg_url`` [function]
    URL of a fresh database made for the requesting test.
``backend`` [module, parametrized]
    ``"sqlite"`` or ``"postgres"``; the postgres case carries the ``postgres``
    marker. Any test using ``server``/``shared_server`` runs on both.
``server`` [function]
    A started server on ``backend`` with its own storage: a new data dir and,
    on postgres, a new database. Stopped (SIGTERM) after the test.
``shared_server`` [module]
    One started server per module and backend (postgres: on ``pg_url``).
    Tests sharing it must not assume an empty server.
``server_factory`` [function]
    ``server_factory(database_url=None, **ServerProcess kwargs)`` starts extra
    servers (e.g. two replicas on one database); all stopped after the test.
``sdk_env`` [function]
    For in-process SDK tests: no developer ``PLUTO_*``/``MLOP_*``/``RANK``
    variables reach ``pluto.init``, and the working directory (where spools land
    by default) is the test's ``tmp_path``. Use with
    ``pytestmark = pytest.mark.usefixtures("sdk_env")``.
``project`` [function]
    A project name of the test's own (from its name, plus a random suffix): the
    shared server is not empty.
``env_for`` [function]
    ``env_for(server, **extra)``: an environment for subprocesses with
    ``PLUTO_URL`` set and no inherited ``PLUTO_*``/``MLOP_*`` variables.
``kube_emulator`` [function]
    A fresh emulated Kubernetes API server (kmock, in its own process, on
    127.0.0.1) with a kubeconfig; ``kube_emulator.env`` is an environment for an
    operator subprocess (``KUBECONFIG`` set). See ``support/kube_emulator.py``.
``s3_server`` [session]
    A real S3-compatible server (SeaweedFS ``weed server -s3`` on 127.0.0.1, free
    ports): ``.endpoint_url``, ``.access_key``, ``.secret_key``, ``.env`` (AWS_*
    variables), ``.create_bucket(name=None)``, ``.client()``. Buckets persist for the
    session: make your own. See ``support/s3_server.py``; skipped without ``weed``
    locally, a failure under CI.
``kube_emulator_factory`` [function]
    ``kube_emulator_factory(**KubeEmulator kwargs)`` starts more, or differently
    configured ones (``git_version="v1.28.0"``, ``crds=[path]``, ``auth=False``).
``browser`` [module]
    Playwright driving the system headless Chromium (``/usr/bin/chromium``, from
    ``make chromium``; never a downloaded one). Skipped without it locally, a
    failure under CI. See ``support/browser.py``.
``page`` [function]
    A new page in a fresh browser context (1400x900, scale 1); on failure a screenshot
    goes to ``test-artifacts/screenshots/``. ``support.browser.save_screenshot(page,
    name)`` keeps named ones there too.

PostgreSQL missing: tests that need it are skipped locally, and FAIL under CI
(``CI=true``), because a CI run that quietly skips a backend proves nothing.
When a test fails, the log of every server it used is attached to the report.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import re
import uuid
from collections.abc import Callable, Generator, Iterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from support.kube_emulator import KubeEmulator
from support.postgres import (
    PostgresCluster,
    PostgresNotFound,
    PostgresStartError,
    find_postgres_bindir,
)
from support.s3_server import S3Server, S3ServerNotFound
from support.server_process import ServerProcess
from support.server_process import env_for as _env_for

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page
from support.sidecar_process import SidecarProcess

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


# -- the editable install must link every module ---------------------------------


def _stale_editable_modules() -> list[str]:
    """Source modules missing from a strict editable install's link tree.

    ``pip install -e . --config-settings editable_mode=strict`` links each file
    that existed at install time; a module added later is not importable from a
    subprocess (``python -m pluto server``) until the install is redone.
    """
    missing: list[str] = []
    for package, folder in (("pluto", "pluto"), ("pluto_server", "server"),
                            ("pluto_sidecar", "sidecar"), ("pluto_operator", "operator")):
        src = ROOT / folder
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            continue
        installed = Path(next(iter(spec.submodule_search_locations)))
        if installed.resolve() == src.resolve() or not src.is_dir():
            continue  # a plain (non-strict) install, or imported straight from the tree
        for path in sorted(src.rglob("*.py")):
            rel = path.relative_to(src)
            if "__pycache__" not in rel.parts and not (installed / rel).exists():
                missing.append(f"{folder}/{rel}")
    return missing


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PLUTO_SKIP_EDITABLE_CHECK"):
        return
    missing = _stale_editable_modules()
    if missing:
        listed = "\n  ".join(missing[:20])
        raise pytest.UsageError(
            "the editable install is stale: these modules are not linked into it, so "
            f"subprocesses cannot import them:\n  {listed}\n"
            "Run `make venv` (re-links them). A new sub-package must also be listed under "
            "[tool.setuptools] packages in pyproject.toml. "
            "PLUTO_SKIP_EDITABLE_CHECK=1 skips this check."
        )


# -- PostgreSQL ----------------------------------------------------------------------


@cache
def _postgres_unavailable() -> str | None:
    """Why PostgreSQL cannot be used here, or ``None`` when it can."""
    try:
        find_postgres_bindir()
    except PostgresNotFound as exc:
        return str(exc)
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root but there is no `postgres` OS user to run PostgreSQL as"
    return None


def _require_postgres() -> None:
    reason = _postgres_unavailable()
    if reason is None:
        return
    if _in_ci():
        pytest.fail(f"PostgreSQL is required under CI: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL not available: {reason}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("postgres") is not None:
        _require_postgres()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    _require_postgres()
    cluster = PostgresCluster()
    try:
        cluster.start()
    except PostgresStartError as exc:
        cluster.destroy()
        pytest.fail(str(exc), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="module")
def pg_url(pg_cluster: PostgresCluster, request: pytest.FixtureRequest) -> str:
    return pg_cluster.create_database(request.module.__name__)


@pytest.fixture
def fresh_pg_url(pg_cluster: PostgresCluster, request: pytest.FixtureRequest) -> str:
    return pg_cluster.create_database(request.node.name)


# -- servers -------------------------------------------------------------------------


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def server(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[ServerProcess]:
    database_url: str | None = None
    if backend == "postgres":
        cluster: PostgresCluster = request.getfixturevalue("pg_cluster")
        database_url = cluster.create_database(request.node.name)
    with ServerProcess(tmp_path / "pluto-data", database_url=database_url) as proc:
        yield proc


@pytest.fixture(scope="module")
def shared_server(
    backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    database_url: str | None = None
    if backend == "postgres":
        database_url = request.getfixturevalue("pg_url")
    data_dir = tmp_path_factory.mktemp(f"shared-{backend}") / "pluto-data"
    with ServerProcess(data_dir, database_url=database_url) as proc:
        yield proc


class ServerFactory:
    """Starts extra servers for one test; :meth:`stop_all` stops them."""

    def __init__(self, tmp_path: Path) -> None:
        self._tmp_path = tmp_path
        self.started: list[ServerProcess] = []

    def __call__(
        self, database_url: str | None = None, *, start: bool = True, **kwargs: Any
    ) -> ServerProcess:
        data_dir = kwargs.pop("data_dir", None) or self._tmp_path / f"server-{len(self.started)}"
        proc = ServerProcess(data_dir, database_url=database_url, **kwargs)
        self.started.append(proc)
        return proc.start() if start else proc

    def stop_all(self) -> None:
        for proc in self.started:
            proc.stop()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    factory = ServerFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def sdk_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith(("PLUTO_", "MLOP_")) or name == "RANK":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def project(request: pytest.FixtureRequest) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    return f"{base}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def env_for() -> Callable[..., dict[str, str]]:
    return _env_for


# -- reporting -----------------------------------------------------------------------

#: Each phase's report ("setup", "call", "teardown"): fixtures see whether the test failed.
PHASE_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()



@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(PHASE_REPORTS, {})[report.when] = report
    if report.failed:
        funcargs: dict[str, object] = getattr(item, "funcargs", {})
        seen: set[int] = set()
        for name, value in funcargs.items():
            procs = value.started if isinstance(value, ServerFactory) else [value]
            for proc in procs:
                if isinstance(proc, ServerProcess) and id(proc) not in seen:
                    seen.add(id(proc))
                    report.sections.append(
                        (f"pluto server log: {name} {proc!r}", proc.logs(limit=8000))
                    )
    return report


# -- sidecars ------------------------------------------------------------------------


@pytest.fixture
def sidecar_factory(tmp_path: Path) -> Iterator[Callable[..., SidecarProcess]]:
    """``sidecar_factory(server_url, **SidecarProcess kwargs)`` starts a real sidecar
    in its own directory; every one is stopped (SIGTERM) after the test."""
    started: list[SidecarProcess] = []

    def make(server_url: str, **kwargs: Any) -> SidecarProcess:
        sidecar = SidecarProcess(tmp_path / f"sidecar-{len(started)}", server_url, **kwargs)
        started.append(sidecar)
        return sidecar.start()

    yield make
    for sidecar in started:
        sidecar.stop()


# -- S3 ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3-server"))
    try:
        server.start()
    except S3ServerNotFound as exc:
        if _in_ci():
            pytest.fail(f"an S3 server is required under CI: {exc}", pytrace=False)
        pytest.skip(f"S3 server not available: {exc}")
    try:
        yield server
    finally:
        server.destroy()


# -- Kubernetes API emulator ---------------------------------------------------------


@pytest.fixture
def kube_emulator_factory(tmp_path: Path) -> Iterator[Callable[..., KubeEmulator]]:
    """``kube_emulator_factory(**KubeEmulator kwargs)`` starts an emulated API server in
    its own directory; every one is stopped (SIGTERM to its own pid) after the test."""
    started: list[KubeEmulator] = []

    def make(**kwargs: Any) -> KubeEmulator:
        emulator = KubeEmulator(tmp_path / f"kube-emulator-{len(started)}", **kwargs)
        started.append(emulator)
        return emulator.start()

    yield make
    for emulator in started:
        emulator.stop()


@pytest.fixture
def kube_emulator(kube_emulator_factory: Callable[..., KubeEmulator]) -> KubeEmulator:
    """A fresh emulated Kubernetes API server: namespaces ``default`` and ``kube-system``,
    the PlutoRun and JobSet CRDs, ``/version`` v1.31.0; ``.env`` for subprocesses."""
    return kube_emulator_factory()


# -- browser -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Per module, not per session: Playwright's sync API keeps an asyncio loop running in
    the main thread while it is started, and ``asyncio.run()`` in any later test would fail
    with "cannot be called from a running event loop"."""
    from support.browser import ChromiumNotFound, find_chromium, launch_chromium

    try:
        find_chromium()
    except ChromiumNotFound as exc:
        if _in_ci():
            pytest.fail(f"Chromium is required under CI: {exc}", pytrace=False)
        pytest.skip(f"Chromium not available: {exc}")
    with launch_chromium() as launched:
        yield launched


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A page in a fresh context; a screenshot of it is saved when the test fails."""
    from support.browser import new_context, save_screenshot, screenshot_path

    context = new_context(browser)
    try:
        new_page = context.new_page()
        yield new_page
        reports = request.node.stash.get(PHASE_REPORTS, {})
        if any(r.failed for r in reports.values()):
            save_screenshot(new_page, f"FAILED-{request.node.nodeid}")
        else:  # a passing run clears the screenshot of an earlier failure
            screenshot_path(f"FAILED-{request.node.nodeid}").unlink(missing_ok=True)
    finally:
        context.close()

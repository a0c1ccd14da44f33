"""API keys never show: not in ``ps``, not in logs, not in error messages.

``tests/test_server_auth.py`` proves that every route refuses a missing, wrong, revoked or
out-of-project key, and ``test_the_training_process_needs_no_credentials``
(``tests/test_sidecar.py``) that a sidecar with a good key keeps it out of its command line,
environment and logs. This module covers the failures: a server with ``--auth`` refusing keys
(wrong secret of a real key, revoked, another project's, garbage), the SDK and ``pluto.query``
given a wrong key, and a sidecar whose key the server refuses. The key presented, and its
secret part alone, must appear in no answer, no exception or warning, no log line, no
``/metrics`` page, and no process's command line (``/proc/PID/cmdline``, what ``ps`` shows).
SQLite only: what is printed does not depend on the database.
"""

from __future__ import annotations

import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.server_process import ServerProcess, create_api_key, revoke_api_key
from support.sidecar_process import SidecarProcess

import pluto
from pluto import query

pytestmark = pytest.mark.usefixtures("sdk_env")


def secret_of(key: str) -> str:
    return key[-12:]  # the tail of the secret part (which may itself hold "_")


def wrong_secret(key: str) -> str:
    """The same key id with another secret: the lookup finds the key, the hash differs."""
    return key[:-12] + ("A" if key[-12] != "A" else "B") * 12


class Keys:
    def __init__(self, server: ServerProcess, good: str, scoped: str, revoked: str) -> None:
        self.server = server
        self.good = good
        self.scoped = scoped
        self.revoked = revoked
        self.wrong = wrong_secret(good)
        self.garbage = "pluto_" + uuid.uuid4().hex + "_" + uuid.uuid4().hex

    @property
    def refused(self) -> list[str]:
        return [self.wrong, self.revoked, self.garbage]

    @property
    def all(self) -> list[str]:
        return [self.good, self.scoped, *self.refused]


def assert_no_key(text: str, keys: list[str], where: str) -> None:
    for key in keys:
        assert key not in text, f"a key appears in {where}"
        assert secret_of(key) not in text, f"a key's secret appears in {where}"


def cmdline(pid: int | None) -> str:
    assert pid is not None
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keys]:
    data_dir = tmp_path_factory.mktemp("security") / "pluto-data"
    server = ServerProcess(data_dir, extra_args=["--auth"])
    good = create_api_key(data_dir, "good")
    scoped = create_api_key(data_dir, "scoped", "--project", "theirs")
    revoked = create_api_key(data_dir, "revoked")
    revoke_api_key(data_dir, revoked)
    with server:
        yield Keys(server, good, scoped, revoked)


def test_a_refused_key_is_in_no_answer_and_no_server_log(keys: Keys) -> None:
    server = keys.server
    run = httpx.post(f"{server.url}/api/v1/runs", json={"project": "mine", "run_id": "r"},
                     headers={"Authorization": f"Bearer {keys.good}"}, timeout=10)
    assert run.status_code in (200, 201), run.text
    answers = []
    for key in keys.refused:
        for header in ({"Authorization": f"Bearer {key}"}, {"X-API-Key": key}):
            reply = httpx.get(f"{server.url}/api/v1/projects/mine/runs", headers=header,
                              timeout=10)
            assert reply.status_code == 401, reply.text
            answers.append(reply.text)
    # Another project's key: refused with 403, without naming it either.
    reply = httpx.get(f"{server.url}/api/v1/runs/{run.json()['id']}",
                      headers={"Authorization": f"Bearer {keys.scoped}"}, timeout=10)
    assert reply.status_code in (403, 404), reply.text
    answers.append(reply.text)
    assert_no_key("\n".join(answers), keys.all, "an error answer")
    time.sleep(0.2)  # the server's log lines of those requests are written
    assert_no_key(server.logs(), keys.all, "the server's log")
    assert_no_key(cmdline(server.pid), keys.all, "the server's command line")


def test_the_sdk_and_queries_never_repeat_a_refused_key(keys: Keys, tmp_path: Path) -> None:
    said: list[str] = []
    for key in keys.refused:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(Exception) as refused:
                pluto.init(project="mine", dir=tmp_path / "sdk", settings={
                    "url": keys.server.url, "api_key": key, "console": False,
                    "init_timeout": 5, "sidecar_socket": None})
        said += [str(refused.value), repr(refused.value)] + [str(w.message) for w in caught]
        with pytest.raises(Exception) as query_refused:
            query.list_runs("mine", url=keys.server.url, api_key=key)
        said += [str(query_refused.value), repr(query_refused.value)]
    assert any("401" in text or "key" in text.lower() for text in said), said
    assert_no_key("\n".join(said), keys.all, "what the SDK said")


def test_a_sidecar_whose_key_is_refused_never_shows_it(keys: Keys, tmp_path: Path) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(keys.wrong + "\n")
    key_file.chmod(0o600)
    with SidecarProcess(tmp_path / "sidecar", keys.server.url,
                        extra_args=["--sys-interval", "0", "--drain-seconds", "1",
                                    "--api-key-file", str(key_file)]) as sidecar:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # The key is the sidecar's to fix, not the training code's: init goes on with a
            # pending run, and what it logs waits in the sidecar's spool.
            run = pluto.init(project="mine", run_id="refused", dir=tmp_path / "sdk",
                             settings={"sidecar_socket": str(sidecar.socket),
                                       "console": False, "init_timeout": 5})
            assert run.pending
            assert any("is pending" in str(w.message) and "the sidecar's API key" in
                       str(w.message) for w in caught), [str(w.message) for w in caught]
            run.log({"loss": 1.0})
            run.finish(timeout=5)
        said = [str(w.message) for w in caught]
        # The server refused the sidecar's key: it says so, without the key.
        deadline = time.monotonic() + 15
        while "401" not in sidecar.logs() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "401" in sidecar.logs(), sidecar.logs()[-3000:]
        assert_no_key(sidecar.logs(), [keys.wrong], "the sidecar's log")
        assert_no_key(sidecar.metrics(), [keys.wrong], "the sidecar's /metrics")
        assert_no_key(cmdline(sidecar.pid), [keys.wrong], "the sidecar's command line")
        assert_no_key("\n".join(said), [keys.wrong], "what the SDK said through the sidecar")
    assert_no_key(keys.server.logs(), [keys.wrong], "the server's log")

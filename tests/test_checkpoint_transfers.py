"""Big and broken transfers: bounded memory, interrupted uploads, damaged bytes, the CLI.

Each test starts its own server process (they kill or inspect it) on the embedded
default: SQLite and a local storage directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pty
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from support.processes import die_with_parent, peak_rss_mib, terminate
from support.server_process import ServerProcess

import pluto
from pluto.errors import PlutoError
from pluto.transfer import Transfer, sha256_of
from pluto.transport.http import ApiClient
from pluto.wire import API_PREFIX, FileEntry

MiB = 1024 * 1024


def big_file(path: Path, size: int) -> Path:
    """``size`` bytes of a repeated random MiB: cheap to make, hashed in full all the same."""
    block = os.urandom(MiB)
    with path.open("wb") as handle:
        for _ in range(size // MiB):
            handle.write(block)
        handle.write(block[: size % MiB])
    return path




def sdk_env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PLUTO_", "MLOP_"))}
    env.update(PLUTO_URL=url, PLUTO_CONSOLE="0", PYTHONUNBUFFERED="1")
    return env


def run_sdk(script: str, url: str, cwd: Path, timeout: float = 300) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd,
                          env=sdk_env(url), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=die_with_parent)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_a_1_gib_checkpoint_round_trip_stays_under_200_mib_on_both_sides(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_factory()
    source = big_file(tmp_path / "big.bin", 1024 * MiB)
    expected = sha256_of(source)
    out = run_sdk(f"""
        from pathlib import Path
        import pluto
        from pluto.transfer import sha256_of
        run = pluto.init(project="big", name="big")
        run.log({{"loss": 1.0}}, step=7)
        info = run.log_checkpoint({str(source)!r}, step=7)
        assert info is not None, "upload failed"
        path = run.download_checkpoint(7, {str(tmp_path / "back")!r})
        print("sha", sha256_of(path / "big.bin"))
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so it would count the
        # forked pytest process this one started as.
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
        print("rss", int(hwm.split()[1]) / 1024)
        run.finish()
    """, server.url, tmp_path)
    fields = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    assert fields["sha"] == expected
    sdk_peak = float(fields["rss"])
    assert server.pid is not None
    server_peak = peak_rss_mib(server.pid)
    print(f"1 GiB round trip: SDK peak RSS {sdk_peak:.0f} MiB, server {server_peak:.0f} MiB")
    assert sdk_peak < 200, sdk_peak
    assert server_peak < 200, server_peak
    stored = list((server.data_dir / "files" / "blobs").rglob("*"))
    assert [p.name for p in stored if p.is_file()] == [expected]


def test_a_server_killed_mid_upload_never_lists_half_a_checkpoint(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_factory()
    source = big_file(tmp_path / "big.bin", 600 * MiB)
    run = pluto.init(project="cut", name="cut", dir=tmp_path / "pluto",
                     settings={"url": server.url, "console": False})
    run.log({"loss": 1.0}, step=1)
    script = f"""
        import pluto
        run = pluto.init(project="cut", run_id={run.run_id!r}, resume=True)
        print("result", run.log_checkpoint({str(source)!r}, step=1))
    """
    uploader = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=tmp_path,
                                env=sdk_env(server.url), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    staging = server.data_dir / "files" / ".tmp"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until bytes are streaming in
        partial = [p.stat().st_size for p in staging.glob("*")] if staging.exists() else []
        if partial and partial[0] > 50 * MiB:
            break
        time.sleep(0.01)
    else:
        terminate(uploader, 10)
        pytest.fail("the upload never started streaming")
    server.kill()
    terminate(uploader, 10)  # the client dies too: nobody will finish this upload
    server.start()

    base = f"{server.url}{API_PREFIX}/runs/{run.run_id}"
    listed = httpx.get(f"{base}/checkpoints", params={"project": "cut"}).json()
    assert listed == {"checkpoints": []}
    assert httpx.get(f"{base}/checkpoints/resolve",
                     params={"project": "cut"}).status_code == 404
    assert not list((server.data_dir / "files").rglob("blobs/**/*"))
    assert list(staging.iterdir()) == []  # the half file was cleared at start

    # The same upload again completes, once.
    info = run.log_checkpoint(source, step=1)
    assert info is not None and info.files[0].sha256 == sha256_of(source)
    assert len(run.checkpoints) == 1
    run.finish()


def test_an_upload_retries_through_a_server_restart(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_factory()
    source = big_file(tmp_path / "big.bin", 400 * MiB)
    run = pluto.init(project="retry", name="retry", dir=tmp_path / "pluto",
                     settings={"url": server.url, "console": False})
    script = f"""
        import pluto
        run = pluto.init(project="retry", run_id={run.run_id!r}, resume=True)
        info = run.log_checkpoint({str(source)!r}, step=0)
        print("step", info.step if info else None)
    """
    uploader = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=tmp_path,
                                env=sdk_env(server.url), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True,
                                preexec_fn=die_with_parent)
    staging = server.data_dir / "files" / ".tmp"
    deadline = time.monotonic() + 120
    while not (staging.exists() and any(p.stat().st_size > 20 * MiB for p in staging.glob("*"))):
        if time.monotonic() > deadline or uploader.poll() is not None:
            uploader.kill()
            pytest.fail("the upload was never seen mid-way: nothing to kill the server under "
                        f"(uploader output: {uploader.communicate()[0]!r})")
        time.sleep(0.01)
    server.kill()
    server.start()
    out, _ = uploader.communicate(timeout=300)
    assert uploader.returncode == 0, out
    assert "step 0" in out, out
    [stored] = run.checkpoints
    assert stored.files[0].sha256 == sha256_of(source)
    run.finish()


def test_damaged_bytes_are_refused_in_both_directions(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_factory()
    run = pluto.init(project="damage", name="d", dir=tmp_path / "pluto",
                     settings={"url": server.url, "console": False})
    base = f"{server.url}{API_PREFIX}/runs/{run.run_id}"
    params = {"project": "damage"}
    content = b"checkpoint bytes" * 1000
    wrong = hashlib.sha256(b"something else").hexdigest()

    # Upload: bytes that do not hash to the announced digest are not kept.
    refused = httpx.put(f"{base}/blobs/{wrong}", params=params, content=content)
    assert refused.status_code == 422
    assert "hash to sha256" in refused.json()["detail"]
    missing = httpx.post(f"{base}/blobs/missing", params=params, json={"sha256": [wrong]})
    assert missing.json() == {"missing": [wrong]}
    commit = httpx.post(f"{base}/checkpoints", params=params, json={
        "step": 1, "files": [{"path": "x", "size": len(content), "sha256": wrong}]})
    assert commit.status_code == 409 and "were not uploaded" in commit.json()["detail"]
    # A body cut short (the client went away) keeps nothing either.
    good = hashlib.sha256(content).hexdigest()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(f"PUT {API_PREFIX}/runs/{run.run_id}/blobs/{good}?project=damage HTTP/1.1\r\n"
                    f"host: {host}\r\ncontent-length: {len(content)}\r\n\r\n".encode()
                    + content[:-100])
        raw.shutdown(socket.SHUT_WR)
        raw.settimeout(10)
        with contextlib.suppress(OSError):
            raw.recv(1000)
    missing = httpx.post(f"{base}/blobs/missing", params=params, json={"sha256": [good]})
    assert missing.json() == {"missing": [good]}
    assert list((server.data_dir / "files" / ".tmp").iterdir()) == []
    assert "unhandled error" not in server.logs()  # a client going away is not a server bug

    # Download: a stored blob changed behind the server's back is caught by the client.
    source = tmp_path / "ckpt.bin"
    source.write_bytes(content)
    info = run.log_checkpoint(source, step=1)
    assert info is not None
    [blob] = [p for p in (server.data_dir / "files" / "blobs").rglob("*") if p.is_file()]
    blob.write_bytes(b"X" + content[1:])
    with pytest.raises(pluto.ChecksumMismatch, match="damaged"):
        run.download_checkpoint(1, tmp_path / "out")
    assert not (tmp_path / "out" / "ckpt.bin").exists()
    run.finish()


def test_the_cli_lists_forks_and_downloads_checkpoints(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_factory()
    settings = {"url": server.url, "console": False}
    a = pluto.init(project="cli", name="a", dir=tmp_path / "pluto", settings=settings)
    for step in (0, 10, 20):
        a.log({"loss": 1.0}, step=step)
        (tmp_path / f"w{step}.bin").write_bytes(f"weights {step}".encode())
        a.log_checkpoint(tmp_path / f"w{step}.bin", step=step, metadata={"acc": step / 100})
    a.finish()
    b = pluto.init(project="cli", name="b", dir=tmp_path / "pluto", settings=settings)

    def cli(*argv: str) -> str:
        done = subprocess.run([sys.executable, "-m", "pluto", "checkpoints", *argv,
                               "--project", "cli", "--url", server.url],
                              capture_output=True, text=True, cwd=tmp_path, timeout=60,
                              env={**sdk_env(server.url), "COLUMNS": "200"})
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    listing = cli("list", a.display_id)
    rows = [line for line in listing.splitlines() if a.display_id in line]
    assert [row.split("│")[1].strip() for row in rows] == ["0", "10", "20"]
    assert all(f"acc={acc}" in listing for acc in (0.0, 0.1, 0.2))
    forked = cli("fork", "--from", a.display_id, "--to", b.display_id,
                 "--not-after-step", "15")
    assert f"forked checkpoint {a.display_id} step 10" in forked
    assert f"to {b.display_id} at step 10" in forked
    assert f"{a.display_id} step 10" in cli("list", b.display_id)
    dest = cli("download", b.display_id, "--dest", str(tmp_path / "got")).strip()
    assert (Path(dest) / "w10.bin").read_bytes() == b"weights 10"

    failed = subprocess.run([sys.executable, "-m", "pluto", "checkpoints", "fork",
                             "--from", a.display_id, "--to", b.display_id, "--project", "cli",
                             "--not-after-step", "-1", "--url", server.url],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60,
                            env=sdk_env(server.url))
    assert failed.returncode == 1
    assert "not_after_step" in failed.stdout + failed.stderr
    b.finish()


PROGRESS_SCRIPT = """
import pluto
run = pluto.init(project="bars", name="bars", settings={"console": False})
run.log({"loss": 1.0}, step=1)
assert run.log_checkpoint(SOURCE, step=1) is not None
run.download_checkpoint(1, DEST)
run.finish()
"""


@pytest.mark.parametrize("terminal", [True, False], ids=["tty", "pipe"])
def test_big_transfers_show_progress_on_a_terminal_and_nothing_in_logs(
    server_factory: Callable[..., ServerProcess], tmp_path: Path, terminal: bool
) -> None:
    server = server_factory()
    source = big_file(tmp_path / "big.bin", 64 * MiB)
    code = PROGRESS_SCRIPT.replace("SOURCE", repr(str(source))).replace(
        "DEST", repr(str(tmp_path / "back")))
    if terminal:
        controller, stderr = pty.openpty()
    else:
        controller, stderr = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path,
                            env={**sdk_env(server.url), "COLUMNS": "120", "TERM": "xterm"},
                            stdout=subprocess.DEVNULL, stderr=stderr,
                            preexec_fn=die_with_parent)
    os.close(stderr)
    output = bytearray()
    while True:
        try:
            piece = os.read(controller, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not piece:
            break
        output += piece
    os.close(controller)
    assert proc.wait(timeout=120) == 0, output.decode(errors="replace")
    text = output.decode(errors="replace")
    if terminal:
        for phase in ("hashing checkpoint 1", "uploading checkpoint 1", "downloading checkpoint"):
            assert phase in text, text[-2000:]
        assert "64.0/64.0 MB" in text or "67.1/67.1 MB" in text, text[-2000:]
    else:
        assert text == "", text


@pytest.mark.parametrize("path", ["../outside.bin", "sub/../../outside.bin", "/etc/passwd"])
def test_a_manifest_path_leaving_the_destination_is_refused_before_anything_is_touched(
    tmp_path: Path, path: str
) -> None:
    """The server refuses such paths when a checkpoint is committed; the SDK checks again
    (a server of another version, a proxy) before it reads or writes any file."""
    dest = tmp_path / "dest"
    dest.mkdir()
    victim = tmp_path / "outside.bin"
    victim.write_bytes(b"x" * 10)
    transfer = Transfer(ApiClient("http://127.0.0.1:9", None), "1", None, quiet=True)
    entries = [("/unused", FileEntry(path="fine.bin", size=1, sha256="0" * 64)),
               ("/unused", FileEntry(path=path, size=10, sha256="0" * 64))]
    with pytest.raises(PlutoError, match="outside"):
        transfer._download(entries, dest, "checkpoint")
    assert list(dest.iterdir()) == [] and victim.read_bytes() == b"x" * 10

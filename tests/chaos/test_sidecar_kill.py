"""``kill -9`` of the sidecar while 4 ranks log through it (issue 3; the fault suite of
issue 7): restarted on the same socket and spool, it loses and duplicates nothing.

The short version runs in the normal suite; 50 rounds carry the ``chaos`` marker and run with
``PLUTO_CHAOS=1`` (``make chaos``). ``PLUTO_CHAOS_SEED`` replays a failed run's schedule (every
failure message prints its seed).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from support.chaos import (
    SIDECAR_ARGS,
    ServerFactory,
    SidecarFactory,
    assert_exactly_once,
    assert_stored_in_order,
    chaos_seed,
    expected_points,
    long_chaos,
    run_status,
    sidecar_metric,
    start_writers,
    stored_count,
    stored_points,
    wait_delivered,
)
from support.server_process import ServerProcess
from support.sidecar_process import SidecarProcess

# -- kill -9 of the sidecar under load --------------------------------------------------


def kill_sidecar_rounds(server: ServerProcess, sidecar: SidecarProcess, tmp_path: Path, *,
                        rounds: int, steps: int, every: int, pause: float) -> None:
    seed = chaos_seed()
    rng = random.Random(seed)
    run_ref = f"sidecar-kill-{seed}"
    writers = start_writers(sidecar, tmp_path / "writers", run_ref, 4, steps, every=every,
                            pause=pause)
    kills: list[tuple[float, float]] = []
    try:
        writers.wait_ready()
        start = time.monotonic()
        for _ in range(rounds):
            up = rng.uniform(0.3, 2.5)
            time.sleep(up)
            under_load = writers.alive
            sidecar.kill()
            down = rng.uniform(0.0, 1.0)
            time.sleep(down)
            sidecar.start()
            kills.append((round(up, 2), round(down, 2)))
            assert under_load or len(kills) > rounds // 2, "the writers finished too early"
        chaos_seconds = time.monotonic() - start
        reports = writers.wait(timeout=180)
    finally:
        writers.kill()
    context = (f"seed {seed} (PLUTO_CHAOS_SEED={seed} replays it), {len(kills)} kills in "
               f"{chaos_seconds:.1f}s (up, down seconds): {kills}")
    assert all(r["undelivered_bytes"] == 0 for r in reports), f"{context}\n{reports}"
    expected = expected_points(range(4), steps, 10)
    waited = wait_delivered(server, [sidecar], run_ref, sum(expected.values()), timeout=120)
    assert_exactly_once(stored_points(server, run_ref), expected,
                        f"{context}\nwaited {waited:.1f}s for delivery")
    assert run_status(server, run_ref) == "COMPLETED"
    opened = [e for e in sidecar.events() if e.get("event") == "spool opened"]
    assert len(opened) == len(kills) + 1, context  # the spool was recovered at each restart


def test_sidecar_kill9_under_load(server_factory: ServerFactory,
                                  sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    """4 writers; the sidecar is SIGKILLed 4 times at random moments and restarted on
    the same socket and spool: every point arrives exactly once."""
    server = server_factory()
    sidecar = sidecar_factory(server.url, extra_args=SIDECAR_ARGS)
    # ~12 s of logging per writer: 4,000 calls of 10 scalars, a pause every 50 calls.
    kill_sidecar_rounds(server, sidecar, tmp_path, rounds=4, steps=4000, every=50, pause=0.15)


@pytest.mark.chaos
@long_chaos
@pytest.mark.timeout(900)
def test_sidecar_kill9_many_rounds(server_factory: ServerFactory,
                                   sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    server = server_factory()
    sidecar = sidecar_factory(server.url, extra_args=SIDECAR_ARGS)
    kill_sidecar_rounds(server, sidecar, tmp_path, rounds=50, steps=50_000, every=50,
                        pause=0.15)


def test_sidecar_kill9_with_backlog(server_factory: ServerFactory,
                                   sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    """The server is away from the start, so the run stays pending and 1,000,000 points
    (more than one 16 MB spool segment) pile up in the sidecar's spool; the sidecar is
    SIGKILLed while the writers log into it and again while the backlog is forwarded
    after the server came up: every point arrives exactly once, in order."""
    seed = chaos_seed()
    rng = random.Random(seed)
    run_ref = f"backlog-kill-{seed}"
    server = server_factory(start=False)
    sidecar = sidecar_factory(server.url, extra_args=[*SIDECAR_ARGS, "--open-wait", "1"])
    steps = 25_000
    writers = start_writers(sidecar, tmp_path / "writers", run_ref, 4, steps, every=500,
                            pause=0.1)
    kills: list[str] = []
    try:
        writers.wait_ready()
        for _ in range(2):
            time.sleep(rng.uniform(0.2, 1.5))
            kills.append(f"logging, {'writers alive' if writers.alive else 'writers done'}, "
                         f"{sidecar_metric(sidecar, 'spool_bytes')} bytes spooled")
            sidecar.kill()
            time.sleep(rng.uniform(0.0, 0.5))
            sidecar.start()
        reports = writers.wait(timeout=180)
    finally:
        writers.kill()
    assert all(r["undelivered_bytes"] == 0 for r in reports), reports
    backlog = sidecar_metric(sidecar, "spool_bytes") or 0
    expected = expected_points(range(4), steps, 10)
    total = sum(expected.values())
    server.start()
    for _ in range(3):
        time.sleep(rng.uniform(0.3, 2.0))
        stored = stored_count(server, run_ref)
        if stored >= total:
            break
        kills.append(f"forwarding, {stored} points stored")
        sidecar.kill()
        time.sleep(rng.uniform(0.0, 0.5))
        sidecar.start()
    context = (f"seed {seed} (PLUTO_CHAOS_SEED={seed} replays it); backlog {backlog:.0f} "
               f"bytes; sidecar SIGKILLed: {kills}")
    assert backlog > 16 * 1024 * 1024, context  # the backlog spans spool segments
    waited = wait_delivered(server, [sidecar], run_ref, total, timeout=120)
    assert_exactly_once(stored_points(server, run_ref), expected,
                        f"{context}\nwaited {waited:.1f}s")
    assert_stored_in_order(server, run_ref)
    assert run_status(server, run_ref) == "COMPLETED"
    assert sidecar_metric(sidecar, "dead_letters_total") == 0, context

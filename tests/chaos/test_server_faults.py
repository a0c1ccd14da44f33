"""The server away under load: stopped for a while, or ``kill -9``ed mid-batch and
restarted, while the sidecar forwards; and every fault at once, for many rounds. Every point
arrives exactly once, and each writer's chunks are applied in order.

Also kill -9 of the sidecar and the server together at random moments (issue 7): three
rounds in the normal suite; the 30 s outage and 50 rounds of mixed faults carry the ``chaos``
marker (``make chaos``). ``PLUTO_CHAOS_SEED`` replays a schedule (failures print the seed).
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
    assert_times_follow_steps,
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

# -- the server away under load -----------------------------------------------------------


def server_outage(server: ServerProcess, sidecar: SidecarProcess, tmp_path: Path, *,
                  outage: float, steps: int, every: int, pause: float,
                  spool_cap: int | None = None) -> None:
    run_ref = f"outage-{int(outage)}s"
    writers = start_writers(sidecar, tmp_path / "writers", run_ref, 4, steps, every=every,
                            pause=pause)
    try:
        writers.wait_ready()
        time.sleep(1.5)
        before = stored_count(server, run_ref)
        server.stop()
        peak = 0.0
        until = time.monotonic() + outage
        while time.monotonic() < until:
            peak = max(peak, sidecar_metric(sidecar, "spool_bytes") or 0)
            time.sleep(0.1)
        assert writers.alive, "the writers finished before the server came back: no load"
        spooled = sidecar_metric(sidecar, "spool_bytes") or 0
        server.start()
        back = time.monotonic()
        reports = writers.wait(timeout=120 + outage)
    finally:
        writers.kill()
    assert all(r["undelivered_bytes"] == 0 for r in reports), reports
    expected = expected_points(range(4), steps, 10)
    waited = wait_delivered(server, [sidecar], run_ref, sum(expected.values()),
                            timeout=90 + outage)
    context = (f"{outage:.0f}s outage; {before} points stored before it, {spooled:.0f} bytes "
               f"spooled at its end; delivered {time.monotonic() - back:.1f}s after the "
               f"server was back (waited {waited:.1f}s after the writers finished)")
    assert before > 0, context
    assert spooled > 0, context
    if spool_cap is not None:  # back-pressure held the spool near its cap
        assert spooled >= spool_cap * 0.5, context
        assert peak <= spool_cap + 2 * 1024 * 1024, f"spool peaked at {peak:.0f}: {context}"
    assert_exactly_once(stored_points(server, run_ref), expected, context)
    assert_times_follow_steps(server, run_ref)
    assert_stored_in_order(server, run_ref)
    assert run_status(server, run_ref) == "COMPLETED"
    assert (sidecar_metric(sidecar, "retries_total") or 0) > 0, context


def test_server_outage_under_load(server_factory: ServerFactory,
                                  sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    """The server is stopped for 5 s while 4 writers log, with a 1 MB spool cap so that
    back-pressure holds the writers back: everything arrives, once, and each writer's
    points are applied and stored in order."""
    server = server_factory()
    sidecar = sidecar_factory(server.url, extra_args=[*SIDECAR_ARGS, "--spool-max-mb", "1"])
    # ~10 s of logging, 400 calls of 10 scalars a second per writer: small chunks, so the
    # spool can overshoot its cap by little (one frame per connection at most).
    server_outage(server, sidecar, tmp_path, outage=5, steps=4000, every=20, pause=0.05,
                  spool_cap=1024 * 1024)


@pytest.mark.chaos
@long_chaos
@pytest.mark.timeout(600)
def test_server_outage_30s_under_load(server_factory: ServerFactory,
                                      sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    """The spec's case: the server is away for 30 s under load."""
    server = server_factory()
    sidecar = sidecar_factory(server.url, extra_args=SIDECAR_ARGS)
    server_outage(server, sidecar, tmp_path, outage=30, steps=8000, every=40, pause=0.2)


# -- kill -9 of the server while a backlog is forwarded ----------------------------------


@pytest.mark.parametrize("database", ["sqlite", pytest.param("postgres",
                                                             marks=pytest.mark.postgres)])
def test_server_kill9_mid_batch(database: str, server_factory: ServerFactory,
                                sidecar_factory: SidecarFactory, tmp_path: Path,
                                request: pytest.FixtureRequest) -> None:
    """A backlog of 600,000 points waits in the sidecar's spool (the server was never up);
    while it is forwarded the server is SIGKILLed three times, mid-batch, and restarted:
    every batch is applied exactly once."""
    seed = chaos_seed()
    rng = random.Random(seed)
    run_ref = f"server-kill-{seed}"
    database_url = (request.getfixturevalue("fresh_pg_url") if database == "postgres"
                    else None)
    server = server_factory(database_url, start=False)
    # Many batches, so the backlog takes many round trips and there is a batch on the wire
    # for each kill: each writer pauses past the SDK's flush interval every 1,500 steps, so
    # that its points come as 10 chunks (logged at full speed, they came as one chunk a
    # writer, 4 batches in all, and a fast server took the whole backlog before the first
    # kill); 256 KB batches then carry one chunk each.
    sidecar = sidecar_factory(server.url, extra_args=[*SIDECAR_ARGS, "--open-wait", "1",
                                                      "--batch-max-kb", "256"])
    steps = 15_000
    writers = start_writers(sidecar, tmp_path / "writers", run_ref, 4, steps, every=1_500,
                            pause=0.25)
    try:
        reports = writers.wait(timeout=120)  # everything is in the sidecar's spool now
    finally:
        writers.kill()
    assert all(r["undelivered_bytes"] == 0 and r["id"] == 0 for r in reports), reports
    expected = expected_points(range(4), steps, 10)
    total = sum(expected.values())
    backlog = sidecar_metric(sidecar, "spool_bytes") or 0
    assert backlog > 10_000_000, f"only {backlog} bytes spooled"

    kills: list[float] = []
    server.start()
    for _ in range(3):
        # Kill while the forwarder has a batch on the wire: once something of this round
        # was sent, after a random delay, and only while the backlog is not all through.
        sent_before = sidecar_metric(sidecar, "batches_sent_total") or 0
        deadline = time.monotonic() + 60
        next_count = time.monotonic() + 1
        while (sidecar_metric(sidecar, "batches_sent_total") or 0) <= sent_before:
            # The rest of the backlog may have gone through while the server restarted
            # (counted once a second: a count reads every block).
            if time.monotonic() > next_count:
                if stored_count(server, run_ref) >= total:
                    break
                next_count = time.monotonic() + 1
            assert time.monotonic() < deadline, "the forwarder sent nothing for 60 s"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.1))
        # The sidecar's own gauge of what is not yet acknowledged: read in a few ms, where
        # counting on the server reads every block and leaves a fast server time to finish.
        unacknowledged = sidecar_metric(sidecar, "spool_bytes") or 0
        if unacknowledged == 0:
            break
        server.kill()
        kills.append(unacknowledged)
        time.sleep(rng.uniform(0.0, 1.0))
        server.start()
    context = (f"seed {seed} (PLUTO_CHAOS_SEED={seed} replays it); {backlog:.0f} bytes of "
               f"backlog; server SIGKILLed with these bytes not yet acknowledged: {kills}")
    assert kills, f"the backlog went through before any kill: {context}"
    waited = wait_delivered(server, [sidecar], run_ref, total, timeout=120)
    assert_exactly_once(stored_points(server, run_ref), expected,
                        f"{context}\nwaited {waited:.1f}s for the rest")
    assert_stored_in_order(server, run_ref)
    assert run_status(server, run_ref) == "COMPLETED"
    # The server's answers count freshly applied points only: a batch committed just before
    # a kill and sent again is answered as a duplicate, so the sum can fall short, never over.
    sent = sidecar_metric(sidecar, "points_sent_total") or 0
    assert sent <= total, context
    assert (sidecar_metric(sidecar, "retries_total") or 0) > 0, context
    assert sidecar_metric(sidecar, "dead_letters_total") == 0, context


# -- kill -9 of the sidecar and the server, and everything at once -----------------------


def mixed_fault_rounds(server: ServerProcess, sidecar: SidecarProcess, tmp_path: Path, *,
                       rounds: int, steps: int, every: int, pause: float,
                       each_once: list[str] | None = None) -> None:
    """``rounds`` faults at random moments while 4 writers log into one run: each SIGKILLs
    the sidecar, the server, or both (in a random order), or stops the server (SIGTERM);
    what was taken down comes back after a random pause (in a random order when both were).
    With ``each_once`` the rounds are those faults, each once, in a random order (else each
    round's fault is drawn at random). Every
    (key, step, writer) point arrives exactly once, and each writer's chunks are applied
    in order."""
    seed = chaos_seed()
    print(f"chaos seed {seed} (PLUTO_CHAOS_SEED={seed} replays it)")
    rng = random.Random(seed)
    run_ref = f"mixed-{seed}"
    kinds = ["kill sidecar", "kill server", "kill both", "stop server"]
    schedule = rng.sample(each_once, len(each_once)) if each_once else None
    writers = start_writers(sidecar, tmp_path / "writers", run_ref, 4, steps, every=every,
                            pause=pause)
    faults: list[str] = []
    under_load = 0
    try:
        writers.wait_ready()
        start = time.monotonic()
        for index in range(rounds):
            time.sleep(rng.uniform(0.2, 2.0))
            fault = schedule[index % len(schedule)] if schedule else rng.choice(kinds)
            if writers.alive:
                under_load += 1
                faults.append(fault)
            else:
                faults.append(f"{fault} (writers done)")
            victims = {"kill sidecar": [sidecar.kill], "kill server": [server.kill],
                       "kill both": [sidecar.kill, server.kill],
                       "stop server": [server.stop]}[fault]
            for victim in rng.sample(victims, len(victims)):
                victim()
                time.sleep(rng.uniform(0.0, 0.2))
            time.sleep(rng.uniform(0.0, 1.5))
            comebacks = []
            if not server.running:
                comebacks.append(server.start)
            if sidecar.proc is not None and sidecar.proc.poll() is not None:
                comebacks.append(sidecar.start)
            for comeback in rng.sample(comebacks, len(comebacks)):
                comeback()
        chaos_seconds = time.monotonic() - start
        reports = writers.wait(timeout=300)
    finally:
        writers.kill()
    counts = {kind: sum(f.startswith(kind) for f in faults) for kind in kinds}
    context = (f"seed {seed} (PLUTO_CHAOS_SEED={seed} replays it); {rounds} faults in "
               f"{chaos_seconds:.0f}s, {under_load} while the writers logged ({counts}): "
               f"{faults}")
    print(context)
    assert under_load > rounds // 2, f"the writers finished too early: {context}"
    assert all(r["undelivered_bytes"] == 0 for r in reports), f"{context}\n{reports}"
    expected = expected_points(range(4), steps, 10)
    waited = wait_delivered(server, [sidecar], run_ref, sum(expected.values()), timeout=180)
    assert_exactly_once(stored_points(server, run_ref), expected,
                        f"{context}\nwaited {waited:.1f}s")
    assert_stored_in_order(server, run_ref)
    assert run_status(server, run_ref) == "COMPLETED"
    assert sidecar_metric(sidecar, "dead_letters_total") == 0, context


def test_sidecar_and_server_kill9_under_load(server_factory: ServerFactory,
                                             sidecar_factory: SidecarFactory,
                                             tmp_path: Path) -> None:
    """The short version (``make test``): 3 rounds while 4 writers log, one of each kind of
    kill -9 (the sidecar, the server, both) in a random order at random moments."""
    server = server_factory()
    sidecar = sidecar_factory(server.url, extra_args=SIDECAR_ARGS)
    # ~15 s of logging per writer: 5,000 calls of 10 scalars, a pause every 50 calls.
    mixed_fault_rounds(server, sidecar, tmp_path, rounds=3, steps=5000, every=50, pause=0.15,
                       each_once=["kill sidecar", "kill server", "kill both"])


@pytest.mark.chaos
@long_chaos
@pytest.mark.timeout(900)
def test_mixed_faults_many_rounds(server_factory: ServerFactory,
                                  sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    """50 rounds (``make chaos``): kill -9 of the sidecar, of the server or of both, or a
    SIGTERM of the server, at random moments while 4 writers log."""
    server = server_factory()
    sidecar = sidecar_factory(server.url, extra_args=SIDECAR_ARGS)
    # ~5 minutes of logging per writer (50,000 calls, 0.3 s pause every 50), about as long as
    # 50 rounds take, so that the faults hit the writers while they log.
    mixed_fault_rounds(server, sidecar, tmp_path, rounds=50, steps=50_000, every=50,
                       pause=0.3)

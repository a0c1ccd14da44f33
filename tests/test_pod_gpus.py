"""``pluto_sidecar.pod_gpus``: which GPUs the sidecar reports, from what the ranks tell it."""

from __future__ import annotations

from pluto_sidecar.pod_gpus import PodGpus


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_nothing_is_reported_before_a_rank_connects_or_tells() -> None:
    clock = Clock()
    gpus = PodGpus(grace_seconds=30, clock=clock)
    clock.now += 3600
    assert gpus.which() == []  # no rank yet: whose GPUs would they be?
    gpus.client_connected()
    clock.now += 29
    assert gpus.which() == []  # a current SDK tells within a second or so


def test_the_told_gpus_are_reported_in_the_order_told_each_once() -> None:
    gpus = PodGpus(grace_seconds=30, clock=Clock())
    gpus.client_connected()
    assert gpus.tell(["GPU-b", "GPU-a", "GPU-b"]) == ["GPU-b", "GPU-a"]
    assert gpus.tell(["GPU-a", "GPU-c"]) == ["GPU-c"]  # a second container of the pod
    assert gpus.which() == ["GPU-b", "GPU-a", "GPU-c"]


def test_a_rank_without_gpus_keeps_the_nodes_gpus_out_for_good() -> None:
    clock = Clock()
    gpus = PodGpus(grace_seconds=30, clock=clock)
    gpus.client_connected()
    assert gpus.tell([]) == []
    assert gpus.told
    clock.now += 3600
    assert gpus.which() == []


def test_with_no_rank_telling_every_gpu_is_reported_after_the_grace() -> None:
    """Ranks of an SDK from before NODE frames carried GPUs never tell."""
    clock = Clock()
    gpus = PodGpus(grace_seconds=30, clock=clock)
    gpus.client_connected()
    clock.now += 10
    gpus.client_connected()  # the grace counts from the first rank, not the latest
    clock.now += 20
    assert gpus.which() is None
    gpus.tell(["GPU-a"])  # a newer rank joins later: from then on, the pod's only
    assert gpus.which() == ["GPU-a"]

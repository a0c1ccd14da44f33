"""The cyclic garbage collector in the long-running processes (server, operator).

A full collection walks every object the collector tracks. After start-up that is mostly
what lives as long as the process: modules, the web framework's routes and models, kopf's
registry, the operator's first listing of the cluster. One full collection took 50-80 ms
in the server and about 100 ms in the operator's webhook (docs/benchmarks.md, "Pod
webhook"): a pause for whatever requests are in flight. ``freeze_start_up_objects``
collects what is garbage now (frozen garbage would never be freed) and freezes the rest
out of later collections, which then walk only what came after (about 1 ms).
"""

from __future__ import annotations

import gc


def freeze_start_up_objects() -> int:
    """Collect, then freeze every tracked object; returns how many are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()

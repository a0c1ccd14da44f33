"""Status conditions (metav1.Condition) of a PlutoRun, one per type.

``status.conditions`` is a list-map keyed by ``type``; a merge patch replaces the whole list,
so each change is made to the full current list and written back whole.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Any, Literal

#: The server answered the last request (False: why not; the reconciler retries).
SERVER_REACHABLE = "ServerReachable"
#: The run exists on the server and the pods can attach to it.
RUN_READY = "RunReady"
#: The run was finished on the server (with the status in the reason).
RUN_FINISHED = "RunFinished"

Status = Literal["True", "False", "Unknown"]


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: Iterable[Mapping[str, Any]],
    type_: str,
    status: Status,
    reason: str,
    message: str,
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """The list with ``type_`` set; its transition time moves only when its status changes."""
    result: list[dict[str, Any]] = []
    found = False
    for cond in conditions:
        if cond.get("type") != type_:
            result.append(dict(cond))
            continue
        found = True
        changed = cond.get("status") != status
        result.append(_condition(type_, status, reason, message, generation,
                                 now() if changed else str(cond.get("lastTransitionTime"))))
    if not found:
        result.append(_condition(type_, status, reason, message, generation, now()))
    return result


def _condition(type_: str, status: Status, reason: str, message: str, generation: int | None,
               at: str) -> dict[str, Any]:
    cond: dict[str, Any] = {
        "type": type_, "status": status, "reason": reason,
        # The CRD caps a message at 32768 characters; server messages can be long.
        "message": message[:32000], "lastTransitionTime": at,
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def condition_status(conditions: Iterable[Mapping[str, Any]], type_: str) -> str | None:
    for cond in conditions:
        if cond.get("type") == type_:
            return str(cond.get("status"))
    return None

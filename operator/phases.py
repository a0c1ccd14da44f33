"""A PlutoRun's phase, from the pods it covers and the Jobs/JobSets that own them. Pure.

Succeeded and Failed come from the workload (a Job's ``Complete``/``Failed`` condition, a
JobSet's ``Completed``/``Failed``), because a pod that failed may be retried by its Job; bare
pods decide by their own phase. Terminal phases stick: a run that finished is not reopened by
a late pod event.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pluto.wire import RunStatus
from pluto_operator.model import Phase
from pluto_operator.names import (
    ANNOTATION_INJECTED,
    JOB_NAME_LABEL,
    JOBSET_NAME_LABEL,
    LEGACY_JOB_NAME_LABEL,
)

WorkloadKind = Literal["Job", "JobSet"]
TERMINAL: frozenset[Phase] = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True, order=True)
class Workload:
    kind: WorkloadKind
    name: str


def workload_of(pod: Mapping[str, Any]) -> Workload | None:
    """The JobSet (preferred: it owns the Jobs) or Job a pod belongs to, from its labels."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    if labels.get(JOBSET_NAME_LABEL):
        return Workload("JobSet", labels[JOBSET_NAME_LABEL])
    job = labels.get(JOB_NAME_LABEL) or labels.get(LEGACY_JOB_NAME_LABEL)
    return Workload("Job", job) if job else None


def _condition_true(obj: Mapping[str, Any], kinds: Iterable[str]) -> bool:
    wanted = set(kinds)
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") in wanted and cond.get("status") == "True":
            return True
    return False


def workload_outcome(kind: WorkloadKind, obj: Mapping[str, Any] | None) -> Phase | None:
    """Succeeded/Failed once the workload says so; None while it runs (or is gone)."""
    if obj is None:
        return None
    if _condition_true(obj, ["Failed"]):
        return "Failed"
    done = ["Complete", "SuccessCriteriaMet"] if kind == "Job" else ["Completed"]
    return "Succeeded" if _condition_true(obj, done) else None


def count_injected(pods: Iterable[Mapping[str, Any]]) -> int:
    return sum(
        1 for pod in pods
        if ANNOTATION_INJECTED in ((pod.get("metadata") or {}).get("annotations") or {})
    )


def phase_of(
    pods: list[Mapping[str, Any]],
    workloads: Mapping[Workload, Mapping[str, Any] | None],
    previous: Phase | None,
) -> Phase:
    if previous in TERMINAL:
        return previous
    outcomes = [workload_outcome(w.kind, obj) for w, obj in workloads.items()]
    if "Failed" in outcomes:
        return "Failed"
    if outcomes and all(o == "Succeeded" for o in outcomes):
        return "Succeeded"
    bare = [p for p in pods if workload_of(p) is None]
    bare_phases = [(p.get("status") or {}).get("phase") for p in bare]
    if not workloads and bare:
        if "Failed" in bare_phases:
            return "Failed"
        if all(phase == "Succeeded" for phase in bare_phases):
            return "Succeeded"
    if any((p.get("status") or {}).get("phase") == "Running" for p in pods):
        return "Running"
    return previous or "Pending"


#: The phase a finished run's status on the server implies, for a workload that went before
#: its outcome was seen (TERMINATED: stopped, not succeeded).
RUN_PHASES: dict[RunStatus, Phase] = {
    RunStatus.COMPLETED: "Succeeded",
    RunStatus.FAILED: "Failed",
    RunStatus.TERMINATED: "Failed",
}


def finish_status(phase: Phase | None) -> RunStatus:
    """The run status a PlutoRun's end maps to: deleted while running is TERMINATED."""
    if phase == "Succeeded":
        return RunStatus.COMPLETED
    if phase == "Failed":
        return RunStatus.FAILED
    return RunStatus.TERMINATED

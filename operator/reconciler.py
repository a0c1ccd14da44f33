"""The PlutoRun reconciler: kopf handlers that keep the server's run and the object in step.

- create/resume: open the run on the server (create, attach, or fork once) and record its ids;
- a timer: follow the covered pods and their Job/JobSet, set the phase and pod count, and
  finish the run on the server when the workload ends;
- spec update: push config and tag changes to the run (identity fields cannot change);
- delete (kopf's finalizer): finish the run with the status the phase implies;
- JobSets in namespaces labelled ``pluto.dev/inject: enabled``: a PlutoRun named after the
  JobSet, owned by it, so Konduktor and JobSet pods get a run without writing one.

Failures say why on the object (conditions, events) and are retried with capped backoff while
the server is unreachable; a request the server refuses is not retried until the spec changes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, NoReturn

import kopf

from pluto.wire import RunAttached, RunStatus, RunUpdate
from pluto_operator import conditions as cond
from pluto_operator.cache import known_run
from pluto_operator.kube import JOBSET_GROUP, JOBSET_VERSION, JOBSETS, Kube
from pluto_operator.model import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    Phase,
    PlutoRunSpec,
)
from pluto_operator.names import (
    INJECT_ENABLED,
    JOBSET_NAME_LABEL,
    LABEL_INJECT,
    LABEL_RUN,
    label_value,
)
from pluto_operator.phases import (
    RUN_PHASES,
    TERMINAL,
    Workload,
    count_injected,
    finish_status,
    phase_of,
    workload_of,
)
from pluto_operator.settings import OperatorSettings
from pluto_operator.targets import NamespaceInfo, namespace_project, namespace_project_problem
from pluto_operator.tracking import KeyRefused, Refused, TrackingServers, Unreachable

logger = logging.getLogger("pluto.operator.reconciler")

#: Retries of finishing a run at deletion before the PlutoRun is let go anyway (a server that
#: is gone for good must not keep the object, and its namespace, from being deleted).
FINISH_ATTEMPTS = 5


def _normal(body: Any, *, reason: str, message: str) -> None:
    """A Normal event. ``kopf.info`` is filtered by kopf's posting level, which the operator
    raises to WARNING so that kopf's own per-handler chatter is not turned into events."""
    kopf.event(body, type="Normal", reason=reason, message=message)


def backoff(retry: int) -> float:
    return float(min(60, 2 ** min(retry, 6)))


def _reached(conditions: list[dict[str, Any]], url: str,
             generation: int | None) -> list[dict[str, Any]]:
    """``conditions`` with ``ServerReachable=True``: the server answered, whatever it said."""
    return cond.set_condition(conditions, cond.SERVER_REACHABLE, "True", "Connected",
                              f"server at {url}", generation)


def _plain(value: Any) -> Any:
    """kopf's mapping views as plain JSON values (pydantic's strict mode wants real dicts)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class Reconciler:
    def __init__(self, settings: OperatorSettings, kube: Kube, servers: TrackingServers) -> None:
        self.settings = settings
        self.kube = kube
        self.servers = servers

    # -- opening the run -------------------------------------------------------------------

    def _server_url(self, body: Mapping[str, Any]) -> str:
        server = (body.get("spec") or {}).get("server") or {}
        return str(server.get("url") or self.settings.server_url)

    def open_run(self, body: kopf.Body, status: kopf.Status, patch: kopf.Patch, retry: int,
                 **_: Any) -> None:
        plain = _plain(body)
        generation = plain["metadata"].get("generation")
        conditions = list(_plain(status.get("conditions") or []))
        known = known_run(plain)
        if known is None:
            patch.status["conditions"] = cond.set_condition(
                conditions, cond.RUN_READY, "False", "InvalidSpec",
                "the spec does not parse; see the operator's log", generation)
            raise kopf.PermanentError("the PlutoRun's spec does not parse: fix it")
        url = self._server_url(plain)
        if not status.get("phase"):
            patch.status["phase"] = "Pending"
        try:
            attached = self.servers.open_run(url, known.run.spec, known.run.run_id)
        except KeyRefused as exc:
            conditions = _reached(conditions, url, generation)
            patch.status["conditions"] = cond.set_condition(
                conditions, cond.RUN_READY, "False", "ApiKeyRefused",
                f"{exc}: create or fix the operator's API key Secret (docs/operator.md); "
                "retrying", generation)
            raise kopf.TemporaryError(f"{exc}; retrying", delay=backoff(retry)) from exc
        except Unreachable as exc:
            patch.status["conditions"] = cond.set_condition(
                conditions, cond.SERVER_REACHABLE, "False", "ServerUnreachable", str(exc),
                generation)
            raise kopf.TemporaryError(f"{exc}; retrying", delay=backoff(retry)) from exc
        except Refused as exc:
            conditions = _reached(conditions, url, generation)
            if exc.status_code == 409 and known.run.spec.fork is not None:
                # The server's word for an attach whose fork differs from the stored run's.
                self._fork_mismatch(body, patch, conditions, generation, _fork_conflict(
                    known.run.spec, known.run.run_id, str(exc)))
            waiting = self._fork_parent_not_there_yet(url, known.run.spec)
            if waiting is not None:
                # As a pod waits for a ConfigMap it names: the parent may be a PlutoRun applied
                # in the same file, whose training has not reached the step yet.
                message = f"{waiting}; the fork is made once it has: retrying"
                patch.status["conditions"] = cond.set_condition(
                    conditions, cond.RUN_READY, "False", "WaitingForForkParent", message,
                    generation)
                raise kopf.TemporaryError(message, delay=backoff(retry)) from exc
            patch.status["conditions"] = cond.set_condition(
                conditions, cond.RUN_READY, "False", "ServerRefused", str(exc), generation)
            kopf.warn(body, reason="ServerRefused", message=str(exc))
            raise kopf.PermanentError(f"the server refused the run: {exc}") from exc
        conditions = _reached(conditions, url, generation)
        problem = self._fork_problem(url, known.run.spec, attached)
        if problem is not None:
            self._fork_mismatch(body, patch, conditions, generation, problem)
        self._record(patch, attached, generation)
        reason, message = _opened(attached)
        patch.status["conditions"] = cond.set_condition(
            conditions, cond.RUN_READY, "True", reason, message, generation)
        _normal(body, reason=reason, message=message)

    def _fork_parent_not_there_yet(self, url: str, spec: PlutoRunSpec) -> str | None:
        """Why the server refused the fork ``spec`` asks for, when waiting can mend it: the
        parent run does not exist yet, or it is running and has not logged the fork step yet.
        None when it cannot (no fork asked for, a parent that finished before that step, any
        other refusal): that refusal is the spec's to fix."""
        fork = spec.fork
        if fork is None:
            return None
        try:
            parent = self.servers.find_run(url, spec.project, fork.run_id)
        except Unreachable as exc:
            raise kopf.TemporaryError(f"{exc}; retrying", delay=10) from exc
        except Refused as exc:
            if exc.status_code == 404:
                return f"run {fork.run_id!r} does not exist in project {spec.project!r} yet"
            return None
        if parent.status is not RunStatus.RUNNING:
            return None
        # Its lineage's steps reach its own last one, or the step it forked at.
        reached = max((s for s in (parent.last_step, parent.fork_step) if s is not None),
                      default=None)
        if reached is None:
            return f"run {parent.display_id} ({fork.run_id!r}) has logged no step yet"
        if reached < fork.step:
            return (f"run {parent.display_id} ({fork.run_id!r}) has logged up to step "
                    f"{reached}, not step {fork.step} yet")
        return None

    def _fork_problem(self, url: str, spec: PlutoRunSpec, run: RunAttached) -> str | None:
        """Why ``run`` is not the fork ``spec`` asks for; None when it is (or none is asked).

        Only an attach can differ: the run already existed, most likely created by a rank's
        ``pluto.init()`` that reached the server before this handler did. The server records
        the ancestor that owns the fork step as the parent, so that is what is compared.
        """
        fork = spec.fork
        if fork is None or not run.resumed:
            return None
        wanted = f"a fork of {fork.run_id!r} at step {fork.step}"
        if run.forked_from is None:
            found = "no fork"
        elif run.fork_step != fork.step:
            found = (f"a fork of run {run.forked_from_display_id or run.forked_from} at step "
                     f"{run.fork_step}")
        else:
            try:
                owner = self.servers.fork_owner(url, spec.project, fork.run_id, fork.step)
            except Unreachable as exc:
                raise kopf.TemporaryError(f"{exc}; retrying", delay=10) from exc
            except Refused as exc:
                owner, why = None, str(exc)
            else:
                why = ""
            if owner == run.forked_from:
                return None
            found = (f"a fork of run {run.forked_from_display_id or run.forked_from} at step "
                     f"{run.fork_step}" + (f" ({why})" if why else ""))
        return _mismatch_message(f"run {run.display_id} (run id {run.run_id!r})", wanted, found)

    @staticmethod
    def _fork_mismatch(body: kopf.Body, patch: kopf.Patch, conditions: list[Any],
                       generation: int | None, message: str) -> NoReturn:
        """RunReady=False, ForkMismatch: never success for a run that lacks its fork. The ids
        are not recorded (the run is not this PlutoRun's to follow or finish); fixing it means
        a new PlutoRun, so there is nothing to retry."""
        patch.status["conditions"] = cond.set_condition(
            conditions, cond.RUN_READY, "False", "ForkMismatch", message, generation)
        kopf.warn(body, reason="ForkMismatch", message=message)
        raise kopf.PermanentError(message)

    @staticmethod
    def _record(patch: kopf.Patch, run: RunAttached, generation: int | None) -> None:
        patch.status["runId"] = run.run_id
        patch.status["project"] = run.project
        patch.status["serverRunId"] = run.id
        patch.status["displayId"] = run.display_id
        if run.url:
            patch.status["url"] = run.url
        if run.forked_from is not None:
            patch.status["forkedFrom"] = run.forked_from
            patch.status["forkStep"] = run.fork_step
        if generation is not None:
            patch.status["observedGeneration"] = generation

    # -- following the workload ------------------------------------------------------------

    def observe(self, body: kopf.Body, name: str, namespace: str | None, status: kopf.Status,
                patch: kopf.Patch, **_: Any) -> None:
        assert namespace is not None  # PlutoRuns are namespaced
        previous = status.get("phase")
        if previous in TERMINAL and cond.condition_status(
                status.get("conditions") or [], cond.RUN_FINISHED) == "True":
            return  # nothing left to follow
        # label_value: the label the webhook wrote (a long name does not fit a label value).
        pods: list[Mapping[str, Any]] = list(
            self.kube.list_pods(namespace, f"{LABEL_RUN}={label_value(name)}"))
        workloads: dict[Workload, Mapping[str, Any] | None] = {}
        for workload in sorted({w for w in map(workload_of, pods) if w is not None}):
            fetch = self.kube.get_jobset if workload.kind == "JobSet" else self.kube.get_job
            workloads[workload] = fetch(namespace, workload.name)
        phase = phase_of(pods, workloads, previous)
        if not pods and phase == "Running" and status.get("serverRunId") is not None:
            # The workload and its pods went between two looks (a Job's TTL, a deletion right
            # after it ended): its outcome is the run's own, if its processes finished it.
            phase = self._phase_from_the_run(body, status) or phase
        if phase != previous:
            patch.status["phase"] = phase
            _normal(body, reason=f"Phase{phase}", message=f"{len(pods)} pod(s); "
                      f"workloads: {', '.join(f'{w.kind}/{w.name}' for w in workloads) or 'none'}")
        if phase not in TERMINAL:
            injected = count_injected(pods)
            if injected != status.get("podsInjected"):
                patch.status["podsInjected"] = injected
        elif status.get("serverRunId") is not None:
            self._finish(body, status, patch, phase, attempt=0, final=False)

    def _phase_from_the_run(self, body: kopf.Body, status: kopf.Status) -> Phase | None:
        """Succeeded/Failed as the run's status on the server says (its ranks' finish());
        None while it is still running there, or the server cannot say."""
        try:
            info = self.servers.get_run(self._server_url(body), int(status["serverRunId"]))
        except (Unreachable, Refused):
            return None
        return RUN_PHASES.get(info.status)

    def _finish(self, body: kopf.Body, status: kopf.Status, patch: kopf.Patch | None,
                phase: Any, attempt: int, final: bool) -> None:
        conditions = list(_plain(status.get("conditions") or []))
        if cond.condition_status(conditions, cond.RUN_FINISHED) == "True":
            return
        run_status = finish_status(phase)
        url = self._server_url(body)
        if phase not in TERMINAL and self._phase_from_the_run(body, status) is not None:
            # Deleted with no outcome seen, but its processes finished the run: TERMINATED
            # would outrank their COMPLETED (the most severe status wins).
            _normal(body, reason="RunFinished", message="the run was already finished by its "
                    "processes; left as it is")
            return
        try:
            info = self.servers.finish_run(url, int(status["serverRunId"]), run_status)
        except Unreachable as exc:
            if final and attempt + 1 >= FINISH_ATTEMPTS:
                kopf.warn(body, reason="FinishFailed",
                          message=f"run left unfinished on the server after {attempt + 1} "
                                  f"attempts: {exc}")
                return
            raise kopf.TemporaryError(f"{exc}; retrying", delay=backoff(attempt)) from exc
        except Refused as exc:
            kopf.warn(body, reason="FinishRefused", message=str(exc))
            return
        message = f"run {info.display_id} finished as {info.status}"
        if patch is not None:
            patch.status["conditions"] = cond.set_condition(
                conditions, cond.RUN_FINISHED, "True", str(run_status).title(), message)
        _normal(body, reason="RunFinished", message=message)

    def finish_on_delete(self, body: kopf.Body, status: kopf.Status, retry: int,
                         **_: Any) -> None:
        if status.get("serverRunId") is None:
            return  # the run was never opened
        # The object is going away: its status is not written any more.
        self._finish(body, status, None, status.get("phase"), attempt=retry, final=True)

    # -- spec changes ----------------------------------------------------------------------

    def spec_changed(self, body: kopf.Body, old: Any, new: Any, status: kopf.Status,
                     patch: kopf.Patch, retry: int, **_: Any) -> None:
        if status.get("serverRunId") is None:
            # The run is not open yet: the server refused the previous spec, or was down. A
            # changed spec is a new attempt (while the server is down, opening retries anyway).
            self.open_run(body=body, status=status, patch=patch, retry=retry)
            return
        old_spec, new_spec = _plain(old or {}), _plain(new or {})
        for field in ("project", "runId", "fork"):
            if old_spec.get(field) != new_spec.get(field):
                kopf.warn(body, reason="ImmutableField",
                          message=f"spec.{field} cannot change once the run exists; the change "
                                  "is ignored: create a new PlutoRun instead")
        old_tags, new_tags = set(old_spec.get("tags") or []), set(new_spec.get("tags") or [])
        update = RunUpdate(
            config=new_spec.get("config") if new_spec.get("config") != old_spec.get(
                "config") else None,
            add_tags=sorted(new_tags - old_tags) or None,
            remove_tags=sorted(old_tags - new_tags) or None,
        )
        if update.config is None and update.add_tags is None and update.remove_tags is None:
            return
        try:
            self.servers.update_run(self._server_url(body), int(status["serverRunId"]), update)
        except Unreachable as exc:
            raise kopf.TemporaryError(f"{exc}; retrying", delay=10) from exc
        except Refused as exc:
            kopf.warn(body, reason="UpdateRefused", message=str(exc))
            return
        generation = body.get("metadata", {}).get("generation")
        if generation is not None:
            patch.status["observedGeneration"] = generation
        _normal(body, reason="RunUpdated", message="config and tags sent to the server")

    # -- JobSets in opted-in namespaces ----------------------------------------------------

    def jobset_created(self, body: kopf.Body, name: str, namespace: str | None,
                       meta: kopf.Meta, **kwargs: Any) -> None:
        assert namespace is not None  # JobSets are namespaced
        # kopf passes every index by its id; this one is registered by the operator.
        namespaces: kopf.Index[str, NamespaceInfo] = kwargs["index_namespaces"]
        info = next(iter(namespaces.get(namespace, [])), None)
        if info is None or info.labels.get(LABEL_INJECT) != INJECT_ENABLED:
            return
        problem = namespace_project_problem(namespace, info)
        if problem is not None:
            logger.warning("%s", problem)
            kopf.warn(body, reason="InvalidProjectAnnotation", message=problem)
        plutorun = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/managed-by": "pluto-operator"},
                # Deleting the JobSet deletes its PlutoRun, which finishes the run.
                "ownerReferences": [{
                    "apiVersion": str(body.get("apiVersion")), "kind": "JobSet",
                    "name": name, "uid": str(meta.get("uid")),
                }],
            },
            "spec": {
                "project": namespace_project(namespace, info, self.settings),
                "runId": name,
                "selector": {"matchLabels": {JOBSET_NAME_LABEL: name}},
            },
        }
        if self.kube.create_plutorun(namespace, plutorun):
            _normal(body, reason="PlutoRunCreated",
                      message=f"PlutoRun {name} created: the pods log into run id {name}")


def _mismatch_message(subject: str, wanted: str, found: str) -> str:
    return (
        f"{subject} already exists on the server with {found}, but this PlutoRun asks for "
        f"{wanted}: most likely a pod's pluto.init() created it before the operator could fork "
        f"it, so the pods log into a run without the requested fork. To fix: delete this "
        f"PlutoRun and that run on the server, then create the PlutoRun again before its pods "
        f"(or create one with another spec.runId)"
    )


def _fork_conflict(spec: PlutoRunSpec, run_id: str, detail: str) -> str:
    """The message for the server's 409: the attach named another fork than the run has."""
    assert spec.fork is not None
    return _mismatch_message(f"run id {run_id!r}",
                             f"a fork of {spec.fork.run_id!r} at step {spec.fork.step}",
                             f"another fork or none (the server answered: {detail})")


def _opened(run: RunAttached) -> tuple[str, str]:
    if run.resumed and run.forked_from is not None:
        return "RunAttached", (f"attached to run {run.display_id} (id {run.id}), a fork of "
                               f"{run.forked_from_display_id or run.forked_from} at step "
                               f"{run.fork_step}")
    if run.resumed:
        return "RunAttached", f"attached to run {run.display_id} (id {run.id})"
    if run.forked_from is not None:
        return "RunForked", (f"run {run.display_id} forked from "
                             f"{run.forked_from_display_id or run.forked_from} at step "
                             f"{run.fork_step}")
    return "RunCreated", f"run {run.display_id} created (id {run.id})"


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler) -> None:
    """Wire the reconciler's handlers into ``registry``."""
    resource = (GROUP, VERSION, PLURAL)
    r = reconciler
    kopf.on.create(*resource, id="open-run", registry=registry)(r.open_run)
    kopf.on.resume(*resource, id="open-run-on-resume", registry=registry,
                   when=lambda status, **_: status.get("serverRunId") is None)(r.open_run)
    kopf.on.update(*resource, id="spec-changed", field="spec", registry=registry)(r.spec_changed)
    kopf.on.delete(*resource, id="finish-run", registry=registry)(r.finish_on_delete)
    kopf.timer(*resource, id="observe", interval=r.settings.poll_interval, registry=registry,
               initial_delay=min(2.0, r.settings.poll_interval))(r.observe)
    kopf.on.create(JOBSET_GROUP, JOBSET_VERSION, JOBSETS, id="jobset-plutorun",
                   registry=registry)(r.jobset_created)
    kopf.on.resume(JOBSET_GROUP, JOBSET_VERSION, JOBSETS, id="jobset-plutorun-on-resume",
                   registry=registry)(r.jobset_created)

"""Names the operator, its webhook and the injected pods agree on.

One module so that a label the webhook writes and the one the reconciler lists pods by cannot
differ by a typo. The chart (``charts/pluto``) and ``docs/operator.md`` spell the same strings.
"""

from __future__ import annotations

from typing import Final

from pluto.wire import DEFAULT_SOCKET

#: Pod label naming the PlutoRun (same namespace) a pod logs into; the webhook adds it to pods
#: it covered by selector or namespace so the reconciler can list them.
LABEL_RUN: Final = "pluto.dev/run"
#: Namespace label ``enabled`` turns on automatic coverage of JobSet pods; pod label
#: ``disabled`` keeps a pod untouched whatever else says.
LABEL_INJECT: Final = "pluto.dev/inject"
INJECT_ENABLED: Final = "enabled"
INJECT_DISABLED: Final = "disabled"
#: Namespace annotation: the project of runs created for the namespace's JobSets.
ANNOTATION_PROJECT: Final = "pluto.dev/project"
#: Pod annotation the webhook writes (value: the run id); a pod carrying it is not injected again.
ANNOTATION_INJECTED: Final = "pluto.dev/injected"
#: Label on the operator's own pods: the webhook configuration's objectSelector excludes them.
LABEL_COMPONENT: Final = "pluto.dev/component"

JOBSET_NAME_LABEL: Final = "jobset.sigs.k8s.io/jobset-name"
JOB_NAME_LABEL: Final = "batch.kubernetes.io/job-name"
LEGACY_JOB_NAME_LABEL: Final = "job-name"
COMPLETION_INDEX_ANNOTATION: Final = "batch.kubernetes.io/job-completion-index"

SIDECAR_CONTAINER: Final = "pluto-sidecar"
VOLUME: Final = "pluto-run"
MOUNT_PATH: Final = "/var/run/pluto"
SOCKET_PATH: Final = DEFAULT_SOCKET
SPOOL_PATH: Final = "/var/run/pluto/spool"
SIDECAR_HEALTH_PORT: Final = 7301
SIDECAR_HEALTH_PORT_NAME: Final = "pluto-health"

#: The sidecar's SIGTERM drain when the PlutoRun sets none (the sidecar's own default), and the
#: margin the pod's grace period keeps above the drain for the process to exit.
DEFAULT_DRAIN_SECONDS: Final = 25
GRACE_MARGIN_SECONDS: Final = 5
#: Kubernetes' default terminationGracePeriodSeconds.
DEFAULT_GRACE_SECONDS: Final = 30

#: The finalizer kopf keeps on PlutoRuns so that deleting one finishes its run first.
FINALIZER: Final = "pluto.dev/finish-run"

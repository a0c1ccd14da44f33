"""Names the operator, its webhook and the injected pods agree on.

One module so that a label the webhook writes and the one the reconciler lists pods by cannot
differ by a typo. The chart (``charts/pluto``) and ``docs/operator.md`` spell the same strings.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

from pluto.wire import DEFAULT_SOCKET

#: Pod label naming the PlutoRun (same namespace) a pod logs into; the webhook adds it to pods
#: it covered by selector or namespace so the reconciler can list them. Its value is
#: ``label_value(<PlutoRun name>)``: the name itself unless it is longer than a label value
#: may be.
LABEL_RUN: Final = "pluto.dev/run"
#: Pod annotation with the full PlutoRun name, added when ``pluto.dev/run`` had to be shortened.
ANNOTATION_PLUTORUN: Final = "pluto.dev/plutorun"
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
#: The API key Secret, mounted in the sidecar only (a volume, not an env var: the kubelet
#: rewrites the file when the Secret changes, and the sidecar follows it, so a rotated key
#: needs no restart).
API_KEY_VOLUME: Final = "pluto-api-key"
API_KEY_MOUNT_PATH: Final = "/var/run/pluto-api-key"
API_KEY_FILE: Final = "/var/run/pluto-api-key/api-key"
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


#: Kubernetes' limit on a label value, and its form (apimachinery ``IsValidLabelValue``).
LABEL_VALUE_MAX: Final = 63
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_NOT_LABEL_CHARS = re.compile(r"[^-A-Za-z0-9_.]")
_HASH_CHARS: Final = 10


def label_value(name: str) -> str:
    """A valid label value that stands for ``name`` (a PlutoRun's, a JobSet's): ``name`` itself
    when it is one, else a prefix of it, ``-`` and a hash of the whole name.

    PlutoRun names may be 253 characters long, label values only 63: a pod labelled with the
    name as is would be refused by the API server. Every place that writes or selects on
    ``pluto.dev/run`` goes through here, so the webhook and the reconciler agree; the hash keeps
    two long names with the same beginning apart. The result starts and ends with a letter or a
    digit, as Kubernetes requires.
    """
    if len(name) <= LABEL_VALUE_MAX and _LABEL_VALUE.fullmatch(name):
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:_HASH_CHARS]
    prefix = _NOT_LABEL_CHARS.sub("-", name)[:LABEL_VALUE_MAX - _HASH_CHARS - 1]
    prefix = prefix.lstrip("-_.").rstrip("-_.")
    return f"{prefix}-{digest}" if prefix else digest

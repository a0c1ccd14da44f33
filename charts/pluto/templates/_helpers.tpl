{{/*
Names, labels and pieces shared by the templates. Object names start with the release name
(<release>-operator, <release>-webhook, <release>-server): the default server URL the operator
and docs use, http://pluto-server.pluto.svc:7300, is release "pluto" in namespace "pluto".
*/}}

{{- define "pluto.fullname" -}}
{{- .Release.Name | trunc 53 | trimSuffix "-" -}}
{{- end -}}

{{- define "pluto.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "pluto.sidecarImage" -}}
{{- .Values.sidecar.image | default (include "pluto.image" .) -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "pluto.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pluto
{{- end -}}

{{/*
Selector labels of one component; call with (dict "root" $ "component" "webhook").
Deployment selectors are immutable, so only labels that never change are in here.
*/}}
{{- define "pluto.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "pluto.componentLabels" -}}
{{ include "pluto.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/*
Labels of a component's pods. pluto.dev/component is what the webhook configuration's
objectSelector excludes: the webhook must never be asked about its own pods (a webhook that
cannot start because its own pods need it), nor about the operator's or the server's.
*/}}
{{- define "pluto.podLabels" -}}
{{ include "pluto.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: pluto
pluto.dev/component: {{ .component }}
{{- end -}}

{{- define "pluto.serviceAccountName" -}}
{{- $sa := index .root.Values .component "serviceAccount" -}}
{{- $sa.name | default (printf "%s-%s" (include "pluto.fullname" .root) .component) -}}
{{- end -}}

{{- define "pluto.webhookServiceName" -}}
{{- printf "%s-webhook" (include "pluto.fullname" .) -}}
{{- end -}}

{{- define "pluto.webhookTLSSecretName" -}}
{{- printf "%s-webhook-tls" (include "pluto.fullname" .) -}}
{{- end -}}

{{- define "pluto.serverServiceName" -}}
{{- printf "%s-server" (include "pluto.fullname" .) -}}
{{- end -}}

{{/* The server the operator and the sidecars use for PlutoRuns that name none. */}}
{{- define "pluto.serverUrl" -}}
{{- if .Values.serverUrl -}}
{{- .Values.serverUrl -}}
{{- else if .Values.server.enabled -}}
{{- printf "http://%s.%s.svc:7300" (include "pluto.serverServiceName" .) .Release.Namespace -}}
{{- else -}}
{{- fail "serverUrl is required when server.enabled is false: the operator and the sidecars need a tracking server (e.g. --set serverUrl=http://pluto-server.pluto.svc:7300)" -}}
{{- end -}}
{{- end -}}

{{/*
Pod and container security settings of every pod the chart runs: the image's user is 10001
(Dockerfile), set here as a number so the kubelet can check runAsNonRoot.
*/}}
{{- define "pluto.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "pluto.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
Flags both operator roles take (docs/operator.md): what to watch, where runs go, and how the
injected sidecar looks. The reconciler needs them for namespace mode and PlutoRun defaults, the
webhook for what it injects.
*/}}
{{- define "pluto.operatorArgs" -}}
- --server-url={{ include "pluto.serverUrl" . }}
- --api-key-secret={{ .Values.apiKeySecret.name }}:{{ .Values.apiKeySecret.key }}
- --sidecar-image={{ include "pluto.sidecarImage" . }}
- --sidecar-mode={{ .Values.sidecar.mode }}
- --failure-policy={{ .Values.webhook.failurePolicy }}
- --health-host=0.0.0.0
- --health-port=8081
- --log-level={{ .Values.logLevel }}
{{- range .Values.namespaces }}
- --namespace={{ . }}
{{- end }}
{{- with .Values.defaultProject }}
- --default-project={{ . }}
{{- end }}
{{- end -}}

{{/* Liveness, readiness and the health port of an operator container (plain HTTP, 8081). */}}
{{- define "pluto.operatorProbes" -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: health
  initialDelaySeconds: 10
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /readyz
    port: health
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 3
{{- end -}}

{{/* nodeSelector, tolerations and affinity of a pod, from a component's values. */}}
{{- define "pluto.placement" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

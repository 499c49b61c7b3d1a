{{/* Names, labels and the pieces every driftloop container shares. */}}

{{- define "driftloop.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "driftloop.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: driftloop
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "mlflow") */}}
{{- define "driftloop.selector" -}}
app.kubernetes.io/name: {{ .ctx.Chart.Name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "driftloop.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}

{{/* A workload's Secret: the user's one Secret (secrets.existingSecret), or the chart's Secret of that
workload: "env" (the platform's jobs, role driftloop), "predictor", "mlflow", "prefect", "postgres", "redis".
(dict "ctx" $ "secret" "predictor") */}}
{{- define "driftloop.secretName" -}}
{{- .ctx.Values.secrets.existingSecret | default (printf "%s-%s" (include "driftloop.fullname" .ctx) .secret) -}}
{{- end -}}

{{/* Restricted Pod Security Standard: non-root, no privilege escalation, no capabilities. */}}
{{- define "driftloop.podSecurity" -}}
runAsNonRoot: true
runAsUser: {{ .uid | default 10001 }}
runAsGroup: {{ .uid | default 10001 }}
fsGroup: {{ .uid | default 10001 }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "driftloop.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* A driftloop container's environment: settings from the ConfigMap, then the workload's Secret, if it
has one ("secret": "" for none). (dict "ctx" $ "secret" "env") */}}
{{- define "driftloop.envFrom" -}}
- configMapRef:
    name: {{ include "driftloop.fullname" .ctx }}-config
{{- if .secret }}
- secretRef:
    name: {{ include "driftloop.secretName" . }}
{{- end }}
{{- end -}}

{{/* The shared state volume and a writable /tmp (the root file system is read-only). */}}
{{- define "driftloop.stateVolumes" -}}
- name: state
  persistentVolumeClaim:
    claimName: {{ include "driftloop.fullname" . }}-state
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "driftloop.stateMounts" -}}
- name: state
  mountPath: /var/lib/driftloop
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* Pod spec lines shared by every driftloop pod. */}}
{{- define "driftloop.podCommon" -}}
automountServiceAccountToken: false
enableServiceLinks: false
securityContext:
  {{- include "driftloop.podSecurity" (dict) | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* One `driftloop` container: (dict "ctx" $ "name" "train" "args" (list ...) "resources" ... "secret" "env") */}}
{{- define "driftloop.container" -}}
- name: {{ .name }}
  image: {{ include "driftloop.image" .ctx }}
  imagePullPolicy: {{ .ctx.Values.image.pullPolicy }}
  args: {{ toJson .args }}
  envFrom:
    {{- include "driftloop.envFrom" . | nindent 4 }}
  securityContext:
    {{- include "driftloop.containerSecurity" . | nindent 4 }}
  resources:
    {{- toYaml .resources | nindent 4 }}
  volumeMounts:
    {{- include "driftloop.stateMounts" . | nindent 4 }}
{{- end -}}

{{/* The first init container of a pod whose program connects to stores at start: it waits until they
accept connections, so a store that starts slowly delays the pod instead of failing it. It gets what its
pod gets: (dict "ctx" $ "stores" (list "postgres" "redis") "secret" "env") */}}
{{- define "driftloop.waitFor" -}}
- name: wait-for-stores
  image: {{ include "driftloop.image" .ctx }}
  imagePullPolicy: {{ .ctx.Values.image.pullPolicy }}
  args: {{ toJson (concat (list "wait-for" (printf "--timeout=%d" (int .ctx.Values.waitFor.timeout))) .stores) }}
  envFrom:
    {{- include "driftloop.envFrom" . | nindent 4 }}
  securityContext:
    {{- include "driftloop.containerSecurity" . | nindent 4 }}
  resources:
    {{- toYaml .ctx.Values.waitFor.resources | nindent 4 }}
  volumeMounts:
    - {name: tmp, mountPath: /tmp}
{{- end -}}

{{/* A startup probe for a server that starts slowly on a small node; liveness counts only after it
passed. (dict "ctx" $ "path" "/health") */}}
{{- define "driftloop.startupProbe" -}}
startupProbe:
  httpGet: {path: {{ .path }}, port: http}
  periodSeconds: {{ .ctx.Values.startupProbe.periodSeconds }}
  failureThreshold: {{ .ctx.Values.startupProbe.failureThreshold }}
{{- end -}}

{{/* The ConfigMap's settings, hashed into pod templates so that a settings change (a new image tag
among them) rolls the pods that read them. */}}
{{- define "driftloop.configChecksum" -}}
checksum/config: {{ include "driftloop.configData" . | sha256sum }}
{{- end -}}

{{/* The Prefect server's API: settings.prefectApiUrl, or the chart's own server. */}}
{{- define "driftloop.prefectApiUrl" -}}
{{- if .Values.settings.prefectApiUrl -}}
{{- .Values.settings.prefectApiUrl -}}
{{- else if .Values.prefect.server.enabled -}}
{{- printf "http://%s-prefect:4200/api" (include "driftloop.fullname" .) -}}
{{- else -}}
{{- fail "settings.prefectApiUrl is required when prefect.server.enabled is false: the API of your Prefect server, e.g. http://prefect-server.prefect.svc.cluster.local:4200/api" -}}
{{- end -}}
{{- end -}}

{{/* The settings every driftloop container gets: the ConfigMap's data. */}}
{{- define "driftloop.configData" -}}
{{- $fullname := include "driftloop.fullname" . -}}
DRIFTLOOP_PROFILE: cluster
DRIFTLOOP_STATE_DIR: /var/lib/driftloop
DRIFTLOOP_DATA_DIR: /var/lib/driftloop/data
DRIFTLOOP_MLFLOW_TRACKING_URI: http://{{ $fullname }}-mlflow:5000
DRIFTLOOP_MODEL_NAME: {{ .Values.settings.modelName | quote }}
DRIFTLOOP_EXPERIMENT: {{ .Values.settings.experiment | quote }}
DRIFTLOOP_FEATURE_SERVICE: {{ .Values.settings.featureService | quote }}
DRIFTLOOP_FEAST_PROJECT: {{ .Values.settings.feastProject | quote }}
DRIFTLOOP_DEVICE: {{ .Values.settings.device | quote }}
DRIFTLOOP_RETRAIN: {{ .Values.settings.retrain | quote }}
DRIFTLOOP_TRAFFIC_ROWS_MAX: {{ .Values.settings.trafficRowsMax | int64 | quote }}
DRIFTLOOP_IMAGE: {{ include "driftloop.image" . | quote }}
PREFECT_API_URL: {{ include "driftloop.prefectApiUrl" . | quote }}
PREFECT_LOGGING_LEVEL: {{ .Values.settings.prefectLogLevel | quote }}
{{- if and .Values.postgres.enabled .Values.redis.enabled (not .Values.secrets.existingSecret) }}
# Where the chart's stores listen, without credentials: what a pod whose Secret has no role in the database
# (MLflow's, Prefect's) reads to wait for them. A workload's Secret overrides both with its own role's.
DRIFTLOOP_POSTGRES_DSN: postgresql://{{ $fullname }}-postgres:5432/driftloop
DRIFTLOOP_REDIS_URL: {{ $fullname }}-redis:6379
{{- end }}
# MLflow, Prefect and Feast keep caches under HOME; the root file system is read-only.
HOME: /tmp
{{- end -}}

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

{{/* The Secret with passwords and connection strings: generated, or the user's own. */}}
{{- define "driftloop.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-env" (include "driftloop.fullname" .)) -}}
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

{{/* Every driftloop container: settings from the ConfigMap, connection strings from the Secret. */}}
{{- define "driftloop.envFrom" -}}
- configMapRef:
    name: {{ include "driftloop.fullname" . }}-config
- secretRef:
    name: {{ include "driftloop.secretName" . }}
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

{{/* One `driftloop` container: (dict "ctx" $ "name" "train" "args" (list ...) "resources" ...) */}}
{{- define "driftloop.container" -}}
- name: {{ .name }}
  image: {{ include "driftloop.image" .ctx }}
  imagePullPolicy: {{ .ctx.Values.image.pullPolicy }}
  args: {{ toJson .args }}
  envFrom:
    {{- include "driftloop.envFrom" .ctx | nindent 4 }}
  securityContext:
    {{- include "driftloop.containerSecurity" . | nindent 4 }}
  resources:
    {{- toYaml .resources | nindent 4 }}
  volumeMounts:
    {{- include "driftloop.stateMounts" . | nindent 4 }}
{{- end -}}

{{/* The chart's name and a release-scoped full name. */}}
{{- define "keyward.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "keyward.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "keyward.labels" -}}
app.kubernetes.io/name: {{ include "keyward.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "keyward.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keyward.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
The keyward container. Secrets are read from .Values.existingSecret, which is
required: the chart refuses to render without it.
*/}}
{{- define "keyward.container" -}}
{{- $secret := required "existingSecret is required: create a Secret with KEYWARD_ADMIN_TOKEN, KEYWARD_ENCRYPTION_KEY, KEYWARD_DATABASE_URL, KEYWARD_REDIS_URL" .Values.existingSecret -}}
name: keyward
image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
imagePullPolicy: {{ .Values.image.pullPolicy }}
args: ["serve"]
# The embedded shape's default SQLite file lands in the writable /data volume.
workingDir: /data
env:
  - name: KEYWARD_LISTEN
    value: "0.0.0.0:{{ .Values.ports.data }}"
  - name: KEYWARD_ADMIN_LISTEN
    value: "0.0.0.0:{{ .Values.ports.admin }}"
  {{- range $name, $value := .Values.config }}
  - name: {{ $name }}
    value: {{ $value | quote }}
  {{- end }}
  {{- range $name := list "KEYWARD_ADMIN_TOKEN" "KEYWARD_ENCRYPTION_KEY" "KEYWARD_ENCRYPTION_KEYS_PREVIOUS" "KEYWARD_DATABASE_URL" "KEYWARD_REDIS_URL" }}
  - name: {{ $name }}
    valueFrom:
      secretKeyRef:
        name: {{ $secret }}
        key: {{ $name }}
        optional: true
  {{- end }}
ports:
  - name: data
    containerPort: {{ .Values.ports.data }}
  - name: admin
    containerPort: {{ .Values.ports.admin }}
livenessProbe:
  httpGet: { path: /healthz, port: data }
  periodSeconds: 10
readinessProbe:
  httpGet: { path: /readyz, port: data }
  periodSeconds: 5
  failureThreshold: 2
startupProbe:
  httpGet: { path: /healthz, port: data }
  periodSeconds: 1
  failureThreshold: 30
resources:
  {{- toYaml .Values.resources | nindent 2 }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
volumeMounts:
  # The embedded shape's SQLite file (and its key file) need a writable place.
  - name: keyward-data
    mountPath: /data
{{- end -}}

{{/*
keyward as a sidecar, for a parent chart's pod spec. Native sidecar (an init container
that keeps running) by default; sidecar.native=false gives a plain container for
clusters before Kubernetes 1.29. Include it under initContainers when native, under
containers otherwise, and add the "keyward.volumes" to the pod's volumes.
*/}}
{{- define "keyward.sidecar" -}}
- {{- include "keyward.container" . | nindent 2 }}
  {{- if .Values.sidecar.native }}
  restartPolicy: Always
  {{- end }}
{{- end -}}

{{- define "keyward.volumes" -}}
- name: keyward-data
  emptyDir: {}
{{- end -}}

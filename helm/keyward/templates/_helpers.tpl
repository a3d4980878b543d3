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
The keyward container, for a dict of "root" (the chart's context) and "sidecar" (bool).
Secrets are read from .Values.existingSecret, which is required: the chart refuses to
render without it. They are environment variables from the Secret, never arguments. The
sidecar listens on the pod's loopback only, so its probes run inside the container.
*/}}
{{- define "keyward.container" -}}
{{- $root := .root -}}
{{- $values := $root.Values -}}
{{- $secret := required "existingSecret is required: create a Secret with KEYWARD_ADMIN_TOKEN, KEYWARD_DATA_TOKEN, KEYWARD_ENCRYPTION_KEY, KEYWARD_DATABASE_URL, KEYWARD_REDIS_URL" $values.existingSecret -}}
name: keyward
image: "{{ $values.image.repository }}:{{ $values.image.tag | default $root.Chart.AppVersion }}"
imagePullPolicy: {{ $values.image.pullPolicy }}
args: ["serve"]
# The embedded shape's default SQLite file lands in the writable /data volume.
workingDir: /data
env:
  {{- if .sidecar }}
  # Only the containers of this pod reach keyward.
  - name: KEYWARD_LISTEN
    value: "127.0.0.1:{{ $values.ports.data }}"
  - name: KEYWARD_ADMIN_LISTEN
    value: "127.0.0.1:{{ $values.ports.admin }}"
  {{- else }}
  # Gateways reach the data port through the Service, on the pod's address.
  - name: KEYWARD_LISTEN
    value: "0.0.0.0:{{ $values.ports.data }}"
  - name: KEYWARD_ADMIN_LISTEN
    value: "{{ if $values.adminService.enabled }}0.0.0.0{{ else }}127.0.0.1{{ end }}:{{ $values.ports.admin }}"
  {{- end }}
  {{- range $name, $value := $values.config }}
  {{- /* A later duplicate of a name wins in Kubernetes: config must not be able to move
  the listeners off the loopback (the sidecar's, the admin API's) or put a secret into
  the pod spec in plain text. */}}
  {{- if has $name (list "KEYWARD_LISTEN" "KEYWARD_ADMIN_LISTEN") }}
  {{- fail (printf "config.%s: the chart sets the listen addresses itself (a sidecar on the pod's loopback; the admin API on the loopback unless adminService.enabled): use ports.data, ports.admin and adminService.enabled" $name) }}
  {{- end }}
  {{- if has $name (list "KEYWARD_ADMIN_TOKEN" "KEYWARD_DATA_TOKEN" "KEYWARD_ENCRYPTION_KEY" "KEYWARD_ENCRYPTION_KEYS_PREVIOUS" "KEYWARD_DATABASE_URL" "KEYWARD_REDIS_URL") }}
  {{- fail (printf "config.%s is a secret: put it in the Secret named by existingSecret, which the chart reads it from; a value in config would be in the pod spec in plain text" $name) }}
  {{- end }}
  - name: {{ $name }}
    value: {{ $value | quote }}
  {{- end }}
  {{- range $name := list "KEYWARD_ADMIN_TOKEN" "KEYWARD_DATA_TOKEN" "KEYWARD_ENCRYPTION_KEY" "KEYWARD_ENCRYPTION_KEYS_PREVIOUS" "KEYWARD_DATABASE_URL" "KEYWARD_REDIS_URL" }}
  - name: {{ $name }}
    valueFrom:
      secretKeyRef:
        name: {{ $secret }}
        key: {{ $name }}
        optional: true
  {{- end }}
ports:
  - name: data
    containerPort: {{ $values.ports.data }}
  - name: admin
    containerPort: {{ $values.ports.admin }}
{{- /* Readiness: with `deny`, a replica whose Redis (or database) is gone can only refuse,
so it leaves its Service (/readyz). With `allow` or `local` it still answers, degraded,
and must stay in: a shared outage would otherwise take every replica (every proxy pod,
for the sidecar) out at once. */}}
{{- $policy := (index $values.config "KEYWARD_ON_BACKEND_ERROR") | default "deny" }}
{{- $ready := ternary "/readyz" "/healthz" (eq $policy "deny") }}
{{- /* The probes run inside the container (`keyward probe`, over loopback), in both
shapes: a sidecar listens on the pod's loopback, which the kubelet cannot reach, and a
standalone replica's loopback connections are ones that peers on the network cannot take
(`KEYWARD_MAX_CONNECTIONS_PER_PEER`; the kubelet's httpGet would come from the node's
address, shared with whatever else the node sends). `keyward probe` waits up to 2 s to
connect and 2 s for the answer: the kubelet's default timeout, 1 s, would cut it short. */}}
livenessProbe:
  exec: { command: ["keyward", "probe", "/healthz"] }
  periodSeconds: 10
  timeoutSeconds: 5
readinessProbe:
  exec: { command: ["keyward", "probe", "{{ $ready }}"] }
  periodSeconds: 5
  timeoutSeconds: 5
  failureThreshold: 2
startupProbe:
  exec: { command: ["keyward", "probe", "/healthz"] }
  periodSeconds: 1
  timeoutSeconds: 5
  failureThreshold: 30
resources:
  {{- toYaml $values.resources | nindent 2 }}
securityContext:
  {{- toYaml $values.securityContext | nindent 2 }}
volumeMounts:
  # The embedded shape's SQLite file (and its key file) need a writable place.
  - name: keyward-data
    mountPath: /data
  {{- if include "keyward.caVolume" $root }}
  # Private CAs for TLS to Redis and Postgres (caCertificates).
  - name: keyward-ca
    mountPath: /etc/keyward/ca
    readOnly: true
  {{- end }}
{{- end -}}

{{/*
keyward as a sidecar, for a parent chart's pod spec. Native sidecar (an init container
that keeps running) by default; sidecar.native=false gives a plain container for
clusters before Kubernetes 1.29. Include it under initContainers when native, under
containers otherwise, and add the "keyward.volumes" to the pod's volumes.
*/}}
{{- define "keyward.sidecar" -}}
- {{- include "keyward.container" (dict "root" . "sidecar" true) | nindent 2 }}
  {{- if .Values.sidecar.native }}
  restartPolicy: Always
  {{- end }}
{{- end -}}

{{- define "keyward.volumes" -}}
- name: keyward-data
  emptyDir: {}
{{ include "keyward.caVolume" . }}
{{- end -}}

{{/*
The volume of caCertificates (a ConfigMap or a Secret of PEM files), or nothing.
*/}}
{{- define "keyward.caVolume" -}}
{{- $ca := .Values.caCertificates | default dict -}}
{{- if and $ca.configMap $ca.secret -}}
{{- fail "caCertificates: set configMap or secret, not both" -}}
{{- end -}}
{{- if $ca.configMap -}}
- name: keyward-ca
  configMap:
    name: {{ $ca.configMap }}
{{- else if $ca.secret -}}
- name: keyward-ca
  secret:
    secretName: {{ $ca.secret }}
{{- end -}}
{{- end -}}

{{/*
terminationGracePeriodSeconds, refused unless keyward can finish its shutdown within
it: KEYWARD_SHUTDOWN_GRACE_S for requests in flight, then up to 4 s of the accounting
writer's retries, and a second to spare. A kill before that loses usage records.
*/}}
{{- define "keyward.terminationGrace" -}}
{{- $grace := int (default 10 (index .Values.config "KEYWARD_SHUTDOWN_GRACE_S")) -}}
{{- $period := int .Values.terminationGracePeriodSeconds -}}
{{- if lt $period (add $grace 5) -}}
{{- fail (printf "terminationGracePeriodSeconds=%d is too short for KEYWARD_SHUTDOWN_GRACE_S=%d: set it to at least %d (the grace, then up to 4 s of accounting retries, and 1 s to spare)" $period $grace (add $grace 5)) -}}
{{- end -}}
{{- $period -}}
{{- end -}}

{{/*
One documented replacement in a shipped example file, for a dict of "text", "file" (its
name, for the error), "old" and "new". Fails when "old" is not in the text: the example
changed, and the chart must follow it rather than render the old address.
*/}}
{{- define "keyward.replace" -}}
{{- if not (contains .old .text) -}}
{{- fail (printf "the chart's files/ copy of %s no longer contains %q: update the replacement in templates/sidecar-example.yaml" .file .old) -}}
{{- end -}}
{{- replace .old .new .text -}}
{{- end -}}

{{/*
The main nginx file of the sidecar example: the shipped keyward.conf is a site for the
http block, so this file gives it one, with every file nginx writes under /tmp (the root
filesystem is read-only) and its logs on stderr and stdout.
*/}}
{{- define "keyward.exampleNginxMain" -}}
daemon off;
pid /tmp/nginx.pid;
error_log stderr warn;
events { worker_connections 1024; }
http {
    access_log /dev/stdout;
    client_body_temp_path /tmp/client_body;
    proxy_temp_path /tmp/proxy;
    fastcgi_temp_path /tmp/fastcgi;
    uwsgi_temp_path /tmp/uwsgi;
    scgi_temp_path /tmp/scgi;
    include /etc/nginx/keyward/keyward.conf;
}
{{ end -}}

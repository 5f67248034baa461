{{/* Names, labels and the pieces the RayCluster's pod templates share. */}}

{{- define "kvrelay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* RayCluster names feed pod and Service names (KubeRay appends suffixes): keep them short. */}}
{{- define "kvrelay.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kvrelay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvrelay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvrelay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kvrelay.labels" -}}
helm.sh/chart: {{ include "kvrelay.chart" . }}
{{ include "kvrelay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kvrelay
{{- end -}}

{{- define "kvrelay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kvrelay.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kvrelay.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "kvrelay.authSecretName" -}}
{{- default (printf "%s-auth" (include "kvrelay.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "kvrelay.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "kvrelay.fullname" .)) .Values.tls.existingSecret -}}
{{- end -}}

{{- define "kvrelay.rayAuthSecretName" -}}
{{- default (printf "%s-ray-auth" (include "kvrelay.fullname" .)) .Values.rayAuth.existingSecret -}}
{{- end -}}

{{/* Value checks that the schema cannot express (cross-field). */}}
{{- define "kvrelay.validate" -}}
{{- $m := .Values.model -}}
{{- if and (eq $m.source "pvc") (not $m.pvc.claimName) -}}
{{- fail "model.source=pvc needs model.pvc.claimName" -}}
{{- end -}}
{{- if and (eq $m.source "hostPath") (not $m.hostPath.path) -}}
{{- fail "model.source=hostPath needs model.hostPath.path" -}}
{{- end -}}
{{- if and (ne $m.source "default") (not $m.path) -}}
{{- fail "model.path (a Hugging Face folder or .gguf file inside the volume) is required unless model.source=default" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) (or (not .Values.tls.cert) (not .Values.tls.key)) -}}
{{- fail "tls.enabled needs tls.existingSecret, or both tls.cert and tls.key (PEM)" -}}
{{- end -}}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) (not .Values.auth.apiKeys) -}}
{{- fail "auth.enabled needs auth.existingSecret or at least one auth.apiKeys entry" -}}
{{- end -}}
{{- if and (not .Values.prefill.enabled) (not .Values.decode.enabled) -}}
{{- fail "enable at least one of prefill and decode" -}}
{{- end -}}
{{- range $role := list "prefill" "decode" -}}
{{- $g := index $.Values $role -}}
{{- if or (lt (int $g.replicas) (int $g.minReplicas)) (gt (int $g.replicas) (int $g.maxReplicas)) -}}
{{- fail (printf "%s: need minReplicas <= replicas <= maxReplicas" $role) -}}
{{- end -}}
{{- if ge (int $g.preStopSleepSeconds) (int $g.terminationGracePeriodSeconds) -}}
{{- fail (printf "%s: preStopSleepSeconds must be shorter than terminationGracePeriodSeconds" $role) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Workers per pod of a group: one per GPU, or one when the group runs on CPU. */}}
{{- define "kvrelay.workersPerPod" -}}
{{- max 1 (int .gpus) -}}
{{- end -}}

{{- define "kvrelay.modelVolume" -}}
{{- $m := .Values.model -}}
{{- if eq $m.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $m.pvc.claimName }}
    readOnly: true
{{- else if eq $m.source "hostPath" }}
- name: model
  hostPath:
    path: {{ $m.hostPath.path }}
    type: Directory
{{- end }}
{{- end -}}

{{/* Volumes every Ray pod has: shared memory, and the model when it comes from a volume. */}}
{{- define "kvrelay.volumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shmSize }}
{{- include "kvrelay.modelVolume" . }}
{{- end -}}

{{- define "kvrelay.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
{{- if ne .Values.model.source "default" }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Environment every Ray pod has: where it runs (the preemption watcher maps Ray nodes to
     Kubernetes nodes and pods through these) and Ray's settings. */}}
{{- define "kvrelay.env" -}}
- name: KVRELAY_POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: KVRELAY_POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: KVRELAY_NODE_NAME
  valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: HF_HUB_OFFLINE
  value: "1"
{{- if .Values.rayAuth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "kvrelay.rayAuthSecretName" . }}
      key: token
{{- else }}
- name: RAY_AUTH_MODE
  value: disabled
{{- end }}
{{- end -}}

{{/* The `kvrelay serve` command line on the head (one argument per line, shell-quoted). */}}
{{- define "kvrelay.serveArgs" -}}
{{- $v := .Values -}}
--address=127.0.0.1:{{ $v.head.ports.gcs }}
--host=0.0.0.0
--grpc-port={{ $v.serve.grpcPort }}
--http-port={{ $v.serve.httpPort }}
--metrics-port={{ $v.metrics.port }}
--prefill-workers={{ if $v.prefill.enabled }}{{ mul $v.prefill.replicas (include "kvrelay.workersPerPod" $v.prefill) }}{{ else }}0{{ end }}
--decode-workers={{ if $v.decode.enabled }}{{ mul $v.decode.replicas (include "kvrelay.workersPerPod" $v.decode) }}{{ else }}0{{ end }}
--placement-resource-prefix=kvrelay_
{{- if ne $v.model.source "default" }}
--model={{ printf "%s/%s" $v.model.mountPath $v.model.path | squote }}
{{- end }}
{{- if $v.auth.enabled }}
--api-key-file=/etc/kvrelay/auth/api-keys
--admin-key-file=/etc/kvrelay/auth/admin-keys
{{- end }}
{{- if $v.tls.enabled }}
--tls-cert-file=/etc/kvrelay/tls/tls.crt
--tls-key-file=/etc/kvrelay/tls/tls.key
{{- end }}
{{- if $v.serve.watchKubernetes }}
--k8s-watch
--k8s-namespace="$KVRELAY_POD_NAMESPACE"
{{- end }}
{{- range $v.serve.extraArgs }}
{{ . | squote }}
{{- end }}
{{- end -}}

{{/* Chart name, cut to 63 characters. */}}
{{- define "kube-sts.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name when it already contains the chart name. */}}
{{- define "kube-sts.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kube-sts.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "kube-sts.labels" -}}
helm.sh/chart: {{ include "kube-sts.chart" . }}
{{ include "kube-sts.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kube-sts
{{- end }}

{{- define "kube-sts.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kube-sts.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kube-sts.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kube-sts.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Whether the operator uses Leases (leader election or shards). */}}
{{- define "kube-sts.usesLeases" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.sharding.shards) 1) }}true{{ end }}
{{- end }}

{{- define "kube-sts.leaseNamespace" -}}
{{- default .Release.Namespace .Values.leaderElection.leaseNamespace }}
{{- end }}

{{- define "kube-sts.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Checks of combinations the schema cannot express; included by the Deployment
so that `helm template` and `helm install` fail with a message.
*/}}
{{- define "kube-sts.validate" -}}
{{- $sharded := gt (int .Values.sharding.shards) 1 }}
{{- if and (gt (int .Values.replicas) 1) (not .Values.leaderElection.enabled) (not $sharded) }}
{{- fail "replicas > 1 requires leaderElection.enabled=true or sharding.shards > 1: without either every replica would issue and write the same credentials" }}
{{- end }}
{{- if and $sharded .Values.leaderElection.enabled }}
{{- fail "sharding.shards > 1 coordinates the replicas through shard Leases: drop leaderElection.enabled" }}
{{- end }}
{{- $leaseNamespace := .Values.leaderElection.leaseNamespace | default .Release.Namespace }}
{{- if and $sharded (has $leaseNamespace (list "kube-system" "kube-public" "kube-node-lease")) }}
{{- fail (printf "sharding.shards > 1 lets the operator create, update and delete every Lease of leaderElection.leaseNamespace (%s holds the cluster's own Leases): give it a namespace of its own" $leaseNamespace) }}
{{- end }}
{{- if and $sharded .Values.watchNamespace }}
{{- fail "sharding.shards > 1 splits namespaces between replicas: drop watchNamespace (one namespace is one shard)" }}
{{- end }}
{{- if and .Values.aws.existingSecret .Values.aws.configSecret }}
{{- fail "set at most one of aws.existingSecret and aws.configSecret" }}
{{- end }}
{{- if and .Values.aws.profile (not .Values.aws.configSecret) }}
{{- fail "aws.profile needs aws.configSecret (the Secret holding the config/credentials files that define the profile)" }}
{{- end }}
{{- if and .Values.webhook.networkPolicy.from (not (and .Values.networkPolicy.enabled .Values.webhook.enabled)) }}
{{- fail "webhook.networkPolicy.from needs webhook.enabled=true and networkPolicy.enabled=true (the webhook's NetworkPolicy is made only with the operator's)" }}
{{- end }}
{{- $pdb := .Values.podDisruptionBudget }}
{{- if and (not (kindIs "invalid" $pdb.minAvailable)) (not (kindIs "invalid" $pdb.maxUnavailable)) }}
{{- fail "set at most one of podDisruptionBudget.minAvailable and podDisruptionBudget.maxUnavailable" }}
{{- end }}
{{- end }}

{{/* --metrics-addr: host:port, IPv6 hosts in brackets. */}}
{{- define "kube-sts.metricsAddr" -}}
{{- $host := .Values.metrics.bindAddress }}
{{- if contains ":" $host }}
{{- printf "[%s]:%d" $host (int64 .Values.metrics.port) }}
{{- else }}
{{- printf "%s:%d" $host (int64 .Values.metrics.port) }}
{{- end }}
{{- end }}

{{/* The webhook's objects: its own name, so that its pods never match the operator's selector. */}}
{{- define "kube-sts.webhook.fullname" -}}
{{- printf "%s-webhook" (include "kube-sts.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kube-sts.webhook.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-webhook" (include "kube-sts.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kube-sts.webhook.labels" -}}
helm.sh/chart: {{ include "kube-sts.chart" . }}
{{ include "kube-sts.webhook.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kube-sts
app.kubernetes.io/component: webhook
{{- end }}

{{/* The Secret holding the serving certificate (the webhook's or cert-manager's). */}}
{{- define "kube-sts.webhook.tlsSecret" -}}
{{- printf "%s-tls" (include "kube-sts.webhook.fullname" .) }}
{{- end }}

{{/* The MutatingWebhookConfiguration (cluster-scoped): the release's full name. */}}
{{- define "kube-sts.webhook.configuration" -}}
{{- include "kube-sts.fullname" . }}
{{- end }}

{{/* Names the serving certificate is for: how the API server reaches the Service. */}}
{{- define "kube-sts.webhook.certNames" -}}
{{- $svc := include "kube-sts.webhook.fullname" . }}
{{- printf "%s,%s.%s,%s.%s.svc" $svc $svc .Release.Namespace $svc .Release.Namespace }}
{{- end }}

{{/* Chart name, overridable. */}}
{{- define "kubellm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name of the operator's objects. A release called "kubellm" (the plain manifests)
gives "kubellm-operator"; any other release is prefixed so two releases never collide.
*/}}
{{- define "kubellm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "kubellm.name" .) .Release.Name }}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s-operator" .Release.Name (include "kubellm.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "kubellm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that never change for the life of a release: the operator Deployment's selector. */}}
{{- define "kubellm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubellm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The recommended app.kubernetes.io labels, on every object the chart renders. */}}
{{- define "kubellm.commonLabels" -}}
helm.sh/chart: {{ include "kubellm.chart" . }}
app.kubernetes.io/name: {{ include "kubellm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kubellm
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels of the operator's own objects (Deployment, ServiceAccount, RBAC). */}}
{{- define "kubellm.labels" -}}
{{ include "kubellm.commonLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubellm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubellm.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kubellm.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The operator watches every namespace unless a list is given. */}}
{{- define "kubellm.clusterWide" -}}
{{- if empty .Values.operator.watchNamespaces }}true{{ end }}
{{- end }}

{{/*
The `model` name clients pass for the first model in values (the operator's rule: servedModelName,
else the hf:// repository id without @revision, else the path, else the embedded model's name).
*/}}
{{- define "kubellm.notesModelName" -}}
{{- if .Values.models }}
{{- $model := (first .Values.models).spec.model | default dict }}
{{- if $model.servedModelName }}{{ $model.servedModelName }}
{{- else if $model.source }}{{ $model.source | trimPrefix "hf://" | splitList "@" | first }}
{{- else }}HuggingFaceTB/SmolLM2-135M-Instruct{{ end }}
{{- else }}meta-llama/Llama-3.2-3B-Instruct{{ end }}
{{- end }}

{{/* Service name and port of one entry of .Values.models (the operator's defaults: <name>-service, 8000). */}}
{{- define "kubellm.modelService" -}}
{{- $service := .spec.service | default dict }}
{{- default (printf "%s-service" .name) $service.name }}
{{- end }}

{{- define "kubellm.modelPort" -}}
{{- $service := .spec.service | default dict }}
{{- default 8000 $service.port }}
{{- end }}

{{/* Names, labels and the decisions several templates share. */}}

{{- define "marl-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "marl-operator.fullname" -}}
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

{{- /*
Name of a cluster-scoped object of the release (a ClusterRole or its binding): the release's
namespace is in it, so that releases of one name in two namespaces (one per team, each with
its watchNamespaces) do not claim the same object. RBAC names may be 253 characters long.
*/ -}}
{{- define "marl-operator.clusterScopedName" -}}
{{- printf "%s-%s" (include "marl-operator.fullname" .) .Release.Namespace }}
{{- end }}

{{- define "marl-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "marl-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "marl-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "marl-operator.labels" -}}
helm.sh/chart: {{ include "marl-operator.chart" . }}
{{ include "marl-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: marl-operator
{{- end }}

{{- define "marl-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "marl-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "marl-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* "true" when the operator watches every namespace (no watchNamespaces), else "". */}}
{{- define "marl-operator.clusterwide" -}}
{{- if not .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/* "true" when replicas peer (kopf peering), "" when the operator runs --standalone. */}}
{{- define "marl-operator.peering" -}}
{{- $mode := toString .Values.peering.enabled }}
{{- if eq $mode "auto" }}
{{- if gt (int .Values.replicaCount) 1 }}true{{ end }}
{{- else if eq $mode "true" }}true
{{- else if ne $mode "false" }}
{{- fail (printf "peering.enabled must be auto, true or false, not %q" $mode) }}
{{- end }}
{{- end }}

{{/* The mesh API groups the RBAC covers. */}}
{{- define "marl-operator.istio" -}}
{{- if has .Values.meshProvider (list "istio" "all") }}true{{ end }}
{{- end }}
{{- define "marl-operator.gatewayApi" -}}
{{- if has .Values.meshProvider (list "gateway-api" "all") }}true{{ end }}
{{- end }}

{{/* A Prometheus duration ("1m30s", units ms, s, m, h as the schema allows) in milliseconds. */}}
{{- define "marl-operator.milliseconds" -}}
{{- $units := dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000 }}
{{- $total := 0 }}
{{- range regexFindAll "[0-9]+(ms|s|m|h)" . -1 }}
{{- $total = add $total (mul (regexFind "^[0-9]+" . | atoi) (get $units (regexFind "[a-z]+$" .))) }}
{{- end }}
{{- $total -}}
{{- end }}

{{/* Fails when a monitor's scrapeTimeout is longer than its interval, which the Prometheus
Operator refuses (the operator would go unscraped). Takes (list "serviceMonitor" .Values.serviceMonitor). */}}
{{- define "marl-operator.checkScrapeTimeout" -}}
{{- $name := index . 0 }}
{{- $monitor := index . 1 }}
{{- with $monitor.scrapeTimeout }}
{{- if gt (include "marl-operator.milliseconds" . | int) (include "marl-operator.milliseconds" $monitor.interval | int) }}
{{- fail (printf "%s.scrapeTimeout (%s) is longer than %s.interval (%s), which Prometheus refuses: shorten the timeout or lengthen the interval" $name . $name $monitor.interval) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The Secret the API's certificate is served from when api.tls.enabled ("" otherwise);
fails when no source of it is named. */}}
{{- define "marl-operator.apiTlsSecret" -}}
{{- with .Values.api.tls }}
{{- if .enabled }}
{{- if and .secretName .certManager.issuerRef }}
{{- fail "api.tls: set secretName or certManager.issuerRef, not both" }}
{{- else if .secretName }}{{ .secretName }}
{{- else if .certManager.issuerRef }}{{ include "marl-operator.fullname" $ }}-api-tls
{{- else }}
{{- fail "api.tls.enabled needs the certificate's source: api.tls.secretName (a kubernetes.io/tls Secret of the release namespace) or api.tls.certManager.issuerRef (e.g. {name: ISSUER, kind: ClusterIssuer}, for cert-manager to issue it)" }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The Service's name in the cluster's DNS: what the API's certificate names, what the
monitors verify it for and what the notes reach it by. */}}
{{- define "marl-operator.apiHost" -}}
{{ include "marl-operator.fullname" . }}.{{ .Release.Namespace }}.svc
{{- end }}

{{/* The name of the API's port: https with api.tls (a mesh reading names as protocols must
not parse it as HTTP), else http. */}}
{{- define "marl-operator.apiPortName" -}}
{{- if .Values.api.tls.enabled }}https{{ else }}http{{ end }}
{{- end }}

{{/* The scheme and tlsConfig of a monitor's endpoint with api.tls: Prometheus verifies the
operator's certificate for the Service's name against the CA the Secret carries, unless the
monitor's tlsConfig says otherwise. Takes (list $ "serviceMonitor" .Values.serviceMonitor). */}}
{{- define "marl-operator.monitorTls" -}}
{{- $ := index . 0 }}
{{- $name := index . 1 }}
{{- $monitor := index . 2 }}
{{- $secret := include "marl-operator.apiTlsSecret" $ }}
{{- if $secret -}}
scheme: https
{{- if $monitor.tlsConfig }}
tlsConfig:
  {{- toYaml $monitor.tlsConfig | nindent 2 }}
{{- else }}
{{- if ne ($monitor.namespace | default $.Release.Namespace) $.Release.Namespace }}
{{- fail (printf "%s: the CA of the operator's certificate is in Secret %s of namespace %s, which a monitor of namespace %s cannot read; set %s.tlsConfig (e.g. {ca: {secret: {name: SECRET, key: ca.crt}}, serverName: ...}, SECRET in the monitor's namespace)" $name $secret $.Release.Namespace $monitor.namespace $name) }}
{{- end }}
tlsConfig:
  ca:
    secret:
      name: {{ $secret | quote }}
      key: ca.crt
  serverName: {{ include "marl-operator.apiHost" $ }}
{{- end }}
{{- end }}
{{- end }}

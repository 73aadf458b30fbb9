{{- define "agent-service.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "agent-service.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "agent-service.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "agent-service.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "agent-service.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agent-service.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "agent-service.labels" -}}
{{ include "agent-service.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "agent-service.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-secrets" (include "agent-service.fullname" .)) }}
{{- end }}

{{- define "agent-service.workloadKind" -}}
{{- if .Values.kafka.transactional }}StatefulSet{{ else }}Deployment{{ end }}
{{- end }}


{{- define "agent-service.maxReplicas" -}}
{{- if gt (int .max) 0 }}{{ int .max }}{{ else }}{{ int .root.Values.kafka.partitions }}{{ end }}
{{- end }}

{{/* AGENT_* variables read from the Secret: name, key, whether the key may be absent */}}
{{- define "agent-service.secretEnv" -}}
{{- $secret := include "agent-service.secretName" . -}}
{{- range list (list "AGENT_ADMIN_TOKEN" "admin-token" false) (list "AGENT_READ_TOKEN" "read-token" true) (list "AGENT_SUBMIT_TOKEN" "submit-token" true) (list "AGENT_LLM__API_KEY" "llm-api-key" true) (list "AGENT_LLM__FALLBACKS" "llm-fallbacks" true) (list "AGENT_LLM__REPLICAS" "llm-replicas" true) (list "AGENT_REDIS__URL" "redis-url" false) (list "AGENT_KAFKA__SASL_PASSWORD" "kafka-sasl-password" true) (list "AGENT_KAFKA__SASL_OAUTHBEARER_CLIENT_SECRET" "kafka-oauth-client-secret" true) }}
- name: {{ index . 0 }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ index . 1 }}
      {{- if index . 2 }}
      optional: true
      {{- end }}
{{- end }}
{{- end }}

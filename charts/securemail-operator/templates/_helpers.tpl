{{/* The release's full name: the release name when it already says securemail-operator, else both. */}}
{{- define "securemail.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "securemail.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "securemail.labels" -}}
{{ include "securemail.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: securemail
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "securemail.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "securemail.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Secret verbs the operator needs where it manages tenants: DKIM key Secrets are created once, immutable; patch
only drops the owner reference on deletionPolicy Orphan; get also checks the Secrets a tenant references. */}}
{{- define "securemail.secretRule" -}}
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch, create, patch, delete]
{{- end -}}

{{/* The MTA pods' status says why a tenant's pods cannot run (image pull, scheduling, crash loop); the operator
lists and watches pods only where tenants live. */}}
{{- define "securemail.podWatchRule" -}}
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
{{- end -}}

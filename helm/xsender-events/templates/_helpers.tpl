{{/* Names, labels and the pod template shared by every role. */}}

{{- define "xsender-events.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "xsender-events.fullname" -}}
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

{{- define "xsender-events.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the release's pods (stable across upgrades). */}}
{{- define "xsender-events.selectorLabels" -}}
app.kubernetes.io/name: {{ include "xsender-events.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "xsender-events.labels" -}}
helm.sh/chart: {{ include "xsender-events.chart" . }}
{{ include "xsender-events.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: xsender
{{- end }}

{{/* The component serving HTTP traffic: the ingress role, or the single embedded pod. */}}
{{- define "xsender-events.httpComponent" -}}
{{- if eq .Values.mode "cluster" }}ingress{{ else }}embedded{{ end }}
{{- end }}

{{- define "xsender-events.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "xsender-events.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "xsender-events.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Refuses values that would render a broken install, with what to set instead. The schema
checks types; these need more than one value at once.
*/}}
{{- define "xsender-events.validate" -}}
{{- $v := .Values }}
{{- $needed := add $v.preStopSleepSeconds $v.config.shutdownGraceSecs }}
{{- if le (int $v.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be larger than preStopSleepSeconds + config.shutdownGraceSecs (%d): Kubernetes would kill the pods before in-flight webhooks finish" (int $v.terminationGracePeriodSeconds) (int $needed)) }}
{{- end }}
{{- if eq $v.mode "cluster" }}
{{- if not $v.kafka.brokers }}
{{- fail "mode cluster needs kafka.brokers (host:port of the Kafka bootstrap brokers); use mode embedded for a single pod without Kafka" }}
{{- end }}
{{- if not $v.cql.nodes }}
{{- fail "mode cluster needs cql.nodes (host:port of the ScyllaDB contact points); use mode embedded for a single pod without ScyllaDB" }}
{{- end }}
{{- end }}
{{- if and $v.ingress.podDisruptionBudget.enabled (eq $v.mode "cluster") (kindIs "invalid" $v.ingress.podDisruptionBudget.minAvailable) (kindIs "invalid" $v.ingress.podDisruptionBudget.maxUnavailable) }}
{{- fail "ingress.podDisruptionBudget needs maxUnavailable or minAvailable" }}
{{- end }}
{{- end }}

{{/*
The pod template of one role. Call with (dict "root" $ "role" "ingress|normalizer|projector|all"
"component" "<label>" "values" <the role's values>).
*/}}
{{- define "xsender-events.podTemplate" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $rv := .values }}
{{- $cluster := eq $v.mode "cluster" }}
{{- $http := or (eq .role "ingress") (eq .role "all") }}
metadata:
  labels:
    {{- include "xsender-events.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # Roll the pods when the rendered settings change.
    checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "xsender-events.serviceAccountName" $root }}
  automountServiceAccountToken: {{ $v.serviceAccount.automountToken }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
  containers:
    - name: xsender-events
      image: {{ include "xsender-events.image" $root | quote }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      args:
        {{- if $v.logJson }}
        - --log-json
        {{- end }}
        - serve
        - --config
        - /etc/xsender-events/config/config.toml
        - --data-dir
        - /data
        {{- if $v.tenants.existingSecret }}
        - --tenants
        - /etc/xsender-events/tenants/tenants.toml
        {{- end }}
        {{- if $cluster }}
        - --role
        - {{ .role }}
        - --kafka-brokers
        - {{ join "," $v.kafka.brokers | quote }}
        {{- with $v.kafka.namespace }}
        - --kafka-namespace
        - {{ . | quote }}
        {{- end }}
        {{- with $v.kafka.schemaRegistryUrl }}
        - --schema-registry-url
        - {{ . | quote }}
        {{- end }}
        - --projections
        - cql
        - --cql-nodes
        - {{ join "," $v.cql.nodes | quote }}
        - --cql-keyspace
        - {{ $v.cql.keyspace | quote }}
        {{- end }}
        {{- range $rv.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      env:
        - name: RUST_LOG
          value: {{ $v.logLevel | quote }}
        {{- if and $http $v.adminToken.existingSecret }}
        - name: XSENDER_ADMIN_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ $v.adminToken.existingSecret }}
              key: {{ $v.adminToken.key }}
        {{- end }}
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: http
          containerPort: {{ $v.containerPort }}
          protocol: TCP
      startupProbe:
        httpGet:
          path: /healthz
          port: http
        {{- toYaml $v.probes.startup | nindent 8 }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: http
        {{- toYaml $v.probes.liveness | nindent 8 }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: http
        {{- toYaml $v.probes.readiness | nindent 8 }}
      {{- if gt (int $v.preStopSleepSeconds) 0 }}
      lifecycle:
        preStop:
          sleep:
            seconds: {{ $v.preStopSleepSeconds }}
      {{- end }}
      resources:
        {{- toYaml $rv.resources | nindent 8 }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/xsender-events/config
          readOnly: true
        {{- if $v.tenants.existingSecret }}
        - name: tenants
          mountPath: /etc/xsender-events/tenants
          readOnly: true
        {{- end }}
        - name: data
          mountPath: /data
        # SQLite's temporary files; the root filesystem is read-only.
        - name: tmp
          mountPath: /tmp
  volumes:
    - name: config
      configMap:
        name: {{ include "xsender-events.fullname" $root }}
    {{- if $v.tenants.existingSecret }}
    - name: tenants
      secret:
        secretName: {{ $v.tenants.existingSecret }}
        defaultMode: 0440
        items:
          - key: {{ $v.tenants.key }}
            path: tenants.toml
    {{- end }}
    {{- if $cluster }}
    # Cluster mode keeps its state in Kafka and ScyllaDB; /data is scratch.
    - name: data
      emptyDir: {}
    {{- end }}
    - name: tmp
      emptyDir: {}
  {{- $nodeSelector := merge (deepCopy ($rv.nodeSelector | default dict)) ($v.nodeSelector | default dict) }}
  {{- with $nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with ($rv.tolerations | default $v.tolerations) }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with ($rv.affinity | default $v.affinity) }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $rv.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

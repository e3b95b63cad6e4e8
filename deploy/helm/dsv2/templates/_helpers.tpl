{{/* Names ------------------------------------------------------------------------------ */}}

{{- define "dsv2.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object name prefix; kept to 40 characters so "<prefix>-<suffix>" and the names KubeRay
derives from the RayService (RayCluster, head Service) stay within 63. */}}
{{- define "dsv2.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dsv2.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dsv2.gatewayName" -}}{{ include "dsv2.fullname" . }}-gateway{{- end }}
{{- define "dsv2.redisName" -}}{{ include "dsv2.fullname" . }}-redis{{- end }}
{{- define "dsv2.serveServiceName" -}}{{ include "dsv2.fullname" . }}-serve{{- end }}

{{- define "dsv2.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (include "dsv2.gatewayName" .) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels: call with (dict "ctx" $ "component" "gateway") ---------------------------------- */}}

{{- define "dsv2.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dsv2.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "dsv2.labels" -}}
{{ include "dsv2.selectorLabels" . }}
helm.sh/chart: {{ include "dsv2.chart" .ctx }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: dsv2
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Image and shared pod pieces -------------------------------------------------------- */}}

{{- define "dsv2.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "dsv2.modelPath" -}}
{{- if .Values.model.subPath }}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) (trimPrefix "/" .Values.model.subPath) }}
{{- else }}
{{- .Values.model.mountPath }}
{{- end }}
{{- end }}

{{/* Container resources plus GPUs: call with (dict "resources" .resources "gpus" N "name" "nvidia.com/gpu") */}}
{{- define "dsv2.resourcesWithGpus" -}}
{{- $res := deepCopy (default dict .resources) }}
{{- if gt (int .gpus) 0 }}
{{- $limits := default dict (get $res "limits") }}
{{- $requests := default dict (get $res "requests") }}
{{- $_ := set $limits .name (toString (int .gpus)) }}
{{- $_ := set $requests .name (toString (int .gpus)) }}
{{- $_ := set $res "limits" $limits }}
{{- $_ := set $res "requests" $requests }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* Redis URL env for the gateway (DSV2_REDIS_URL, and DSV2_SESSIONS_REDIS_URL for the
sessions server), from the built-in Redis or externalRedis. */}}
{{- define "dsv2.redisEnv" -}}
{{- if .Values.redis.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ default (include "dsv2.redisName" .) .Values.redis.auth.existingSecret }}
      key: {{ .Values.redis.auth.key }}
- name: DSV2_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:6379/0" (include "dsv2.redisName" .) | quote }}
- name: DSV2_SESSIONS_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:6380/0" (include "dsv2.redisName" .) | quote }}
{{- else if .Values.externalRedis.existingSecret }}
- name: DSV2_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.externalRedis.existingSecret }}
      key: {{ .Values.externalRedis.urlKey }}
{{- if .Values.externalRedis.sessionsUrlKey }}
- name: DSV2_SESSIONS_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.externalRedis.existingSecret }}
      key: {{ .Values.externalRedis.sessionsUrlKey }}
{{- else if .Values.externalRedis.sessionsUrl }}
- name: DSV2_SESSIONS_REDIS_URL
  value: {{ .Values.externalRedis.sessionsUrl | quote }}
{{- end }}
{{- else if .Values.externalRedis.url }}
- name: DSV2_REDIS_URL
  value: {{ .Values.externalRedis.url | quote }}
{{- if .Values.externalRedis.sessionsUrl }}
- name: DSV2_SESSIONS_REDIS_URL
  value: {{ .Values.externalRedis.sessionsUrl | quote }}
{{- end }}
{{- else }}
{{- fail "redis.enabled is false: set externalRedis.url or externalRedis.existingSecret" }}
{{- end }}
{{- end }}

{{/* The Serve config (serveConfigV2). Application args are the builder's keyword arguments,
the same as a local `dsv2 model-plane` run. */}}
{{- define "dsv2.serveConfig" -}}
{{- $s := .Values.serve }}
{{- $rc := .Values.rayCluster }}
{{- $engine := dict
      "num_cpus" $s.engineDeployment.numCpus
      "num_gpus" $s.engineDeployment.numGpus
      "max_ongoing_requests" $s.engineDeployment.maxOngoingRequests
      "resources" (dict $rc.attention.rayResource 1) }}
{{- $shard := dict
      "num_cpus" $s.shardDeployment.numCpus
      "num_gpus" $s.shardDeployment.numGpus
      "max_ongoing_requests" $s.shardDeployment.maxOngoingRequests
      "resources" (dict $rc.expert.rayResource 1) }}
{{- $routing := dict
      "policy" $s.routing.policy
      "max_imbalance" $s.routing.maxImbalance
      "max_keys_per_replica" $s.routing.maxKeysPerReplica
      "max_sessions" $s.routing.maxSessions }}
{{- $args := dict
      "model_path" (include "dsv2.modelPath" .)
      "num_expert_shards" $s.numExpertShards
      "shard_port_base" $s.shardPortBase
      "shard_host" "0.0.0.0"
      "engine" $s.engine
      "engine_deployment" $engine
      "shard_deployment" $shard
      "routing" $routing }}
{{- $as := $s.engineAutoscaling }}
{{- if $as.enabled }}
{{- $_ := set $args "engine_autoscaling" (dict
      "min_replicas" $as.minReplicas
      "max_replicas" $as.maxReplicas
      "target_ongoing_requests" $as.targetOngoingRequests
      "upscale_delay_s" $as.upscaleDelayS
      "downscale_delay_s" $as.downscaleDelayS) }}
{{- else }}
{{- $_ := set $args "engine_replicas" $s.engineReplicas }}
{{- end }}
{{- if $s.modelId }}
{{- $_ := set $args "model_id" $s.modelId }}
{{- end }}
{{- if not (kindIs "invalid" $s.metricsPort) }}
{{- /* 0.0.0.0: read from outside the pod (Prometheus, the API server's pod proxy). */}}
{{- $_ := set $args "metrics_port" $s.metricsPort }}
{{- $_ := set $args "metrics_host" "0.0.0.0" }}
{{- end }}
{{- $app := dict "name" $s.appName "import_path" $s.importPath "route_prefix" "/" "args" $args }}
{{- $config := dict
      "proxy_location" "EveryNode"
      "http_options" (dict "host" "0.0.0.0" "port" $s.httpPort)
      "grpc_options" (dict "port" $s.grpcPort "grpc_servicer_functions" (list "services.rpc.dsv2.v1.inference_pb2_grpc.add_InferenceServicer_to_server"))
      "applications" (list $app) }}
{{- toYaml $config }}
{{- end }}

{{/* Volumes every Ray pod has: a writable /tmp (Ray's session dir) and a memory-backed
/dev/shm (the object store). Call with (dict "ctx" $ "shm" "8Gi"). */}}
{{- define "dsv2.rayVolumes" -}}
- name: tmp
  emptyDir: {}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shm }}
{{- end }}

{{- define "dsv2.rayEnv" -}}
- name: HOME
  value: /tmp
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}

{{/* Ray health: the dashboard agent's /api/healthz (raylet, and the GCS on the head). */}}
{{- define "dsv2.rayProbes" -}}
readinessProbe:
  httpGet:
    path: /api/healthz
    port: 52365
  initialDelaySeconds: 10
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 6
livenessProbe:
  httpGet:
    path: /api/healthz
    port: 52365
  initialDelaySeconds: 60
  periodSeconds: 15
  timeoutSeconds: 5
  failureThreshold: 8
{{- end }}

{{/* A Ray worker group. Call with (dict "ctx" $ "group" "attention" "spec" .Values.rayCluster.attention). */}}
{{- define "dsv2.workerGroup" -}}
{{- $ctx := .ctx }}
{{- $spec := .spec }}
{{- $v := $ctx.Values -}}
- groupName: {{ .group }}
  replicas: {{ $spec.replicas }}
  minReplicas: {{ $spec.minReplicas }}
  maxReplicas: {{ $spec.maxReplicas }}
  rayStartParams:
    # Custom Ray resource: the {{ .group }} deployment asks for one unit, so its replicas land
    # here and nowhere else. KubeRay passes the value to `ray start --resources=` verbatim.
    resources: {{ printf "\"%s\"" (dict $spec.rayResource $spec.slots | toJson | replace "\"" "\\\"") | quote }}
  template:
    metadata:
      labels:
        {{- include "dsv2.labels" (dict "ctx" $ctx "component" "ray-worker") | nindent 8 }}
        dsv2.io/ray-group: {{ .group }}
    spec:
      automountServiceAccountToken: false
      {{- with $v.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $v.podSecurityContext | nindent 8 }}
      {{- if eq $v.model.source "download" }}
      initContainers:
        - name: download-model
          image: {{ include "dsv2.image" $ctx }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          command:
            - python
            - -m
            - services.k8s.download
            - --repo
            - {{ $v.model.download.repo | quote }}
            - --revision
            - {{ $v.model.download.revision | quote }}
            - --dest
            - {{ include "dsv2.modelPath" $ctx | quote }}
          env:
            - name: HOME
              value: /tmp
            - name: HF_HOME
              value: /tmp/hf
            {{- if $v.model.download.tokenSecret.name }}
            - name: HF_TOKEN
              valueFrom:
                secretKeyRef:
                  name: {{ $v.model.download.tokenSecret.name }}
                  key: {{ $v.model.download.tokenSecret.key }}
            {{- end }}
          resources:
            {{- toYaml $v.model.download.resources | nindent 12 }}
          securityContext:
            {{- toYaml $v.containerSecurityContext | nindent 12 }}
          volumeMounts:
            - name: models
              mountPath: {{ $v.model.mountPath }}
            - name: tmp
              mountPath: /tmp
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "dsv2.image" $ctx }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          env:
            {{- include "dsv2.rayEnv" $ctx | nindent 12 }}
          ports:
            - name: serve
              containerPort: {{ $v.serve.httpPort }}
            - name: serve-grpc
              containerPort: {{ $v.serve.grpcPort }}
            - name: dashboard-agent
              containerPort: 52365
            - name: metrics
              containerPort: 8080
            {{- if and (eq .group "attention") (not (kindIs "invalid" $v.serve.metricsPort)) }}
            # The Engine replicas' own Prometheus endpoint (serve.metricsPort).
            - name: engine-metrics
              containerPort: {{ $v.serve.metricsPort }}
            {{- end }}
          resources:
            {{- include "dsv2.resourcesWithGpus" (dict "resources" $spec.resources "gpus" $spec.gpus "name" $v.rayCluster.gpuResourceName) | nindent 12 }}
          {{- include "dsv2.rayProbes" $ctx | nindent 10 }}
          securityContext:
            {{- toYaml $v.containerSecurityContext | nindent 12 }}
          volumeMounts:
            - name: models
              mountPath: {{ $v.model.mountPath }}
              readOnly: {{ eq $v.model.source "pvc" }}
            - name: tmp
              mountPath: /tmp
            - name: shm
              mountPath: /dev/shm
      volumes:
        {{- include "dsv2.rayVolumes" (dict "ctx" $ctx "shm" $spec.shmSize) | nindent 8 }}
        - name: models
          {{- if eq $v.model.source "pvc" }}
          persistentVolumeClaim:
            claimName: {{ required "model.pvc.claimName is required when model.source is pvc" $v.model.pvc.claimName }}
            readOnly: true
          {{- else }}
          emptyDir:
            sizeLimit: {{ $v.model.download.sizeLimit }}
          {{- end }}
      {{- with $spec.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $spec.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $spec.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

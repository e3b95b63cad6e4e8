{{/* Checks across values that values.schema.json cannot express; each names the fields. */}}
{{- define "dsv2.validate" -}}
{{- $rc := .Values.rayCluster }}
{{- $s := .Values.serve }}
{{- range $group := list "attention" "expert" }}
{{- $g := index $rc $group }}
{{- if gt (int $g.minReplicas) (int $g.maxReplicas) }}
{{- fail (printf "rayCluster.%s.minReplicas (%v) must not exceed rayCluster.%s.maxReplicas (%v)" $group $g.minReplicas $group $g.maxReplicas) }}
{{- end }}
{{- if or (lt (int $g.replicas) (int $g.minReplicas)) (gt (int $g.replicas) (int $g.maxReplicas)) }}
{{- fail (printf "rayCluster.%s.replicas (%v) must lie within [minReplicas, maxReplicas] = [%v, %v]" $group $g.replicas $g.minReplicas $g.maxReplicas) }}
{{- end }}
{{- end }}
{{- if $s.engineAutoscaling.enabled }}
{{- if gt (int $s.engineAutoscaling.minReplicas) (int $s.engineAutoscaling.maxReplicas) }}
{{- fail (printf "serve.engineAutoscaling.minReplicas (%v) is above maxReplicas (%v)" $s.engineAutoscaling.minReplicas $s.engineAutoscaling.maxReplicas) }}
{{- end }}
{{- if gt (int $s.engineAutoscaling.maxReplicas) (mul (int $rc.attention.maxReplicas) (int $rc.attention.slots)) }}
{{- fail (printf "serve.engineAutoscaling.maxReplicas (%v) needs more room than rayCluster.attention offers (maxReplicas %v × slots %v)" $s.engineAutoscaling.maxReplicas $rc.attention.maxReplicas $rc.attention.slots) }}
{{- end }}
{{- else if gt (int $s.engineReplicas) (mul (int $rc.attention.maxReplicas) (int $rc.attention.slots)) }}
{{- fail (printf "serve.engineReplicas (%v) needs more room than rayCluster.attention offers (maxReplicas %v × slots %v)" $s.engineReplicas $rc.attention.maxReplicas $rc.attention.slots) }}
{{- end }}
{{- if gt (int $s.numExpertShards) 0 }}
{{- if not $rc.expert.enabled }}
{{- fail (printf "serve.numExpertShards is %v but rayCluster.expert.enabled is false: enable the expert group or set serve.numExpertShards to 0" $s.numExpertShards) }}
{{- end }}
{{- if gt (int $s.numExpertShards) (mul (int $rc.expert.maxReplicas) (int $rc.expert.slots)) }}
{{- fail (printf "serve.numExpertShards (%v) needs more room than rayCluster.expert offers (maxReplicas %v × slots %v)" $s.numExpertShards $rc.expert.maxReplicas $rc.expert.slots) }}
{{- end }}
{{- end }}
{{- if not (kindIs "invalid" $s.metricsPort) }}
{{- range $name, $port := dict "serve.grpcPort" $s.grpcPort "serve.httpPort" $s.httpPort "Ray's metrics export" 8080 "Ray's dashboard agent" 52365 }}
{{- if eq (int $s.metricsPort) (int $port) }}
{{- fail (printf "serve.metricsPort (%v) is already taken by %s on the attention pods: pick another port" $s.metricsPort $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- $device := toString (default "auto" $s.engine.device) }}
{{- if and (hasPrefix "cuda" $device) (eq (float64 $s.engineDeployment.numGpus) 0.0) }}
{{- fail (printf "serve.engine.device is %s but serve.engineDeployment.numGpus is 0: Ray hides GPUs from replicas that reserve none" $device) }}
{{- end }}
{{- if and (eq $device "cpu") (gt (float64 $s.engineDeployment.numGpus) 0.0) }}
{{- fail (printf "serve.engine.device is cpu but serve.engineDeployment.numGpus is %v: the Engine would hold a GPU it never uses" $s.engineDeployment.numGpus) }}
{{- end }}
{{- if and .Values.gateway.autoscaling.enabled (gt (int .Values.gateway.autoscaling.minReplicas) (int .Values.gateway.autoscaling.maxReplicas)) }}
{{- fail "gateway.autoscaling.minReplicas must not exceed gateway.autoscaling.maxReplicas" }}
{{- end }}
{{- end }}

"""Kubernetes helpers: `dsv2 k8s status` (release readiness), `dsv2 k8s smoke` (the helm test
check) and the model download run by the chart's init container."""

#!/usr/bin/env bash
# Installs the platform the chart runs on, at the versions in infra/versions.env, into the current
# kubectl context. Idempotent: `helm upgrade --install` and `kubectl apply`, so a second run upgrades.
#   cert-manager         certificates for KServe's webhooks
#   KServe               InferenceService in Standard (raw Deployment) mode: no Knative, no Istio
#   Kubeflow Pipelines   standalone, single-user, in namespace kubeflow
#   Prefect server       namespace prefect, Service prefect-server:4200
#   NVIDIA device plugin with --gpu: advertises nvidia.com/gpu on nodes labelled nvidia.com/gpu.present
#
# No Prefect worker and no Kubernetes work pool: the chart runs `driftloop pipeline serve`, a Deployment
# that registers the retraining deployment on this server and executes its flow runs in-process
# (scale it with replicas). Nothing has to create pods, so it needs no RBAC beyond its own.
#
# Usage: infra/addons.sh [--gpu]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

gpu=0
case ${1:-} in
  --gpu) gpu=1 ;;
  "") ;;
  *) die "usage: infra/addons.sh [--gpu]" ;;
esac

step "cert-manager $CERT_MANAGER_VERSION"
helm upgrade --install cert-manager cert-manager --repo https://charts.jetstack.io \
  --version "$CERT_MANAGER_VERSION" -n cert-manager --create-namespace \
  --set crds.enabled=true --wait --timeout 10m
# KServe's chart creates Certificates at once, and the webhook that admits them must be serving.
kubectl wait --for=condition=Available deployment/cert-manager-webhook -n cert-manager --timeout=5m

step "KServe $KSERVE_VERSION (Standard mode)"
helm upgrade --install kserve-crd oci://ghcr.io/kserve/charts/kserve-crd \
  --version "$KSERVE_VERSION" -n kserve --create-namespace --wait --timeout 10m
# Standard is KServe's name for the raw Deployment mode since 0.16 (RawDeployment before). No Ingress
# and no Istio VirtualService: clients reach <name>-predictor through the cluster (or a port-forward).
helm upgrade --install kserve oci://ghcr.io/kserve/charts/kserve-resources \
  --version "$KSERVE_VERSION" -n kserve \
  --set kserve.controller.deploymentMode=Standard \
  --set kserve.controller.gateway.disableIngressCreation=true \
  --set kserve.controller.gateway.disableIstioVirtualHost=true \
  --wait --timeout 10m

step "Kubeflow Pipelines $KFP_VERSION (standalone)"
kfp=github.com/kubeflow/pipelines/manifests/kustomize
kubectl apply -k "$kfp/cluster-scoped-resources?ref=$KFP_VERSION"
kubectl wait --for=condition=Established crd/applications.app.k8s.io --timeout=2m
kubectl apply -k "$kfp/env/platform-agnostic?ref=$KFP_VERSION"
# The API server restarts until MySQL and the object store are up: give the first start time.
for deployment in ml-pipeline ml-pipeline-ui workflow-controller; do
  kubectl rollout status "deployment/$deployment" -n kubeflow --timeout=15m
done

step "Prefect server (chart $PREFECT_CHART_VERSION, Prefect $PREFECT_IMAGE_TAG)"
# SQLite on a volume: one server replica is all a demo needs, and there is no PostgreSQL to run.
helm upgrade --install prefect-server prefect-server --repo https://prefecthq.github.io/prefect-helm \
  --version "$PREFECT_CHART_VERSION" -n prefect --create-namespace \
  --set global.prefect.image.prefectTag="$PREFECT_IMAGE_TAG" \
  --set postgresql.enabled=false --set sqlite.enabled=true \
  --set-json 'server.env=[{"name":"PREFECT_SERVER_ANALYTICS_ENABLED","value":"false"}]' \
  --wait --timeout 10m

if ((gpu)); then
  step "NVIDIA device plugin $NVIDIA_DEVICE_PLUGIN_VERSION"
  # The plugin needs the nvidia runtime to see the GPUs: nvkind registers the RuntimeClass, the NVIDIA
  # GPU Operator does on a cloud cluster.
  kubectl get runtimeclass nvidia >/dev/null ||
    die "no RuntimeClass nvidia in this cluster: create the cluster with nvkind (make deploy GPU=1)" \
      "or install the NVIDIA GPU Operator"
  helm upgrade --install nvidia-device-plugin nvidia-device-plugin \
    --repo https://nvidia.github.io/k8s-device-plugin --version "$NVIDIA_DEVICE_PLUGIN_VERSION" \
    -n nvidia --create-namespace \
    --set runtimeClassName=nvidia \
    --set-string 'nodeSelector.nvidia\.com/gpu\.present=true' \
    --wait --timeout 10m
  kubectl get nodes -l nvidia.com/gpu.present=true \
    -o custom-columns='NODE:.metadata.name,GPUS:.status.allocatable.nvidia\.com/gpu'
fi

step "add-ons ready"

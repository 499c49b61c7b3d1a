#!/usr/bin/env bash
# Installs the platform the chart runs on, at the versions in infra/versions.env, into the current
# kubectl context. Idempotent: `helm upgrade --install` and `kubectl apply`, so a second run upgrades.
#   cert-manager         certificates for KServe's webhooks
#   KServe               InferenceService in Standard (raw Deployment) mode: no Knative, no Istio
#   Kubeflow Pipelines   standalone, single-user, in namespace kubeflow
#   NVIDIA device plugin with --gpu: advertises nvidia.com/gpu on nodes labelled nvidia.com/gpu.present
# The Prefect server is part of the chart (helm/driftloop, from the project image).
#
# AIRGAP=1 (nothing can be pulled; infra/airgap/ built the images): KServe's charts come with its Go
# module's source and its controller image was built here; cert-manager is replaced by a webhook
# certificate made with openssl (infra/airgap/kserve-post-render.py); kube-router's firewall enforces
# NetworkPolicies (infra/airgap/kube-router/); Kubeflow Pipelines is left out
# (its manifests and images cannot be built from package registries: the KFP path is proven offline).
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

if [[ $AIRGAP == 1 ]]; then
  ((gpu == 0)) || die "AIRGAP=1 builds a CPU cluster only (the NVIDIA device plugin's image cannot be built here)"
  charts=$AIRGAP_CACHE/bin/kserve-$KSERVE_VERSION/charts
  [[ -d $charts ]] || die "no KServe charts in $charts: run infra/airgap/binaries.sh kserve"
  step "KServe $KSERVE_VERSION (Standard mode; charts from its module, controller built here)"
  kind load docker-image "driftloop-airgap/kserve-controller:$KSERVE_VERSION" --name "$CLUSTER_NAME" >/dev/null
  helm upgrade --install kserve-crd "$charts/kserve-crd" -n kserve --create-namespace --wait --timeout 10m
  certs=$(mktemp -d)
  trap 'rm -rf "$certs"' EXIT
  service=kserve-webhook-server-service.kserve.svc
  # A re-deploy keeps the certificate the webhook already serves: a new CA in the webhook configuration
  # before the controller has remounted the new Secret fails every InferenceService call for a minute.
  if kubectl get secret kserve-webhook-server-cert -n kserve >/dev/null 2>&1; then
    for key in ca.crt tls.crt tls.key; do
      kubectl get secret kserve-webhook-server-cert -n kserve -o "jsonpath={.data.${key//./\\.}}" |
        base64 -d >"$certs/$key"
    done
  fi
  [[ -s $certs/tls.key ]] || {
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=kserve-webhook-ca" \
      -keyout "$certs/ca.key" -out "$certs/ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$service" -keyout "$certs/tls.key" -out "$certs/tls.csr" 2>/dev/null
    openssl x509 -req -in "$certs/tls.csr" -CA "$certs/ca.crt" -CAkey "$certs/ca.key" -CAcreateserial -days 3650 \
      -extfile <(printf 'subjectAltName=DNS:%s,DNS:%s.cluster.local' "$service" "$service") -out "$certs/tls.crt" 2>/dev/null
  }
  KSERVE_CERT_DIR=$certs KSERVE_IMAGE=driftloop-airgap/kserve-controller:$KSERVE_VERSION \
    helm upgrade --install kserve "$charts/kserve-resources" -n kserve \
    --post-renderer "$INFRA_DIR/airgap/kserve-post-render" \
    --set kserve.controller.deploymentMode=Standard \
    --set kserve.controller.gateway.disableIngressCreation=true \
    --set kserve.controller.gateway.disableIstioVirtualHost=true \
    --wait --timeout 10m
  step "kube-router $KUBE_ROUTER_VERSION: NetworkPolicy enforcement"
  image=driftloop-airgap/kube-router:$KUBE_ROUTER_VERSION
  kind load docker-image "$image" --name "$CLUSTER_NAME" >/dev/null
  sed "s|image: IMAGE|image: $image|" "$INFRA_DIR/airgap/kube-router/kube-router.yaml" | kubectl apply -f -
  kubectl rollout status daemonset/kube-router -n kube-system --timeout=5m
  step "add-ons ready (Kubeflow Pipelines left out: it cannot be built without a registry)"
  exit 0
fi

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

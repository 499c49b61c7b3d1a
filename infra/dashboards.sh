#!/usr/bin/env bash
# Port-forwards the UIs to fixed local ports and prints their URLs; runs until Ctrl-C.
#   Evidently  svc/driftloop-evidently  (NAMESPACE)  http://127.0.0.1:8000
#   MLflow     svc/driftloop-mlflow     (NAMESPACE)  http://127.0.0.1:5000
#   Prefect    svc/driftloop-prefect    (NAMESPACE)  http://127.0.0.1:4200
#   KFP        svc/ml-pipeline-ui       (kubeflow)   http://127.0.0.1:8080   where installed
#
# Usage: infra/dashboards.sh   (NAMESPACE, default kubeflow)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NAMESPACE=${NAMESPACE:-kubeflow}
trap stop_port_forwards EXIT
trap 'exit 0' INT TERM

# MLflow asks for a user (its basic-auth app): the platform's, from its Secret.
secret_key() {
  kubectl -n "$NAMESPACE" get secret driftloop-env -o "jsonpath={.data.$1}" 2>/dev/null | base64 -d || echo "?"
}

step "port-forwarding the dashboards"
port_forward "$NAMESPACE" svc/driftloop-evidently 8000 8000
port_forward "$NAMESPACE" svc/driftloop-mlflow 5000 5000
# 4200 on purpose: the Prefect UI in the browser calls its API at http://localhost:4200/api, the
# chart's default (prefect.server.uiApiUrl).
port_forward "$NAMESPACE" svc/driftloop-prefect 4200 4200
kfp=0
if kubectl get svc/ml-pipeline-ui -n kubeflow >/dev/null 2>&1; then
  port_forward kubeflow svc/ml-pipeline-ui 80 8080
  kfp=1
fi

cat <<URLS

  Evidently  http://127.0.0.1:8000   drift dashboards, one snapshot per check
  MLflow     http://127.0.0.1:5000   runs, model versions, champion and challenger aliases
             user $(secret_key MLFLOW_TRACKING_USERNAME), password: kubectl -n $NAMESPACE get secret driftloop-env \
               -o jsonpath='{.data.MLFLOW_TRACKING_PASSWORD}' | base64 -d
  Prefect    http://127.0.0.1:4200   flow runs of the retraining deployment
$( ((kfp)) && echo "  KFP        http://127.0.0.1:8080   Kubeflow pipeline runs" || echo "  (no Kubeflow Pipelines in this cluster)")

Ctrl-C stops the port-forwards.
URLS
wait

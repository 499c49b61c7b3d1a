#!/usr/bin/env bash
# Removes what infra/deploy.sh installed.
#   CLUSTER=kind (default): deletes the kind cluster driftloop, and with it the add-ons, the models
#                           and every volume.
#   CLUSTER=current:        uninstalls the Helm release driftloop from NAMESPACE. The add-ons stay
#                           (other workloads may use them), so do the release's volumes.
#
# Usage: infra/undeploy.sh   (CLUSTER, NAMESPACE as for infra/deploy.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CLUSTER=${CLUSTER:-kind}
NAMESPACE=${NAMESPACE:-kubeflow}

case $CLUSTER in
  kind)
    if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
      note "no kind cluster named $CLUSTER_NAME: nothing to remove"
      exit 0
    fi
    step "deleting the kind cluster $CLUSTER_NAME: the release, the add-ons and all their data go with it"
    kind delete cluster --name "$CLUSTER_NAME"
    ;;
  current)
    step "uninstalling the Helm release driftloop from $NAMESPACE (context $(kubectl config current-context))"
    helm uninstall driftloop -n "$NAMESPACE" --ignore-not-found --wait
    note "kept: cert-manager, KServe and Kubeflow Pipelines (helm list -A), and the release's"
    note "volumes: kubectl get pvc -n $NAMESPACE -l app.kubernetes.io/instance=driftloop"
    ;;
  *) die "CLUSTER is kind or current, not '$CLUSTER'" ;;
esac

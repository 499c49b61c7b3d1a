#!/usr/bin/env bash
# Starts a retraining on the cluster from this machine, through a port-forward to the orchestrator:
#   prefect  a flow run of the retraining deployment on the chart's Prefect server (svc/driftloop-prefect)
#   kfp      a run of the compiled pipeline on Kubeflow Pipelines (svc/ml-pipeline-ui -n kubeflow)
#
# A KFP run's steps use the image named by DRIFTLOOP_IMAGE; unless set, the image the release runs.
#
# With the chart's secrets.existingSecret (cloud.yaml), SECRET names it: KFP steps read it as env.
#
# Usage: infra/submit-pipeline.sh prefect|kfp   (NAMESPACE as for infra/deploy.sh; SECRET for kfp)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NAMESPACE=${NAMESPACE:-kubeflow}
usage="usage: infra/submit-pipeline.sh prefect|kfp"
(($# == 1)) || die "$usage"
engine=$1
[[ -x $DRIFTLOOP ]] || die "no $DRIFTLOOP: run \`make install\` first"
trap stop_port_forwards EXIT

case $engine in
  prefect)
    step "port-forward svc/driftloop-prefect ($NAMESPACE)"
    port_forward "$NAMESPACE" svc/driftloop-prefect 4200
    url=http://127.0.0.1:$PF_PORT/api
    ;;
  kfp)
    step "port-forward svc/ml-pipeline-ui (kubeflow)"
    port_forward kubeflow svc/ml-pipeline-ui 80
    url=http://127.0.0.1:$PF_PORT
    ;;
  *) die "unknown engine '$engine' ($usage)" ;;
esac

# The pipeline's steps run the image the release runs (make deploy tags it by content)
if [[ -z ${DRIFTLOOP_IMAGE:-} ]]; then
  DRIFTLOOP_IMAGE=$(kubectl get deployment/driftloop-retrainer -n "$NAMESPACE" \
    -o jsonpath='{.spec.template.spec.containers[0].image}' 2>/dev/null) ||
    die "no driftloop release in namespace $NAMESPACE (kubectl get deployment/driftloop-retrainer): \`make deploy\` first"
fi
export DRIFTLOOP_IMAGE
step "driftloop pipeline submit --engine $engine --url $url"
"$DRIFTLOOP" pipeline submit --engine "$engine" --url "$url" ${SECRET:+--secret "$SECRET"}

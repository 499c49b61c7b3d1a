#!/usr/bin/env bash
# Starts a retraining on the cluster from this machine, through a port-forward to the orchestrator:
#   prefect  a flow run of the retraining deployment on the Prefect server (svc/prefect-server -n prefect)
#   kfp      a run of the compiled pipeline on Kubeflow Pipelines (svc/ml-pipeline-ui -n kubeflow)
#
# A KFP run's steps use the image named by DRIFTLOOP_IMAGE; unless set, it is the one infra/deploy.sh
# built: [REGISTRY/]driftloop:<version>.
#
# With the chart's secrets.existingSecret (cloud.yaml), SECRET names it: KFP steps read it as env.
#
# Usage: infra/submit-pipeline.sh prefect|kfp   (REGISTRY as for infra/deploy.sh; SECRET for kfp)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage="usage: infra/submit-pipeline.sh prefect|kfp"
(($# == 1)) || die "$usage"
engine=$1
[[ -x $DRIFTLOOP ]] || die "no $DRIFTLOOP: run \`make install\` first"
trap stop_port_forwards EXIT

case $engine in
  prefect)
    step "port-forward svc/prefect-server (prefect)"
    port_forward prefect svc/prefect-server 4200
    url=http://127.0.0.1:$PF_PORT/api
    ;;
  kfp)
    step "port-forward svc/ml-pipeline-ui (kubeflow)"
    port_forward kubeflow svc/ml-pipeline-ui 80
    url=http://127.0.0.1:$PF_PORT
    ;;
  *) die "unknown engine '$engine' ($usage)" ;;
esac

export DRIFTLOOP_IMAGE=${DRIFTLOOP_IMAGE:-$IMAGE_REPOSITORY:$IMAGE_TAG}
step "driftloop pipeline submit --engine $engine --url $url"
"$DRIFTLOOP" pipeline submit --engine "$engine" --url "$url" ${SECRET:+--secret "$SECRET"}

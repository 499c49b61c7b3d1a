#!/usr/bin/env bash
# Smoke test: one prediction through the InferenceService, with the host's CLI. The predictor's
# Service (KServe Standard mode: driftloop-fraud-predictor, port 80 -> the container's 8080) is
# port-forwarded to a free local port for the length of the test.
#
# Usage: infra/predict.sh   (NAMESPACE, default kubeflow)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NAMESPACE=${NAMESPACE:-kubeflow}
[[ -x $DRIFTLOOP ]] || die "no $DRIFTLOOP: run \`make install\` first"
trap stop_port_forwards EXIT

step "port-forward svc/driftloop-fraud-predictor ($NAMESPACE)"
port_forward "$NAMESPACE" svc/driftloop-fraud-predictor 80
url=http://127.0.0.1:$PF_PORT
wait_http "$url/v2/health/live" 60 || die "the model server at $url did not answer /v2/health/live within 60s"
note "$url is live"

step "driftloop predict --customer-id 7 --merchant-id 3 --amount 120"
"$DRIFTLOOP" predict --url "$url" --customer-id 7 --merchant-id 3 --amount 120

#!/usr/bin/env bash
# Deploys driftloop: preflight, a kind cluster (unless CLUSTER=current), the image, the add-ons, the
# chart; then waits for the bootstrap job and the InferenceService and sends one prediction.
# Every step can be run again: an existing cluster, add-on or release is upgraded in place.
#
# Usage: infra/deploy.sh   (`make deploy` passes the settings as environment variables)
#   CLUSTER    kind (default): a local kind cluster named driftloop; current: the kubectl context
#   GPU        1: a kind cluster whose worker has the host's GPUs (nvkind), and the device plugin
#   REGISTRY   where the image is pushed; required with CLUSTER=current (e.g. ghcr.io/acme)
#   NAMESPACE  default kubeflow: Kubeflow Pipelines standalone (single-user) runs pipeline pods in its
#              own namespace, and those pods mount the driftloop data volume and read its Secret and
#              ConfigMap, which Kubernetes only allows within one namespace.
#   VALUES     the chart's values file: helm/values/kind.yaml, kind-small.yaml (a 2-CPU node),
#              kind-gpu.yaml or cloud.yaml
#   AIRGAP     1: pull nothing. Every image is built on this machine first (infra/airgap/: the kind
#              node, Python, PostgreSQL, Redis, the KServe controller, the project image) from Debian's
#              packages and the Go module proxy, with kind, kubectl and helm built the same way. Cached:
#              a second deploy rebuilds only what changed (after a code change, the project image).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

CLUSTER=${CLUSTER:-kind}
GPU=${GPU:-0}
REGISTRY=${REGISTRY:-}
NAMESPACE=${NAMESPACE:-kubeflow}
if [[ $CLUSTER == current ]]; then
  default_values=helm/values/cloud.yaml
elif [[ $GPU == 1 ]]; then
  default_values=helm/values/kind-gpu.yaml
else
  default_values=helm/values/kind.yaml
fi
VALUES=${VALUES:-$default_values}

[[ $CLUSTER == kind || $CLUSTER == current ]] || die "CLUSTER is kind or current, not '$CLUSTER'"
[[ $GPU == 0 || $GPU == 1 ]] || die "GPU is 0 or 1, not '$GPU'"
[[ $CLUSTER == kind || -n $REGISTRY ]] ||
  die "CLUSTER=current needs REGISTRY (the image is pushed there and the cluster pulls it), e.g. REGISTRY=ghcr.io/acme"
[[ -f $VALUES ]] || die "no values file $VALUES"
[[ -x $DRIFTLOOP ]] || die "no $DRIFTLOOP: run \`make install\` first (the smoke test uses the host's CLI)"
[[ $AIRGAP == 0 || $CLUSTER == kind ]] || die "AIRGAP=1 makes a local kind cluster; with CLUSTER=current push images to your registry"

# A tag per content: a code change gets a new tag, so the pods roll to it (IfNotPresent never re-pulls).
# The image is built from a snapshot of the files it copies, taken now and hashed for the tag: an edit
# made while the build runs cannot slip into an image under the tag of the code before it.
snapshot=$(mktemp -d)
trap 'rm -rf "$snapshot"' EXIT
(cd "$REPO_ROOT" && find pyproject.toml uv.lock README.md driftloop pipelines serving monitoring feature_repo \
  infra/Dockerfile infra/Dockerfile.dockerignore -type f ! -name '*.pyc' -print0 |
  tar --null -T - -cf - | tar -xf - -C "$snapshot")
IMAGE_TAG=$IMAGE_VERSION-$(cd "$snapshot" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum |
  sha256sum | cut -c1-12)
variant=cpu
[[ $GPU == 0 ]] || { variant=gpu; IMAGE_TAG=$IMAGE_TAG-gpu; }
image=$IMAGE_REPOSITORY:$IMAGE_TAG
gpu_flag=()
build_args=(--build-arg "VARIANT=$variant")
chart_args=()
kind_config=$INFRA_DIR/kind/cluster.yaml
addons="cert-manager, KServe, Kubeflow Pipelines"
if [[ $AIRGAP == 1 ]]; then
  addons="KServe (built here)"
  build_args+=(--network host --build-arg "PYTHON_IMAGE=driftloop-airgap/python:3.11-$DEBIAN_SUITE")
  chart_args=(--set "postgres.image=driftloop-airgap/postgres:15-$DEBIAN_SUITE"
    --set "redis.image=driftloop-airgap/redis:7-$DEBIAN_SUITE")
  kind_config=$INFRA_DIR/kind/airgap.yaml
fi
if [[ $GPU == 1 ]]; then
  gpu_flag=(--gpu)
  addons="$addons, NVIDIA device plugin"
fi
started=$SECONDS

if [[ $AIRGAP == 1 ]]; then
  step "[0/8] air-gapped build: binaries and images (cached; cold: about half an hour of Go builds)"
  "$INFRA_DIR/airgap/binaries.sh"
  "$INFRA_DIR/airgap/images.sh"
fi

step "[1/8] preflight"
"$INFRA_DIR/preflight.sh" --cluster "$CLUSTER" ${gpu_flag[@]+"${gpu_flag[@]}"} \
  $([[ $AIRGAP == 1 ]] && echo --airgap) $([[ $VALUES == *kind-small.yaml ]] && echo --small)

step "[2/8] cluster"
if [[ $CLUSTER == kind ]]; then
  if kind get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
    note "kind cluster $CLUSTER_NAME exists: reusing it"
  elif [[ $GPU == 1 ]]; then
    note "creating kind cluster $CLUSTER_NAME with nvkind (a control plane and a worker with every GPU)"
    # The image goes in twice: as the flag and as the template value infra/kind/gpu.yaml reads.
    nvkind cluster create --name "$CLUSTER_NAME" --image "$KIND_NODE_IMAGE" \
      --config-template "$INFRA_DIR/kind/gpu.yaml" --config-values - --wait 5m <<<"image: $KIND_NODE_IMAGE"
  else
    note "creating kind cluster $CLUSTER_NAME ($KIND_NODE_IMAGE)"
    kind create cluster --name "$CLUSTER_NAME" --image "$KIND_NODE_IMAGE" --config "$kind_config" --wait 5m
  fi
  kubectl config use-context "kind-$CLUSTER_NAME" >/dev/null
  if [[ $GPU == 1 && -z $(kubectl get nodes -l nvidia.com/gpu.present=true -o name) ]]; then
    die "kind cluster $CLUSTER_NAME has no GPU worker (it was created without GPU=1):" \
      "\`make undeploy\`, then \`make deploy GPU=1\`"
  fi
fi
context=$(kubectl config current-context)
note "kubectl context: $context"

step "[3/8] image $image"
if docker image inspect "$image" >/dev/null 2>&1; then
  note "$image exists (same code): not rebuilt"
else
  docker build -f "$snapshot/infra/Dockerfile" "${build_args[@]}" -t "$image" "$snapshot"
fi
if [[ $AIRGAP == 1 ]]; then
  # The air-gapped engine keeps images in its own store: kind loads them directly (and skips an
  # image every node already has)
  kind load docker-image "$image" "driftloop-airgap/postgres:15-$DEBIAN_SUITE" \
    "driftloop-airgap/redis:7-$DEBIAN_SUITE" --name "$CLUSTER_NAME"
elif [[ $CLUSTER == kind ]]; then
  # Saved for this platform only, then loaded: `kind load docker-image` fails on Docker's containerd
  # image store ("content digest not found"), kind's documented workaround.
  archive=$snapshot/image.tar
  platform=linux/$(docker info --format '{{.Architecture}}' | sed 's/x86_64/amd64/;s/aarch64/arm64/')
  docker image save --platform "$platform" -o "$archive" "$image"
  kind load image-archive "$archive" --name "$CLUSTER_NAME"
else
  docker push "$image"
fi

step "[4/8] add-ons: $addons"
"$INFRA_DIR/addons.sh" ${gpu_flag[@]+"${gpu_flag[@]}"}

step "[5/8] chart helm/driftloop -> namespace $NAMESPACE ($VALUES)"
# On a first install Helm also waits for the bootstrap job (a post-install hook): its logs tell why it failed.
if ! helm upgrade --install driftloop helm/driftloop -n "$NAMESPACE" --create-namespace -f "$VALUES" \
  --set image.repository="$IMAGE_REPOSITORY" --set image.tag="$IMAGE_TAG" ${chart_args[@]+"${chart_args[@]}"} \
  --wait --timeout 20m; then
  kubectl logs job/driftloop-bootstrap -n "$NAMESPACE" --all-containers --tail=200 >&2 2>/dev/null || true
  die "helm could not install the release driftloop (the bootstrap job's logs, if it ran, are above)"
fi

step "[6/8] bootstrap job (data, features, first training, champion)"
# Polled rather than `kubectl wait --for=condition=complete`: that waits for one condition only, so a
# failed job would hold it for the whole timeout.
job=job/driftloop-bootstrap
if [[ -z $(kubectl get "$job" -n "$NAMESPACE" --ignore-not-found -o name) ]]; then
  note "no $job in $NAMESPACE (bootstrap disabled, or removed a day after it finished): nothing to wait for"
else
  deadline=$((SECONDS + 30 * 60))
  condition() { kubectl get "$job" -n "$NAMESPACE" -o jsonpath="{.status.conditions[?(@.type==\"$1\")].status}"; }
  until [[ $(condition Complete) == True ]]; do
    if [[ $(condition Failed) == True ]] || ((SECONDS > deadline)); then
      kubectl logs "$job" -n "$NAMESPACE" --all-containers --tail=200 >&2 || true
      die "$job did not complete (failed, or still running after 30 minutes); its logs are above"
    fi
    sleep 10
  done
  note "done"
fi

step "[7/8] InferenceService driftloop-fraud"
if ! kubectl wait --for=condition=Ready inferenceservice/driftloop-fraud -n "$NAMESPACE" --timeout=15m; then
  kubectl describe inferenceservice/driftloop-fraud -n "$NAMESPACE" >&2 || true
  kubectl get pods -n "$NAMESPACE" -l serving.kserve.io/inferenceservice=driftloop-fraud >&2 || true
  die "InferenceService driftloop-fraud is not Ready (its description is above)"
fi

step "[8/8] smoke test: one prediction"
NAMESPACE=$NAMESPACE "$INFRA_DIR/predict.sh"

cat <<EOF

driftloop is deployed ($(((SECONDS - started) / 60)) min)
  context    $context ($CLUSTER, $([[ $GPU == 1 ]] && echo GPU || echo CPU))
  namespace  $NAMESPACE
  image      $image
  values     $VALUES
next (give make the same CLUSTER and NAMESPACE)
  make dashboards                        Evidently, MLflow, Prefect and KFP UIs on localhost (URLs printed)
  make predict                           one prediction through the InferenceService
  make submit-pipeline ENGINE=prefect    retrain on the cluster (ENGINE=kfp: as a Kubeflow pipeline)
  make undeploy                          remove the release; with CLUSTER=kind, the whole cluster
EOF

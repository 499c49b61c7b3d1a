#!/usr/bin/env bash
# Checks this machine before a deploy: the tools and their versions, the Docker engine and, for a
# local kind cluster, memory, CPUs and inotify limits. Reports every problem with its fix on one
# line, then exits 1 if there was any.
#
# Usage: infra/preflight.sh [--gpu] [--cluster kind|current]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage="usage: infra/preflight.sh [--gpu] [--airgap] [--small] [--cluster kind|current]"
gpu=0
cluster=kind
airgap=0
min_cpus=4
while (($#)); do
  case $1 in
    --gpu) gpu=1 ;;
    --airgap) airgap=1 ;;
    --small) min_cpus=2 ;;
    --cluster) (($# >= 2)) || die "--cluster takes kind or current ($usage)"; cluster=$2; shift ;;
    -h | --help) echo "$usage"; exit 0 ;;
    *) die "unknown argument '$1' ($usage)" ;;
  esac
  shift
done
[[ $cluster == kind || $cluster == current ]] || die "--cluster takes kind or current ($usage)"

problems=0
ok() { printf '  ok    %s\n' "$*"; }
fail() { printf '  FAIL  %s\n' "$*"; problems=$((problems + 1)); }
has() { command -v "$1" >/dev/null 2>&1; }

# "v1.30.2-eks-1" -> "1.30.2"
numeric() { local v=${1#v}; printf '%s' "${v%%[!0-9.]*}"; }
# version_at_least HAVE WANT (x.y.z, compared number by number)
version_at_least() {
  local have want i
  IFS=. read -r -a have <<<"$(numeric "$1")"
  IFS=. read -r -a want <<<"$(numeric "$2")"
  for i in 0 1 2; do
    ((${have[i]:-0} > ${want[i]:-0})) && return 0
    ((${have[i]:-0} < ${want[i]:-0})) && return 1
  done
  return 0
}
minor() { local v; v=$(numeric "$1"); v=${v#*.}; printf '%s' "${v%%.*}"; }

os=$(uname -s | tr '[:upper:]' '[:lower:]')
case $(uname -m) in
  x86_64 | amd64) arch=amd64 ;;
  aarch64 | arm64) arch=arm64 ;;
  *) arch=$(uname -m) ;;
esac

echo "preflight: cluster=$cluster gpu=$gpu"

# Docker builds the image on this machine in both modes (and runs the kind nodes).
engine=0
reachable=0
if ! has docker; then
  fail "docker: not found — install Docker Engine 28 or newer: https://docs.docker.com/engine/install/"
elif ! server=$(docker info --format '{{.ServerVersion}}' 2>/dev/null) || [[ -z $server ]]; then
  fail "docker: the engine is not running or not reachable (\`docker info\` failed) — start it" \
    "(sudo systemctl start docker, or open Docker Desktop) and let your user use it" \
    "(sudo usermod -aG docker \$USER, then log in again)"
else
  engine=1
  # 28+: `docker image save --platform`, which loads the image into kind whatever the image store
  # (the air-gapped engine's own store needs no such thing: kind loads from it directly)
  if ((airgap)); then
    ok "docker engine $server (infra/airgap/dockerd.sh)"
  elif version_at_least "$server" 28.0.0; then
    ok "docker engine $server"
  else
    fail "docker: engine $server is too old — upgrade to Docker Engine 28 or newer:" \
      "https://docs.docker.com/engine/install/"
  fi
fi
if ((airgap)); then
  ok "docker build: BuildKit of Debian's docker CLI"
elif has docker; then
  if docker buildx version >/dev/null 2>&1; then
    ok "docker buildx (BuildKit: cache mounts, infra/Dockerfile.dockerignore)"
  else
    fail "docker buildx: not found — install the Buildx plugin (apt-get install docker-buildx-plugin):" \
      "https://docs.docker.com/build/install-buildx/"
  fi
fi

# kubectl fetches the Kubeflow Pipelines manifests from GitHub with git (kustomize remote bases).
if has git; then ok "git"; else fail "git: not found — install git (apt-get install git)"; fi

if [[ $cluster == kind ]]; then
  if ! has kind; then
    fail "kind: not found — install $KIND_VERSION: go install sigs.k8s.io/kind@$KIND_VERSION," \
      "or https://kind.sigs.k8s.io/dl/$KIND_VERSION/kind-$os-$arch"
  else
    have=$(kind version 2>/dev/null | sed -n 's/^kind \(v[^ ]*\).*/\1/p' || true)
    # The node image digest in versions.env is built for this kind release and no other.
    if [[ $have == "$KIND_VERSION" ]]; then
      ok "kind $have"
    else
      fail "kind: ${have:-unknown version}, need $KIND_VERSION (its node images are release-specific) —" \
        "go install sigs.k8s.io/kind@$KIND_VERSION, or https://kind.sigs.k8s.io/dl/$KIND_VERSION/kind-$os-$arch"
    fi
  fi
fi

# kubectl_fix VERSION: where that kubectl is downloaded
kubectl_fix() { printf 'install kubectl %s: https://dl.k8s.io/release/%s/bin/%s/%s/kubectl' "$1" "$1" "$os" "$arch"; }
if ! has kubectl; then
  fail "kubectl: not found — $(kubectl_fix "$KUBECTL_VERSION")"
else
  have=$(kubectl version --client -o json 2>/dev/null |
    sed -n 's/.*"gitVersion": *"\([^"]*\)".*/\1/p' | head -n 1 || true)
  target=$KUBECTL_VERSION
  if [[ $cluster == current ]]; then
    server=$(kubectl version -o json --request-timeout=10s 2>/dev/null |
      sed -n '/"serverVersion"/,/}/s/.*"gitVersion": *"\([^"]*\)".*/\1/p' | head -n 1 || true)
    context=$(kubectl config current-context 2>/dev/null || true)
    if [[ -n $server ]]; then
      ok "cluster: context $context, Kubernetes $server"
      target=$server
      reachable=1
    else
      fail "cluster: kubectl cannot reach the cluster of context '${context:-none set}' — pick a working" \
        "context: kubectl config get-contexts; kubectl config use-context NAME"
    fi
  fi
  # Kubernetes supports kubectl within one minor version of the API server.
  skew=$(($(minor "$have") - $(minor "$target")))
  if [[ -n $have ]] && ((skew >= -1 && skew <= 1)); then
    ok "kubectl $have (Kubernetes $target)"
  else
    fail "kubectl: ${have:-unknown version} is more than one minor version away from Kubernetes $target —" \
      "$(kubectl_fix "v$(numeric "$target")")"
  fi
fi

helm_fix="install helm $HELM_VERSION: https://get.helm.sh/helm-$HELM_VERSION-$os-$arch.tar.gz"
if ! has helm; then
  fail "helm: not found — $helm_fix"
else
  have=$(helm version --template '{{.Version}}' 2>/dev/null || true)
  # Helm 3.13+: OCI charts, --set-json, uninstall --ignore-not-found. Helm 4 changed --wait.
  if [[ $have == v3.* ]] && version_at_least "$have" 3.13.0; then
    ok "helm $have"
  else
    fail "helm: ${have:-unknown version}, need v3.13 or newer within v3 (tested: $HELM_VERSION) — $helm_fix"
  fi
fi

if [[ $cluster == kind ]]; then
  # One node runs KFP (MySQL, Argo, metadata, object store), KServe, cert-manager, Prefect and the
  # driftloop services at once: below 8 GiB pods get evicted or stay Pending, below 4 CPUs the first
  # install (dozens of pods starting together) runs past its timeouts. Docker's own numbers count
  # where Docker runs in a VM (Docker Desktop); the host's are the fallback while the engine is down.
  if ((engine)); then
    mem_kib=$(($(docker info --format '{{.MemTotal}}') / 1024))
    cpus=$(docker info --format '{{.NCPU}}')
    where="for Docker"
  elif [[ -r /proc/meminfo ]]; then
    mem_kib=$(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo)
    cpus=$(getconf _NPROCESSORS_ONLN)
    where="on this host"
  else
    mem_kib=$(($(sysctl -n hw.memsize) / 1024))
    cpus=$(sysctl -n hw.ncpu)
    where="on this host"
  fi
  # Reported totals sit a little under the nominal size (an "8 GB" machine shows about 7.7 GiB).
  mem_tenths=$((mem_kib * 10 / 1024 / 1024))
  mem="$((mem_tenths / 10)).$((mem_tenths % 10)) GiB"
  if ((mem_tenths >= 75)); then
    ok "memory: $mem $where"
  else
    fail "memory: $mem $where, need 8 GiB (the add-ons and the stack share one node) —" \
      "give Docker more memory (Docker Desktop: Settings > Resources) or use a larger machine"
  fi
  if ((cpus >= min_cpus)); then
    ok "CPUs: $cpus $where"
  else
    fail "CPUs: $cpus $where, need $min_cpus (the first install starts dozens of pods at once) —" \
      "give Docker more CPUs (Docker Desktop: Settings > Resources), use a larger machine, or" \
      "VALUES=helm/values/kind-small.yaml (2 CPUs)"
  fi

  # kind's known issue "Pod errors due to too many open files": every node and pod watches files.
  if [[ -r /proc/sys/fs/inotify/max_user_watches ]]; then
    watches=$(cat /proc/sys/fs/inotify/max_user_watches)
    instances=$(cat /proc/sys/fs/inotify/max_user_instances)
    if ((watches >= 524288 && instances >= 512)); then
      ok "inotify: max_user_watches $watches, max_user_instances $instances"
    else
      fail "inotify: max_user_watches $watches (need 524288), max_user_instances $instances (need 512) —" \
        "sudo sysctl fs.inotify.max_user_watches=524288 fs.inotify.max_user_instances=512" \
        "(persist: printf 'fs.inotify.max_user_watches=524288\\nfs.inotify.max_user_instances=512\\n'" \
        "| sudo tee /etc/sysctl.d/99-kind.conf)"
    fi
  fi
fi

if ((gpu)) && [[ $cluster == kind ]]; then
  # nvkind hands every GPU of this host to one kind worker through the NVIDIA container runtime.
  if ! has nvidia-smi; then
    fail "nvidia-smi: not found — install the NVIDIA driver: https://www.nvidia.com/download/index.aspx"
  elif gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ') && ((gpus > 0)); then
    ok "GPUs: $gpus"
  else
    fail "nvidia-smi: no GPU listed (\`nvidia-smi -L\`) — check the NVIDIA driver is loaded"
  fi
  if has nvkind; then
    ok "nvkind"
  else
    fail "nvkind: not found — go install github.com/NVIDIA/nvkind/cmd/nvkind@$NVKIND_VERSION"
  fi
  if ! has nvidia-ctk; then
    fail "nvidia-ctk: not found — install the NVIDIA Container Toolkit:" \
      "https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/latest/install-guide.html"
  else
    ok "nvidia-ctk"
    if ((engine)) && [[ $(docker info --format '{{.DefaultRuntime}}') != nvidia ]]; then
      fail "docker: the default runtime is not nvidia — sudo nvidia-ctk runtime configure --runtime=docker" \
        "--set-as-default --cdi.enabled && sudo systemctl restart docker"
    fi
    if grep -Eq '^[[:space:]]*accept-nvidia-visible-devices-as-volume-mounts[[:space:]]*=[[:space:]]*true' \
      /etc/nvidia-container-runtime/config.toml 2>/dev/null; then
      ok "nvidia-container-runtime accepts GPUs as volume mounts"
    else
      fail "nvidia-container-runtime: accept-nvidia-visible-devices-as-volume-mounts is not true" \
        "(nvkind needs it) —" \
        "sudo nvidia-ctk config --set accept-nvidia-visible-devices-as-volume-mounts=true --in-place" \
        "&& sudo systemctl restart docker"
    fi
  fi
elif ((gpu && reachable)); then
  if [[ -n $(kubectl get nodes -l nvidia.com/gpu.present=true -o name --request-timeout=10s 2>/dev/null) ]]; then
    ok "GPU nodes labelled nvidia.com/gpu.present=true"
  else
    fail "cluster: no node labelled nvidia.com/gpu.present=true — install the NVIDIA GPU Operator" \
      "(it labels GPU nodes) or label them: kubectl label node NAME nvidia.com/gpu.present=true"
  fi
fi

if ((problems)); then
  echo "preflight: $problems problem(s); fix them and run \`make preflight\` again"
  exit 1
fi
echo "preflight: all checks passed"

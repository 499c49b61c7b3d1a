# Helpers of the air-gapped builds (AIRGAP=1). Sourced, never run.
# shellcheck shell=bash
# shellcheck source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

AIRGAP_DIR=$INFRA_DIR/airgap
# Built binaries and images outlive a clone: a machine builds each version once.
AIRGAP_CACHE=${DRIFTLOOP_AIRGAP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/driftloop/airgap}
mkdir -p "$AIRGAP_CACHE"
export PATH="$PATH:/usr/local/go/bin"

# bin_dir NAME: where the binaries of NAME at its pinned version live
bin_dir() {
  local v
  case $1 in
    kubernetes) v=$KUBECTL_VERSION ;; containerd) v=$CONTAINERD_VERSION ;; runc) v=$RUNC_VERSION ;;
    crictl) v=$CRICTL_VERSION ;; cni) v=$CNI_PLUGINS_VERSION ;; etcd) v=$ETCD_VERSION ;;
    coredns) v=$COREDNS_VERSION ;; local-path-provisioner) v=$LOCAL_PATH_PROVISIONER_VERSION ;;
    kind) v=$KIND_VERSION ;; helm) v=$HELM_VERSION ;; kserve) v=$KSERVE_VERSION ;;
    kube-router) v=$KUBE_ROUTER_VERSION ;;
    *) die "unknown binary $1" ;;
  esac
  printf '%s' "$AIRGAP_CACHE/bin/$1-$v"
}

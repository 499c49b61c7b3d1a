#!/usr/bin/env bash
# Builds every image an air-gapped `make deploy` runs, from Debian's packages and the binaries of
# binaries.sh, in the engine of dockerd.sh: Debian itself (debootstrap), the kind node image, Python,
# PostgreSQL and Redis stand-ins, the KServe controller. An image is rebuilt only when its inputs
# change: each carries the hash of its inputs as a label, and a build with the same hash is skipped.
# The project image is built by deploy.sh (it changes with every code edit; the rest does not).
#
# Usage: infra/airgap/images.sh [--os-only]   (--os-only: only the images that need no Go build)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DOCKER_HOST=$("$AIRGAP_DIR/dockerd.sh")
export DOCKER_HOST DOCKER_BUILDKIT=1
PATH="$AIRGAP_CACHE/docker/cli:$PATH"  # Debian's CLI: its BuildKit needs no buildx plugin

R=driftloop-airgap
DEBIAN_IMAGE=$R/debian:$DEBIAN_SUITE
KIND_SRC=$(go env GOMODCACHE)/sigs.k8s.io/kind@$KIND_VERSION
[[ -d $KIND_SRC ]] || die "no kind $KIND_VERSION module source: run infra/airgap/binaries.sh first"
bin() { printf '%s' "$(bin_dir "$1")/$2"; }

label() { docker image inspect -f '{{index .Config.Labels "driftloop.airgap.hash"}}' "$1" 2>/dev/null || true; }
# build TAG CONTEXT [docker build options]: skipped when TAG was built from the same inputs
build() {
  local tag=$1 ctx=$2 hash started=$SECONDS
  shift 2
  hash=$( (cd "$ctx" && find . -type f -print0 | sort -z | xargs -0 sha256sum; printf '%s\n' "$@") | sha256sum | cut -c1-16)
  if [[ $(label "$tag") == "$hash" ]]; then
    note "$tag: cached"
    return 0
  fi
  docker build --network host -q --label "driftloop.airgap.hash=$hash" -t "$tag" "$@" "$ctx" >/dev/null
  note "$tag: built in $((SECONDS - started)) s"
}
# one_binary TAG BASE BINARY PATH: an image of one binary (the control plane, etcd, CoreDNS …)
one_binary() {
  local d
  d=$(mktemp -d)
  cp "$3" "$d/bin"
  printf 'FROM %s\nCOPY bin %s\nENTRYPOINT ["%s"]\n' "$2" "$4" "$4" >"$d/Dockerfile"
  build "$1" "$d"
  rm -rf "$d"
}

step "air-gapped images (engine $DOCKER_HOST)"
if [[ $(label "$DEBIAN_IMAGE") != "$DEBIAN_SUITE" ]]; then
  command -v debootstrap >/dev/null || die "no debootstrap: apt-get install debootstrap"
  started=$SECONDS
  rootfs=$(mktemp -d)
  debootstrap --variant=minbase "$DEBIAN_SUITE" "$rootfs" http://deb.debian.org/debian >"$AIRGAP_CACHE/debootstrap.log" 2>&1 ||
    die "debootstrap failed (log: $AIRGAP_CACHE/debootstrap.log)"
  printf 'deb http://deb.debian.org/debian %s main\ndeb http://deb.debian.org/debian %s-updates main\ndeb http://deb.debian.org/debian-security %s-security main\n' \
    "$DEBIAN_SUITE" "$DEBIAN_SUITE" "$DEBIAN_SUITE" >"$rootfs/etc/apt/sources.list"
  tar -C "$rootfs" -c . | docker import -c "LABEL driftloop.airgap.hash=$DEBIAN_SUITE" -c 'CMD ["bash"]' - "$DEBIAN_IMAGE" >/dev/null
  rm -rf "$rootfs"
  note "$DEBIAN_IMAGE: built in $((SECONDS - started)) s"
else
  note "$DEBIAN_IMAGE: cached"
fi
base=(--build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE")
ctx=$(mktemp -d)
cp "$AIRGAP_DIR/python/Dockerfile" "$ctx/"
cp "${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}" "$ctx/host-ca.crt" ||
  die "no CA bundle at /etc/ssl/certs/ca-certificates.crt: set HOST_CA_BUNDLE to the host's"
build "$R/python:3.11-$DEBIAN_SUITE" "$ctx" "${base[@]}"
rm -rf "$ctx"
build "$R/postgres:15-$DEBIAN_SUITE" "$AIRGAP_DIR/postgres" "${base[@]}"
build "$R/redis:7-$DEBIAN_SUITE" "$AIRGAP_DIR/redis" "${base[@]}"
build "$R/iptables:$DEBIAN_SUITE" "$AIRGAP_DIR/iptables" "${base[@]}"
[[ ${1:-} != --os-only ]] || exit 0
ctx=$(mktemp -d)
cp "$(bin kserve manager)" "$AIRGAP_DIR/kserve/Dockerfile" "$ctx/"
build "$R/kserve-controller:$KSERVE_VERSION" "$ctx" "${base[@]}"
rm -rf "$ctx"
ctx=$(mktemp -d)
cp "$(bin kube-router kube-router)" "$AIRGAP_DIR/kube-router/Dockerfile" "$ctx/"
build "$R/kube-router:$KUBE_ROUTER_VERSION" "$ctx" --build-arg "BASE_IMAGE=$R/iptables:$DEBIAN_SUITE"
rm -rf "$ctx"

# The kind node's base: kind's files, the runtime binaries, the pod network.
ctx=$AIRGAP_CACHE/node-context
rm -rf "$ctx"; mkdir -p "$ctx/bin/cni"
cp -r "$KIND_SRC/images/base/files" "$ctx/files"
# the module cache keeps no file modes: kind's image has its scripts executable
find "$ctx/files" -type d -exec chmod 0755 {} + && find "$ctx/files" -type f -exec chmod 0644 {} +
chmod 0755 "$ctx/files/usr/local/bin/"* "$ctx/files/kind/bin/"*
cp "$AIRGAP_DIR/node/Dockerfile" "$AIRGAP_DIR/node/10-driftloop-ptp.conflist" "$ctx/"
for b in containerd ctr containerd-shim-runc-v2; do cp "$(bin containerd $b)" "$ctx/bin/"; done
cp "$(bin crictl crictl)" "$(bin runc runc)" "$ctx/bin/"
cp "$(bin_dir cni)"/* "$ctx/bin/cni/"
build "$R/kind-base:$KIND_VERSION" "$ctx" "${base[@]}"

# Every image kubeadm and kind's node image name, tagged as they name them, so that
# `kind build node-image` finds each one built and pulls nothing.
kbin=$(bin_dir kubernetes)
mapfile -t kubeadm_images < <("$kbin/kubeadm" config images list --kubernetes-version "$KUBECTL_VERSION" 2>/dev/null)
kind_image() { sed -n "s/^const $1 = \"\(.*\)\"$/\1/p" "$KIND_SRC"/pkg/build/nodeimage/const_*.go; }
sandbox=$(sed -n 's/^ *sandbox_image = "\(.*\)"$/\1/p' "$KIND_SRC/images/base/files/etc/containerd/config.toml")
images=()
for ref in "${kubeadm_images[@]}"; do
  name=${ref##*/}; name=${name%%:*}
  case $name in
    kube-apiserver | kube-controller-manager | kube-scheduler)
      one_binary "$ref" scratch "$kbin/$name" "/usr/local/bin/$name" ;;
    kube-proxy)
      one_binary "$ref" "$R/iptables:$DEBIAN_SUITE" "$kbin/kube-proxy" /usr/local/bin/kube-proxy ;;
    etcd) one_binary "$ref" scratch "$(bin etcd etcd)" /usr/local/bin/etcd ;;
    coredns) one_binary "$ref" scratch "$(bin coredns coredns)" /coredns ;;
    pause) one_binary "$ref" scratch "$kbin/pause" /pause ;;
    *) die "kubeadm names an image this script cannot build: $ref" ;;
  esac
  images+=("$ref")
done
[[ " ${images[*]} " == *" $sandbox "* ]] || { one_binary "$sandbox" scratch "$kbin/pause" /pause; images+=("$sandbox"); }
provisioner=$(kind_image storageProvisionerImage)
one_binary "$provisioner" scratch "$(bin local-path-provisioner local-path-provisioner)" /usr/local/bin/local-path-provisioner
helper=$(kind_image storageHelperImage)
docker tag "$DEBIAN_IMAGE" "$helper"  # the provisioner's helper pod runs sh, mkdir and rm
# kind packs its CNI's image into every node; this cluster disables that CNI, so a placeholder (the
# pause binary) stands in for it and is never run.
kindnetd=$(kind_image kindnetdImage)
one_binary "$kindnetd" scratch "$kbin/pause" /bin/kindnetd
images+=("$provisioner" "$helper" "$kindnetd")

node=$R/kind-node:$KUBECTL_VERSION
node_hash=$( { docker image inspect -f '{{.Id}}' "$R/kind-base:$KIND_VERSION" "${images[@]}"; sha256sum "$kbin"/kube{adm,let,ctl}; } | sha256sum | cut -c1-16)
if [[ $(label "$node") == "$node_hash" ]]; then
  note "$node: cached"
else
  started=$SECONDS
  "$AIRGAP_DIR/server-tarball.sh" "$AIRGAP_CACHE/k8s-tarball" "${images[@]}"
  "$(bin kind kind)" build node-image --type file "$AIRGAP_CACHE/k8s-tarball/kubernetes-server-linux-amd64.tar.gz" \
    --base-image "$R/kind-base:$KIND_VERSION" --image "$node.tmp" >"$AIRGAP_CACHE/node-image.log" 2>&1 ||
    { tail -n 30 "$AIRGAP_CACHE/node-image.log" >&2; die "kind build node-image failed"; }
  printf 'FROM %s\nLABEL driftloop.airgap.hash=%s\n' "$node.tmp" "$node_hash" | docker build -q -t "$node" - >/dev/null
  docker rmi "$node.tmp" >/dev/null
  rm -rf "$AIRGAP_CACHE/k8s-tarball"
  note "$node: built in $((SECONDS - started)) s"
fi

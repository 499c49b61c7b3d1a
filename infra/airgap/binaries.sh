#!/usr/bin/env bash
# Builds, from the Go module proxy only, every binary an air-gapped cluster needs: Kubernetes (kubeadm,
# kubelet, kubectl and the control plane), the node's runtime (containerd, runc, crictl, CNI plugins),
# etcd, CoreDNS, local-path-provisioner, the pause binary, kind, helm, the KServe controller and
# kube-router (its NetworkPolicy firewall).
# Each lands in $AIRGAP_CACHE/bin/<name>-<version>/ and is built once: a finished build leaves a
# `.done` stamp, so a rerun (or a later session on the same machine) skips it.
#
# Usage: infra/airgap/binaries.sh [NAME ...]   (default: all)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

export GOFLAGS=-buildvcs=false GOTOOLCHAIN=local
gobuild() { nice -n 10 go build -trimpath "$@"; }

# module_dir MODULE@VERSION: a writable copy of a module's source (for builds `go install` refuses)
module_dir() {
  local src dst=$AIRGAP_CACHE/src/${1//\//_}
  src=$(go mod download -json "$1" | jq -r .Dir)
  rm -rf "$dst"; mkdir -p "$(dirname "$dst")"
  cp -r "$src" "$dst"; chmod -R u+w "$dst"
  printf '%s' "$dst"
}

build_kubernetes() {  # k8s.io/kubernetes: its go.mod replaces the staging modules with folders the
  # module zip leaves out; drop those replaces and require the published staging modules instead.
  local v=$KUBECTL_VERSION out=$1 src ld="" p commit
  src=$(module_dir "k8s.io/kubernetes@$v")
  ( cd "$src"
    rm -rf vendor go.work go.work.sum
    for m in $(grep -oE '^\s*k8s.io/[a-z0-9-]+ => ./staging' go.mod | awk '{print $1}'); do
      go mod edit -dropreplace="$m"
      if grep -qE "^\s*$m v0\.0\.0" go.mod; then go mod edit -require="$m@v0.${v#v1.}"; fi
    done
    commit=$(jq -r '.Origin.Hash // "0000000000000000000000000000000000000000"' \
      "$(go mod download -json "k8s.io/kubernetes@$v" | jq -r .Info)")
    for p in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
      ld+=" -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$(cut -d. -f2 <<<"$v") -X $p.gitCommit=$commit"
      ld+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
    done
    GOWORK=off GOFLAGS="$GOFLAGS -mod=mod" CGO_ENABLED=0 gobuild -tags=selinux,notest,grpcnotrace \
      -ldflags="all=$ld -s -w" -o "$out/" ./cmd/kubeadm ./cmd/kubelet ./cmd/kubectl ./cmd/kube-apiserver \
      ./cmd/kube-controller-manager ./cmd/kube-scheduler ./cmd/kube-proxy
    gcc -Os -static -DVERSION=v3.10.1 -o "$out/pause" build/pause/linux/pause.c && strip "$out/pause" )
}
build_containerd() {
  local m=github.com/containerd/containerd/v2
  GOBIN=$1 CGO_ENABLED=0 nice -n 10 go install -trimpath -tags "no_aufs no_zfs no_btrfs no_devmapper" \
    -ldflags "-s -w -X $m/version.Version=$CONTAINERD_VERSION" \
    "$m/cmd/containerd@$CONTAINERD_VERSION" "$m/cmd/ctr@$CONTAINERD_VERSION" \
    "$m/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION"
}
build_runc() {  # cgo and libseccomp: links the same Debian release's libc and libseccomp as the node
  GOBIN=$1 CGO_ENABLED=1 nice -n 10 go install -trimpath -tags "seccomp urfave_cli_no_docs" \
    -ldflags "-X main.version=${RUNC_VERSION#v}" "github.com/opencontainers/runc@$RUNC_VERSION"
}
build_crictl() {
  GOBIN=$1 CGO_ENABLED=0 nice -n 10 go install -trimpath \
    -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION" \
    "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
}
build_cni() {  # bridge + host-local: the cluster's pod network on one node (kind's kindnetd is not served)
  local m=github.com/containernetworking/plugins/plugins
  GOBIN=$1 CGO_ENABLED=0 nice -n 10 go install -trimpath -ldflags "-s -w" \
    "$m/ipam/host-local@$CNI_PLUGINS_VERSION" "$m/main/loopback@$CNI_PLUGINS_VERSION" \
    "$m/main/bridge@$CNI_PLUGINS_VERSION" "$m/main/ptp@$CNI_PLUGINS_VERSION" \
    "$m/meta/portmap@$CNI_PLUGINS_VERSION"
}
build_etcd() {  # server/v3's go.mod has ../ replaces, so `go install` refuses: build it as a dependency
  local d=$AIRGAP_CACHE/src/etcd-wrapper
  rm -rf "$d"; mkdir -p "$d"
  ( cd "$d"
    go mod init local/etcd >/dev/null 2>&1
    printf 'package tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' >tools.go
    go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null 2>&1
    CGO_ENABLED=0 gobuild -mod=mod -ldflags "-s -w" -o "$1/etcd" go.etcd.io/etcd/server/v3 )
}
build_coredns() {  # only the plugins kubeadm's Corefile uses (and a few for debugging): the cloud
  # plugins (route53, azure, clouddns, etcd …) more than double the build for nothing a kind cluster asks
  local d=$AIRGAP_CACHE/src/coredns-wrapper m=github.com/coredns/coredns p
  rm -rf "$d"; mkdir -p "$d"
  ( cd "$d"
    go mod init local/coredns >/dev/null 2>&1
    { printf 'package main\n\nimport (\n\t"%s/coremain"\n' "$m"
      for p in cache errors forward health hosts kubernetes loadbalance log loop metrics ready reload rewrite whoami; do
        printf '\t_ "%s/plugin/%s"\n' "$m" "$p"
      done
      printf ')\n\nfunc main() { coremain.Run() }\n'; } >main.go
    go get "$m@$COREDNS_VERSION" >/dev/null 2>&1
    CGO_ENABLED=0 gobuild -mod=mod -ldflags "-s -w" -o "$1/coredns" . )
}
build_local-path-provisioner() {
  GOBIN=$1 CGO_ENABLED=0 nice -n 10 go install -trimpath -ldflags "-s -w" \
    "github.com/rancher/local-path-provisioner@$LOCAL_PATH_PROVISIONER_VERSION"
}
build_kind() {
  GOBIN=$1 CGO_ENABLED=0 nice -n 10 go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kind@$KIND_VERSION"
}
build_helm() {
  GOBIN=$1 CGO_ENABLED=0 nice -n 10 go install -trimpath -ldflags "-s -w" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}
build_kube-router() {  # NetworkPolicy enforcement with iptables and ipset (its firewall only)
  GOBIN=$1 CGO_ENABLED=0 nice -n 10 go install -trimpath -ldflags "-s -w" \
    "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router@$KUBE_ROUTER_VERSION"
}
build_kserve() {  # the controller (manager); its charts come with the module's source
  local src
  src=$(module_dir "github.com/kserve/kserve@$KSERVE_VERSION")
  ( cd "$src" && GOWORK=off CGO_ENABLED=0 gobuild -mod=mod -ldflags "-s -w" -o "$1/manager" ./cmd/manager
    cp -r charts "$1/charts" )
}

names=("$@")
((${#names[@]})) || names=(kind helm kubernetes containerd runc crictl cni etcd coredns local-path-provisioner kserve kube-router)
for name in "${names[@]}"; do
  declare -F "build_$name" >/dev/null || die "no binary '$name' (one of: kind helm kubernetes containerd …)"
  out=$(bin_dir "$name")
  [[ -f $out/.done ]] && { note "$name: cached ($out)"; continue; }
  rm -rf "$out"; mkdir -p "$out"
  started=$SECONDS
  note "$name: building"
  "build_$name" "$out" >"$out.log" 2>&1 || { tail -n 30 "$out.log" >&2; die "building $name failed (log: $out.log)"; }
  touch "$out/.done"
  note "$name: built in $((SECONDS - started)) s"
done

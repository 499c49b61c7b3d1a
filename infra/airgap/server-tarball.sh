#!/usr/bin/env bash
# Packs a kubernetes-server-linux-amd64.tar.gz as `kind build node-image --type file` reads it:
# kubernetes/version, server/bin/{kubeadm,kubelet,kubectl} and the control plane's image archives.
# kind imports only those archives and pulls every other image, so kube-proxy.tar holds every other
# image too, with a `repositories` entry (fully qualified names) first in the archive: kind reads the
# tags of an archive from its first manifest.json or repositories entry.
#
# Usage: infra/airgap/server-tarball.sh OUT_DIR IMAGE...   (DOCKER_HOST: the air-gapped engine)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
out=$1; shift
kbin=$(bin_dir kubernetes)
bindir=$out/kubernetes/server/bin
rm -rf "$out"; mkdir -p "$bindir"
echo "$KUBECTL_VERSION" >"$out/kubernetes/version"
cp "$kbin/kubeadm" "$kbin/kubelet" "$kbin/kubectl" "$bindir/"
others=()
for ref in "$@"; do
  case $ref in
    */kube-apiserver:* | */kube-controller-manager:* | */kube-scheduler:*)
      name=${ref##*/}; docker save -o "$bindir/${name%%:*}.tar" "$ref" ;;
    *) others+=("$ref") ;;
  esac
done
tmp=$(mktemp -d)
docker save "${others[@]}" | tar -C "$tmp" -x
repositories='{}'
for ref in "${others[@]}"; do
  id=$(docker image inspect -f '{{.Id}}' "$ref")
  repositories=$(jq -c --arg repo "${ref%:*}" --arg tag "${ref##*:}" --arg id "${id#sha256:}" \
    '.[$repo][$tag] = $id' <<<"$repositories")
done
printf '%s' "$repositories" >"$tmp/repositories"
(cd "$tmp" && tar -cf "$bindir/kube-proxy.tar" repositories manifest.json $(ls | grep -vxE 'repositories|manifest.json'))
rm -rf "$tmp"
tar -C "$out" -cf - kubernetes | gzip -1 >"$out/kubernetes-server-linux-amd64.tar.gz"
rm -rf "$out/kubernetes"

"""Helm post-renderer for KServe's chart on a cluster without cert-manager (AIRGAP=1).

KServe's chart asks cert-manager for its webhook certificate (an Issuer, a Certificate and the
`inject-ca-from` annotation). Where cert-manager cannot be installed, this replaces that: it drops the
Issuer and the Certificate, adds the Secret the Certificate would have made (from the files in
KSERVE_CERT_DIR: ca.crt, tls.crt, tls.key, made by addons.sh with openssl) and writes the CA into every
webhook configuration. It also runs the controller image built here (KSERVE_IMAGE, never pulled) and
leaves out the kube-rbac-proxy sidecar, which only guards the metrics port and has no image here.

Reads the rendered manifests on stdin, writes them on stdout (Helm's post-renderer contract).
"""

import base64
import os
import sys
from pathlib import Path

import yaml


def main() -> None:
    cert_dir = Path(os.environ["KSERVE_CERT_DIR"])
    image = os.environ["KSERVE_IMAGE"]
    pem = {name: (cert_dir / name).read_bytes() for name in ("ca.crt", "tls.crt", "tls.key")}
    b64 = {name: base64.b64encode(data).decode() for name, data in pem.items()}
    out = []
    for doc in yaml.safe_load_all(sys.stdin):
        if not doc:
            continue
        kind = doc.get("kind")
        if kind in {"Issuer", "Certificate"} and doc["apiVersion"].startswith("cert-manager.io/"):
            continue
        if kind in {"MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"}:
            doc["metadata"].get("annotations", {}).pop("cert-manager.io/inject-ca-from", None)
            for hook in doc.get("webhooks", []):
                hook["clientConfig"]["caBundle"] = b64["ca.crt"]
        if kind == "Deployment" and doc["metadata"]["name"] == "kserve-controller-manager":
            spec = doc["spec"]["template"]["spec"]
            spec["containers"] = [c for c in spec["containers"] if c["name"] != "kube-rbac-proxy"]
            for container in spec["containers"]:
                container["image"] = image
                container["imagePullPolicy"] = "IfNotPresent"
        out.append(doc)
    out.append({
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": "kserve-webhook-server-cert", "namespace": os.environ.get("KSERVE_NAMESPACE", "kserve")},
        "data": {"ca.crt": b64["ca.crt"], "tls.crt": b64["tls.crt"], "tls.key": b64["tls.key"]},
    })
    yaml.safe_dump_all(out, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()

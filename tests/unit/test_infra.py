"""The cluster set-up in infra/ and the Makefile's Kubernetes targets, checked without Docker or a cluster:
the scripts parse, preflight reports what is missing with its fix, every version is pinned in one place,
the image is built the way the chart expects, and make calls the scripts with the right settings."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
SCRIPTS = sorted([*INFRA.glob("*.sh"), *INFRA.glob("airgap/*.sh")])
RUNNABLE = [s for s in SCRIPTS if s.name != "lib.sh"]  # lib.sh is sourced, never run


def versions() -> dict[str, str]:
    pairs = {}
    for line in (INFRA / "versions.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and key == key.strip() and value == value.strip(), f"not KEY=value: {line!r}"
            pairs[key] = value
    return pairs


def make(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MAKELEVEL", "MFLAGS"}}
    for name in ("CLUSTER", "GPU", "REGISTRY", "NAMESPACE", "VALUES", "ENGINE", "AIRGAP"):  # the targets' knobs
        env.pop(name, None)
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, check=False)


# scripts -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", RUNNABLE, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_script_is_strict_executable_and_says_how_to_call_it(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert re.search(r"^# Usage: infra/", text, re.MULTILINE), "a usage line in the header"
    assert os.access(script, os.X_OK), f"chmod +x {script.relative_to(ROOT)}"


def test_scripts_take_versions_from_versions_env_only():
    pins = {value for key, value in versions().items() if key != "KIND_NODE_IMAGE"}
    pins |= {versions()["KIND_NODE_IMAGE"].split("@")[0]}
    for script in SCRIPTS:
        text = script.read_text()
        written = sorted(pin for pin in pins if pin in text)
        assert not written, f"{script.name} spells out {written}: use the variable from versions.env"


def tool_dir(tmp_path: Path) -> Path:
    """A PATH with the basic tools the scripts use and none of docker, kind, kubectl, helm, git or nvkind."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "env", "sed", "grep", "head", "cat", "tr", "uname", "getconf", "dirname", "seq",
                 "mktemp", "sleep", "rm"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    return bin_dir


def test_preflight_reports_every_missing_tool_with_its_fix(tmp_path):
    env = {"PATH": str(tool_dir(tmp_path)), "HOME": str(tmp_path)}
    result = subprocess.run(["bash", str(INFRA / "preflight.sh")], env=env, capture_output=True, text=True,
                            timeout=60, check=False)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "docker: not found" in out and "https://docs.docker.com/engine/install/" in out
    assert f"kind: not found — install {versions()['KIND_VERSION']}" in out
    assert "kubectl: not found" in out and "git: not found" in out
    failures = [line for line in out.splitlines() if line.startswith("  FAIL")]
    assert len(failures) >= 4
    assert all(" — " in line for line in failures), "every problem comes with its fix on the same line"
    assert re.search(r"preflight: \d+ problem\(s\)", out)


def test_preflight_refuses_an_unknown_argument():
    result = subprocess.run(["bash", str(INFRA / "preflight.sh"), "--clutser", "kind"], capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 1
    assert "unknown argument '--clutser'" in result.stderr and "usage:" in result.stderr


def test_deploy_to_an_existing_cluster_needs_a_registry(tmp_path):
    env = {"PATH": str(tool_dir(tmp_path)), "HOME": str(tmp_path), "CLUSTER": "current"}
    result = subprocess.run(["bash", str(INFRA / "deploy.sh")], env=env, capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 1
    assert "CLUSTER=current needs REGISTRY" in result.stderr


# pins --------------------------------------------------------------------------------------------------
def test_versions_env_pins_every_tool_to_a_concrete_version():
    pins = versions()
    expected = {"KIND_VERSION", "KIND_NODE_IMAGE", "KUBECTL_VERSION", "HELM_VERSION", "CERT_MANAGER_VERSION",
                "KSERVE_VERSION", "KFP_VERSION", "NVIDIA_DEVICE_PLUGIN_VERSION", "NVKIND_VERSION",
                "CONTAINERD_VERSION", "RUNC_VERSION", "CRICTL_VERSION", "CNI_PLUGINS_VERSION", "ETCD_VERSION",
                "COREDNS_VERSION", "LOCAL_PATH_PROVISIONER_VERSION", "KUBE_ROUTER_VERSION", "DEBIAN_SUITE"}
    assert expected <= pins.keys()
    semver = re.compile(r"^v?\d+\.\d+\.\d+$")
    for key, value in pins.items():
        assert "latest" not in value.lower(), key
        if key == "KIND_NODE_IMAGE":
            assert re.fullmatch(r"kindest/node:v\d+\.\d+\.\d+@sha256:[0-9a-f]{64}", value), "tag and digest"
        elif key == "NVKIND_VERSION":
            assert re.fullmatch(r"[0-9a-f]{40}", value), "a full commit: nvkind has no release tags"
        elif key == "DEBIAN_SUITE":
            assert value == "bookworm", "the node's systemd must boot on cgroup v1 hosts (trixie's refuses)"
        else:
            assert semver.match(value), f"{key}={value} is not a version"


def test_versions_agree_with_each_other_and_the_lock():
    pins = versions()
    node_kubernetes = re.search(r":(v[\d.]+)@", pins["KIND_NODE_IMAGE"]).group(1)
    assert pins["KUBECTL_VERSION"] == node_kubernetes, "kubectl of the node image's Kubernetes release"
    makefile = (ROOT / "Makefile").read_text()
    # The chart tests build helm from the same pin the deploy uses.
    assert "include infra/versions.env" in makefile and "helm@$(HELM_VERSION)" in makefile


# image -------------------------------------------------------------------------------------------------
def dockerfile() -> str:
    return (INFRA / "Dockerfile").read_text()


def test_dockerfile_bases_are_pinned_to_one_patch_release():
    bases = re.findall(r"^FROM\s+(\S+)", dockerfile(), re.MULTILINE)
    assert len(bases) == 2, "a builder and a runtime stage"
    assert len(set(bases)) == 1, "the venv built in the first stage links to the second stage's interpreter"
    assert bases[0] == "${PYTHON_IMAGE}"
    default = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile(), re.MULTILINE).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", default), default
    assert "latest" not in dockerfile()


def test_the_cpu_variant_leaves_out_nvidia_packages_the_gpu_variant_keeps():
    text = dockerfile()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.MULTILINE)
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    nvidia = {p["name"] for p in lock["package"] if p["name"].startswith("nvidia-")}
    assert nvidia, "the lock has NVIDIA wheels (XGBoost's NCCL)"
    for name in nvidia:
        assert text.count(f'[ "$VARIANT" = gpu ] || echo --no-install-package {name}') == 2, name


def test_the_image_has_the_artifact_store_clients_mlflow_needs_on_a_cloud():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = {re.split(r"[<>=\[]", d)[0] for d in project["optional-dependencies"]["artifacts"]}
    assert {"boto3", "google-cloud-storage", "azure-storage-blob", "azure-identity"} <= extra
    assert all("--extra artifacts" in s for s in re.findall(r"uv sync[^\n]*", dockerfile()))


def test_dockerfile_runs_the_cli_as_a_numeric_non_root_user():
    text = dockerfile()
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].isdigit() and int(users[-1]) != 0, "numeric, so runAsNonRoot can check it"
    assert re.search(r'^ENTRYPOINT \["driftloop"\]$', text, re.MULTILINE)
    assert "DRIFTLOOP_STATE_DIR=/var/lib/driftloop" in text
    assert "DRIFTLOOP_FEAST_REPO=/app/feature_repo" in text, "the installed package cannot find it by itself"


def test_dockerfile_installs_only_what_the_lock_says():
    text = dockerfile()
    syncs = re.findall(r"uv sync[^\n]*", text)
    assert len(syncs) == 2 and all("--frozen" in s and "--no-dev" in s for s in syncs), syncs
    uv_pin = re.search(r"^UV_VERSION\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1)
    assert f"uv=={uv_pin}" in text, "the uv the Makefile pins"
    runtime = text.split("AS runtime", 1)[1]
    assert "pip install" not in runtime and "uv " not in runtime.replace("/.venv", ""), "no build tools in the image"


def test_dockerignore_keeps_local_state_out_but_not_what_the_image_copies():
    ignored = {line.strip() for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".tools", ".driftloop", "tests"} <= ignored
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile(), re.MULTILINE)
    sources = {source for sources in copied for source in sources.split()}
    assert sources and not sources & ignored, sources & ignored


# kind --------------------------------------------------------------------------------------------------
def test_kind_configs_are_kind_clusters_with_the_gpu_worker_labelled():
    cpu = yaml.safe_load((INFRA / "kind" / "cluster.yaml").read_text())
    assert (cpu["kind"], cpu["apiVersion"]) == ("Cluster", "kind.x-k8s.io/v1alpha4")
    # gpu.yaml is a Go template for nvkind: render its one value the way the template does.
    template = (INFRA / "kind" / "gpu.yaml").read_text()
    rendered = re.sub(r"^\s*\{\{-? (if|end).*\}\}\n", "", template, flags=re.MULTILINE)
    rendered = rendered.replace("{{ $.image }}", versions()["KIND_NODE_IMAGE"])
    gpu = yaml.safe_load(rendered)
    assert (gpu["kind"], gpu["apiVersion"]) == ("Cluster", "kind.x-k8s.io/v1alpha4")
    worker = next(node for node in gpu["nodes"] if node["role"] == "worker")
    assert worker["labels"] == {"nvidia.com/gpu.present": "true"}, "a string: label values are strings"
    assert {"hostPath": "/dev/null", "containerPath": "/var/run/nvidia-container-devices/all"} in worker["extraMounts"]
    assert all(node["image"] == versions()["KIND_NODE_IMAGE"] for node in gpu["nodes"])


# make --------------------------------------------------------------------------------------------------
def test_make_help_lists_the_kubernetes_targets():
    result = make("help")
    assert result.returncode == 0, result.stderr
    for target in ("preflight", "deploy", "undeploy", "predict", "dashboards", "submit-pipeline"):
        assert re.search(rf"^\s*(\x1b\[\d+m)?{target}\b", result.stdout, re.MULTILINE), target


@pytest.mark.parametrize(("args", "expected"), [
    ((), "CLUSTER=kind GPU=0 AIRGAP=0 REGISTRY= NAMESPACE=kubeflow VALUES=helm/values/kind.yaml infra/deploy.sh"),
    (("GPU=1",),
     "CLUSTER=kind GPU=1 AIRGAP=0 REGISTRY= NAMESPACE=kubeflow VALUES=helm/values/kind-gpu.yaml infra/deploy.sh"),
    (("CLUSTER=current", "REGISTRY=ghcr.io/acme"), "CLUSTER=current GPU=0 AIRGAP=0 REGISTRY=ghcr.io/acme "
     "NAMESPACE=kubeflow VALUES=helm/values/cloud.yaml infra/deploy.sh"),
    (("VALUES=mine.yaml", "NAMESPACE=ml"),
     "CLUSTER=kind GPU=0 AIRGAP=0 REGISTRY= NAMESPACE=ml VALUES=mine.yaml infra/deploy.sh"),
    (("AIRGAP=1", "VALUES=helm/values/kind-small.yaml"),
     "CLUSTER=kind GPU=0 AIRGAP=1 REGISTRY= NAMESPACE=kubeflow VALUES=helm/values/kind-small.yaml infra/deploy.sh"),
])
def test_make_deploy_calls_the_script_with_its_settings(args, expected):
    result = make("-n", "deploy", *args)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout.splitlines()
    assert "undefined variable" not in result.stderr


@pytest.mark.parametrize(("args", "expected"), [
    (("preflight",), "AIRGAP=0 infra/preflight.sh --cluster kind"),
    (("preflight", "GPU=1", "CLUSTER=current"), "AIRGAP=0 infra/preflight.sh --cluster current --gpu"),
    (("preflight", "AIRGAP=1", "VALUES=helm/values/kind-small.yaml"),
     "AIRGAP=1 infra/preflight.sh --cluster kind --airgap --small"),
    (("undeploy",),
     "CLUSTER=kind GPU=0 AIRGAP=0 REGISTRY= NAMESPACE=kubeflow VALUES=helm/values/kind.yaml infra/undeploy.sh"),
    (("predict", "NAMESPACE=ml"), "AIRGAP=0 NAMESPACE=ml infra/predict.sh"),
    (("dashboards",), "AIRGAP=0 NAMESPACE=kubeflow infra/dashboards.sh"),
    (("submit-pipeline",), "AIRGAP=0 NAMESPACE=kubeflow SECRET= infra/submit-pipeline.sh prefect"),
    (("submit-pipeline", "ENGINE=kfp"), "AIRGAP=0 NAMESPACE=kubeflow SECRET= infra/submit-pipeline.sh kfp"),
    (("e2e",), "AIRGAP=1 .venv/bin/python tests/e2e/cluster.py"),
])
def test_make_targets_call_their_scripts(args, expected):
    result = make("-n", *args)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout.splitlines()
    assert "undefined variable" not in result.stderr


# air-gapped builds -------------------------------------------------------------------------------------
def test_the_airgap_kind_config_disables_the_default_cni_the_node_image_replaces():
    config = yaml.safe_load((INFRA / "kind" / "airgap.yaml").read_text())
    assert (config["kind"], config["apiVersion"]) == ("Cluster", "kind.x-k8s.io/v1alpha4")
    assert config["networking"]["disableDefaultCNI"] is True
    conflist = json.loads((INFRA / "airgap" / "node" / "10-driftloop-ptp.conflist").read_text())
    assert [p["type"] for p in conflist["plugins"]] == ["ptp", "portmap"]
    assert "10-driftloop-ptp.conflist /etc/cni/net.d/" in (INFRA / "airgap" / "node" / "Dockerfile").read_text()


def test_runc_wrapper_drops_exactly_the_capabilities_the_host_cannot_grant(tmp_path):
    bounding = int(re.search(r"^CapBnd:\s*([0-9a-f]+)$", Path("/proc/self/status").read_text(), re.M).group(1), 16)
    if not shutil.which("capsh") or not shutil.which("jq"):
        pytest.skip("needs capsh and jq (libcap2-bin, jq), as the air-gapped engine does")
    caps = ["CAP_CHOWN", "CAP_SYS_ADMIN", "CAP_SYS_RESOURCE", "CAP_NET_ADMIN"]
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    spec = {"process": {"capabilities": {k: list(caps) for k in ("bounding", "effective", "permitted")}}}
    (bundle / "config.json").write_text(json.dumps(spec))
    fake = tmp_path / "runc"
    fake.write_text("#!/bin/sh\necho \"runc $*\"\n")
    fake.chmod(0o755)
    result = subprocess.run([str(INFRA / "airgap" / "runc-nosysres"), "--root", "/x", "create", "--bundle", str(bundle),
                             "id1"], env={**os.environ, "REAL_RUNC": str(fake)}, capture_output=True, text=True,
                            check=False, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"runc --root /x create --bundle {bundle} id1", "the arguments pass unchanged"
    kept = json.loads((bundle / "config.json").read_text())["process"]["capabilities"]
    host_lacks_sys_resource = not bounding & (1 << 24)
    expected = [c for c in caps if not (c == "CAP_SYS_RESOURCE" and host_lacks_sys_resource)]
    assert all(v == expected for v in kept.values()), kept


def test_kserve_post_renderer_replaces_cert_manager_and_runs_the_local_controller(tmp_path):
    for name in ("ca.crt", "tls.crt", "tls.key"):
        (tmp_path / name).write_text(f"PEM {name}")
    manifests = [
        {"apiVersion": "cert-manager.io/v1", "kind": "Issuer", "metadata": {"name": "selfsigned-issuer"}},
        {"apiVersion": "cert-manager.io/v1", "kind": "Certificate", "metadata": {"name": "serving-cert"}},
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
         "metadata": {"name": "v", "annotations": {"cert-manager.io/inject-ca-from": "kserve/serving-cert"}},
         "webhooks": [{"name": "a", "clientConfig": {"service": {"name": "s"}}}]},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "kserve-controller-manager"},
         "spec": {"template": {"spec": {"containers": [
             {"name": "manager", "image": "kserve/kserve-controller:v0.20.0", "imagePullPolicy": "Always"},
             {"name": "kube-rbac-proxy", "image": "quay.io/brancz/kube-rbac-proxy:v0.18.0"}]}}}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "inferenceservice-config"}},
    ]
    result = subprocess.run([str(ROOT / ".venv/bin/python"), str(INFRA / "airgap" / "kserve-post-render.py")],
                            input=yaml.safe_dump_all(manifests), capture_output=True, text=True, check=False,
                            env={**os.environ, "KSERVE_CERT_DIR": str(tmp_path), "KSERVE_IMAGE": "local/ctl:1"})
    assert result.returncode == 0, result.stderr
    out = {d["kind"]: d for d in yaml.safe_load_all(result.stdout)}
    assert "Issuer" not in out and "Certificate" not in out
    hook = out["ValidatingWebhookConfiguration"]
    assert "cert-manager.io/inject-ca-from" not in hook["metadata"]["annotations"]
    assert hook["webhooks"][0]["clientConfig"]["caBundle"] == base64.b64encode(b"PEM ca.crt").decode()
    containers = out["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert [(c["name"], c["image"], c["imagePullPolicy"]) for c in containers] == [
        ("manager", "local/ctl:1", "IfNotPresent")]
    secret = out["Secret"]
    assert secret["metadata"]["name"] == "kserve-webhook-server-cert" and secret["type"] == "kubernetes.io/tls"
    assert base64.b64decode(secret["data"]["tls.key"]) == b"PEM tls.key"
    assert out["ConfigMap"]["metadata"]["name"] == "inferenceservice-config", "everything else passes unchanged"


def test_every_airgap_image_input_is_in_the_tree():
    images = (INFRA / "airgap" / "images.sh").read_text()
    for folder in re.findall(r'"\$AIRGAP_DIR/([a-z-]+)(?:/Dockerfile)?"', images):
        assert (INFRA / "airgap" / folder / "Dockerfile").is_file(), folder
    for pin in re.findall(r"\$([A-Z_]+_VERSION)\b", images + (INFRA / "airgap" / "binaries.sh").read_text()):
        assert pin in versions(), f"{pin} is not pinned in infra/versions.env"


def test_e2e_harness_lists_its_steps():
    result = subprocess.run([str(ROOT / ".venv/bin/python"), str(ROOT / "tests/e2e/cluster.py"), "--help"],
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--keep" in result.stdout and "--from" in result.stdout

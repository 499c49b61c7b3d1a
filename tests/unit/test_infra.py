"""The cluster set-up in infra/ and the Makefile's Kubernetes targets, checked without Docker or a cluster:
the scripts parse, preflight reports what is missing with its fix, every version is pinned in one place,
the image is built the way the chart expects, and make calls the scripts with the right settings."""

from __future__ import annotations

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
SCRIPTS = sorted(INFRA.glob("*.sh"))
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
    for name in ("CLUSTER", "GPU", "REGISTRY", "NAMESPACE", "VALUES", "ENGINE"):  # the targets' own knobs
        env.pop(name, None)
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, check=False)


# scripts -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", RUNNABLE, ids=lambda p: p.name)
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
                "KSERVE_VERSION", "KFP_VERSION", "PREFECT_CHART_VERSION", "PREFECT_IMAGE_TAG",
                "NVIDIA_DEVICE_PLUGIN_VERSION", "NVKIND_VERSION"}
    assert expected <= pins.keys()
    semver = re.compile(r"^v?\d+\.\d+\.\d+$")
    for key, value in pins.items():
        assert "latest" not in value.lower(), key
        if key == "KIND_NODE_IMAGE":
            assert re.fullmatch(r"kindest/node:v\d+\.\d+\.\d+@sha256:[0-9a-f]{64}", value), "tag and digest"
        elif key == "NVKIND_VERSION":
            assert re.fullmatch(r"[0-9a-f]{40}", value), "a full commit: nvkind has no release tags"
        elif key == "PREFECT_IMAGE_TAG":
            assert re.fullmatch(r"\d+\.\d+\.\d+-python\d+\.\d+", value)
        else:
            assert semver.match(value), f"{key}={value} is not a version"


def test_versions_agree_with_each_other_and_the_lock():
    pins = versions()
    node_kubernetes = re.search(r":(v[\d.]+)@", pins["KIND_NODE_IMAGE"]).group(1)
    assert pins["KUBECTL_VERSION"] == node_kubernetes, "kubectl of the node image's Kubernetes release"
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    prefect = next(p["version"] for p in lock["package"] if p["name"] == "prefect")
    assert pins["PREFECT_IMAGE_TAG"] == f"{prefect}-python3.11", "the Prefect server runs the locked Prefect"
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
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", bases[0]), bases[0]
    assert "latest" not in dockerfile()


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
    ((), "CLUSTER=kind GPU=0 REGISTRY= NAMESPACE=kubeflow VALUES=helm/values/kind.yaml infra/deploy.sh"),
    (("GPU=1",), "CLUSTER=kind GPU=1 REGISTRY= NAMESPACE=kubeflow VALUES=helm/values/kind-gpu.yaml infra/deploy.sh"),
    (("CLUSTER=current", "REGISTRY=ghcr.io/acme"),
     "CLUSTER=current GPU=0 REGISTRY=ghcr.io/acme NAMESPACE=kubeflow VALUES=helm/values/cloud.yaml infra/deploy.sh"),
    (("VALUES=mine.yaml", "NAMESPACE=ml"),
     "CLUSTER=kind GPU=0 REGISTRY= NAMESPACE=ml VALUES=mine.yaml infra/deploy.sh"),
])
def test_make_deploy_calls_the_script_with_its_settings(args, expected):
    result = make("-n", "deploy", *args)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout.splitlines()
    assert "undefined variable" not in result.stderr


@pytest.mark.parametrize(("args", "expected"), [
    (("preflight",), "infra/preflight.sh --cluster kind "),
    (("preflight", "GPU=1", "CLUSTER=current"), "infra/preflight.sh --cluster current --gpu"),
    (("undeploy",), "CLUSTER=kind GPU=0 REGISTRY= NAMESPACE=kubeflow VALUES=helm/values/kind.yaml infra/undeploy.sh"),
    (("predict", "NAMESPACE=ml"), "NAMESPACE=ml infra/predict.sh"),
    (("dashboards",), "NAMESPACE=kubeflow infra/dashboards.sh"),
    (("submit-pipeline",), "REGISTRY= SECRET= infra/submit-pipeline.sh prefect"),
    (("submit-pipeline", "ENGINE=kfp"), "REGISTRY= SECRET= infra/submit-pipeline.sh kfp"),
])
def test_make_targets_call_their_scripts(args, expected):
    result = make("-n", *args)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout.splitlines()
    assert "undefined variable" not in result.stderr

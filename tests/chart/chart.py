"""The chart as the tests see it: rendered by the real helm, per values scenario, as Python documents."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "driftloop"
CRDS = ROOT / "infra" / "crds"
RELEASE, NAMESPACE = "driftloop", "kubeflow"
# The values files (and --set values) each kind of cluster installs with (what `make deploy` passes).
SCENARIOS: dict[str, tuple[list[str], list[str]]] = {
    "kind": (["kind.yaml"], []),
    "kind-small": (["kind-small.yaml"], []),
    "kind-gpu": (["kind-gpu.yaml"], []),
    # A cloud install names its ReadWriteMany storage class: the schema refuses ReadWriteMany without one.
    "cloud": (["cloud.yaml"], ["persistence.storageClass=efs-sc"]),
}


@cache
def versions() -> dict[str, str]:
    """infra/versions.env: the pinned versions `make deploy` uses."""
    pairs = (line.split("=", 1) for line in (ROOT / "infra" / "versions.env").read_text().splitlines()
             if line.strip() and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def kubernetes_version() -> str:
    """The kind node's Kubernetes release, e.g. 1.34.11."""
    return versions()["KUBECTL_VERSION"].removeprefix("v")


def tool(name: str) -> Path:
    path = ROOT / ".tools" / ("checkov/bin" if name == "checkov" else "bin") / name
    if not path.exists():
        pytest.fail(f"{name} is missing: `make chart-tools` builds helm and installs checkov (pinned)")
    return path


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(tool("helm")), *args], capture_output=True, text=True, timeout=120, check=False)
    if check and result.returncode != 0:
        pytest.fail(f"helm {' '.join(args[:2])} failed:\n{result.stderr}")
    return result


def values_args(scenario: str) -> list[str]:
    files, sets = SCENARIOS[scenario]
    return [*(arg for name in files for arg in ("-f", str(ROOT / "helm" / "values" / name))),
            *(arg for value in sets for arg in ("--set", value))]


def render_text(scenario: str, *sets: str, check: bool = True) -> subprocess.CompletedProcess:
    return helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", kubernetes_version(),
                *values_args(scenario), *(arg for s in sets for arg in ("--set", s)), check=check)


def render(scenario: str, *sets: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(render_text(scenario, *sets).stdout) if doc]


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert matches, f"no {kind} {name} in the rendered chart"
    return matches[0]


def pod_specs(docs: list[dict]) -> Iterator[tuple[dict, dict]]:
    """(document, pod spec) for every workload, the InferenceService's predictor included."""
    for doc in docs:
        kind = doc["kind"]
        if kind in ("Deployment", "StatefulSet", "Job"):
            yield doc, doc["spec"]["template"]["spec"]
        elif kind == "CronJob":
            yield doc, doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif kind == "InferenceService":
            yield doc, doc["spec"]["predictor"]


def secret_data(secret: dict) -> dict[str, str]:
    if "stringData" in secret:
        return dict(secret["stringData"])
    return {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}

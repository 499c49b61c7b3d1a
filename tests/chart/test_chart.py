"""The chart, offline: helm lint, Kubernetes and CRD schemas, checkov, and the promises of its values."""

from __future__ import annotations

import copy
import json
import subprocess
from functools import cache

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pipelines.kfp_pipeline import ClusterWiring
from tests.chart.chart import (
    CHART,
    CRDS,
    ROOT,
    SCENARIOS,
    find,
    helm,
    kubernetes_version,
    pod_specs,
    render,
    render_text,
    secret_data,
    tool,
    values_args,
)

pytestmark = pytest.mark.chart

CRD_GROUPS = ("serving.kserve.io", "kubeflow.org", "pipelines.kubeflow.org", "app.k8s.io")


def strict(schema: dict) -> dict:
    """An openAPIV3Schema as the API server applies it with strict field validation (kubectl's default):
    an unknown field is an error, unless the schema keeps unknown fields on purpose."""
    schema = copy.deepcopy(schema)

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@cache
def crd_validators() -> dict[tuple[str, str], jsonschema.Validator]:
    """(apiVersion, kind) -> a validator, from the CRD files of the pinned KServe and KFP releases."""
    validators = {}
    for path in sorted(CRDS.glob("*/*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = version.get("schema", {}).get("openAPIV3Schema")
                if schema:
                    validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(strict(schema))
    return validators


def validate(doc: dict) -> None:
    """Raise if the document would not pass the API server's schema for its kind."""
    if doc["apiVersion"].split("/")[0] in CRD_GROUPS:
        validator = crd_validators().get((doc["apiVersion"], doc["kind"]))
        assert validator is not None, f"no CRD schema for {doc['apiVersion']} {doc['kind']}"
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
        if errors:
            raise jsonschema.ValidationError(f"{doc['kind']}/{doc['metadata']['name']}: " + "; ".join(
                f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5]))
    else:
        kubernetes_validate.validate(doc, kubernetes_version(), strict=True)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_strict(scenario):
    result = helm("lint", "--strict", "--kube-version", kubernetes_version(), str(CHART), *values_args(scenario))
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_document_matches_its_kubernetes_or_crd_schema(scenario):
    docs = render(scenario)
    for doc in docs:
        validate(doc)
    kinds = {d["kind"] for d in docs}
    assert {"InferenceService", "Deployment", "CronJob", "Job", "NetworkPolicy", "ConfigMap"} <= kinds
    assert ("StatefulSet" in kinds) == (scenario != "cloud")  # cloud: managed PostgreSQL and Redis


def test_the_schema_checks_can_fail():
    docs = render("kind")
    isvc = copy.deepcopy(find(docs, "InferenceService", "driftloop-fraud"))
    isvc["spec"]["predictor"]["scaleMetric"] = "gpu"
    with pytest.raises(jsonschema.ValidationError, match="scaleMetric"):
        validate(isvc)
    isvc = copy.deepcopy(find(docs, "InferenceService", "driftloop-fraud"))
    isvc["spec"]["predictor"]["containers"][0]["startupProbes"] = {}
    with pytest.raises(jsonschema.ValidationError, match="startupProbes"):
        validate(isvc)
    deployment = copy.deepcopy(find(docs, "Deployment", "driftloop-mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_checkov_passes_every_check_it_does_not_skip_for_a_stated_reason(scenario, tmp_path):
    (tmp_path / "chart.yaml").write_text(render_text(scenario).stdout)
    result = subprocess.run(
        [str(tool("checkov")), "--config-file", str(ROOT / "helm" / "checkov.yaml"), "-d", str(tmp_path),
         "--output", "json"], capture_output=True, text=True, timeout=300, check=False)
    report = json.loads(result.stdout)
    report = report[0] if isinstance(report, list) else report
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert failed == []
    assert report["summary"]["resource_count"] > 10 and report["summary"]["passed"] > 100
    lines = (ROOT / "helm" / "checkov.yaml").read_text().splitlines()
    skips = [i for i, line in enumerate(lines) if line.strip().startswith("- CKV")]
    assert skips and all(lines[i - 1].strip().startswith("#") for i in skips)  # each skip says why


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_container_is_restricted_resourced_and_probed(scenario):
    docs = render(scenario)
    for doc, spec in pod_specs(docs):
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        for container in spec.get("initContainers", []) + spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), name
            assert not container["image"].endswith(":latest") and ":" in container["image"], name
            if doc["kind"] in ("Deployment", "StatefulSet", "InferenceService"):  # servers, not Jobs
                assert "readinessProbe" in container and "livenessProbe" in container, name


def test_gpu_values_put_the_predictor_on_a_gpu_and_on_cuda():
    predictor = find(render("kind-gpu"), "InferenceService", "driftloop-fraud")["spec"]["predictor"]
    container = predictor["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert predictor["runtimeClassName"] == "nvidia"
    assert predictor["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert predictor["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {"name": "DRIFTLOOP_DEVICE", "value": "cuda"} in container["env"]
    cpu = find(render("kind"), "InferenceService", "driftloop-fraud")["spec"]["predictor"]
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"] and "runtimeClassName" not in cpu


def test_cloud_values_scale_the_predictor_and_use_managed_services():
    docs = render("cloud")
    predictor = find(docs, "InferenceService", "driftloop-fraud")["spec"]["predictor"]
    assert predictor["maxReplicas"] > predictor["minReplicas"] >= 2  # KServe makes an HPA
    assert not [d for d in docs if d["kind"] == "Secret"]  # the user's Secret, not a generated one
    env_from = find(docs, "Deployment", "driftloop-retrainer")["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    assert {"secretRef": {"name": "driftloop-connections"}} in env_from
    assert find(docs, "PersistentVolumeClaim", "driftloop-state")["spec"]["accessModes"] == ["ReadWriteMany"]


def test_passwords_are_generated_never_defaulted():
    first, second = (secret_data(find(render("kind"), "Secret", "driftloop-env")) for _ in range(2))
    for key in ("postgres-password", "redis-password"):
        assert len(first[key]) == 32 and first[key] != second[key]
    assert first["postgres-password"] in first["DRIFTLOOP_POSTGRES_DSN"]
    assert first["redis-password"] in first["DRIFTLOOP_REDIS_URL"]
    config = find(render("kind"), "ConfigMap", "driftloop-config")["data"]
    assert not any("password" in value for value in config.values())


@pytest.mark.parametrize(("setting", "message"), [
    ("image.tag=latest", "/image/tag"),
    ("predictor.scaleMetric=gpu", "/predictor/scaleMetric"),
    ("settings.device=tpu", "/settings/device"),
    ("postgres.enabled=false", "secrets.existingSecret is required"),
])
def test_bad_values_are_refused_with_the_reason(setting, message):
    result = render_text("kind", setting, check=False)
    assert result.returncode != 0 and message in result.stderr


def test_kfp_components_find_what_the_chart_provides():
    """The compiled pipeline reads keys of the chart's ConfigMap and Secret and mounts its volume."""
    docs = render("kind")
    wiring = ClusterWiring()
    assert set(wiring.CONFIG_KEYS) <= set(find(docs, "ConfigMap", "driftloop-config")["data"])
    assert set(wiring.SECRET_KEYS) <= set(secret_data(find(docs, "Secret", "driftloop-env")))
    mount = find(docs, "Deployment", "driftloop-retrainer")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "state", "mountPath": wiring.state_mount} in mount["volumeMounts"]
    find(docs, "PersistentVolumeClaim", f"{wiring.release}-state")

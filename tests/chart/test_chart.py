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
            for container in spec["containers"]:  # init containers run to completion: no probes
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
    first, second = (render("kind") for _ in range(2))
    pg1, pg2 = (secret_data(find(docs, "Secret", "driftloop-postgres")) for docs in (first, second))
    for role in ("postgres", "driftloop", "predictor", "mlflow", "prefect"):
        key = f"{role}-password"
        assert len(pg1[key]) == 32 and pg1[key] != pg2[key]
    assert len(set(pg1.values())) == len(pg1)  # a password per role
    redis = secret_data(find(first, "Secret", "driftloop-redis"))["redis-password"]
    assert len(redis) == 32
    env = secret_data(find(first, "Secret", "driftloop-env"))
    assert env["DRIFTLOOP_POSTGRES_DSN"] == f"postgresql://driftloop:{pg1['driftloop-password']}@driftloop-postgres:5432/driftloop"
    assert redis in env["DRIFTLOOP_REDIS_URL"]
    predictor = secret_data(find(first, "Secret", "driftloop-predictor"))
    assert predictor["DRIFTLOOP_POSTGRES_DSN"] == (
        f"postgresql://predictor:{pg1['predictor-password']}@driftloop-postgres:5432/driftloop")
    mlflow = secret_data(find(first, "Secret", "driftloop-mlflow"))
    assert mlflow["MLFLOW_BACKEND_STORE_URI"] == (
        f"postgresql+psycopg://mlflow:{pg1['mlflow-password']}@driftloop-postgres:5432/mlflow")
    config = find(first, "ConfigMap", "driftloop-config")["data"]
    assert not any(p in value for value in config.values() for p in [*pg1.values(), redis])


# The Secret each workload's containers (init containers included) take their environment from; None: none.
SECRETS = {
    ("StatefulSet", "driftloop-postgres"): "driftloop-postgres",
    ("StatefulSet", "driftloop-redis"): "driftloop-redis",
    ("Deployment", "driftloop-mlflow"): "driftloop-mlflow",
    ("Deployment", "driftloop-prefect"): "driftloop-prefect",
    ("Deployment", "driftloop-evidently"): None,
    ("Deployment", "driftloop-retrainer"): "driftloop-env",
    ("InferenceService", "driftloop-fraud"): "driftloop-predictor",
    ("Job", "driftloop-bootstrap"): "driftloop-env",  # and the predictor's MLflow password, to create its user
    ("CronJob", "driftloop-materialize"): "driftloop-env",
    ("CronJob", "driftloop-monitor"): "driftloop-env",
}


def secrets_seen(spec: dict) -> set[str]:
    """The Secrets a pod's containers read, by envFrom or by key."""
    names = set()
    for c in spec.get("initContainers", []) + spec["containers"]:
        names |= {s["secretRef"]["name"] for s in c.get("envFrom", []) if "secretRef" in s}
        names |= {v["valueFrom"]["secretKeyRef"]["name"] for v in c.get("env", [])
                  if "secretKeyRef" in v.get("valueFrom", {})}
    return names


@pytest.mark.parametrize("scenario", ["kind", "cloud"])
def test_each_workload_mounts_its_own_secret_or_none(scenario):
    docs = render(scenario)
    shared = "driftloop-connections" if scenario == "cloud" else None
    for doc, spec in pod_specs(docs):
        want = SECRETS[(doc["kind"], doc["metadata"]["name"])]
        seen = secrets_seen(spec) - {"driftloop-object-store"}  # cloud: MLflow's object-store credentials
        if doc["metadata"]["name"] == "driftloop-bootstrap" and not shared:
            reader = next(c for c in spec["initContainers"] if c["name"] == "mlflow-reader")
            assert secrets_seen({"containers": [reader]}) == {"driftloop-env", "driftloop-predictor"}
            assert [v["valueFrom"]["secretKeyRef"]["key"] for v in reader["env"] if "valueFrom" in v] == [
                "MLFLOW_TRACKING_PASSWORD"]
            seen -= {"driftloop-predictor"}
        if want is None:
            assert seen == set(), (doc["metadata"]["name"], seen)
        else:
            assert seen == {shared or want}, (doc["metadata"]["name"], seen)
    if scenario == "kind":
        assert {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"} == {
            s for s in SECRETS.values() if s}


def test_the_predictor_and_the_ui_see_no_owner_password_and_no_mlflow_store():
    docs = render("kind")
    passwords = secret_data(find(docs, "Secret", "driftloop-postgres"))
    owners = [passwords[f"{role}-password"] for role in ("postgres", "driftloop", "mlflow", "prefect")]
    secrets = {d["metadata"]["name"]: secret_data(d) for d in docs if d["kind"] == "Secret"}
    mlflow = secrets["driftloop-mlflow"]
    owners += [mlflow["MLFLOW_AUTH_ADMIN_PASSWORD"], mlflow["MLFLOW_FLASK_SERVER_SECRET_KEY"]]  # MLflow's admin
    config = find(docs, "ConfigMap", "driftloop-config")["data"]
    for kind, name in (("InferenceService", "driftloop-fraud"), ("Deployment", "driftloop-evidently")):
        spec = next(s for _, s in pod_specs([find(docs, kind, name)]))
        env = dict(config)
        for secret in secrets_seen(spec):
            env.update(secrets[secret])
        for c in spec.get("initContainers", []) + spec["containers"]:
            env.update({v["name"]: v.get("value", "") for v in c.get("env", [])})
        assert "MLFLOW_BACKEND_STORE_URI" not in env and "PREFECT_API_DATABASE_CONNECTION_URL" not in env, name
        assert not [k for k in env if k.endswith("-password")], name
        assert not any(p in value for value in env.values() for p in owners), name
        assert "basic_auth.ini" not in env, name
        if kind == "InferenceService":
            assert env["DRIFTLOOP_POSTGRES_DSN"].startswith("postgresql://predictor:"), env
            assert env["MLFLOW_TRACKING_USERNAME"] == "predictor", env
        else:
            assert "MLFLOW_TRACKING_PASSWORD" not in env


@pytest.mark.parametrize(("setting", "message"), [
    ("image.tag=latest", "/image/tag"),
    ("predictor.scaleMetric=gpu", "/predictor/scaleMetric"),
    ("settings.device=tpu", "/settings/device"),
    ("settings.trafficRowsMax=-1", "/settings/trafficRowsMax"),
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


def test_the_traffic_a_training_takes_is_a_setting_of_every_pod_and_pipeline_step():
    config = find(render("kind", "settings.trafficRowsMax=1234"), "ConfigMap", "driftloop-config")["data"]
    assert config["DRIFTLOOP_TRAFFIC_ROWS_MAX"] == "1234"
    assert "DRIFTLOOP_TRAFFIC_ROWS_MAX" in ClusterWiring.CONFIG_KEYS


# What a kind cluster on one 2-CPU node leaves for driftloop next to the control plane and the add-ons
# (about 1.2 CPU and 6 GiB): the small profile's requests must stay well under it.
SMALL_NODE_BUDGET = {"cpu": 0.8, "memory": 5 * 2**30}
SERVERS = ("Deployment", "StatefulSet", "InferenceService")


def quantity(value: str | float) -> float:
    """A Kubernetes quantity as a number: CPUs, or bytes."""
    text = str(value)
    for suffix, factor in (("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30), ("Ti", 2**40), ("m", 1e-3)):
        if text.endswith(suffix):
            return float(text.removesuffix(suffix)) * factor
    return float(text)


def pod_requests(doc: dict, spec: dict) -> dict[str, float]:
    """What the scheduler reserves for one workload: per pod the larger of its containers together and its
    largest init container (they run one at a time, before the containers), times its replicas."""
    replicas = {"InferenceService": doc["spec"].get("predictor", {}).get("minReplicas", 1)}.get(
        doc["kind"], doc["spec"].get("replicas", 1))
    total = {}
    for resource in ("cpu", "memory"):
        def requested(container: dict, resource: str = resource) -> float:
            return quantity(container["resources"]["requests"][resource])
        main = sum(requested(c) for c in spec["containers"])
        init = max((requested(c) for c in spec.get("initContainers", [])), default=0.0)
        total[resource] = max(main, init) * replicas
    return total


def main_container(spec: dict) -> dict:
    return spec["containers"][0]


def env_of(container: dict) -> dict[str, object]:
    return {var["name"]: var.get("value", var.get("valueFrom")) for var in container.get("env", [])}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_mlflow_server_runs_without_the_job_runner_and_with_the_workers_asked_for(scenario):
    container = main_container(find(render(scenario), "Deployment", "driftloop-mlflow")["spec"]["template"]["spec"])
    assert env_of(container)["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"  # huey consumers: ~1.5 GiB idle
    docs = render(scenario, "mlflow.workers=3", "mlflow.jobExecution=true")
    container = main_container(find(docs, "Deployment", "driftloop-mlflow")["spec"]["template"]["spec"])
    assert "--workers=3" in container["args"]
    assert env_of(container)["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "true"


def test_kind_small_fits_a_two_cpu_node_with_every_pod_running_at_once():
    docs = render("kind-small")
    workloads = list(pod_specs(docs))
    assert {d["kind"] for d, _ in workloads} >= {"Deployment", "StatefulSet", "Job", "CronJob", "InferenceService"}
    total = {"cpu": 0.0, "memory": 0.0}
    for doc, spec in workloads:
        for resource, amount in pod_requests(doc, spec).items():
            total[resource] += amount
    assert total["cpu"] <= SMALL_NODE_BUDGET["cpu"], f"{total['cpu']:.2f} CPU requested"
    assert total["memory"] <= SMALL_NODE_BUDGET["memory"], f"{total['memory'] / 2**30:.2f} GiB requested"
    bootstrap = find(docs, "Job", "driftloop-bootstrap")["spec"]["template"]["spec"]
    steps = {c["name"]: c["args"] for c in bootstrap["initContainers"] + bootstrap["containers"]}
    assert "--rows=50000" in steps["generate"] and "--n-estimators=300" in steps["train"], "the demo's world"
    for name in ("driftloop-monitor", "driftloop-materialize"):
        spec = next(s for _, s in pod_specs([find(docs, "CronJob", name)]))
        requests = main_container(spec)["resources"]["requests"]
        assert quantity(requests["cpu"]) <= 0.05 and quantity(requests["memory"]) <= 256 * 2**20, name
    mlflow = main_container(find(docs, "Deployment", "driftloop-mlflow")["spec"]["template"]["spec"])
    assert "--workers=1" in mlflow["args"]


def test_default_values_stay_sized_for_real_clusters():
    """kind-small shrinks a copy; the chart's own defaults keep the full data and the larger requests."""
    docs = [doc for doc in yaml.safe_load_all(helm("template", "driftloop", str(CHART), "--namespace", "kubeflow",
                                                   "--kube-version", kubernetes_version()).stdout) if doc]
    bootstrap = find(docs, "Job", "driftloop-bootstrap")["spec"]["template"]["spec"]
    generate = next(c for c in bootstrap["initContainers"] if c["name"] == "generate")
    assert "--rows=50000" in generate["args"]
    assert "--n-estimators=300" in bootstrap["containers"][0]["args"]
    small = sum(pod_requests(d, s)["cpu"] for d, s in pod_specs(render("kind-small")))
    assert sum(pod_requests(d, s)["cpu"] for d, s in pod_specs(docs)) > 2 * small


WAITS = {  # (kind, name) -> the stores its first init container waits for
    ("StatefulSet", "driftloop-postgres"): None,
    ("StatefulSet", "driftloop-redis"): None,
    ("Deployment", "driftloop-evidently"): None,  # reads the workspace on the volume, no store
    ("Deployment", "driftloop-mlflow"): ["postgres"],
    ("Deployment", "driftloop-prefect"): ["postgres"],
    ("Deployment", "driftloop-retrainer"): ["postgres", "redis", "mlflow", "prefect"],
    ("InferenceService", "driftloop-fraud"): ["postgres", "redis", "mlflow"],
    ("Job", "driftloop-bootstrap"): ["postgres", "redis", "mlflow"],
    ("CronJob", "driftloop-materialize"): ["postgres", "redis"],
    ("CronJob", "driftloop-monitor"): ["postgres", "mlflow", "prefect"],
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pods_wait_for_the_stores_they_connect_to_before_anything_else(scenario):
    docs = render(scenario)
    workloads = {(d["kind"], d["metadata"]["name"]) for d, _ in pod_specs(docs)}
    assert workloads == set(WAITS) - ({("StatefulSet", "driftloop-postgres"), ("StatefulSet", "driftloop-redis")}
                                      if scenario == "cloud" else set())  # cloud: managed stores
    for (kind, name), stores in ((key, WAITS[key]) for key in sorted(workloads)):
        spec = next(s for _, s in pod_specs([find(docs, kind, name)]))
        inits = spec.get("initContainers", [])
        if stores is None:
            assert not any(c["name"] == "wait-for-stores" for c in inits), name
            continue
        first = inits[0]
        assert first["name"] == "wait-for-stores", name
        assert first["args"] == ["wait-for", "--timeout=600", *stores], name
        assert first["image"] == main_container(spec)["image"], name  # the CLI of the same image
        assert {"configMapRef": {"name": "driftloop-config"}} in first["envFrom"], name
    # Without the retraining deployment, the monitor needs no Prefect server.
    docs = render("kind", "monitor.retrain=false")
    spec = next(s for _, s in pod_specs([find(docs, "CronJob", "driftloop-monitor")]))
    assert spec["initContainers"][0]["args"] == ["wait-for", "--timeout=600", "postgres", "mlflow"]
    # Its schedule may fire while a fresh install's bootstrap trains: no champion then is no failure.
    assert "--no-champion-ok" in main_container(spec)["args"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_servers_get_a_startup_probe_long_enough_for_a_slow_node(scenario):
    docs = render(scenario)
    least = 600 if scenario == "kind-small" else 300  # seconds before liveness counts
    for doc, spec in pod_specs(docs):
        if doc["kind"] not in SERVERS:
            continue
        container = main_container(spec)
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= least, name
        assert "initialDelaySeconds" not in container["livenessProbe"], name  # the startup probe gates it
        if "httpGet" in startup:  # the same endpoint as readiness
            assert startup["httpGet"]["path"] == container["livenessProbe"]["httpGet"]["path"], name


@pytest.mark.parametrize("tag", ["0.1.0-0123456789ab", "0.1.0-0123456789ab-gpu", "0.1.0@sha256:" + "a1" * 32])
def test_a_content_tag_reaches_every_driftloop_container_and_rolls_the_pods(tag):
    docs = render("kind", f"image.tag={tag}")
    images = {c["image"] for _, spec in pod_specs(docs) for c in spec.get("initContainers", []) + spec["containers"]
              if not c["image"].startswith("docker.io/")}
    assert images == {f"driftloop:{tag}"}
    assert find(docs, "ConfigMap", "driftloop-config")["data"]["DRIFTLOOP_IMAGE"] == f"driftloop:{tag}"

    def checksums(docs: list[dict]) -> dict[str, str]:
        found = {}
        for doc in docs:
            template = {"Deployment": lambda d: d["spec"]["template"]["metadata"],
                        "InferenceService": lambda d: d["spec"]["predictor"]}.get(doc["kind"])
            if template:
                found[doc["metadata"]["name"]] = template(doc).get("annotations", {}).get("checksum/config")
        return found

    before, after = checksums(render("kind")), checksums(docs)
    for name in ("driftloop-fraud", "driftloop-retrainer", "driftloop-evidently"):  # they read the settings
        assert before[name] and after[name] and before[name] != after[name], name


@pytest.mark.parametrize("tag", ["latest", "latest@sha256:" + "a1" * 32, "0.1 0", "ghcr.io/x:1", "-1", ""])
def test_a_floating_or_malformed_tag_is_refused(tag):
    result = render_text("kind", f"image.tag={tag}", check=False)
    assert result.returncode != 0 and "/image/tag" in result.stderr


def test_prefect_server_runs_in_the_chart_on_its_postgres_database():
    docs = render("kind")
    service = find(docs, "Service", "driftloop-prefect")
    assert service["spec"]["ports"] == [{"name": "http", "port": 4200, "targetPort": "http"}]
    spec = find(docs, "Deployment", "driftloop-prefect")["spec"]["template"]["spec"]
    container = main_container(spec)
    assert container["image"] == "driftloop:0.1.0"  # the project image: the locked Prefect
    assert container["command"] + container["args"] == ["prefect", "server", "start", "--host", "0.0.0.0",
                                                        "--port", "4200"]
    env = env_of(container)
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"] == {
        "secretKeyRef": {"name": "driftloop-prefect", "key": "PREFECT_API_DATABASE_CONNECTION_URL"}}
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    volumes = {v["name"]: v for v in spec["volumes"]}
    home = next(m for m in container["volumeMounts"] if m["mountPath"] == env["HOME"])
    assert volumes[home["name"]] == {"name": home["name"], "emptyDir": {}}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/api/health", "port": "http"}
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])

    secret = secret_data(find(docs, "Secret", "driftloop-prefect"))
    password = secret_data(find(docs, "Secret", "driftloop-postgres"))["prefect-password"]
    assert secret == {"PREFECT_API_DATABASE_CONNECTION_URL":
                      f"postgresql+asyncpg://prefect:{password}@driftloop-postgres:5432/prefect"}
    assert "prefect:prefect" in find(docs, "ConfigMap", "driftloop-postgres-init")["data"]["10-roles.sh"]
    assert find(docs, "ConfigMap", "driftloop-config")["data"]["PREFECT_API_URL"] == "http://driftloop-prefect:4200/api"
    policy = find(docs, "NetworkPolicy", "driftloop-prefect")["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "prefect"
    assert policy["ingress"] == [{"ports": [{"port": 4200, "protocol": "TCP"}], "from": [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "driftloop", "app.kubernetes.io/instance":
                                         "driftloop"}, "matchExpressions": [{"key": "app.kubernetes.io/component",
                                                                             "operator": "In",
                                                                             "values": ["monitor", "retrainer"]}]}},
        {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "driftloop"}, "matchExpressions": [
            {"key": "app.kubernetes.io/component", "operator": "DoesNotExist"}]}}]}]

    # On managed stores the server reads its database URL from the user's Secret.
    cloud = main_container(find(render("cloud"), "Deployment", "driftloop-prefect")["spec"]["template"]["spec"])
    assert env_of(cloud)["PREFECT_API_DATABASE_CONNECTION_URL"]["secretKeyRef"]["name"] == "driftloop-connections"


def test_prefect_server_can_be_left_out_for_a_server_of_your_own():
    url = "http://prefect-server.prefect.svc.cluster.local:4200/api"
    docs = render("kind", "prefect.server.enabled=false", f"settings.prefectApiUrl={url}")
    assert not [d for d in docs if d["metadata"]["name"] == "driftloop-prefect"]
    assert find(docs, "ConfigMap", "driftloop-config")["data"]["PREFECT_API_URL"] == url
    assert not [d for d in docs if d["metadata"]["name"] == "driftloop-prefect"]  # no Secret either
    result = render_text("kind", "prefect.server.enabled=false", check=False)
    assert result.returncode != 0 and "settings.prefectApiUrl is required" in result.stderr


def test_read_write_many_without_a_storage_class_is_refused_with_the_classes_to_use():
    result = helm("template", "driftloop", str(CHART), "--kube-version", kubernetes_version(),
                  "-f", str(ROOT / "helm" / "values" / "cloud.yaml"), check=False)
    assert result.returncode != 0
    for words in ("persistence.storageClass", "efs-sc", "standard-rwx", "azurefile"):
        assert words in result.stderr
    claim = find(render("cloud"), "PersistentVolumeClaim", "driftloop-state")["spec"]
    assert claim["accessModes"] == ["ReadWriteMany"] and claim["storageClassName"] == "efs-sc"
    assert "storageClassName" not in find(render("kind"), "PersistentVolumeClaim", "driftloop-state")["spec"]


# What each component may connect to (DNS aside), on the in-chart stores.
EGRESS = {
    "postgres": set(), "redis": set(), "evidently": set(),
    "mlflow": {("postgres", 5432)}, "prefect": {("postgres", 5432)},
    "predictor": {("postgres", 5432), ("redis", 6379), ("mlflow", 5000)},
    "retrainer": {("postgres", 5432), ("redis", 6379), ("mlflow", 5000), ("prefect", 4200)},
    "bootstrap": {("postgres", 5432), ("redis", 6379), ("mlflow", 5000)},
    "materialize": {("postgres", 5432), ("redis", 6379)},
    "monitor": {("postgres", 5432), ("mlflow", 5000), ("prefect", 4200)},
}


def test_each_component_may_reach_only_the_servers_it_needs():
    docs = render("kind")
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    deny = policies.pop("driftloop-default-deny-egress")
    assert deny["policyTypes"] == ["Egress"] and "egress" not in deny
    assert deny["podSelector"]["matchExpressions"] == [{"key": "app.kubernetes.io/component", "operator": "Exists"}]
    for component, allowed in EGRESS.items():
        spec = policies[f"driftloop-{component}"]
        assert "Egress" in spec["policyTypes"], component
        reached, dns = set(), False
        for rule in spec["egress"]:
            for to in rule["to"]:
                if "namespaceSelector" in to:
                    assert to == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                                  "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}
                    dns = True
                    continue
                target = to["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                reached |= {(target, p["port"]) for p in rule["ports"]}
        assert reached == allowed, component
        assert dns == bool(allowed), component
        # and the servers take connections from these components alone (and KFP's step pods)
        for target, _ in allowed:
            ingress = policies[f"driftloop-{target}"]["ingress"][0]["from"]
            if target != "predictor":
                assert component in ingress[0]["podSelector"]["matchExpressions"][0]["values"], (component, target)
    # managed stores: the egress the user names, for the components that need a store outside the chart
    cloud = {d["metadata"]["name"]: d["spec"] for d in render("cloud") if d["kind"] == "NetworkPolicy"}
    external = [r for r in cloud["driftloop-predictor"]["egress"] if any("ipBlock" in t for t in r["to"])]
    assert [p["port"] for p in external[0]["ports"]] == [5432, 6379, 443]
    assert cloud["driftloop-evidently"]["egress"] == []


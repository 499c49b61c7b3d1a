"""The training pipeline as a Kubeflow Pipelines v2 pipeline over the same step functions.

Each component runs in the project image (kfp is already installed there, so
``install_kfp_package=False`` keeps it offline) and its body is one call to ``run_step``, which calls
``pipelines.training``. Components pass JSON strings (URIs, ids, small records), never objects.

No secret is a pipeline or component parameter (those are written into the compiled YAML and shown by the
KFP UI): a component builds its settings from its pod's environment, which ``ClusterWiring`` fills from the
chart's ConfigMap and Secret.

Lineage: the train component gets the pipeline run's id and name from KFP's placeholders and tags the MLflow
run with them (``driftloop.kfp.run_id``, ``driftloop.kfp.run_name``). On a KFP server they are the run's UUID
(what ``submit`` returns) and its display name; ``kfp.local`` gives a random number and
``driftloop-training-<local time>``, the run's folder under ``<state>/kfp/``.
"""

# No ``from __future__ import annotations`` here: KFP reads the component functions' annotations as types.
import contextlib
import io
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from driftloop.settings import Settings, load_settings, redact_logs
from pipelines import training
from pipelines.steps import tracking
from pipelines.steps.features import TrainingSet
from pipelines.steps.register import GatePolicy
from pipelines.steps.train import TrainParams
from pipelines.steps.validate import ValidationPolicy
from pipelines.training import TrainingConfig

PIPELINE_NAME = "driftloop-training"


def config_to_json(config: TrainingConfig) -> str:
    data = asdict(config)
    data["as_of"] = config.as_of.isoformat() if config.as_of else ""
    return json.dumps(data)


def config_from_json(text: str) -> TrainingConfig:
    data = json.loads(text or "{}")
    return TrainingConfig(
        params=TrainParams(**data.get("params", {})),
        gate=GatePolicy(**data.get("gate", {})),
        validation=ValidationPolicy(**data.get("validation", {})),
        as_of=datetime.fromisoformat(data["as_of"]) if data.get("as_of") else None,
    )


def _dump(value: Any) -> str:
    return json.dumps(asdict(value) if is_dataclass(value) else value)


def run_step(step: str, settings: Settings | None = None, **args: str) -> str:
    """One pipeline step from JSON-string arguments to a JSON-string result (a component's body)."""
    if settings is None:  # a component: the settings of its pod's environment, masked in what it logs
        settings = load_settings()
        redact_logs(settings)
    config = config_from_json(args.get("config_json", ""))
    if step == "features":
        return _dump(training.features(settings, config.as_of))
    training_set = TrainingSet(**json.loads(args["training_set"])) if "training_set" in args else None
    if step == "validate":
        return _dump(training.validate(settings, training_set.uri, config.validation))
    if step == "train":
        origin = tracking.origin_tags("kfp", run_id=args.get("kfp_run_id"), run_name=args.get("kfp_run_name"))
        return json.dumps(training.train(settings, training_set, config.params, origin))
    run_id = json.loads(args["run_id"])
    if step == "evaluate":
        return _dump(training.evaluate(settings, run_id))
    if step == "register":
        return _dump(training.register(settings, run_id, config.gate))
    raise ValueError(f"unknown step {step!r}; steps are {', '.join(training.STEPS)}")


# Component bodies: KFP ships each function's source to the container, so each imports what it runs.
def features_component(config_json: str) -> str:
    from pipelines.kfp_pipeline import run_step

    return run_step("features", config_json=config_json)


def validate_component(training_set: str, config_json: str) -> str:
    from pipelines.kfp_pipeline import run_step

    return run_step("validate", training_set=training_set, config_json=config_json)


def train_component(training_set: str, config_json: str, kfp_run_id: str, kfp_run_name: str) -> str:
    from pipelines.kfp_pipeline import run_step

    return run_step("train", training_set=training_set, config_json=config_json, kfp_run_id=kfp_run_id,
                    kfp_run_name=kfp_run_name)


def evaluate_component(run_id: str) -> str:
    from pipelines.kfp_pipeline import run_step

    return run_step("evaluate", run_id=run_id)


def register_component(run_id: str, config_json: str) -> str:
    from pipelines.kfp_pipeline import run_step

    return run_step("register", run_id=run_id, config_json=config_json)


@dataclass(frozen=True)
class ClusterWiring:
    """Where a component on the cluster finds the chart's settings, secrets and state volume.

    KFP runs pipeline pods in its own namespace, the one the chart is installed in (``make deploy``).
    """

    release: str = "driftloop"
    secret: str | None = None  # default: the chart's generated Secret; set it to secrets.existingSecret
    state_mount: str = "/var/lib/driftloop"

    # The keys a step reads, from the chart's ConfigMap and Secret (helm/driftloop/templates/config.yaml).
    CONFIG_KEYS = ("DRIFTLOOP_PROFILE", "DRIFTLOOP_STATE_DIR", "DRIFTLOOP_DATA_DIR", "DRIFTLOOP_MLFLOW_TRACKING_URI",
                   "DRIFTLOOP_MODEL_NAME", "DRIFTLOOP_EXPERIMENT", "DRIFTLOOP_FEATURE_SERVICE",
                   "DRIFTLOOP_FEAST_PROJECT", "DRIFTLOOP_DEVICE", "DRIFTLOOP_TRAFFIC_ROWS_MAX", "HOME")
    SECRET_KEYS = ("DRIFTLOOP_POSTGRES_DSN", "DRIFTLOOP_REDIS_URL",
                   "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")  # MLflow is behind basic auth

    def apply(self, task: Any) -> None:
        from kfp import kubernetes

        kubernetes.use_config_map_as_env(task, f"{self.release}-config", {k: k for k in self.CONFIG_KEYS})
        kubernetes.use_secret_as_env(task, self.secret or f"{self.release}-env", {k: k for k in self.SECRET_KEYS})
        kubernetes.mount_pvc(task, f"{self.release}-state", self.state_mount)
        # The chart's NetworkPolicies let pods of the loop reach PostgreSQL, Redis and MLflow.
        kubernetes.add_pod_label(task, "app.kubernetes.io/part-of", "driftloop")
        kubernetes.add_pod_label(task, "app.kubernetes.io/instance", self.release)


def build_pipeline(image: str, wiring: ClusterWiring | None = None) -> Callable:
    """The pipeline function, its components running ``image`` (wired to the chart's release if given)."""
    from kfp import dsl

    def component(fn: Callable) -> Callable:
        return dsl.component(fn, base_image=image, install_kfp_package=False)

    features_op, validate_op, train_op, evaluate_op, register_op = map(component, (
        features_component, validate_component, train_component, evaluate_component, register_component,
    ))

    @dsl.pipeline(name=PIPELINE_NAME, description="Feast training set -> validate -> XGBoost -> evaluate -> gate")
    def pipeline(config_json: str = "{}") -> str:
        features = features_op(config_json=config_json)
        validated = validate_op(training_set=features.output, config_json=config_json)
        trained = train_op(training_set=features.output, config_json=config_json,
                           kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                           kfp_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER).after(validated)
        evaluated = evaluate_op(run_id=trained.output)
        registered = register_op(run_id=trained.output, config_json=config_json).after(evaluated)
        for task in (features, validated, trained, evaluated, registered):
            task.set_caching_options(False)  # data steps must see today's data
            if wiring is not None:
                wiring.apply(task)
        return registered.output

    return pipeline


def compile_pipeline(settings: Settings, out: Path, wiring: ClusterWiring = ClusterWiring()) -> Path:
    """Write the KFP v2 pipeline spec (YAML, with its Kubernetes platform spec) that a KFP 2.x server accepts."""
    from kfp import compiler

    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(settings.image, wiring), str(out))
    return out


def submit(settings: Settings, url: str, wiring: ClusterWiring, config: TrainingConfig) -> str:
    """Start a run of the pipeline on the KFP server at ``url``; return the run's id."""
    import tempfile

    import kfp

    with tempfile.TemporaryDirectory() as tmp:
        path = compile_pipeline(settings, Path(tmp) / "pipeline.yaml", wiring)
        client = kfp.Client(host=url)
        run = client.create_run_from_pipeline_package(
            str(path), arguments={"config_json": config_to_json(config)}, experiment_name=settings.experiment,
            enable_caching=False)
    return run.run_id


class ComponentError(RuntimeError):
    """A component of a ``kfp.local`` run failed; the message is its own last error line and where its log is."""


class _RunLog(io.TextIOBase):
    """Where ``kfp.local`` prints (its logger, each component's output): a file, and a progress line per task.

    kfp.local writes the executor's JSON and every component's logs to stdout (~40 lines a step), which would
    bury the CLI's summary and break ``--json``; the whole of it stays in the file, for when a step fails.
    """

    TASK = re.compile(r"(Executing task|Task) '([\w-]+)'( finished with status (\w+))?")
    COLOUR = re.compile(r"\x1b\[[0-9;]*m")

    def __init__(self, file: TextIO, progress: Callable[[str, str], None] | None) -> None:
        self.file, self.progress = file, progress

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.file.write(text)
        if self.progress is not None and (match := self.TASK.search(self.COLOUR.sub("", text))):
            step = match.group(2).removesuffix("-component")
            if match.group(1) == "Executing task":
                self.progress(step, "start")
            elif match.group(4):
                self.progress(step, match.group(4).lower())
        return len(text)


def _last_error(log: str) -> str:
    """The last ``SomeError: message`` line a component printed (its traceback's end), or ''."""
    found = re.findall(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", log, flags=re.MULTILINE)
    return f"{found[-1][0]}: {found[-1][1]}" if found else ""


def run_kfp_local(settings: Settings, config: TrainingConfig,
                  progress: Callable[[str, str], None] | None = None) -> dict:
    """Run the pipeline with ``kfp.local`` (subprocesses, this interpreter, no network).

    kfp.local's own output goes to ``<state>/kfp/last-run.log``; ``progress(step, what)`` hears each task
    start and end. A failed component raises ``ComponentError`` with its last error line.
    """
    from kfp import local

    root = settings.state / "kfp"
    (root / "workspace").mkdir(parents=True, exist_ok=True)
    log_path = root / "last-run.log"
    with log_path.open("w") as log_file, contextlib.redirect_stdout(_RunLog(log_file, progress)), \
            warnings.catch_warnings():
        # The subprocess runner ignores the image (it runs this interpreter): the warning about it is noise.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
                   workspace_root=str(root / "workspace"))
        try:
            task = build_pipeline(settings.image)(config_json=config_to_json(config))
        except RuntimeError as error:  # kfp.local: "Task '…' finished with status FAILURE"
            log_file.flush()
            cause = _last_error(log_path.read_text()) or str(error)
            raise ComponentError(f"{cause} (kfp.local's log: {log_path})") from error
    return training.summary_of_run(settings, json.loads(task.output), engine="kfp")

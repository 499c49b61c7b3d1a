"""Importing any module does nothing: no files, no clients, no services needed."""

import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGES = ("driftloop", "pipelines", "serving", "monitoring")


def all_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        module = importlib.import_module(package)
        names.append(package)
        names += [m.name for m in pkgutil.walk_packages(module.__path__, prefix=f"{package}.")]
    return names


def test_every_module_imports_without_side_effects(tmp_path, tmp_path_factory):
    code = "import importlib, sys\nfor name in sys.argv[1:]: importlib.import_module(name)\n"
    # Prefect itself makes its home directory on import: keep that one outside the checked folder.
    prefect_home = tmp_path_factory.mktemp("prefect-home")
    env = {**os.environ, "DRIFTLOOP_STATE_DIR": str(tmp_path / "state"), "PREFECT_HOME": str(prefect_home)}
    result = subprocess.run([sys.executable, "-c", code, *all_modules()], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing created, not even the state dir


def test_steps_do_not_import_orchestrators():
    steps = Path(pkgutil.resolve_name("pipelines.steps").__path__[0])
    for path in steps.glob("*.py"):
        text = path.read_text()
        assert "prefect" not in text and "import kfp" not in text and "from kfp" not in text, path.name


def test_the_cli_knows_every_user_error_by_its_module_and_name():
    """The CLI prints these as one line; it names them by module so that an error never waits for imports."""
    from driftloop.cli import USER_ERRORS

    for module, name in USER_ERRORS:
        error = getattr(importlib.import_module(module), name)
        assert isinstance(error, type) and issubclass(error, Exception), (module, name)


def test_moves_against_a_tracking_server_import_no_heavy_library(tmp_path):
    """`driftloop rollback` and `promote --force` against a tracking server speak its REST API: what they load
    (the CLI, the registry step, its REST client, built) imports none of MLflow (about 4 CPU-s) and the like."""
    code = ("import sys\nfrom driftloop import cli\nfrom pipelines.steps import register, registry_api, tracking\n"
            "registry_api.RestRegistry.from_environment('http://127.0.0.1:5000').close()\n"
            "print(' '.join(sorted({name.split('.')[0] for name in sys.modules})))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "DRIFTLOOP_STATE_DIR": str(tmp_path / "state")}, check=False)
    assert result.returncode == 0, result.stderr
    heavy = {"mlflow", "pandas", "numpy", "sklearn", "xgboost", "feast", "evidently", "prefect", "pyarrow"}
    assert not set(result.stdout.split()) & heavy


INSTRUMENTED = """
import sys
from driftloop import cli
if sys.argv[1] == "cli":
    try:
        cli.main(["config"])  # a command: the entry point sets its process up, then the command's imports follow
    except SystemExit:
        pass
import feast.feature_service
print("typeguard" in feast.feature_service.FeatureService.__init__.__code__.co_names)
"""


@pytest.mark.parametrize(("entry", "instrumented"), [("cli", "False"), ("plain", "True")])
def test_the_cli_imports_feast_without_its_type_check_instrumentation(tmp_path, entry, instrumented):
    """typeguard recompiles every function Feast decorates when Feast is imported (about 4 CPU-s of each command
    that touches Feast): the CLI's process skips it; any other process (these tests' own) keeps the checks."""
    result = subprocess.run([sys.executable, "-c", INSTRUMENTED, entry], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "DRIFTLOOP_STATE_DIR": str(tmp_path / "state")},
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == instrumented

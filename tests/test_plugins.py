"""Models from other packages: one import namespace, the entry-point registry, a dotted path for code that is not
a package, the conformance kit on a plug-in, and the plug-in's provenance in the record (docs/models.md)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from seqbench import models
from seqbench.models import registry

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugin_model"


def seqbench_files() -> str:
    """A digest of seqbench's own tracked files (the example package and tests aside): a plug-in changes none."""
    listed = subprocess.run(["git", "ls-files", "models", "tasks", "harness", "reports", "conf", "run.py",
                             "pyproject.toml"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    digest = hashlib.sha256()
    for name in sorted(listed):
        path = ROOT / name
        digest.update(name.encode() + (path.read_bytes() if path.is_file() else b"-"))
    return digest.hexdigest()


def run(args: list[str], cwd: Path = ROOT, pythonpath: list[Path] = (), timeout: int = 300):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath)), "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_project_with_its_own_models_and_tasks_packages_imports_seqbench_beside_them(tmp_path):
    """seqbench installs as seqbench.models, seqbench.tasks, ...: a user's own top-level ``models`` is theirs."""
    for name in ("models", "tasks", "harness", "reports"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"OWNER = 'project {name}'\n")
    (tmp_path / "run.py").write_text("OWNER = 'project run'\n")
    out = run(["-c", "import models, tasks, harness, reports, run\n"
                     "from seqbench import models as sb_models, tasks as sb_tasks\n"
                     "from seqbench.harness import run as sb_run\n"
                     "assert [m.OWNER for m in (models, tasks, harness, reports, run)] == "
                     "['project models', 'project tasks', 'project harness', 'project reports', 'project run']\n"
                     "assert 'transformer' in sb_models.MODELS and hasattr(sb_tasks, 'build') and sb_run.main\n"
                     "print('both')"], cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "both", out.stderr


def test_the_seqbench_command_is_run_py(tmp_path):
    """The console command installed beside the interpreter composes the same config as ``python run.py``."""
    command = Path(sys.executable).with_name("seqbench")
    if not command.is_file():
        pytest.skip("seqbench is not installed as a command beside this interpreter")
    out = subprocess.run([str(command), "model=gru_tiny", "task=copy", "--cfg", "job"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "name: gru" in out.stdout and "preset: tiny" in out.stdout


def test_every_package_folder_is_installed_under_the_namespace():
    """pyproject's package list names every folder with an __init__.py under the four package folders."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    folders = {"seqbench." + ".".join(p.parent.relative_to(ROOT).parts)
               for top in ("models", "tasks", "harness", "reports") for p in (ROOT / top).rglob("__init__.py")}
    assert folders - listed == set(), "folders missing from [tool.setuptools] packages"
    assert {"seqbench.models", "seqbench.conf"} <= listed
    assert config["package-dir"]["seqbench.models"] == "models"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The example model package installed into a folder of its own (as pip installs it, entry point included)."""
    target = tmp_path_factory.mktemp("site")
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(EXAMPLE)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return target


def test_an_installed_model_package_trains_passes_the_conformance_kit_and_is_named_in_the_record(installed, tmp_path):
    before = seqbench_files()
    job = run(["run.py", "model=mingru_tiny", "task=copy", "trainer=smoke", "device=cpu",
               f"hydra.run.dir={tmp_path / 'run'}"], pythonpath=[installed])
    assert job.returncode == 0, job.stderr[-3000:]
    rec = json.loads((tmp_path / "run" / "record.json").read_text())
    assert rec["status"] == "ok" and rec["model"]["name"] == "mingru"
    (plugin,) = [p for p in rec["environment"]["plugins"] if p["name"] == "mingru"]
    assert plugin["distribution"] == "seqbench-mingru" and plugin["version"] == "0.1.0"
    assert plugin["found_by"] == "entry point" and plugin["used"] is True
    assert re.fullmatch(r"[0-9a-f]{64}", plugin["source_sha256"]) and plugin["source_files"] >= 3
    assert plugin["path"] == str(installed / "mingru")
    report = run(["-m", "seqbench.reports", str(tmp_path / "run"), "--out", str(tmp_path / "report")],
                 pythonpath=[installed])
    assert report.returncode == 0, report.stderr[-3000:]
    md = (tmp_path / "report" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| mingru |"))
    assert "| seqbench-mingru | 0.1.0 |" in row and plugin["source_sha256"][:12] in row and row.endswith("| 1 |")
    kit = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")], pythonpath=[installed])
    assert kit.returncode == 0 and re.search(r"\b1[0-9] passed", kit.stdout), kit.stdout[-3000:]
    assert seqbench_files() == before, "running a plug-in changed seqbench's own files"


def test_a_model_named_by_dotted_path_needs_no_package(tmp_path):
    """``architecture:`` in a preset of the user's own config folder, the code on PYTHONPATH, nothing installed."""
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "my_gru.yaml").write_text(
        "name: my_gru\npreset: tiny\narchitecture: mingru.model.ARCHITECTURE\nd_model: 16\nn_layers: 1\nn_heads: 2\n")
    job = run(["run.py", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "model=my_gru", "task=copy",
               "trainer=smoke", "device=cpu", "eval.splits=[valid]", f"hydra.run.dir={tmp_path / 'run'}"],
              pythonpath=[EXAMPLE])
    assert job.returncode == 0, job.stderr[-3000:]
    rec = json.loads((tmp_path / "run" / "record.json").read_text())
    assert rec["status"] == "ok" and rec["model"]["name"] == "my_gru"
    (plugin,) = [p for p in rec["environment"]["plugins"] if p["used"]]
    assert plugin["found_by"] == "dotted path" and plugin["module"] == "mingru.model"
    assert plugin["path"] == str(EXAMPLE / "mingru") and plugin["git_commit"]  # it sits in seqbench's repository


def test_a_broken_or_clashing_plug_in_is_reported_when_chosen_and_spares_the_others(tmp_path, monkeypatch):
    dist = tmp_path / "broken_models-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-models\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[seqbench.models]\nghost = no_such_module.model:ARCHITECTURE\n"
                                           "lstm = no_such_module.model:LSTM\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found, broken = registry.discover(models.BUILTIN)
    assert set(models.BUILTIN) <= set(found) and "ghost" not in found
    assert "no_such_module" in broken["ghost"] and "broken-models" in broken["ghost"]
    assert "built-in" in broken["lstm"] and found["lstm"] is models.BUILTIN["lstm"]
    monkeypatch.setattr(models, "BROKEN", broken)
    with pytest.raises(models.PluginError, match="ghost.*no_such_module"):
        models.architecture("ghost")


def test_a_dotted_path_to_something_else_says_what_it_must_name():
    with pytest.raises(models.PluginError, match="Architecture"):
        models.architecture({"name": "x", "architecture": "seqbench.models.common.PAD"})
    with pytest.raises(models.PluginError, match="PYTHONPATH"):
        models.architecture({"name": "x", "architecture": "no_such_pkg.mod.ARCH"})

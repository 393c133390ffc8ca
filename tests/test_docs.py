"""The documentation holds: every relative link in README.md and docs/ resolves, every ``python run.py`` command in
their shell blocks composes with each key it names, every setting they name is declared; ``run.py --help`` says
what the commands run; a mistyped setting gets the one it most likely meant; a stated error prints no traceback."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
PLACEHOLDER = re.compile(r"<[^<>\s]+>")
SHELL = {"", "bash", "sh", "shell", "console"}


def prose(text: str) -> str:
    """The text outside code blocks and inline code (where a ``[x](y)`` is not a link)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, formatting and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_the_pages_exist_and_the_readme_fits_a_first_hour():
    names = {p.name for p in PAGES if p.parent.name == "docs"}
    assert {"README.md", "running.md", "models.md", "tasks.md", "report.md", "results.md", "reliability.md",
            "testing.md", "architecture.md"} <= names
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 300
    assert "python -m pytest" in readme  # the test command the README gives (and CI runs)
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    assert all(f"]({name})" in index for name in names - {"README.md"}), "docs/README.md links every page"


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading in {dest.name})")
    assert not broken, "\n".join(broken)


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, the command line after run.py) for every run.py command in the pages' shell blocks."""
    found = []
    for page in PAGES:
        for lang, body in FENCE.findall(page.read_text(encoding="utf-8")):
            if lang not in SHELL:
                continue
            for line in body.replace("\\\n", " ").splitlines():
                line = line.strip().removeprefix("$ ")
                try:
                    words = shlex.split(line, comments=True)
                except ValueError:
                    continue
                command: list[str] = []
                for word in [*words, "&&"]:
                    if word in ("&&", "||", ";", "|"):
                        at = next((i for i, w in enumerate(command) if w.endswith("run.py")), None)
                        if at is not None and any(w in ("python", "torchrun") for w in command[:at]):
                            found.append((f"{page.relative_to(ROOT)}: {line}", command[at + 1:]))
                        command = []
                    else:
                        command.append(word)
    return found


COMMANDS = documented_commands()
GROUPS = {p.relative_to(CONF).as_posix(): sorted(f.stem for f in p.glob("*.yaml"))
          for p in [*CONF.iterdir(), *(CONF / "hydra").iterdir()] if p.is_dir()}


def one_job(args: list[str]) -> list[str]:
    """The overrides of a documented command's first job: flags dropped, each sweep cut to its first value,
    a placeholder (``<dir>``) replaced by a valid option of its group or a plain value, its key kept."""
    from hydra._internal.utils import get_args_parser  # the parser hydra.main uses
    overrides = []
    for line in get_args_parser().parse_args(args).overrides:
        key, eq, value = line.partition("=")
        if eq and PLACEHOLDER.search(value):
            group = key.lstrip("+~")
            value = GROUPS[group][0] if group in GROUPS else PLACEHOLDER.sub("x", value)
        overrides.append(f"{key}{eq}{value}")
    out = []
    for o in OverridesParser.create().parse_overrides(overrides):
        first = next(iter(o.sweep_string_iterator())) if o.is_sweep_override() else None
        out.append(o.input_line if first is None else f"{o.get_key_element()}={first}")
    return out


def test_the_documentation_has_run_py_commands_to_check():
    assert len(COMMANDS) >= 20
    texts = [where for where, _ in COMMANDS]
    assert any("experiment=smoke" in t for t in texts) and any("task.path=" in t for t in texts)
    assert any("hydra/launcher=slurm" in t for t in texts)


def test_every_documented_run_py_command_composes_with_the_keys_it_names():
    failed = []
    with warnings.catch_warnings(), initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        warnings.simplefilter("ignore", UserWarning)  # Hydra's note on the joblib launcher's schema
        checked = set()
        for where, args in COMMANDS:
            if tuple(args) in checked:
                continue
            checked.add(tuple(args))
            try:
                overrides = one_job(args)
                cfg = compose("config", overrides=overrides, return_hydra_config=True)
            except Exception as err:  # noqa: BLE001 (any failure is a documented command that does not run)
                failed.append(f"{where}\n    {type(err).__name__}: {str(err).splitlines()[0]}")
                continue
            for line in overrides:  # the key each names is now in the config (a group: its choice)
                key = line.partition("=")[0].lstrip("+~")
                if "/" in key or key in GROUPS:
                    continue
                if OmegaConf.select(cfg, key, default="<absent>", throw_on_missing=False) == "<absent>":
                    failed.append(f"{where}\n    {key} is not in the composed config")
            if any(line.startswith("+") and not line.startswith("++") for line in overrides):
                failed.append(f"{where}\n    a documented setting needs no '+': declare it in conf/")
    assert not failed, "\n".join(failed)


def paths(node, prefix: str = "") -> set[str]:
    """Every setting's dotted path in a config (mappings and their keys)."""
    out = set()
    for key, value in node.items():
        out.add(f"{prefix}{key}")
        if isinstance(value, dict):
            out |= paths(value, f"{prefix}{key}.")
    return out


def settings_of(group: str) -> set[str]:
    """The settings of ``group``'s options, each preset file read as it is (the union over the presets)."""
    found = set()
    for file in (CONF / group).glob("*.yaml"):
        node = OmegaConf.to_container(OmegaConf.load(file))
        node.pop("defaults", None)
        found |= paths(node, f"{group}.")
    return found


def test_every_setting_the_documentation_names_is_declared():
    """`trainer.save_every` in prose is a setting a user writes as `trainer.save_every=2`: it must need no '+'.
    trainer, eval and data settings exist in the default config; a key=value of a model or task setting in the
    config of some preset of its group (the record's own fields, `task.warnings`, are not settings)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        default = paths(OmegaConf.to_container(compose("config")))
    per_group = {group: settings_of(group) for group in ("model", "task", "logger")}
    missing = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for span in re.findall(r"`([^`\n]+)`", FENCE.sub("", text)):
            pattern = r"(?<![\w.$/+{])((trainer|eval|data|model|task|logger)\.[a-z_][\w.]*?)(=|\b(?![.\w]))"
            for m in re.finditer(pattern, span):
                key, root, assigned = m.group(1), m.group(2), m.group(3) == "="
                if re.search(r"\.(py|yaml|md|sh)$", key):
                    continue
                if root in ("trainer", "eval", "data"):
                    known = default
                elif assigned:
                    known = per_group[root]
                else:
                    continue
                if key not in known:
                    missing.append(f"{page.relative_to(ROOT)}: `{span}`: {key}")
    assert not missing, "\n".join(missing)


def run_py(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_help_says_what_the_commands_run_with_the_experiments_and_groups():
    res = run_py("--help")
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "seqbench" in text and "powered by hydra" not in text.lower()  # seqbench's own text, not Hydra's stock one
    # what the bare command runs (the quick sweep) and how long it takes
    assert "experiment=quick" in text and re.search(r"about \d+ minutes", text)
    for experiment in GROUPS["experiment"]:
        assert re.search(rf"^{experiment}\s", text, re.M), f"--help does not describe experiment={experiment}"
    for group in ("model", "task", "trainer", "experiment"):  # $APP_CONFIG_GROUPS: each group with its options
        assert re.search(rf"^{group}: .*{GROUPS[group][0]}", text, re.M), group
    assert len(re.findall(r"^python run\.py .*=", text, re.M)) >= 3  # example commands


def test_a_mistyped_setting_names_the_one_meant_and_runs_nothing(tmp_path):
    out = tmp_path / "run"
    res = run_py("model=transformer_tiny", "task=copy", "trainer=smoke", "trainer.max_second=5", f"hydra.run.dir={out}")
    assert res.returncode != 0
    assert "trainer.max_second" in res.stderr and "did you mean trainer.max_seconds?" in res.stderr
    assert "+trainer.max_second=5" in res.stderr  # how to add a new key on purpose
    assert "Traceback" not in res.stderr and not out.exists()


@pytest.mark.parametrize("args,meant", [
    (["-m", "model=transformer_tiny,lstm_tiny", "trainer.max_secnds=4,8"], ["trainer.max_seconds"]),
    (["eval.decodng.beam=2", "trainr.lr=1e-3"], ["eval.decoding.beam", "trainer.lr"]),
    (["task=copy", "task.n_trian=5", "experiment=smoke"], ["task.n_train"]),
])
def test_the_suggestion_for_each_unknown_setting_of_a_command(args, meant):
    from seqbench.harness import run
    message = run.unknown_settings(args)
    assert message is not None
    assert [m for m in re.findall(r"did you mean (\S+)\?", message)] == meant


@pytest.mark.parametrize("args", [
    ["model=transformer_tiny", "trainer.save_every=2", "eval.checkpoint=average"],  # declared: no '+'
    ["-m", "experiment=tune", "trainer.lr=1e-3,3e-3", "hydra/launcher=joblib"],
    ["+trainer.my_new_key=1"],  # added on purpose
    ["model=nope"],  # not a setting: Hydra lists the options itself
    ["--help"],
])
def test_commands_without_an_unknown_setting_pass_the_check(args):
    from seqbench.harness import run
    assert run.unknown_settings(args) is None


def test_a_setting_the_check_catches_fails_with_its_message_alone(tmp_path):
    out = tmp_path / "run"
    args = ("model=transformer_tiny", "task=copy", "trainer=smoke", "trainer.lr=-1", "device=cpu",
            "data.download=false", f"hydra.run.dir={out}")
    res = run_py(*args)
    assert res.returncode == 1
    assert "trainer.lr=-1 must be" in res.stderr and "Traceback" not in res.stderr + res.stdout
    assert json.loads((out / "record.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_hydra_full_error_shows_the_traceback_of_a_stated_error(tmp_path):
    res = run_py("model=transformer_tiny", "task=copy", "trainer=smoke", "trainer.lr=-1", "device=cpu",
                 "data.download=false", f"hydra.run.dir={tmp_path / 'run'}", env={"HYDRA_FULL_ERROR": "1"})
    assert res.returncode == 1 and "Traceback" in res.stderr and "settings.py" in res.stderr

"""seqbench's command line in a checkout: ``python run.py model=<m> task=<t>`` is ``seqbench model=<m> task=<t>``,
running this checkout's code whichever seqbench is installed.

``python run.py --help`` says what the commands run, the experiments and the config groups.
"""
import importlib.abc
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
FOLDERS = ("models", "tasks", "harness", "reports")  # installed as seqbench.<folder> (pyproject.toml)


class ThisCheckout(importlib.abc.MetaPathFinder):
    """Imports ``seqbench.<folder>`` from this checkout, where seqbench is installed from another one (a git
    worktree of an older commit, mutation testing's copy of the tree)."""

    def find_spec(self, name, path=None, target=None):
        top, _, rest = name.removeprefix("seqbench.").partition(".")
        if not name.startswith("seqbench.") or rest or top not in FOLDERS:
            return None
        return importlib.util.spec_from_file_location(name, ROOT / top / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / top)])


def use_this_checkout() -> None:
    """Put :class:`ThisCheckout` first, unless the installed seqbench is this checkout already."""
    installed = importlib.util.find_spec("seqbench.models")
    if installed is None or Path(installed.origin).resolve().parent != ROOT / "models":
        sys.meta_path.insert(0, ThisCheckout())


if __name__ == "__main__":
    use_this_checkout()
    from seqbench.harness.run import main

    main()

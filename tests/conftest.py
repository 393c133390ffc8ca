"""Shared fixtures: the real Hydra config, shrunk for CPU tests; the data root."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# the tests test the checkout they sit in, whichever seqbench is installed (run.py does the same)
_checkout = importlib.util.spec_from_file_location("seqbench_checkout", ROOT / "run.py")
_run = importlib.util.module_from_spec(_checkout)
_checkout.loader.exec_module(_run)
_run.use_this_checkout()

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data"

# tiny models gain nothing from intra-op threads, and lose a lot when cores are shared
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The data root the tests read: $SEQBENCH_DATA_ROOT, else ../shared/data, else ./data."""
    root = Path(os.environ.get("SEQBENCH_DATA_ROOT") or (DEFAULT_DATA if DEFAULT_DATA.is_dir() else ROOT / "data"))
    if not (root / "multi30k" / "train.en").is_file():
        pytest.fail(f"test data not found under {root}; set SEQBENCH_DATA_ROOT to the folder holding multi30k/, "
                    "wikitext-2/ and ptb/")
    return root


@pytest.fixture(scope="session", autouse=True)
def peak_cache(tmp_path_factory) -> None:
    """Measured matmul peaks (harness/peak.py) are cached in a session folder, never in the user's cache."""
    os.environ["SEQBENCH_CACHE_DIR"] = str(tmp_path_factory.mktemp("peak"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_cfg(data_root, cache_dir):
    """Compose the real config with overrides, on CPU, offline, with a session tokenizer cache."""
    def make(*overrides: str):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose("config", overrides=["device=cpu", f"data.root={data_root}", f"data.cache_dir={cache_dir}",
                                                "data.download=false", *overrides])
    return make

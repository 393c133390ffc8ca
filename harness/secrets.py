"""Secrets (API keys, tokens, passwords) kept out of everything a job writes.

Torch-free: ``run.py`` rewrites its command line with it before Hydra starts, and the records,
the wandb run, Hydra's config copies and the job's logs are scrubbed with it (:func:`scrub`, :func:`scrub_files`).

What is a secret is decided by name (:func:`is_secret_name`): every value under a secret-named key, whatever its
type (a string, a number, each element of a list, each leaf of a mapping), and the literal parts of an
interpolation there (the default of ``${oc.env:NAME,default}``). Values in the environment under secret names
are secrets wherever they turn up.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, MutableMapping

import yaml

from .io import _atomic

# Word parts naming a secret: a word that is one of these or ends in one (``apikey``, ``PGPASSWORD``, ``oauth``).
# Plural ``keys``/``tokens``/``sessions`` are not among them: they count or list ordinary things (``n_keys``,
# ``max_tokens``, ``special_tokens``); the plurals that still name secrets are listed.
SECRET_WORDS = ("key", "token", "secret", "secrets", "password", "passwords", "passwd", "pwd", "credential",
                "credentials", "auth", "authorization", "bearer", "cookie", "cookies", "session", "private")
REDACTED = "<redacted>"
ENV_PREFIX = "SEQBENCH_SECRET_"  # command-line secrets moved into the environment (the name marks them as secrets)
MIN_ENV_SECRET = 8  # shorter values of secret-named environment variables are not searched for in text
MIN_SECRET = 4  # shorter values given to secret-named keys are not searched for in text (only redacted by name)
# environment variables whose names match but which hold no secret (where the shell is, the ssh agent's socket,
# the desktop session's bus): their values are paths and addresses that must stay readable in records and logs
NOT_SECRET_ENV = ("PWD", "OLDPWD", "SSH_AUTH_SOCK", "DBUS_SESSION_BUS_ADDRESS", "SESSION_MANAGER")


def name_words(name) -> list[str]:
    """The word parts of a key or variable name, lower case: split at every character that is not a letter or
    digit (``_``, ``-``, ``.``, ...), at camelCase humps (``apiKey``, ``HFToken``) and between letters and digits."""
    s = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", str(name))
    s = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", s)
    s = re.sub(r"([A-Za-z])([0-9])|([0-9])([A-Za-z])", r"\1\3 \2\4", s)
    return [w for w in re.split(r"[^a-z0-9]+", s.lower()) if w]


def is_secret_name(name) -> bool:
    """Whether a key or variable name marks a secret: one of its word parts is, or ends in, a word of
    ``SECRET_WORDS`` (``api_key``, ``HF_TOKEN``, ``apiKey``, ``passwd``, ``credentials``, ``auth``,
    ``session_cookie``, ``PGPASSWORD``). Words that only contain one (``tokenizer``, ``keyboard``), plurals that
    count (``max_tokens``, ``n_keys``) and the words after ``per`` (a rate: ``flops_per_token``) do not."""
    words = name_words(name)
    if "per" in words:
        words = words[:words.index("per")]
    return any(w.endswith(SECRET_WORDS) for w in words)


def literal_parts(text: str) -> list[str]:
    """The literal pieces of a config string, the parts that are not interpolation syntax or names: ``sk-1`` of
    ``${oc.env:NOPE,sk-1}``, ``Bearer`` of ``Bearer ${oc.env:T}``; none of ``${oc.env:HF_TOKEN}`` or ``${a.b}``.
    A string OmegaConf cannot parse is one literal piece."""
    if "${" not in text:
        return [text] if text else []
    from antlr4.tree.Tree import TerminalNodeImpl
    from omegaconf import grammar_parser
    from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser as P

    try:
        tree = grammar_parser.parse(text)
    except Exception:  # noqa: BLE001 - OmegaConf's grammar errors vary; the whole text is then literal
        return [text]
    pieces, current = [], []

    def flush():
        piece = "".join(current).strip().strip("'\"").strip()
        if piece:
            pieces.append(piece)
        current.clear()

    def walk(node):
        if isinstance(node, TerminalNodeImpl):
            if isinstance(node.parentCtx, (P.TextContext, P.PrimitiveContext)):
                current.append(node.getText())
            else:  # quotes, brackets, commas, ${ and }
                flush()
            return
        if isinstance(node, P.InterpolationNodeContext):  # ${a.b}: a name
            flush()
            return
        if isinstance(node, P.InterpolationResolverContext):  # ${name:args}: the arguments are literal, except
            flush()  # the variable or key that oc.env / oc.select name
            resolver = node.resolverName().getText()
            sequence = node.sequence()
            for i, element in enumerate(sequence.element() if sequence else []):
                if not (i == 0 and resolver in ("oc.env", "oc.select")):
                    walk(element)
                    flush()
            return
        if isinstance(node, P.DictKeyContext):  # keys name things
            return
        for child in node.getChildren():
            walk(child)
        if isinstance(node, (P.InterpolationContext, P.QuotedValueContext)):
            flush()

    walk(tree)
    flush()
    return pieces


def _hidden_leaf(x) -> bool:
    """Whether a leaf under a secret name holds something to hide: a non-empty string with a literal part (not an
    interpolation naming where the secret is) or a number; not None, a boolean, or an already redacted value."""
    if isinstance(x, bool) or x is None:
        return False
    if isinstance(x, (int, float)):
        return True
    return isinstance(x, str) and x != REDACTED and bool(literal_parts(x))


def env_secrets() -> set[str]:
    """Values of environment variables whose names mark a secret (not ``NOT_SECRET_ENV``, not a path that exists),
    and the literal parts of those ``run.py`` moved there from the command line: each of 8 characters or more
    (shorter ones are redacted by name only: searched for in any text, they would hit ordinary words and numbers)."""
    found = set()
    for k, v in os.environ.items():
        if k.startswith(ENV_PREFIX):
            found |= {v, *literal_parts(v)}
        elif (is_secret_name(k) and k not in NOT_SECRET_ENV and not k.startswith("XDG_SESSION_")
              and len(v) >= MIN_ENV_SECRET and not os.path.exists(v)):
            found.add(v)
    return {v for v in found if len(v) >= MIN_ENV_SECRET and v != REDACTED}


def scrub(obj):
    """``obj`` with every value under a secret-named key redacted, whatever its type (strings, numbers, each element
    of a list, each leaf of a mapping; None and booleans stay), and any secret from the environment replaced in
    the strings elsewhere."""
    secrets = sorted(env_secrets(), key=len, reverse=True)

    def walk(x, hidden: bool):
        if isinstance(x, dict):
            return {k: walk(v, hidden or is_secret_name(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            items = [walk(v, hidden) for v in x]
            return items if isinstance(x, list) else tuple(items)
        if hidden and _hidden_leaf(x):
            return REDACTED
        if isinstance(x, str):
            for s in secrets:
                x = x.replace(s, REDACTED)
        return x
    return walk(obj, False)


# -- the command line -------------------------------------------------------------------------------------------

def _parse_override(arg: str):
    """Hydra's parse of a ``key=value`` override, or None (options, deletions, anything Hydra cannot parse)."""
    if arg.startswith(("-", "~")) or "=" not in arg:
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(arg)
    except Exception:  # noqa: BLE001 - Hydra reports a malformed override itself
        return None


def _rewrite_override(arg: str, leaf: Callable[[Any, list[str]], Any]) -> str | None:
    """``arg`` with each secret leaf of its value replaced by ``leaf(value, path)`` (``path``: the key parts down to
    it), or None when it has none. A leaf is secret when a key on its path (the override's or one inside a
    mapping value) names a secret; choice sweeps (``a,b``) are rewritten element by element."""
    override = _parse_override(arg)
    if override is None:
        return None
    from hydra.core.override_parser.types import ChoiceSweep, Override, QuotedString

    base = [override.key_or_group, *([override.package] if override.package else [])]
    changed = []

    def walk(x, hidden: bool, path: list[str]):
        if isinstance(x, dict):
            return {k: walk(v, hidden or is_secret_name(k), [*path, str(k)]) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v, hidden, [*path, str(i)]) for i, v in enumerate(x)]
        value = x.text if isinstance(x, QuotedString) else x
        if hidden and _hidden_leaf(value):
            changed.append(path)
            return leaf(value, path)
        return x

    hidden = any(is_secret_name(part) for part in ".".join(base).split("."))
    value = override._value  # the parsed value, quoted strings marked as such (Hydra's own serialiser reads it)
    if isinstance(value, ChoiceSweep):
        if value.tags or value.shuffle:
            return None
        items = [walk(v, hidden, [*base, str(i)]) for i, v in enumerate(value.list)]
        text = ",".join(Override._get_value_element_as_str(v) for v in items)
        text = text if value.simple_form else f"choice({text})"
    elif override.is_sweep_override():
        return None
    else:
        new = walk(value, hidden, base)
        plain = isinstance(new, QuotedString) and new.text.startswith("${oc.env:") and new.text.count("${") == 1
        text = new.text if plain else Override._get_value_element_as_str(new)  # as given before: no quotes
    if not changed:
        return None
    return f"{arg.split('=', 1)[0]}={text}"


def _omegaconf_quoted(text: str) -> str:
    """``text`` as an OmegaConf quoted string (``oc.decode`` gives ``text`` back, its interpolations resolved)."""
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    return "'" + text.replace("'", "\\'") + "'"


def hide_in_environment(args: list[str], environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """The command-line overrides with each secret value moved into an environment variable the config reads.

    Hydra writes the command line into ``.hydra/{overrides,config,hydra}.yaml`` (and a sweep's
    ``multirun.yaml``) before the job starts, and wandb stores it in its run metadata, so a key given as
    ``+logger.api_key=...`` would sit in those files in clear text, even after a crash. Here it becomes
    ``+logger.api_key=${oc.env:SEQBENCH_SECRET_LOGGER_API_KEY}`` with the value in that variable: the job's
    config resolves to the same value, the files hold only the variable's name, and the value, now an
    environment secret, is redacted from records and logs. Jobs started by a launcher inherit the variable.

    Every secret leaf is moved, whatever its shape: a number (``+logger.password=9182``, read back with
    ``oc.decode`` as the same number), each element of a list (``+logger.api_key=[k1,k2]``: one variable each,
    ``..._API_KEY_0``, ``..._API_KEY_1``), each secret-named leaf of a mapping (``+logger.wandb={api_key: k}``:
    ``..._LOGGER_WANDB_API_KEY``), and a string with literal parts around or inside an interpolation
    (``${oc.env:NOPE,k}``: the whole string, resolved by ``oc.decode`` as Hydra would have). An interpolation
    that only names where the secret is (``${oc.env:HF_TOKEN}``) stays as it is.
    """
    used: dict[str, str] = {}

    def leaf(value, path):
        stem = ENV_PREFIX + re.sub(r"[^A-Za-z0-9]+", "_", "_".join(path)).strip("_").upper()
        var, n = stem, 1
        while var in used:  # two paths with one name (a.b_c, a_b.c)
            n += 1
            var = f"{stem}_{n}"
        from hydra.core.override_parser.types import Quote, QuotedString

        if isinstance(value, str) and "${" not in value:
            used[var] = environ[var] = value
            ref = f"${{oc.env:{var}}}"
        else:  # a number, or a string with interpolations: oc.decode gives the same value back
            used[var] = environ[var] = _omegaconf_quoted(value) if isinstance(value, str) else repr(value)
            ref = f"${{oc.decode:${{oc.env:{var}}}}}"
        return QuotedString(text=ref, quote=Quote.single)

    out = []
    for arg in args:
        new = _rewrite_override(arg, leaf)
        out.append(arg if new is None else new)
    return out


def redact_args(args: list[str]) -> list[str]:
    """A command line with secret values replaced by ``<redacted>``: for tools that store it (wandb's metadata)."""
    secrets = sorted(env_secrets(), key=len, reverse=True)
    out = []
    for arg in args:
        arg = _rewrite_override(arg, lambda value, path: REDACTED) or arg
        for s in secrets:
            arg = arg.replace(s, REDACTED)
        out.append(arg)
    return out


# -- files a job leaves -----------------------------------------------------------------------------------------

SCRUB_SUFFIXES = (".yaml", ".yml", ".log", ".json", ".txt")


def _secret_values(text: str) -> set[str]:
    """Secret values in a YAML dump: every leaf under a secret-named key (:func:`scrub`'s rule, numbers included;
    of a string with interpolations, its literal parts) and the secret leaves of ``key=value`` override strings in
    it. An interpolation that only names where the secret is (``${oc.env:HF_TOKEN}``) names no secret."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return set()
    found = set()

    def add(value):
        found.update(literal_parts(value) if isinstance(value, str) else [repr(value)])

    def walk(x, hidden: bool):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, hidden or is_secret_name(k))
        elif isinstance(x, list):
            for v in x:
                walk(v, hidden)
        elif hidden and _hidden_leaf(x):
            add(x)
        elif isinstance(x, str) and "=" in x:  # an override: [+|++]key.path=value
            _rewrite_override(x, lambda value, path: add(value))
    walk(doc, False)
    return {v for v in found if len(v) >= MIN_SECRET and v not in ("???", REDACTED)}


def scrub_files(folder: str | os.PathLike, extra: tuple[str, ...] = (), max_bytes: int = 50 << 20) -> list[Path]:
    """Redact secrets from the text files a job leaves in its output folder; returns the files changed.

    Hydra writes the command-line overrides and the composed config into ``.hydra/overrides.yaml``,
    ``.hydra/config.yaml`` and ``.hydra/hydra.yaml`` (and a sweep's ``multirun.yaml``) before the job
    runs, so a key passed as ``+logger.api_key=...`` would land there verbatim (``run.py`` moves such
    values into the environment first: :func:`hide_in_environment`; this catches the rest,
    such as a key written into a config file). This replaces, in every
    ``.yaml/.yml/.log/.json/.txt`` file under ``folder`` (recursively; checkpoints are left alone),
    each secret-looking value: values of environment variables named like a secret, values given to
    secret-named keys (:func:`is_secret_name`; every leaf, numbers too, and the literal parts of interpolations)
    in any of those YAML files, and ``extra``. YAML files are replaced atomically; logs are rewritten in place
    (a logging handler may still hold them open in append mode).
    """
    files = [p for p in Path(folder).rglob("*") if p.suffix in SCRUB_SUFFIXES and p.is_file()
             and p.stat().st_size <= max_bytes]
    texts = {}
    for p in files:
        try:
            texts[p] = p.read_text(encoding="utf-8", errors="surrogateescape")
        except OSError:
            continue
    secrets = env_secrets() | set(extra)
    for p, text in texts.items():
        if p.suffix in (".yaml", ".yml"):
            secrets |= _secret_values(text)
    secrets = sorted((s for s in secrets if s), key=len, reverse=True)  # longest first: no partial leftovers
    changed = []
    for p, text in texts.items():
        new = text
        for s in secrets:
            new = new.replace(s, REDACTED)
        if new == text:
            continue
        data = new.encode("utf-8", errors="surrogateescape")
        if p.suffix == ".log":
            with open(p, "r+b") as f:
                f.write(data)
                f.truncate()
        else:
            _atomic(p, lambda f, data=data: f.write(data))
        changed.append(p)
    return changed

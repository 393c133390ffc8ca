"""The synthetic suites that compare sequence mixers today: Zoology's multi-query associative recall (MQAR;
Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language Models") and the six MAD
tasks (Poli et al. 2024, "Mechanistic Design and Scaling of Hybrid Architectures"), as probe tasks.

Every task is in the language-model form (``tasks.probes.ProbeTask``): one token sequence per example, the
loss and the accuracy on the answer positions only (target ``IGNORE`` elsewhere), and each answer's distance
back to where the input holds it, grouped in octaves (row d of ``accuracy_by_distance`` covers distances
d .. 2d-1; 0: the answer is not in the input, as in memorization). Examples of one task all have one length.
The data depend only on ``data_seed`` (each split has its own stream); a valid or test example that equals a
training example is drawn again (MAD checks for this leakage; Zoology's vocabulary makes it vanishingly rare).

Token ids follow the papers' layouts (``vocab_size`` counts every id, special ones included):

mqar, n = ``num_kv_pairs``, V = ``vocab_size``: keys 1 .. V/2-1, values V/2 .. V-1 (each distinct within an
example), 0 fills the query region (or a random token, ``random_non_queries``)::

    k_0 v_0 .. k_{n-1} v_{n-1} | 0 .. k_j 0 .. k_i 0 ..         (seq_len tokens)
                                      ^ target v_j at the query of k_j

  the query region has (seq_len - 2n) / 2 even slots; pair j is asked at slot g_j, the slots drawn without
  replacement with P(g) ~ (g + 1) ** (power_a - 1) (a power law: most queries come soon after the pairs).
mad_in_context_recall (multi-query, as MAD's benchmark): seq_len / 2 key-value slots (the last value cut, so
  seq_len - 1 tokens), keys 0 .. K-1, values K .. 2K-1 with K = (V - noise_vocab) / 2, a key keeps its value
  within a sequence; the target at every key already seen is its value; the last slot asks a key seen before.
mad_noisy_in_context_recall: the same with each slot, by chance ``frac_noise``, two tokens of the noise
  vocabulary (the top ``noise_vocab`` ids) instead of a pair.
mad_fuzzy_in_context_recall: keys and values are motifs of 1 .. ``k_motif_size`` / ``v_motif_size`` distinct
  tokens (K = (V - 1) / 2 key tokens, the next K value tokens, V - 1 pads on the left to ``seq_len``); a test
  key always has ``k_motif_size`` tokens (training keys vary: the fuzziness); every token of a repeated key's
  value is a target.
mad_selective_copying: ``num_tokens_to_copy`` tokens (0 .. V-3) at random places among blanks (V - 2), the
  copy marker (V - 1), then as many blanks, at which the tokens are the targets in order.
mad_compression: seq_len - 1 tokens (0 .. V-2), the compression marker (V - 1), then position cues
  V .. V+seq_len-2; the target at cue i is token i. MAD encodes the sequence into the last position's state
  and decodes every token from it and a position embedding (an encoder-decoder bottleneck); this LM form asks
  the same reconstruction from a position cue, after the whole sequence has been read. A recurrent or
  convolutional model must still hold the sequence in its state at the marker; attention can read the tokens
  back directly, so the LM form is easier for attention than MAD's bottleneck.
mad_memorization: seq_len / 2 pairs ``key INSERT`` (keys 0 .. K-1, INSERT = V - 1), the target at INSERT is the
  key's value under one fixed map (values K .. 2K-1, K = (V - 1) / 2, drawn from ``data_seed``): the facts are
  in the training set, never in the input. Training draws keys in shuffled rounds so that every fact is seen
  (MAD draws them independently; at its sizes no fact is left unseen either).
"""
from __future__ import annotations

import itertools
import random

import numpy as np

from .probes import IGNORE, NO_ANSWER, ProbeTask, _sizes

SPLITS = ("train", "valid", "test")
REDRAWS = 20  # rounds of drawing again the valid/test examples that equal a training example


class SuiteTask(ProbeTask):
    """A probe of the Zoology/MAD suites: ``settings`` are the task's generator settings; distances in octaves."""

    def describe(self) -> dict:
        out = super().describe()
        out["suite"] = self.settings.get("suite")
        return out

    def batches(self, split: str, max_tokens: int, epoch: int = 0, shuffle: bool = False, seed: int = 0):
        longest = int(self.data[split]["length"].max())
        if longest > max_tokens:
            raise ValueError(f"task {self.name}: its examples of {longest} tokens exceed trainer.max_tokens="
                             f"{max_tokens}; raise trainer.max_tokens or lower task.seq_len")
        return super().batches(split, max_tokens, epoch, shuffle, seed)


# ---------------------------------------------------------------- helpers

def _arrays(tokens: np.ndarray, target: np.ndarray, distance: np.ndarray) -> dict[str, np.ndarray]:
    """Probe arrays from (N,T) tokens, targets (IGNORE off answers) and raw distances (NO_ANSWER off answers)."""
    answer = target != IGNORE
    octave = np.where(distance > 0, 2 ** np.floor(np.log2(np.maximum(distance, 1))), 0).astype(np.int32)
    return {"tokens": tokens.astype(np.int32), "target": target.astype(np.int32),
            "distance": np.where(answer, octave, NO_ANSWER).astype(np.int32),
            "length": np.full(len(tokens), tokens.shape[1], np.int64)}


def _splits(name: str, draw, sizes: dict[str, int], data_seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Each split drawn by ``draw(rng, n, split)`` from its own stream; valid/test examples that equal a training
    example (same tokens and targets) drawn again."""
    data = {s: draw(np.random.default_rng([data_seed, i]), sizes[s], s) for i, s in enumerate(SPLITS)}
    seen = {_key(data["train"], i) for i in range(sizes["train"])}
    for i, split in enumerate(SPLITS[1:], start=1):
        rng = np.random.default_rng([data_seed, i, 1])
        for _ in range(REDRAWS):
            clash = [j for j in range(sizes[split]) if _key(data[split], j) in seen]
            if not clash:
                break
            fresh = draw(rng, len(clash), split)
            for field in ("tokens", "target", "distance"):
                data[split][field][clash] = fresh[field]
        else:
            raise ValueError(f"task {name}: cannot draw {sizes[split]} {split} examples that are not training "
                             "examples; the space of examples is too small for these sizes: raise task.vocab_size or "
                             f"task.seq_len, or lower task.n_train / task.n_{split}")
    return data


def _key(d: dict[str, np.ndarray], j: int) -> bytes:
    return d["tokens"][j].tobytes() + d["target"][j].tobytes()


def _check(name: str, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"task {name}: {what}")


def _task(name: str, draw, sizes, data_seed: int, vocab: int, settings: dict) -> SuiteTask:
    data = _splits(name, draw, sizes, data_seed)
    return SuiteTask(name, data, vocab, {**settings, "data_seed": data_seed,
                                         "distances": sorted({int(d) for s in data.values()
                                                              for d in np.unique(s["distance"]) if d >= 0})})


def power_law(space: int, power_a: float) -> np.ndarray:
    """Zoology's query-slot distribution over ``space`` slots: P(g) ~ (g + 1) ** (power_a - 1), g = 0 .. space-1."""
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    return p / p.sum()


def _without_replacement(rng, p: np.ndarray, n_rows: int, k: int) -> np.ndarray:
    """(n_rows, k) successive draws without replacement from p (Gumbel top-k: the first draw follows p exactly)."""
    keys = np.log(p)[None, :] + rng.gumbel(size=(n_rows, len(p)))
    return np.argsort(-keys, axis=1, kind="stable")[:, :k]


def _distinct(rng, n_rows: int, low: int, high: int, k: int) -> np.ndarray:
    """(n_rows, k) distinct ids in [low, high) per row: a random ordering of a small range, else draws repeated
    where a row holds a duplicate (an (n_rows, high - low) ordering of Zoology's 4,095 ids would not fit memory)."""
    if high - low <= 512:
        return low + rng.random((n_rows, high - low)).argsort(1)[:, :k]
    ids = rng.integers(low, high, (n_rows, k))
    while True:
        s = np.sort(ids, axis=1)
        dup = (s[:, 1:] == s[:, :-1]).any(axis=1)
        if not dup.any():
            return ids
        ids[dup] = rng.integers(low, high, (int(dup.sum()), k))


# ---------------------------------------------------------------- MQAR (Zoology)

def mqar(root=None, cache_dir=None, *, n_train: int = 100_000, n_valid: int = 500, n_test: int = 3_000,
         vocab_size: int = 8192, seq_len: int = 64, num_kv_pairs: int = 4, power_a: float = 0.01,
         random_non_queries: bool = False, data_seed: int = 1234) -> SuiteTask:
    """Multi-query associative recall: ``num_kv_pairs`` pairs, then every key asked once, at power-law slots."""
    name, n = "mqar", num_kv_pairs
    _check(name, seq_len % 2 == 0 and n >= 1 and 4 * n <= seq_len,
           f"needs an even seq_len and 1 <= 4 * num_kv_pairs <= seq_len (the pairs, then a query slot each); got "
           f"seq_len={seq_len}, num_kv_pairs={n}: raise task.seq_len or lower task.num_kv_pairs")
    _check(name, vocab_size // 2 - 1 >= n and vocab_size > seq_len,
           f"vocab_size={vocab_size} must exceed seq_len={seq_len} and hold num_kv_pairs={n} distinct keys "
           "(ids 1 .. vocab_size/2 - 1): raise task.vocab_size")
    _check(name, power_a > 0, f"power_a={power_a} must be > 0 (1 draws query slots uniformly)")
    space, half = (seq_len - 2 * n) // 2, vocab_size // 2
    p = power_law(space, power_a)

    def draw(rng, rows, split):
        keys, values = _distinct(rng, rows, 1, half, n), _distinct(rng, rows, half, vocab_size, n)
        slots = _without_replacement(rng, p, rows, n)  # (N,n) slot of pair j's query
        tokens = np.zeros((rows, seq_len), np.int64)
        tokens[:, 0 : 2 * n : 2], tokens[:, 1 : 2 * n : 2] = keys, values
        r = np.arange(rows)[:, None]
        query = 2 * n + 2 * slots  # (N,n) positions of the queries
        if random_non_queries:
            filler = rng.integers(0, vocab_size, size=(rows, seq_len - 2 * n))
            tokens[:, 2 * n :] = filler
        tokens[r, query] = keys
        target = np.full_like(tokens, IGNORE)
        target[r, query] = values
        distance = np.full_like(tokens, NO_ANSWER)
        distance[r, query] = query - (2 * np.arange(n) + 1)  # back to the pair's value
        return _arrays(tokens, target, distance)

    settings = {"suite": "zoology", "vocab_size": vocab_size, "seq_len": seq_len, "num_kv_pairs": n,
                "power_a": power_a, "random_non_queries": random_non_queries}
    return _task(name, draw, _sizes(n_train, n_valid, n_test), data_seed, vocab_size, settings)


# ---------------------------------------------------------------- MAD: in-context recall (plain, noisy)

def _recall_draw(name: str, vocab_size: int, seq_len: int, noise_vocab: int, frac_noise: float):
    """A draw function of (noisy) multi-query in-context recall."""
    _check(name, seq_len % 2 == 0 and seq_len >= 4, f"seq_len={seq_len} must be even and >= 4")
    _check(name, 0 <= frac_noise < 1 and (frac_noise == 0 or noise_vocab > 0),
           f"needs 0 <= frac_noise < 1 and noise_vocab > 0 when frac_noise > 0; got frac_noise={frac_noise}, "
           f"noise_vocab={noise_vocab}")
    k = (vocab_size - noise_vocab) // 2  # key ids 0..k-1, value ids k..2k-1, noise ids from vocab_size - noise_vocab
    _check(name, k >= 2, f"vocab_size={vocab_size} minus noise_vocab={noise_vocab} leaves fewer than 4 key and value "
           "ids: raise task.vocab_size")
    slots = seq_len // 2

    def draw(rng, rows, split):
        r = np.arange(rows)
        noise = rng.random((rows, slots)) < frac_noise
        noise[r, rng.integers(0, slots - 1, rows)] = False  # at least one pair before the last slot
        noise[:, -1] = False
        keys = rng.integers(0, k, (rows, slots))
        kv_map = rng.integers(k, 2 * k, (rows, k))  # a key's value within the sequence
        last = np.full((rows, k), -1)  # slot of each key's latest pair
        for s in range(slots - 1):
            pair = ~noise[:, s]
            last[r[pair], keys[pair, s]] = s
        seen = last >= 0  # (N,k): the final slot asks a key seen before, uniformly
        keys[:, -1] = (seen.cumsum(1) > (rng.random(rows) * seen.sum(1))[:, None]).argmax(1)
        tokens = np.stack([keys, kv_map[r[:, None], keys]], axis=2)  # (N,slots,2)
        tokens[noise] = vocab_size - noise_vocab + rng.integers(0, max(noise_vocab, 1), (int(noise.sum()), 2))
        target = np.full((rows, slots), IGNORE)
        distance = np.full((rows, slots), NO_ANSWER)
        last[:] = -1
        for s in range(slots):
            pair = r[~noise[:, s]]
            prev = last[pair, keys[pair, s]]
            again = pair[prev >= 0]
            target[again, s] = tokens[again, s, 1]
            distance[again, s] = 2 * (s - prev[prev >= 0]) - 1  # the key at 2s reads the value at 2 prev + 1
            last[pair, keys[pair, s]] = s
        tokens = tokens.reshape(rows, -1)[:, :-1]  # the last value is only a target
        shifted = np.full((rows, 2 * slots), IGNORE)
        shifted[:, 0::2] = target  # the target of the key's position is its value
        dshift = np.full((rows, 2 * slots), NO_ANSWER)
        dshift[:, 0::2] = distance
        return _arrays(tokens, shifted[:, :-1], dshift[:, :-1])

    return draw


def mad_in_context_recall(root=None, cache_dir=None, *, n_train: int = 12_800, n_valid: int = 256,
                          n_test: int = 1_280, vocab_size: int = 16, seq_len: int = 128,
                          data_seed: int = 1234) -> SuiteTask:
    """MAD in-context recall (multi-query): recall the value of every key seen before."""
    name = "mad_in_context_recall"
    draw = _recall_draw(name, vocab_size, seq_len, 0, 0.0)
    settings = {"suite": "mad", "vocab_size": vocab_size, "seq_len": seq_len}
    return _task(name, draw, _sizes(n_train, n_valid, n_test), data_seed, vocab_size, settings)


def mad_noisy_in_context_recall(root=None, cache_dir=None, *, n_train: int = 12_800, n_valid: int = 256,
                                n_test: int = 1_280, vocab_size: int = 32, seq_len: int = 128,
                                noise_vocab: int = 16, frac_noise: float = 0.2,
                                data_seed: int = 1234) -> SuiteTask:
    """MAD noisy in-context recall: in-context recall with noise-token slots among the pairs."""
    name = "mad_noisy_in_context_recall"
    draw = _recall_draw(name, vocab_size, seq_len, noise_vocab, frac_noise)
    settings = {"suite": "mad", "vocab_size": vocab_size, "seq_len": seq_len, "noise_vocab": noise_vocab,
                "frac_noise": frac_noise}
    return _task(name, draw, _sizes(n_train, n_valid, n_test), data_seed, vocab_size, settings)


# ---------------------------------------------------------------- MAD: fuzzy in-context recall

def mad_fuzzy_in_context_recall(root=None, cache_dir=None, *, n_train: int = 12_800, n_valid: int = 256,
                                n_test: int = 1_280, vocab_size: int = 16, seq_len: int = 128,
                                k_motif_size: int = 3, v_motif_size: int = 3,
                                data_seed: int = 1234) -> SuiteTask:
    """MAD fuzzy in-context recall: keys and values are motifs of several tokens."""
    name = "mad_fuzzy_in_context_recall"
    k = (vocab_size - 1) // 2  # key tokens 0..k-1, value tokens k..2k-1, pad vocab_size - 1
    pad = vocab_size - 1
    _check(name, 1 <= k_motif_size <= k and 1 <= v_motif_size <= k,
           f"motif sizes must be 1 .. {k} (distinct tokens of {k} key / value ids); got k_motif_size={k_motif_size}, "
           f"v_motif_size={v_motif_size}: lower them or raise task.vocab_size")
    longest = k_motif_size + v_motif_size
    _check(name, seq_len >= 3 * longest, f"seq_len={seq_len} must be >= 3 * (k_motif_size + v_motif_size) = "
           f"{3 * longest}: raise task.seq_len")

    tables = {(size, low): list(itertools.permutations(range(low, low + k), size))  # every motif of distinct ids
              for size in range(1, max(k_motif_size, v_motif_size) + 1) for low in (0, k)}

    def motif(rng, size, low):
        table = tables[size, low]
        return table[rng.randrange(len(table))]

    def one(rng, split):  # rng: a random.Random (per example, seeded from the split's stream): many small draws
        test = split != "train"
        size = (lambda: k_motif_size) if test else (lambda: rng.randint(1, k_motif_size))
        kv = {}
        probe_key, probe_val = motif(rng, size(), 0), motif(rng, rng.randint(1, v_motif_size), k)
        kv[probe_key] = probe_val
        body = seq_len + 1 - len(probe_key) - len(probe_val)  # room before the final probe (MAD: seq_len + 1)
        probe_at = rng.randrange(max(1, body - 2 * longest))
        pairs, length, placed = [], 0, False
        while length < body - longest:
            if not placed and (length >= probe_at or length + 2 * longest >= body):  # the probe pair, once
                key, placed = probe_key, True
            else:
                key = motif(rng, size(), 0)
                placed |= key == probe_key
            if key not in kv:
                kv[key] = motif(rng, rng.randint(1, v_motif_size), k)
            pairs.append((key, kv[key]))
            length += len(key) + len(kv[key])
        pairs.append((probe_key, probe_val))
        tokens, target, distance, where = [], [], [], {}
        for key, val in pairs:
            tokens += key
            pos, prev = len(tokens), where.get(key)  # pos: the value's first position
            target += [IGNORE] * (len(key) + len(val))
            distance += [NO_ANSWER] * (len(key) + len(val))
            if prev is not None:  # a repeated key: the target before each value token is that token
                target[pos - 1 : pos - 1 + len(val)] = val
                distance[pos - 1 : pos - 1 + len(val)] = [pos - 1 - prev] * len(val)  # back to the earlier copy
            tokens += val
            where[key] = pos
        tokens, target, distance = tokens[:-1], target[: len(tokens) - 1], distance[: len(tokens) - 1]
        n_pad = seq_len - len(tokens)
        return [pad] * n_pad + tokens, [IGNORE] * n_pad + target, [NO_ANSWER] * n_pad + distance

    def draw(rng, rows, split):
        out = [one(random.Random(int(seed)), split) for seed in rng.integers(0, 2**63, rows)]
        return _arrays(*(np.asarray([o[f] for o in out]) for f in range(3)))

    settings = {"suite": "mad", "vocab_size": vocab_size, "seq_len": seq_len, "k_motif_size": k_motif_size,
                "v_motif_size": v_motif_size}
    return _task(name, draw, _sizes(n_train, n_valid, n_test), data_seed, vocab_size, settings)


# ---------------------------------------------------------------- MAD: selective copying, compression

def mad_selective_copying(root=None, cache_dir=None, *, n_train: int = 12_800, n_valid: int = 256,
                          n_test: int = 1_280, vocab_size: int = 16, seq_len: int = 256,
                          num_tokens_to_copy: int = 16, data_seed: int = 1234) -> SuiteTask:
    """MAD selective copying: copy the tokens scattered among blanks, in order, after the copy marker."""
    name, c = "mad_selective_copying", num_tokens_to_copy
    _check(name, vocab_size >= 3 and c >= 1 and seq_len > 2 * c + 1,
           f"needs vocab_size >= 3, num_tokens_to_copy >= 1 and seq_len > 2 * num_tokens_to_copy + 1; got "
           f"vocab_size={vocab_size}, seq_len={seq_len}, num_tokens_to_copy={c}")
    blank, marker, room = vocab_size - 2, vocab_size - 1, seq_len - c - 1

    def draw(rng, rows, split):
        r = np.arange(rows)[:, None]
        where = np.sort(rng.random((rows, room)).argsort(1)[:, :c], axis=1)  # (N,c) positions of the tokens
        copied = rng.integers(0, vocab_size - 2, (rows, c))
        tokens = np.full((rows, seq_len), blank)
        tokens[r, where] = copied
        tokens[:, room] = marker
        target = np.full_like(tokens, IGNORE)
        target[:, room + 1 :] = copied  # MAD: answer i at the i-th blank after the marker
        distance = np.full_like(tokens, NO_ANSWER)
        distance[:, room + 1 :] = room + 1 + np.arange(c) - where
        return _arrays(tokens, target, distance)

    settings = {"suite": "mad", "vocab_size": vocab_size, "seq_len": seq_len, "num_tokens_to_copy": c}
    return _task(name, draw, _sizes(n_train, n_valid, n_test), data_seed, vocab_size, settings)


def mad_compression(root=None, cache_dir=None, *, n_train: int = 12_800, n_valid: int = 256, n_test: int = 1_280,
                    vocab_size: int = 16, seq_len: int = 32, data_seed: int = 1234) -> SuiteTask:
    """MAD compression, LM form: after the marker, reproduce token i at position cue i (see the module doc)."""
    name, m = "mad_compression", seq_len - 1
    _check(name, vocab_size >= 3 and seq_len >= 2,
           f"needs vocab_size >= 3 and seq_len >= 2; got vocab_size={vocab_size}, seq_len={seq_len}")

    def draw(rng, rows, split):
        body = rng.integers(0, vocab_size - 1, (rows, m))
        cues = np.broadcast_to(vocab_size + np.arange(m), (rows, m))
        tokens = np.concatenate([body, np.full((rows, 1), vocab_size - 1), cues], axis=1)  # (N, 2m + 1)
        target = np.full_like(tokens, IGNORE)
        target[:, m + 1 :] = body
        distance = np.full_like(tokens, NO_ANSWER)
        distance[:, m + 1 :] = m + 1
        return _arrays(tokens, target, distance)

    settings = {"suite": "mad", "vocab_size": vocab_size, "seq_len": seq_len}
    return _task(name, draw, _sizes(n_train, n_valid, n_test), data_seed, vocab_size + m, settings)


# ---------------------------------------------------------------- MAD: memorization

def memorization_map(vocab_size: int, data_seed: int) -> np.ndarray:
    """The fixed fact table: value id of each key id 0 .. K-1 (values K .. 2K-1, K = (vocab_size - 1) // 2)."""
    k = (vocab_size - 1) // 2
    return k + np.random.default_rng([data_seed, 99]).permutation(k)


def mad_memorization(root=None, cache_dir=None, *, n_train: int = 256, n_valid: int = 64, n_test: int = 1_280,
                     vocab_size: int = 256, seq_len: int = 32, data_seed: int = 1234) -> SuiteTask:
    """MAD memorization: the value of each key under a fixed map, learned from the training set."""
    name = "mad_memorization"
    k, pairs = (vocab_size - 1) // 2, seq_len // 2
    _check(name, k >= 2 and seq_len % 2 == 0 and pairs >= 1,
           f"needs vocab_size >= 5 and an even seq_len >= 2; got vocab_size={vocab_size}, seq_len={seq_len}")
    facts = memorization_map(vocab_size, data_seed)

    def draw(rng, rows, split):
        if split == "train":  # shuffled rounds over all keys: every fact is seen
            rounds = -(-rows * pairs // k)
            keys = np.concatenate([rng.permutation(k) for _ in range(rounds)])[: rows * pairs].reshape(rows, pairs)
        else:
            keys = rng.integers(0, k, (rows, pairs))
        tokens = np.stack([keys, np.full_like(keys, vocab_size - 1)], axis=2).reshape(rows, -1)
        target = np.stack([np.full_like(keys, IGNORE), facts[keys]], axis=2).reshape(rows, -1)
        distance = np.where(target == IGNORE, NO_ANSWER, 0)  # 0: not in the input
        return _arrays(tokens, target, distance)

    settings = {"suite": "mad", "vocab_size": vocab_size, "seq_len": seq_len}
    return _task(name, draw, _sizes(n_train, n_valid, n_test), data_seed, vocab_size, settings)


MAD_TASKS = ("mad_in_context_recall", "mad_fuzzy_in_context_recall", "mad_noisy_in_context_recall",
             "mad_selective_copying", "mad_compression", "mad_memorization")

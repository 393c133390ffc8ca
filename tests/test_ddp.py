"""Data parallelism: two CPU processes (gloo) train exactly as one process does with the same global batch."""
from __future__ import annotations

import json
import multiprocessing
import os
import socket

import pytest
import torch

from seqbench.harness import job

# Summation order differs between one process (one batch) and two (two halves, then an all-reduce);
# over 8 Adam steps that moves the per-token loss by < 1e-6 (measured: 4e-7 to 8e-7). A different batch, or a
# gradient share missing or counted twice, moves it by > 1e-2.
LOSS_TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, cfg, out_dir: str, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        results.put((rank, job.run(cfg, out_dir)))
    except BaseException as err:  # reported to the test instead of a silent hang
        results.put((rank, {"status": "crashed", "error": repr(err)}))


def run_ranks(cfg, out_dir, world: int = 2, timeout: float = 240) -> dict[int, dict]:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, cfg, str(out_dir), results)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        out = dict(results.get(timeout=timeout) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return out


def curve(rec):
    return [(r["step"], r["loss"]) for r in rec["curves"]["train"]]


@pytest.mark.parametrize("arch", ["transformer", "lstm", *(pytest.param(a, marks=pytest.mark.slow)
                                                           for a in ("gru", "convs2s", "bytenet"))])
def test_two_processes_match_one_with_the_same_global_batch(make_cfg, tmp_path, arch):
    cfg = make_cfg(f"model={arch}_tiny", "model.dropout=0", "task=copy", "task.n_train=300", "task.n_valid=8",
                   "task.n_test=8", "trainer=smoke", "trainer.max_steps=8", "trainer.eval_every=4",
                   "trainer.label_smoothing=0.1", "eval.splits=[test]")
    single = job.run(cfg, tmp_path / "single")
    ranks = run_ranks(cfg, tmp_path / "ddp")
    assert ranks[1]["status"] == "ok", ranks[1]
    rec = ranks[0]
    assert rec["status"] == "ok", rec.get("error")
    assert rec["environment"]["processes"] == 2
    assert ranks[1]["steps"] == 8
    # the record on disk is rank 0's; rank 1 writes none
    assert json.loads((tmp_path / "ddp" / "record.json").read_text())["environment"]["processes"] == 2
    a, b = curve(single), curve(rec)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 9))
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < LOSS_TOL, (a, b)
    assert rec["costs"]["tokens"] == single["costs"]["tokens"]  # the same global batches
    # the validation losses rank 0 measured (eval_every=4) follow the same weights
    va, vb = ([r["valid_nll"] for r in x["curves"]["valid"]] for x in (single, rec))
    assert len(va) == len(vb) == 2 and max(abs(x - y) for x, y in zip(va, vb)) < LOSS_TOL, (va, vb)
    print(f"{arch}: max train loss difference {max(abs(x - y) for (_, x), (_, y) in zip(a, b)):.2e}, "
          f"valid {max(abs(x - y) for x, y in zip(va, vb)):.2e}")
    assert len(torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)["rng_ranks"]) == 2


def test_a_batch_too_small_to_split_is_a_clear_error():
    from seqbench.tasks.batching import Batch

    b = Batch({"tokens": torch.zeros(1, 4, dtype=torch.long)}, torch.zeros(1, 4, dtype=torch.long), 4,
              ignore_index=-100)
    with pytest.raises(ValueError, match="raise trainer.max_tokens"):
        b.shard(1, 2)
    x = Batch({"tokens": torch.arange(12).view(3, 4)}, torch.arange(12).view(3, 4), 12, ignore_index=-100)
    parts = [x.shard(r, 2) for r in range(2)]
    assert torch.equal(torch.cat([p.target for p in parts]), x.target)
    assert [p.n_tokens for p in parts] == [8, 4]

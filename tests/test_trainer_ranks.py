"""The training loop as one rank of a two-process data-parallel job (harness/train.py's ``Trainer`` with
``dist=Dist(rank, world)``), run inside one process: the collectives of harness/distributed.py are replaced by a
scripted peer that records every call and answers as if the other rank had contributed its part (its stop vote,
its non-finite loss, its window loss, its clock, its RNG state, rank 0's broadcasts), and DistributedDataParallel
by a thin wrapper that records how it was built and forwards to the model.

Each test trains a 2-layer Transformer of width 32 for a few steps; expectations are derived from the settings,
the task's own batches and torch's RNG, not from the loop's output.
"""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from seqbench import models
from seqbench.harness import checkpoint, distributed, train
from seqbench.harness.distributed import Dist
from seqbench.harness.train import Interrupted, Trainer, TrainConfig
from seqbench.models.common import PAD
from tests.test_trainer_loop import epoch_batches
from tests.test_trainer_loop import trainer as tiny_trainer

CPU = torch.device("cpu")
SEED = 1
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")


def rng_of(seed: int) -> dict:
    """An RNG state (checkpoint.rng_state's form) other than this process's: the peer's."""
    return {"torch": torch.Generator().manual_seed(seed).get_state(), "python": random.Random(seed).getstate()}


def seeded_state(seed: int) -> torch.Tensor:
    return torch.Generator().manual_seed(seed).get_state()


class Peer:
    """The other rank of a two-process job as this rank's collectives see it. Its contributions are scripted:
    ``stop_at`` (the step after which it votes to stop), ``bad_at`` (steps where its loss is not finite), ``loss``
    (its part of every logged window's summed loss), ``clock(step)`` (its training seconds), ``rng`` (its RNG
    state) and ``from_rank0`` (what rank 0 broadcasts, for a rank other than 0). Every call lands in ``calls``."""

    def __init__(self, rank=0, stop_at=None, bad_at=(), loss=0.0, clock=lambda step: 0.0, rng=None, from_rank0=()):
        self.rank, self.stop_at, self.bad_at, self.loss, self.clock = rank, stop_at, bad_at, loss, clock
        self.rng, self.from_rank0 = rng or rng_of(99), list(from_rank0)
        self.calls, self.steps, self.votes = [], 0, 0

    def agree(self, values, op="max"):  # harness.distributed.agree: element-wise max or sum
        if op not in ("max", "sum"):
            raise ValueError(f"agree(op={op!r}): op must be 'max' or 'sum'")
        values = list(values)
        self.calls.append(("agree", values, op))
        if op != "max":
            theirs = [self.loss]
        elif len(values) == 2:  # after every step: the stop vote and the clock
            self.steps += 1
            theirs = [float(self.steps == self.stop_at), self.clock(self.steps)]
        else:  # in every step under on_nonfinite=skip: the vote that the loss was not finite
            self.votes += 1
            theirs = [float(self.votes in self.bad_at)]
        combine = max if op == "max" else (lambda a, b: a + b)
        return [float(combine(a, b)) for a, b in zip(values, theirs, strict=True)]

    def broadcast(self, obj, src=0):
        self.calls.append(("broadcast", obj))
        return obj if self.rank == src else self.from_rank0.pop(0)

    def gather(self, obj):
        self.calls.append(("gather", obj))
        return [obj, self.rng] if self.rank == 0 else [self.rng, obj]

    def barrier(self):
        self.calls.append(("barrier",))

    def names(self):
        return [call[0] for call in self.calls]


class Wrapper(torch.nn.Module):
    """Stands in for DistributedDataParallel (same signature's first two parameters): records, then forwards."""

    def __init__(self, module, device_ids=None):
        super().__init__()
        self.module, self.device_ids = module, device_ids

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def fake_collectives(monkeypatch, peer):
    for name in ("agree", "broadcast", "gather", "barrier"):
        monkeypatch.setattr(distributed, name, getattr(peer, name))
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", Wrapper)


def trainer(folder, monkeypatch, peer, world=2, **settings) -> Trainer:
    """Rank ``peer.rank`` of ``world`` processes, with the scripted peer's collectives."""
    fake_collectives(monkeypatch, peer)
    return tiny_trainer(folder, dist=Dist(rank=peer.rank, world=world), **settings)


def same_rng(state: dict, expected: dict) -> bool:
    return torch.equal(state["torch"], expected["torch"]) and state["python"] == expected["python"]


def test_a_rank_trains_through_a_data_parallel_wrapper_of_its_model(tmp_path, monkeypatch):
    """DistributedDataParallel gets the model itself and, on the CPU, device_ids None (a device list is for CUDA)."""
    t = trainer(tmp_path, monkeypatch, Peer())
    assert isinstance(t.forward, Wrapper)
    assert t.forward.module is t.model and t.forward.device_ids is None


def test_carried_state_is_told_the_job_is_data_parallel(tmp_path, monkeypatch):
    """trainer.carry_state does not run on several processes: the carried state is built knowing it is one of two."""
    import numpy as np

    from seqbench.tasks.lm import LMTask

    rng = np.random.default_rng(0)
    lines = {split: [" ".join(f"w{i}" for i in rng.integers(0, 30, 9)) for _ in range(n)]
             for split, n in (("train", 20), ("valid", 4), ("test", 4))}
    task = LMTask("words", lines, bptt=8)
    model = models.build({**models.load_preset("lstm_tiny"), "dropout": 0.0}, task)
    fake_collectives(monkeypatch, Peer())
    cfg = TrainConfig(max_tokens=32, max_steps=2, progress=False, threads=None, precision="fp32", carry_state=True)
    with pytest.raises(ValueError, match="does not run data-parallel"):
        Trainer(model, task, cfg, tmp_path, CPU, seed=SEED, identity={}, dist=Dist(rank=0, world=2))


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_trains_on_its_own_rows_of_every_global_batch(tmp_path, monkeypatch, rank):
    """Batches of 5, 9 and 10 rows split 3+2, 5+4 and 5+5: rank 0 the first ceil(n/2) rows, rank 1 the rest; the
    loss is normalised by the global batch's token count and the progress counts the global tokens."""
    row = {"step": 3, "valid_nll": 2.5}
    peer = Peer(rank=rank, from_rank0=[row])
    t = trainer(tmp_path, monkeypatch, peer, max_steps=3)
    fed = []
    real_step = t.train_step
    t.train_step = lambda batch, n_tokens=None: fed.append((batch, n_tokens)) or real_step(batch, n_tokens)
    p = t.fit()
    whole = epoch_batches(t.task, 0)
    assert [b.target.shape[0] for b in whole] == [5, 9, 10]
    assert len(fed) == 3
    for (part, n_tokens), batch in zip(fed, whole, strict=True):
        first = math.ceil(batch.target.shape[0] / 2)
        rows = slice(0, first) if rank == 0 else slice(first, None)
        assert torch.equal(part.target, batch.target[rows])
        assert part.inputs.keys() == batch.inputs.keys()
        assert all(torch.equal(part.inputs[k], batch.inputs[k][rows]) for k in batch.inputs)
        assert part.n_tokens == int((batch.target[rows] != PAD).sum())
        assert n_tokens == batch.n_tokens
    assert p.step == 3 and p.tokens == sum(b.n_tokens for b in whole)
    if rank == 1:
        assert p.evals == [row] and not (tmp_path / "last.pt").exists()  # rank 0's row; rank 0 writes


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_seeds_differ_by_7919_per_rank(tmp_path, monkeypatch, rank):
    """Training starts from torch.manual_seed(seed + 7919 * rank): rank 0 draws what a single process draws."""
    t = trainer(tmp_path, monkeypatch, Peer(rank=rank, from_rank0=[{"step": 1, "valid_nll": 2.5}]), max_steps=1)
    states = []
    real_step = t.train_step
    t.train_step = lambda batch, n_tokens=None: states.append(torch.get_rng_state()) or real_step(batch, n_tokens)
    t.fit()
    assert torch.equal(states[0], seeded_state(SEED + 7919 * rank))


def test_a_peers_stop_vote_stops_this_rank_at_the_next_step(tmp_path, monkeypatch):
    """This rank is never asked to stop, the peer votes to stop after step 2: both stop there, last.pt written
    collectively; the agreed clock is the later of the two (the peer's 1000 s per step)."""
    peer = Peer(stop_at=2, clock=lambda step: 1000.0 * step)
    t = trainer(tmp_path, monkeypatch, peer, max_steps=5)
    asked = []
    t.should_stop = lambda: asked.append(1) is None and False
    with pytest.raises(Interrupted, match="stop requested at step 2"):
        t.fit()
    assert len(asked) == 2  # once a step, in the vote
    votes = [values for name, *rest in peer.calls if name == "agree" for values, op in [rest] if len(values) == 2]
    assert [v[0] for v in votes] == [0.0, 0.0]
    saved = checkpoint.load(tmp_path / "last.pt", {"test": 1})
    assert saved["progress"]["step"] == 2 and saved["progress"]["train_seconds"] == 2000.0
    assert peer.names()[-2:] == ["gather", "barrier"]


def test_without_stop_votes_a_rank_trains_its_whole_budget(tmp_path, monkeypatch):
    """Nobody votes to stop: every step's agreement sends this rank's vote 0 and the loop runs to max_steps."""
    peer = Peer()
    p = trainer(tmp_path, monkeypatch, peer, max_steps=3).fit()
    votes = [call[1] for call in peer.calls if call[0] == "agree" and len(call[1]) == 2]
    assert p.step == 3 and len(votes) == 3 and all(v[0] == 0.0 for v in votes)


def test_a_peers_non_finite_loss_makes_this_rank_skip_the_step_too(tmp_path, monkeypatch):
    """on_nonfinite=skip: this rank votes 0 (finite) twice; at its second step the peer's loss is not finite, so
    the update is skipped here too (step 2 recorded, weights untouched); the first is an ordinary SGD update."""
    peer = Peer(bad_at=(2,))
    t = trainer(tmp_path, monkeypatch, peer, optimizer="sgd", lr=1.0, on_nonfinite="skip")
    batch = epoch_batches(t.task, 0)[0].shard(0, 2)
    start = [p.detach().clone() for p in t.model.parameters()]
    assert t.train_step(batch, n_tokens=70) is not None
    t.p.step = 1
    moved = [p.detach().clone() for p in t.model.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(start, moved))
    assert t.p.skipped_steps == []
    assert t.train_step(batch, n_tokens=70) is None
    assert t.p.skipped_steps == [2]
    assert all(torch.equal(a, b) for a, b in zip(moved, t.model.parameters()))
    assert peer.calls == [("agree", [0.0], "max"), ("agree", [0.0], "max")]


def test_this_ranks_non_finite_loss_is_its_vote_to_skip(tmp_path, monkeypatch):
    """A NaN loss here votes 1 (not finite); the peer's finite loss does not save the step."""
    real = train.smoothed_cross_entropy
    monkeypatch.setattr(train, "smoothed_cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    peer = Peer()
    t = trainer(tmp_path, monkeypatch, peer, on_nonfinite="skip")
    assert t.train_step(epoch_batches(t.task, 0)[0].shard(0, 2), n_tokens=70) is None
    assert t.p.skipped_steps == [1] and peer.calls == [("agree", [1.0], "max")]


def test_the_logged_window_loss_sums_every_ranks_part(tmp_path, monkeypatch):
    """log_every=2: the window's loss is (this rank's two summed losses + the peer's 100) over the global tokens."""
    peer = Peer(loss=100.0)
    t = trainer(tmp_path, monkeypatch, peer, max_steps=2, log_every=2)
    losses = []
    real_step = t.train_step

    def step(batch, n_tokens=None):
        out = real_step(batch, n_tokens)
        losses.append(out.item())
        return out

    t.train_step = step
    p = t.fit()
    tokens = sum(b.n_tokens for b in epoch_batches(t.task, 0)[:2])
    assert [row["step"] for row in p.log] == [2]
    assert p.log[0]["loss"] == pytest.approx((sum(losses) + 100.0) / tokens, rel=1e-6)
    sums = [call for call in peer.calls if call[0] == "agree" and call[2] != "max"]
    assert len(sums) == 1 and sums[0][1] == [pytest.approx(sum(losses), rel=1e-6)]


def test_a_checkpoint_carries_every_ranks_rng_state_in_rank_order(tmp_path, monkeypatch):
    """A collective save gathers this rank's RNG state, writes [rank 0's, rank 1's] and waits at a barrier; a
    save without a collective (Ctrl-C on one rank) calls neither and holds no per-rank states."""
    peer = Peer()
    t = trainer(tmp_path, monkeypatch, peer)
    torch.manual_seed(5)
    random.seed(5)
    mine = {"torch": torch.get_rng_state(), "python": random.getstate()}
    t.save("best.pt")
    assert peer.names() == ["gather", "barrier"] and same_rng(peer.calls[0][1], mine)
    ranks = checkpoint.load(tmp_path / "best.pt", {"test": 1})["rng_ranks"]
    assert len(ranks) == 2 and same_rng(ranks[0], mine) and same_rng(ranks[1], peer.rng)
    peer.calls.clear()
    t.save("last.pt", collective=False)
    assert peer.calls == []
    assert "rng_ranks" not in checkpoint.load(tmp_path / "last.pt", {"test": 1})


def test_an_evaluation_saves_collectively_on_every_rank(tmp_path, monkeypatch):
    """A non-main rank takes part in best.pt's and last.pt's gathers and barriers but writes nothing."""
    peer = Peer(rank=1, from_rank0=[{"step": 0, "valid_nll": 2.0}])
    t = trainer(tmp_path, monkeypatch, peer)
    t.evaluate_and_save()
    assert peer.names() == ["broadcast", "gather", "barrier", "gather", "barrier"]
    assert same_rng(peer.calls[1][1], {"torch": torch.get_rng_state(), "python": random.getstate()})
    assert list(tmp_path.iterdir()) == []


def write_two_rank_checkpoint(folder, monkeypatch, step):
    """last.pt of rank 0 in a two-process job at ``step``; returns the (rank 0, rank 1) RNG states it holds."""
    writer = Peer(rng=rng_of(11))
    t = trainer(folder, monkeypatch, writer)
    t.p.step = step
    torch.manual_seed(7)
    random.seed(7)
    mine = {"torch": torch.get_rng_state(), "python": random.getstate()}
    t.save("last.pt")
    return mine, writer.rng


def test_a_resumed_rank_restores_its_own_rng_state(tmp_path, monkeypatch):
    """Two ranks saved, two resume: rank 1 continues from rank 1's RNG state, rank 0 from rank 0's."""
    states = write_two_rank_checkpoint(tmp_path, monkeypatch, step=3)
    for rank in (1, 0):
        torch.manual_seed(123)
        t = trainer(tmp_path, monkeypatch, Peer(rank=rank, from_rank0=[False]))
        t.maybe_resume()
        assert t.resumed_from == 3
        assert same_rng({"torch": torch.get_rng_state(), "python": random.getstate()}, states[rank])


@pytest.mark.parametrize("rank", [1, 2])
def test_a_rank_resumed_on_more_processes_reseeds_from_seed_rank_and_step(tmp_path, monkeypatch, rank):
    """Saved by two processes, resumed by three: a rank other than 0 gets seed + 7919 * rank + step (3)."""
    write_two_rank_checkpoint(tmp_path, monkeypatch, step=3)
    t = trainer(tmp_path, monkeypatch, Peer(rank=rank, from_rank0=[False]), world=3)
    t.maybe_resume()
    assert torch.equal(torch.get_rng_state(), seeded_state(SEED + 7919 * rank + 3))


def test_rank_zero_resumed_on_more_processes_restores_the_saved_rng(tmp_path, monkeypatch):
    mine, _ = write_two_rank_checkpoint(tmp_path, monkeypatch, step=3)
    t = trainer(tmp_path, monkeypatch, Peer(rank=0), world=3)
    t.maybe_resume()
    assert same_rng({"torch": torch.get_rng_state(), "python": random.getstate()}, mine)


def test_rank_zero_validates_and_broadcasts_its_row(tmp_path, monkeypatch):
    """Rank 0 evaluates: its row (the teacher-forced loss computed here by hand) is what it broadcasts and keeps."""
    peer = Peer()
    t = trainer(tmp_path, monkeypatch, peer)
    t.p.step = 4
    row = t.validate()
    assert peer.calls == [("broadcast", row)]
    total, count = 0.0, 0
    with torch.no_grad():
        t.model.eval()
        for batch in t.task.batches("valid", 10_000):
            logits = t.model(**batch.inputs)
            total += F.cross_entropy(logits.flatten(0, 1), batch.target.flatten(), ignore_index=PAD,
                                     reduction="sum").item()
            count += batch.n_tokens
    assert row["step"] == 4 and row["valid_nll"] == pytest.approx(total / count, rel=1e-5)


def test_a_rank_other_than_zero_takes_rank_zeros_row_without_evaluating(tmp_path, monkeypatch):
    row = {"step": 4, "valid_nll": 1.25}
    peer = Peer(rank=1, from_rank0=[row])
    t = trainer(tmp_path, monkeypatch, peer)
    monkeypatch.setattr(train, "mean_nll", lambda *a, **k: pytest.fail("rank 1 evaluated"))
    assert t.validate() is row
    assert peer.calls == [("broadcast", None)]


def test_ctrl_c_on_one_rank_saves_last_pt_without_a_collective(tmp_path, monkeypatch):
    """KeyboardInterrupt may reach one rank only: last.pt (at step 1) is written with no gather and no barrier."""
    peer = Peer()
    t = trainer(tmp_path, monkeypatch, peer, max_steps=5)
    real_step = t.train_step
    taken = []

    def step(batch, n_tokens=None):
        if taken:
            raise KeyboardInterrupt
        taken.append(1)
        return real_step(batch, n_tokens)

    t.train_step = step
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert "gather" not in peer.names() and "barrier" not in peer.names()
    saved = checkpoint.load(tmp_path / "last.pt", {"test": 1})
    assert saved["progress"]["step"] == 1 and "rng_ranks" not in saved

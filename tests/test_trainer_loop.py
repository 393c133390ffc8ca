"""The training loop itself (harness/train.py's ``Trainer``), driven directly on a tiny copy task: what one update
does to the weights, when it logs, evaluates, saves and stops, and that a resumed loop continues the same run.

Each test trains a 2-layer Transformer of width 32 for a few steps (well under a second); expectations are
derived from the settings and the task's own batches, not from the loop's output.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from seqbench import models
from seqbench.harness import checkpoint, train
from seqbench.harness.distributed import SINGLE
from seqbench.harness.train import Interrupted, NonFiniteLoss, Trainer, TrainConfig, lr_factor
from seqbench.models.common import PAD
from seqbench.tasks import synthetic

CPU = torch.device("cpu")
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")


def copy_task():
    return synthetic.copy(n_train=24, n_valid=4, n_test=4, n_symbols=8, min_len=3, max_len=6)


def trainer(folder, task=None, dropout=0.0, device=CPU, dist=SINGLE, **settings) -> Trainer:
    """A trainer of a 2-layer Transformer of width 32 on the copy task (seed 1), as process ``dist`` of its job."""
    task = task or copy_task()
    torch.manual_seed(0)
    model = models.build({**models.load_preset("transformer_tiny"), "dropout": dropout}, task)
    cfg = TrainConfig(**{"max_tokens": 64, "max_steps": 5, "warmup_steps": 1, "lr": 1e-3, "log_every": 1,
                         "eval_every": 1000, "progress": False, "threads": None, "valid_bleu": False,
                         "precision": "fp32", **settings})
    return Trainer(model, task, cfg, folder, device, seed=1, identity={"test": 1}, dist=dist)


def fake_clock(monkeypatch, wall=0.0, cpu=0.0, load=0.0) -> None:
    """The loop's clocks advance one second per reading (wall from ``wall``, CPU from ``cpu``); load is ``load``."""
    from types import SimpleNamespace

    from seqbench.harness import utilization

    ticks = {"wall": wall, "cpu": cpu}

    def clock(kind):
        def read():
            ticks[kind] += 1.0
            return ticks[kind]
        return read

    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=clock("wall"), process_time=clock("cpu")))
    monkeypatch.setattr(utilization, "load_average", lambda: load)


def epoch_batches(task, epoch, max_tokens=64):
    return task.batches("train", max_tokens, epoch=epoch, shuffle=True, seed=1)


def test_one_update_is_sgd_on_the_mean_label_smoothed_cross_entropy(tmp_path):
    """SGD with lr 1 (warm-up 1: the full rate at the first step): new weights = old - grad of the batch's mean
    smoothed cross-entropy over its non-padding tokens, computed here with torch's own loss."""
    t = trainer(tmp_path, optimizer="sgd", lr=1.0, label_smoothing=0.2)
    batch = epoch_batches(t.task, 0)[0]
    reference = copy.deepcopy(t.model)
    logits = reference(**batch.inputs)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.target.flatten(), ignore_index=PAD,
                           label_smoothing=0.2)
    loss.backward()
    summed = t.train_step(batch)
    assert summed.item() == pytest.approx(loss.item() * batch.n_tokens, rel=1e-5)  # the summed token loss
    for (name, new), old in zip(t.model.named_parameters(), reference.parameters(), strict=True):
        expected = old.detach() - (old.grad if old.grad is not None else 0)
        torch.testing.assert_close(new.detach(), expected, atol=1e-6, rtol=1e-5, msg=name)
    assert all(p.grad is None for p in t.model.parameters())  # gradients cleared for the next step
    assert t.sched.last_epoch == 1


def test_the_loss_is_a_mean_over_the_global_batch_when_n_tokens_is_given(tmp_path):
    """Data-parallel ranks pass the global batch's token count: the gradient scales by n_tokens / global."""
    a, b = trainer(tmp_path / "a", optimizer="sgd", lr=1.0), trainer(tmp_path / "b", optimizer="sgd", lr=1.0)
    batch = epoch_batches(a.task, 0)[0]
    start = [p.detach().clone() for p in a.model.parameters()]
    a.train_step(batch)
    b.train_step(batch, n_tokens=4 * batch.n_tokens)
    for p0, pa, pb in zip(start, a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(pb.detach() - p0, (pa.detach() - p0) / 4, atol=1e-7, rtol=1e-4)


def test_clipping_bounds_the_update_of_plain_sgd(tmp_path):
    clipped = trainer(tmp_path / "c", optimizer="sgd", lr=1.0, clip_norm=1e-3)
    free = trainer(tmp_path / "f", optimizer="sgd", lr=1.0)
    batch = epoch_batches(clipped.task, 0)[0]
    start = torch.cat([p.detach().flatten().clone() for p in clipped.model.parameters()])

    def moved(t):
        t.train_step(batch)
        return (torch.cat([p.detach().flatten() for p in t.model.parameters()]) - start).norm().item()

    assert moved(clipped) == pytest.approx(1e-3, rel=1e-3)
    assert moved(free) > 0.01


def test_a_finite_loss_under_skip_is_an_ordinary_update(tmp_path):
    t = trainer(tmp_path, on_nonfinite="skip")
    before = [p.detach().clone() for p in t.model.parameters()]
    assert t.train_step(epoch_batches(t.task, 0)[0]) is not None
    assert t.p.skipped_steps == [] and not all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))


def test_a_non_finite_loss_is_skipped_or_fails_as_configured(tmp_path, monkeypatch, caplog):
    real = train.smoothed_cross_entropy
    monkeypatch.setattr(train, "smoothed_cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    t = trainer(tmp_path / "skip", on_nonfinite="skip")
    before = [p.detach().clone() for p in t.model.parameters()]
    t.p.step = 4
    assert t.train_step(epoch_batches(t.task, 0)[0]) is None
    assert t.p.skipped_steps == [5]
    assert all(torch.equal(p0, p) for p0, p in zip(before, t.model.parameters()))
    assert all(p.grad is None for p in t.model.parameters())
    assert [r.getMessage() for r in caplog.records if r.name == "seqbench.train"] == [
        "non-finite loss nan at step 5: update skipped (trainer.on_nonfinite=skip)"]
    with pytest.raises(NonFiniteLoss, match="training loss is nan at step 2 .*trainer.on_nonfinite=skip"):
        trainer(tmp_path / "fail", max_steps=3, log_every=2).fit()


def test_fit_steps_through_the_epochs_logging_and_evaluating_on_schedule(tmp_path):
    t = trainer(tmp_path, max_steps=7, log_every=2, eval_every=3)
    order, epoch_of = [], []  # the batches of steps 1, 2, ... and the epoch each belongs to
    for epoch in range(7):
        order += epoch_batches(t.task, epoch)
        epoch_of += [epoch] * len(epoch_batches(t.task, epoch))
    assert epoch_of[6] >= 1  # the run crosses into a later epoch
    fed = []
    real_step = t.train_step
    t.train_step = lambda batch, n_tokens=None: fed.append(batch.target) or real_step(batch, n_tokens)
    p = t.fit()
    assert len(fed) == 7 and all(torch.equal(a, b.target) for a, b in zip(fed, order))  # the shuffled order
    assert p.step == 7 and (p.epoch, p.batch_in_epoch) == (epoch_of[6], epoch_of[:7].count(epoch_of[6]))
    assert p.tokens == sum(b.n_tokens for b in order[:7])
    assert [row["step"] for row in p.log] == [2, 4, 6]
    assert [row["epoch"] for row in p.log] == [epoch_of[1], epoch_of[3], epoch_of[5]]
    for row in p.log:
        assert row["lr"] == pytest.approx(1e-3 * lr_factor(t.cfg, row["step"]))  # the next step's rate
        assert row["tokens_per_second"] > 0
    assert [row["step"] for row in p.evals] == [3, 6, 7]  # and once at the end
    assert [row["train_seconds"] for row in p.log] == sorted(row["train_seconds"] for row in p.log)
    assert p.best_valid_nll == min(row["valid_nll"] for row in p.evals)
    assert checkpoint.load(tmp_path / "last.pt", {"test": 1})["progress"]["step"] == 7
    best = checkpoint.load(tmp_path / "best.pt", {"test": 1})["progress"]
    assert best["evals"][-1]["valid_nll"] == p.best_valid_nll
    assert p.load_average.keys() == {"start", "end"}


def test_max_epochs_trains_whole_epochs(tmp_path):
    t = trainer(tmp_path, max_steps=None, max_epochs=2)
    n0, n1 = len(epoch_batches(t.task, 0)), len(epoch_batches(t.task, 1))
    p = t.fit()
    assert p.step == n0 + n1
    assert p.tokens == sum(b.n_tokens for b in epoch_batches(t.task, 0) + epoch_batches(t.task, 1))
    assert [row["step"] for row in p.evals] == [n0 + n1]


def test_a_resumed_loop_continues_the_same_run(tmp_path):
    """Dropout on: the RNG state, the batch position and the schedule all come back from last.pt."""
    whole = trainer(tmp_path / "whole", dropout=0.3, max_steps=6, eval_every=2).fit()
    first = trainer(tmp_path / "split", dropout=0.3, max_steps=3, eval_every=2)
    first.fit()
    second = trainer(tmp_path / "split", dropout=0.3, max_steps=6, eval_every=2)
    resumed = second.fit()
    assert second.resumed_from == 3
    assert [row["step"] for row in resumed.log] == list(range(1, 7))
    assert [row["loss"] for row in resumed.log] == pytest.approx([row["loss"] for row in whole.log], rel=1e-6)
    assert [row["step"] for row in resumed.evals] == [2, 3, 4, 6]  # the first run's final evaluation is kept
    fresh = trainer(tmp_path / "split", dropout=0.3, max_steps=6, resume=False)
    fresh.maybe_resume()
    assert fresh.resumed_from is None and fresh.p.step == 0


def test_a_stop_request_saves_the_position_and_raises(tmp_path):
    asked = iter([False, False, True])
    t = trainer(tmp_path, max_steps=9)
    t.should_stop = lambda: next(asked)
    with pytest.raises(Interrupted, match="stop requested at step 2"):
        t.fit()
    assert checkpoint.load(tmp_path / "last.pt", {"test": 1})["progress"]["step"] == 2
    assert not (tmp_path / "best.pt").exists()


def test_best_is_saved_only_on_improvement_and_plateau_shrinks_the_rate(tmp_path, monkeypatch):
    t = trainer(tmp_path, max_steps=9, schedule="plateau", lr=1e-3, lr_shrink=0.5, warmup_steps=1)
    rows = iter([3.0, 2.0, 2.5, 2.0])
    t.validate = lambda: {"step": t.p.step, "valid_nll": next(rows)}
    saved = []
    monkeypatch.setattr(t, "save", lambda name, **kw: saved.append(name))
    for _ in range(4):
        t.sched.step()
        t.evaluate_and_save()
    assert saved == ["best.pt", "last.pt", "best.pt", "last.pt", "last.pt", "last.pt"]
    assert t.p.best_valid_nll == 2.0 and t.p.lr_shrinks == 2  # 2.5 and the tie 2.0 are no improvement
    assert t.opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.25)
    t.validate = lambda: {"step": t.p.step, "valid_nll": float("nan")}
    with pytest.raises(NonFiniteLoss, match="validation loss is nan at step 0"):
        t.evaluate_and_save()


def test_the_loop_logs_what_the_tracker_gets(tmp_path):
    logged = []

    class Tracker:
        def log(self, row, step):
            logged.append((step, row))

    t = trainer(tmp_path, max_steps=2, log_every=1)
    t.tracker = Tracker()
    p = t.fit()
    train_rows = [(s, r) for s, r in logged if "train/loss" in r]
    assert [s for s, _ in train_rows] == [1, 2]
    assert [r["train/loss"] for _, r in train_rows] == [row["loss"] for row in p.log]
    assert all(r["train_seconds"] == row["train_seconds"] for (_, r), row in zip(train_rows, p.log))
    evals = [(s, r) for s, r in logged if "valid_nll" in r]
    assert [s for s, _ in evals] == [2] and "step" not in evals[0][1]


def test_a_deleted_best_checkpoint_is_rewritten_and_the_record_says_what_it_holds(tmp_path, caplog):
    """best.pt deleted between runs: the resumed run forgets the lost best, writes best.pt at its next evaluation
    and says in ``best_recreated`` which evaluation was lost and which one best.pt holds now."""
    first = trainer(tmp_path, max_steps=4, eval_every=2).fit()
    lost = min(first.evals, key=lambda row: row["valid_nll"])
    (tmp_path / "best.pt").unlink()
    with caplog.at_level("WARNING", logger="seqbench.train"):
        t = trainer(tmp_path, max_steps=6, eval_every=2)
        t.maybe_resume()
    assert [r.getMessage() for r in caplog.records if r.name == "seqbench.train"] == [
        f"best.pt is missing (it held step {lost['step']}, valid_nll {lost['valid_nll']:.4g}); the next evaluation "
        "writes a new one"]
    assert t.p.best_recreated == {"lost": {"step": lost["step"], "valid_nll": lost["valid_nll"]}, "from_step": 4,
                                  "evals_before": 2}
    assert t.p.best_valid_nll == float("inf")
    p = t.fit()
    new = p.evals[-1]
    assert new["step"] == 6 and (tmp_path / "best.pt").is_file()
    assert checkpoint.load(tmp_path / "best.pt", {"test": 1})["progress"]["step"] == 6
    assert p.best_recreated == {"lost": {"step": lost["step"], "valid_nll": lost["valid_nll"]}, "from_step": 4,
                                "evals_before": 2, "step": 6, "valid_nll": new["valid_nll"]}
    assert checkpoint.load(tmp_path / "last.pt", {"test": 1})["progress"]["best_recreated"] == p.best_recreated


def test_a_deleted_best_after_training_is_written_from_the_final_model(tmp_path):
    first = trainer(tmp_path, max_steps=4, eval_every=2).fit()
    (tmp_path / "best.pt").unlink()
    p = trainer(tmp_path, max_steps=4, eval_every=2).fit()  # nothing left to train
    final = first.evals[-1]
    assert p.best_recreated["step"] == 4 and p.best_recreated["valid_nll"] == final["valid_nll"]
    assert p.best_valid_nll == final["valid_nll"]
    assert checkpoint.load(tmp_path / "best.pt", {"test": 1})["progress"]["step"] == 4
    untouched = tmp_path / "again"
    trainer(untouched, max_steps=2, eval_every=2).fit()
    again = trainer(untouched, max_steps=2, eval_every=2)
    again.maybe_resume()
    assert again.p.best_recreated is None and again.p.best_valid_nll < float("inf")  # best.pt is there


def test_carried_state_training_starts_each_batch_from_the_state_the_last_one_ended_in(tmp_path):
    """trainer.carry_state: four streams of 8-token slices (32-token batches); step 1 starts from a zero state,
    step 2 from the state step 1 ended in, and the loss of each is the plain cross-entropy from that state."""
    import numpy as np

    from seqbench.tasks.lm import LMTask

    rng = np.random.default_rng(0)
    lines = {split: [" ".join(f"w{i}" for i in rng.integers(0, 30, 9)) for _ in range(n)]
             for split, n in (("train", 60), ("valid", 10), ("test", 10))}
    task = LMTask("words", lines, bptt=8)
    torch.manual_seed(0)
    model = models.build({**models.load_preset("lstm_tiny"), "dropout": 0.0}, task)
    initial = copy.deepcopy(model)
    cfg = TrainConfig(max_tokens=32, max_steps=2, warmup_steps=1, lr=1e-2, log_every=1, eval_every=1000,
                      progress=False, threads=None, precision="fp32", label_smoothing=0.0, carry_state=True)
    t = Trainer(model, task, cfg, tmp_path, CPU, seed=1, identity={})
    stream = torch.from_numpy(task.streams["train"])
    rows = stream[: len(stream) // 4 * 4].view(4, -1)
    x1, y1, x2, y2 = rows[:, 0:8], rows[:, 1:9], rows[:, 8:16], rows[:, 9:17]
    after_one = []
    real_step = t.train_step

    def step(batch, n_tokens=None):
        out = real_step(batch, n_tokens)
        after_one.append(copy.deepcopy(t.model))
        return out

    t.train_step = step
    p = t.fit()
    with torch.no_grad():
        first = F.cross_entropy(initial(x1).flatten(0, 1), y1.flatten()).item()
        _, state = initial(x1, state=initial.init_state(4))
        second = F.cross_entropy(after_one[0](x2, state=state)[0].flatten(0, 1), y2.flatten()).item()
        fresh = F.cross_entropy(after_one[0](x2).flatten(0, 1), y2.flatten()).item()
    assert abs(second - fresh) > 1e-4  # the carried state makes a difference here
    assert [row["loss"] for row in p.log] == pytest.approx([first, second], rel=1e-5)


def test_a_validation_row_holds_the_teacher_forced_loss_and_the_tasks_own_scores(tmp_path, monkeypatch):
    t = trainer(tmp_path, max_tokens=48, valid_bleu=False, precision="bf16")  # neither is EvalContext's default
    t.decoding = {"beam": 1, "max_len_b": 3}
    t.p.step, t.p.tokens, t.p.train_seconds = 3, 77, 1.23456
    seen = []
    monkeypatch.setattr(t.task, "validate", lambda model, ctx: seen.append((model, ctx)) or {"valid_bleu_greedy": 1.5})
    t.model.train()
    row = t.validate()
    assert t.model.training  # back to training afterwards
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer's precision
        t.model.eval()
        for batch in t.task.batches("valid", 10_000):
            logits = t.model(**batch.inputs)
            total += F.cross_entropy(logits.float().flatten(0, 1), batch.target.flatten(), ignore_index=PAD,
                                     reduction="sum").item()
            count += batch.n_tokens
    assert set(row) == {"step", "train_seconds", "tokens", "valid_nll", "valid_ppl", "valid_bleu_greedy"}
    assert (row["step"], row["train_seconds"], row["tokens"], row["valid_bleu_greedy"]) == (3, 1.235, 77, 1.5)
    assert row["valid_nll"] == pytest.approx(total / count, rel=1e-4)
    assert row["valid_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    (model, ctx), = seen
    assert model is t.model
    assert (ctx.device, ctx.max_tokens, ctx.decoding, ctx.precision, ctx.greedy_curve) == (
        CPU, 48, {"beam": 1, "max_len_b": 3}, "bf16", False)


def test_evaluate_and_save_logs_the_row_and_names_a_non_finite_loss(tmp_path, monkeypatch, caplog):
    t = trainer(tmp_path)
    monkeypatch.setattr(t, "save", lambda name, **kw: None)
    t.validate = lambda: {"step": 3, "valid_nll": 2.658861, "tokens": 123456}
    with caplog.at_level("INFO", logger="seqbench.train"):
        t.evaluate_and_save()
    assert [r.getMessage() for r in caplog.records if r.name == "seqbench.train"] == [
        "eval step=3 valid_nll=2.659 tokens=123456"]  # floats to 4 digits, integers whole
    t.validate = lambda: {"step": 4, "valid_nll": float("inf")}
    with pytest.raises(NonFiniteLoss) as caught:
        t.evaluate_and_save()
    assert str(caught.value) == ("validation loss is inf at step 0: the model's weights or outputs are not finite; "
                                 "lower trainer.lr or set trainer.clip_norm (last.pt is the previous evaluation's)")


def test_chunk_nll_scores_every_sequence_in_batch_order_at_the_precision_asked(tmp_path):
    """Per sequence, over several batches; without an autocast it runs in fp32 even inside a caller's bf16
    autocast, and with one it enters that autocast for every batch."""
    from seqbench.harness.evaluate import chunk_nll, mean_nll

    t = trainer(tmp_path)
    batches = t.task.batches("valid", 12)
    assert len(batches) > 1
    expected, tokens = [], []
    with torch.no_grad():
        t.model.eval()
        for batch in batches:
            logits = t.model(**batch.inputs)
            nll = F.cross_entropy(logits.flatten(0, 1), batch.target.flatten(), ignore_index=PAD, reduction="none")
            expected += nll.view_as(batch.target).sum(1).tolist()
            tokens += (batch.target != PAD).sum(1).tolist()
    t.model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sums, counts = chunk_nll(t.model, t.task, "valid", CPU, 12)
    assert not t.model.training and counts == tokens
    assert sums == pytest.approx(expected, rel=1e-5)  # fp32: bf16 would be off by ~1e-2
    entered = []

    class Cast:
        def __enter__(self):
            entered.append(1)

        def __exit__(self, *exc):
            return False

    sums, _ = chunk_nll(t.model, t.task, "valid", CPU, 12, autocast=Cast)
    assert len(entered) == len(batches) and sums == pytest.approx(expected, rel=1e-5)
    nll, n = mean_nll(t.model, t.task, "valid", CPU, 12, autocast=Cast)
    assert n == sum(tokens) and nll == pytest.approx(sum(expected) / sum(tokens), rel=1e-5)
    assert len(entered) == 2 * len(batches)


def test_a_logged_loss_is_the_windows_summed_loss_over_its_tokens(tmp_path):
    t = trainer(tmp_path, max_steps=4, log_every=2)
    losses, tokens = [], []
    real_step = t.train_step

    def step(batch, n_tokens=None):
        out = real_step(batch, n_tokens)
        losses.append(out.item())
        tokens.append(n_tokens)
        return out

    t.train_step = step
    p = t.fit()
    assert [row["loss"] for row in p.log] == pytest.approx([sum(losses[:2]) / sum(tokens[:2]),
                                                            sum(losses[2:]) / sum(tokens[2:])], rel=1e-6)
    assert p.cpu_seconds > 0 and p.train_seconds > 0


def test_a_window_of_skipped_steps_logs_no_loss(tmp_path, monkeypatch):
    real = train.smoothed_cross_entropy
    monkeypatch.setattr(train, "smoothed_cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    t = trainer(tmp_path, max_steps=4, log_every=2, on_nonfinite="skip")
    t.evaluate_and_save = lambda: None  # the weights never change: nothing to evaluate
    p = t.fit()
    assert p.step == 4 and p.skipped_steps == [1, 2, 3, 4] and p.log == [] and p.tokens > 0


def test_adam_hands_over_to_sgd_at_the_switch_step(tmp_path):
    t = trainer(tmp_path, max_steps=3, optimizer="adam_then_sgd", switch_step=2, sgd_lr=0.5, warmup_steps=1)
    seen = []
    real_step = t.train_step

    def step(batch, n_tokens=None):
        seen.append((type(t.opt).__name__, t.opt.param_groups[0]["lr"]))
        return real_step(batch, n_tokens)

    t.train_step = step
    t.fit()
    assert [name for name, _ in seen] == ["Adam", "Adam", "SGD"]
    assert seen[2][1] == pytest.approx(0.5 * lr_factor(t.cfg, 2))  # SGD's rate, on the schedule at step 2


def test_ctrl_c_saves_the_position_and_stops(tmp_path):
    calls = iter([False, KeyboardInterrupt])

    def should_stop():
        answer = next(calls)
        if answer is KeyboardInterrupt:
            raise KeyboardInterrupt
        return answer

    t = trainer(tmp_path, max_steps=9)
    t.should_stop = should_stop
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert checkpoint.load(tmp_path / "last.pt", {"test": 1})["progress"]["step"] == 1


def test_a_log_row_and_its_line(tmp_path, monkeypatch, caplog):
    from seqbench.harness import utilization

    posted, tracked = [], []

    class Bar:
        def set_postfix(self, **kw):
            posted.append(kw)

    class Tracker:
        def log(self, row, step):
            tracked.append((step, row))

    t = trainer(tmp_path, max_steps=10)
    t.tracker = Tracker()
    t.p.step, t.p.epoch, t.p.train_seconds = 5, 1, 1.23456
    lr = t.sched.get_last_lr()[0]
    monkeypatch.setattr(utilization, "gpu_percent", lambda device: 55.0)
    with caplog.at_level("INFO", logger="seqbench.train"):
        t.log(12.0, 4, 2.0, Bar())
    expected = {"step": 5, "epoch": 1, "loss": 3.0, "lr": lr, "tokens_per_second": 2.0, "train_seconds": 1.235,
                "gpu_utilization": 55.0}
    assert t.p.log == [expected]
    assert [r.getMessage() for r in caplog.records if r.name == "seqbench.train"] == [
        f"step 5/10 epoch 1 loss 3.0000 lr {lr:.3g} tok/s 2 ETA {t.eta()}"]
    assert tracked == [(5, {"train/epoch": 1, "train/loss": 3.0, "train/lr": lr, "train/tokens_per_second": 2.0,
                            "train/train_seconds": 1.235, "train/gpu_utilization": 55.0, "train_seconds": 1.235})]
    assert posted == []  # the progress line's text is Trainer.advance's
    monkeypatch.setattr(utilization, "gpu_percent", lambda device: None)
    t.log(3.0, 0, 0.0, Bar())
    assert t.p.log[-1] == {"step": 5, "epoch": 1, "loss": 3.0, "lr": lr, "tokens_per_second": 0.0,
                           "train_seconds": 1.235}
    t.log(6.0, 3, 0.0, Bar())
    assert t.p.log[-1]["loss"] == 2.0 and t.p.log[-1]["tokens_per_second"] == 3 / 1e-9


def test_resuming_removes_temporaries_of_cut_checkpoint_writes_and_restores_the_phase(tmp_path, caplog):
    trainer(tmp_path, max_steps=3, optimizer="adam_then_sgd", switch_step=2, sgd_lr=0.5).fit()
    snapshots = tmp_path / checkpoint.SNAPSHOTS
    snapshots.mkdir(exist_ok=True)
    cut = [tmp_path / ".last.pt.ab12.tmp", snapshots / ".step_4.pt.cd34.tmp"]
    kept = [tmp_path / ".record.json.ef56.tmp", tmp_path / "notes.tmp"]
    for path in cut + kept:
        path.write_bytes(b"x")
    with caplog.at_level("WARNING", logger="seqbench.train"):
        t = trainer(tmp_path, max_steps=5, optimizer="adam_then_sgd", switch_step=2, sgd_lr=0.5)
        t.maybe_resume()
    assert [r.getMessage() for r in caplog.records if r.name == "seqbench.train"] == [
        f"removed {path}, left by an interrupted checkpoint write" for path in cut]
    assert not any(p.exists() for p in cut) and all(p.exists() for p in kept)
    assert t.resumed_from == 3 and type(t.opt).__name__ == "SGD"  # past the switch: the SGD phase
    assert t.opt.param_groups[0]["lr"] == pytest.approx(0.5 * lr_factor(t.cfg, 3))


def test_the_trainer_starts_at_step_zeros_rate_with_the_precision_it_resolves(tmp_path):
    from seqbench.harness.precision import resolve_precision

    t = trainer(tmp_path, warmup_steps=4, lr=1e-3)
    assert t.opt.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor(t.cfg, 0))  # 1/4 of the peak
    assert not t.scaler.is_enabled()
    auto = trainer(tmp_path / "auto", precision="auto")
    assert auto.precision == resolve_precision("auto", CPU) != "auto"
    assert trainer(tmp_path / "half", precision="fp16").scaler.is_enabled()  # fp16 scales its loss


def test_recreate_best_names_the_evaluation_best_pt_holds(tmp_path, monkeypatch):
    def recreate(evals, note, best_valid_nll=float("inf")):
        t = trainer(tmp_path)
        saved = []
        monkeypatch.setattr(t, "save", lambda name, **kw: saved.append((name, t.p.best_valid_nll)))
        t.p.evals, t.p.best_recreated, t.p.best_valid_nll = evals, note, best_valid_nll
        t._recreate_best()
        return t.p.best_recreated, saved

    rows = [{"step": 2, "valid_nll": 1.5}, {"step": 4, "valid_nll": 2.0}, {"step": 6, "valid_nll": 3.0}]
    assert recreate(rows, None) == (None, [])
    lost = {"lost": {"step": 2, "valid_nll": 1.5}, "from_step": 2, "evals_before": 1}
    # evaluations since: best.pt was written by the best of them (step 4); last.pt must say so
    assert recreate(rows, dict(lost), 2.0) == ({**lost, "step": 4, "valid_nll": 2.0}, [("last.pt", 2.0)])
    # none since (training was over): best.pt from the final model, at the last evaluation
    over = {**lost, "evals_before": 3}
    assert recreate(rows, dict(over)) == ({**over, "step": 6, "valid_nll": 3.0},
                                          [("best.pt", 3.0), ("last.pt", 3.0)])
    # already recorded: nothing to write again
    done = {**over, "step": 6, "valid_nll": 3.0}
    assert recreate(rows, dict(done), 3.0) == (done, [])


def test_snapshots_carry_the_folder_model_and_identity(tmp_path, monkeypatch):
    got = []
    monkeypatch.setattr(checkpoint, "save_snapshot", lambda out, **kw: got.append((out, kw)))
    t = trainer(tmp_path, max_steps=2, save_every=2, eval_every=2)
    t.keep_snapshots = None
    t2 = Trainer(t.model, t.task, t.cfg, tmp_path / "k", CPU, seed=1, identity={"test": 1}, keep_snapshots=2)
    t2.p.step = 2
    t2.snapshot()
    (out, kw), = got
    assert out == tmp_path / "k" and kw["model"] is t.model and kw["identity"] == {"test": 1} and kw["keep"] == 2
    assert kw["progress"]["step"] == 2
    t2.p.step = 3
    t2.snapshot()  # not due, and not the final one
    assert len(got) == 1


def test_budget_edges_of_epochs_and_the_plateau_floor(tmp_path):
    t = trainer(tmp_path, max_steps=None, max_epochs=1)
    t.p.batch_in_epoch = 1
    assert not t.budget_left(1)  # one batch of a one-batch epoch: the epoch is done
    plateau = trainer(tmp_path / "p", schedule="plateau", lr=1.0, lr_shrink=0.5, stop_lr=0.25)
    plateau.p.lr_shrinks = 2
    assert plateau.budget_left(5)  # 1.0 * 0.5 ** 2 = 0.25: not below the floor yet
    plateau.p.lr_shrinks = 3
    assert not plateau.budget_left(5)


def test_the_loop_times_each_step_and_snapshots_at_the_end(tmp_path, monkeypatch):
    """A clock that advances one second per reading: each step is timed as 1 s of wall and CPU time, a log
    window of two steps as 2 s; the load average is read at the start and the end; the last step's weights are
    snapshot even when it is not a multiple of save_every."""
    fake_clock(monkeypatch, cpu=100.0, load=1.5)
    t = trainer(tmp_path, max_steps=5, log_every=2, save_every=3)
    p = t.fit()
    assert p.train_seconds == 5.0 and p.cpu_seconds == 5.0
    assert [row["train_seconds"] for row in p.log] == [2.0, 4.0]
    window_tokens = [sum(b.n_tokens for b in epoch_batches(t.task, 0)[:2])]
    assert p.log[0]["tokens_per_second"] == pytest.approx(window_tokens[0] / 2.0)
    assert p.load_average == {"start": 1.5, "end": 1.5}
    assert sorted(q.name for q in (tmp_path / checkpoint.SNAPSHOTS).iterdir()) == ["step_3.pt", "step_5.pt"]


def test_a_non_finite_training_loss_names_the_fixes(tmp_path, monkeypatch):
    real = train.smoothed_cross_entropy
    monkeypatch.setattr(train, "smoothed_cross_entropy", lambda *a, **k: real(*a, **k) * float("inf"))
    with pytest.raises(NonFiniteLoss) as caught:
        trainer(tmp_path, max_steps=3, log_every=1).fit()
    assert str(caught.value) == ("training loss is inf at step 1 (window ending here); lower trainer.lr, set "
                                 "trainer.clip_norm, or trainer.on_nonfinite=skip")

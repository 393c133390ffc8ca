"""The PyTorch examples' word language model, trained and evaluated as its ``main.py`` does, for a time budget.

The README sets seqbench's LSTM language model beside pytorch/examples ``word_language_model`` at the same size
and training budget, run on the same machine. This runs that peer: its model (``baselines.WordLanguageModel``),
its batches (``batchify``: the training split in 20 parallel streams, valid and test in 10; ``get_batch``:
``bptt`` 35), its step (the hidden state carried and detached, gradient norm clipped to 0.25, plain SGD at
lr 20, divided by 4 after an epoch that does not lower the validation loss) and its evaluation (the state
carried across each split's chunks; the model with the lowest validation loss is tested). The token streams
are seqbench's (``tasks.build``): the example's ``data.py`` makes the same ones (each line's words, then
``<eos>``; the vocabulary in order of first occurrence). Only the training time counts against the budget;
a budget that ends mid-epoch evaluates the model where it stopped too.

    python -m seqbench.harness.bench.word_lm --seconds 720 --threads 2 --out results/word_lm.json

seqbench at the same size, batch, context and evaluation protocol (its own optimizer and schedule):

    python run.py model=lstm model.d_model=200 model.n_layers=2 model.dropout=0.2 model.tie_output=false \\
        task=wikitext2 task.bptt=35 trainer.max_tokens=700 trainer.carry_state=true trainer.max_seconds=720 \\
        eval.lm_protocol=carry eval.lm_batch_size=10
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from seqbench import tasks

from .baselines import WordLanguageModel


def batchify(stream: np.ndarray, bsz: int) -> torch.Tensor:
    """The stream as ``bsz`` columns (T, B), the last ``len % bsz`` tokens dropped (the example's ``batchify``)."""
    data = torch.from_numpy(stream.astype(np.int64))
    nbatch = data.size(0) // bsz
    return data.narrow(0, 0, nbatch * bsz).view(bsz, -1).t().contiguous()


def get_batch(source: torch.Tensor, i: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``i..i+bptt`` as input (T, B) and the next tokens as flat targets (T*B,)."""
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len].reshape(-1)


def detached(hidden):
    """The example's ``repackage_hidden``: the state's values without the graph that made them."""
    return tuple(h.detach() for h in hidden)


@torch.no_grad()
def evaluate(model: WordLanguageModel, source: torch.Tensor, bptt: int) -> float:
    """Mean NLL per scored token, the state carried from chunk to chunk (the example's ``evaluate``)."""
    model.eval()
    total, hidden = 0.0, model.init_hidden(source.size(1))
    for i in range(0, source.size(0) - 1, bptt):
        data, targets = get_batch(source, i, bptt)
        output, hidden = model(data, hidden)
        total += len(data) * F.nll_loss(output, targets).item()
    return total / (len(source) - 1)


def train_epoch(model: WordLanguageModel, source: torch.Tensor, bptt: int, lr: float, clip: float,
                seconds_left: float) -> tuple[float, int, bool]:
    """One epoch of the example's ``train`` until ``seconds_left`` run out: (seconds, tokens, epoch finished)."""
    model.train()
    hidden, spent, tokens = model.init_hidden(source.size(1)), 0.0, 0
    for i in range(0, source.size(0) - 1, bptt):
        if spent >= seconds_left:
            return spent, tokens, False
        start = time.perf_counter()
        data, targets = get_batch(source, i, bptt)
        model.zero_grad()
        output, hidden = model(data, detached(hidden))
        F.nll_loss(output, targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
        spent += time.perf_counter() - start
        tokens += targets.numel()
    return spent, tokens, True


def run(streams: dict[str, np.ndarray], vocab: int, args: argparse.Namespace) -> dict:
    """Train for ``args.seconds`` (or ``args.epochs``), then test the model with the lowest validation loss."""
    torch.manual_seed(args.seed)
    model = WordLanguageModel(vocab, args.emsize, args.nhid, args.nlayers, args.dropout)
    train = batchify(streams["train"], args.batch_size)
    valid, test = (batchify(streams[s], args.eval_batch_size) for s in ("valid", "test"))
    lr, seconds, tokens, epochs, best, curve = args.lr, 0.0, 0, 0, None, []
    while seconds < args.seconds and epochs < args.epochs:
        spent, n, finished = train_epoch(model, train, args.bptt, lr, args.clip, args.seconds - seconds)
        seconds, tokens, epochs = seconds + spent, tokens + n, epochs + finished
        val = evaluate(model, valid, args.bptt)
        curve.append({"epochs": epochs, "train_seconds": seconds, "lr": lr, "valid_nll": val})
        if best is None or val < best[0]:
            best = (val, copy.deepcopy(model.state_dict()))
        elif finished:
            lr /= 4.0
    model.load_state_dict(best[1])
    test_nll = evaluate(model, test, args.bptt)
    return {"model": "pytorch/examples word_language_model (LSTM)", "settings": vars(args),
            "parameters": sum(p.numel() for p in model.parameters()), "protocol": "carry",
            "train_seconds": seconds, "train_tokens": tokens, "epochs_finished": epochs, "curve": curve,
            "valid_nll": best[0], "valid_perplexity": math.exp(best[0]),
            "test_nll": test_nll, "test_perplexity": math.exp(test_nll)}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=os.environ.get("SEQBENCH_DATA_ROOT", "data"))
    p.add_argument("--task", default="wikitext2", help="a word-level LM task: wikitext2, ptb, wikitext103")
    p.add_argument("--seconds", type=float, default=720.0, help="training time budget (evaluation excluded)")
    p.add_argument("--epochs", type=int, default=40, help="the example's default; the budget usually ends first")
    p.add_argument("--emsize", type=int, default=200)
    p.add_argument("--nhid", type=int, default=200)
    p.add_argument("--nlayers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--lr", type=float, default=20.0)
    p.add_argument("--clip", type=float, default=0.25)
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--eval-batch-size", type=int, default=10)
    p.add_argument("--seed", type=int, default=1111)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    task = tasks.build({"name": args.task, "bptt": args.bptt}, {"root": args.data_root, "download": False})
    result = run(task.streams, task.vocab_size, args)
    text = json.dumps(result, indent=1, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return result


if __name__ == "__main__":
    main()

"""Recurrent encoder-decoders with attention and recurrent language models, LSTM or GRU.

Luong et al. (2015, "Effective Approaches to Attention-based Neural Machine
Translation", arXiv:1508.04025): stacked RNN encoder and decoder, "general"
attention on the top decoder state, attentional vector tanh(W_c [c; h]) and
optional input feeding. ``attention="bahdanau"`` selects the additive score of
Bahdanau et al. (2015, arXiv:1409.0473), queried with the previous decoder state
and its context fed into the first decoder layer. ``residual_from`` and a first
bidirectional layer give the GNMT encoder of Wu et al. (2016, arXiv:1609.08144).
The GRU is that of Cho et al. (2014, arXiv:1406.1078).

Every layer is its own one-layer ``nn.LSTM``/``nn.GRU`` (one cuDNN call per
layer) so residual connections, per-layer dropout and the position-mixing blocks
fall out naturally. A bidirectional layer has ``d_model // 2`` units per
direction, so every layer outputs ``d_model`` features. Padding never enters the
encoder's recurrence (``RecurrentLayer.run`` with ``lengths``): a CPU LSTM runs
each group of equal-length sources as one fused call, anything else a packed
sequence. Parameters keep PyTorch's
default initialization (N(0,1) embeddings; Luong's uniform(-0.1,0.1) learns the
tied output layer too slowly for the tiny copy test).
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .common import Dropout, LanguageModel, Seq2Seq, padding_mask


@functools.cache
def cpu_bf16_lstm_runs() -> bool:
    """Whether this CPU's oneDNN builds a bf16 LSTM (it needs AVX-512; without it the call fails).

    Under CPU bf16 autocast torch runs ``nn.LSTM`` in bf16 (``nn.GRU`` stays fp32). On CPUs without AVX-512
    oneDNN cannot create that primitive ("could not create a primitive descriptor for the LSTM forward
    propagation primitive"), so a forced ``trainer.precision=bf16`` would crash every LSTM there; such
    CPUs have no native bf16 arithmetic either, so the LSTM layers run in fp32 instead (the rest of the
    model stays under autocast).
    """
    lstm, x = nn.LSTM(2, 2, batch_first=True), torch.zeros(1, 1, 2)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            lstm(x)
    except RuntimeError:
        return False
    return True


def _fp32_lstm_needed(rnn: nn.Module, x: torch.Tensor) -> bool:
    return (isinstance(rnn, nn.LSTM) and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and not cpu_bf16_lstm_runs())


class RecurrentLayer(nn.Module):
    """Input dropout, one recurrent layer, optional residual; ``forward`` is (B,T,D_in) -> (B,T,H)."""

    def __init__(self, cell: type[nn.RNNBase], d_in: int, d_out: int, dropout: float,
                 bidirectional: bool = False, residual: bool = False):
        super().__init__()
        if residual and d_in != d_out:
            raise ValueError(f"a residual layer needs equal input and output sizes, got {d_in} and {d_out}")
        dirs = 2 if bidirectional else 1
        self.rnn = cell(d_in, d_out // dirs, batch_first=True, bidirectional=bidirectional)
        self.drop, self.residual = Dropout(dropout), residual

    def run(self, x: torch.Tensor, state: tuple[torch.Tensor, ...] | None = None,
            lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """x (B,T,D_in); state: (h,) or (h, c), each (B,H) -> (y (B,T,H), final state, each (B,H)).

        ``lengths`` (B,), on the CPU, marks each row's valid prefix (padding at the end): the recurrence then
        sees only the valid steps, in both directions, and the final state is that of each row's last valid
        step (first, for the reverse direction), as ``nn.LSTM`` gives on a packed sequence; ``y`` is zero at
        padding (before the residual). It needs ``state=None`` (the encoder starts from zeros).
        """
        if lengths is not None and state is not None:
            raise ValueError("RecurrentLayer.run: lengths (the encoder's valid prefixes) take no initial state; "
                             "pass state=None")
        hx = None if state is None else tuple(s[None].contiguous() for s in state)  # each (1,B,H)
        if hx is not None and not isinstance(self.rnn, nn.LSTM):
            hx = hx[0]
        dropped = self.drop(x)
        precision = contextlib.nullcontext()
        if _fp32_lstm_needed(self.rnn, dropped):  # see cpu_bf16_lstm_runs
            dropped, hx = dropped.float(), None if hx is None else tuple(h.float() for h in hx)
            precision = torch.autocast("cpu", enabled=False)
        with precision:
            y, hn = self.rnn(dropped, hx) if lengths is None else self._run_valid(dropped, lengths)
        hn = hn if isinstance(hn, tuple) else (hn,)
        final = tuple(h.transpose(0, 1).reshape(h.size(1), -1) for h in hn)  # (dirs,B,H/dirs) -> (B,H)
        if self.residual:
            y = y + x
        return y, final

    def _run_valid(self, x: torch.Tensor, lengths: torch.Tensor):
        """The recurrence over each row's valid prefix -> (y (B,T,H), zero at padding; hn as ``self.rnn`` gives).

        On a ``PackedSequence`` torch's CPU kernels step through time themselves, slicing the precomputed input
        gates of all packed positions at every step; the backward of each slice zero-fills a gradient of the
        whole gate tensor, so that backward costs (steps x tokens x gates) on top of the arithmetic. A CPU LSTM
        on unpacked input runs as one fused oneDNN layer instead, so it runs each group of equal-length rows
        that way (:meth:`_run_by_length`). The GRU has no fused CPU layer: per group it would step through
        time once per distinct length, up to twice the packed cost on a batch of many lengths, so it stays
        packed, as does any recurrence on an accelerator, where cuDNN consumes the packed sequence in one call.
        """
        if x.device.type == "cpu" and isinstance(self.rnn, nn.LSTM):
            return self._run_by_length(x, lengths)
        y, hn = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        return pad_packed_sequence(y, batch_first=True, total_length=x.size(1))[0], hn

    def _run_by_length(self, x: torch.Tensor, lengths: torch.Tensor):
        """One fused call per distinct length, on that group's rows cut to their length.

        The same arithmetic per row as the packed recurrence, and padding never enters it. Rows are sorted by
        length once (one gather forward and one back), so each group is a contiguous slice; a batch of the
        length-bucketed batcher holds a few distinct source lengths (Multi30k: median 3, at most 24).
        """
        T = x.size(1)
        order = torch.argsort(lengths, descending=True, stable=True)
        group_lengths, counts = torch.unique_consecutive(lengths[order], return_counts=True)
        if len(group_lengths) == 1 and int(group_lengths[0]) == T:  # no padding: one call, no reordering
            return self.rnn(x)
        order = order.to(x.device)
        ys, hns = [], []
        for rows, n in zip(x.index_select(0, order).split(counts.tolist()), group_lengths.tolist()):
            y, hn = self.rnn(rows[:, :n])
            ys.append(nn.functional.pad(y, (0, 0, 0, T - n)))
            hns.append(hn)
        restore = torch.empty_like(order)
        restore[order] = torch.arange(order.numel(), device=order.device)
        return (torch.cat(ys).index_select(0, restore),
                tuple(torch.cat(parts, dim=1).index_select(1, restore) for parts in zip(*hns)))

    def forward(self, x):
        return self.run(x)[0]


class Attention(nn.Module):
    """Luong "general" score q^T W k, or Bahdanau's additive score v^T tanh(W_q q + W_k k)."""

    def __init__(self, d_model: int, kind: str):
        super().__init__()
        if kind not in ("luong", "bahdanau"):
            raise ValueError(f"unknown attention {kind!r}; expected 'luong' or 'bahdanau'")
        self.kind = kind
        self.wk = nn.Linear(d_model, d_model, bias=kind == "bahdanau")
        if kind == "bahdanau":
            self.wq, self.v = nn.Linear(d_model, d_model, bias=False), nn.Linear(d_model, 1, bias=False)

    def keys(self, memory: torch.Tensor) -> torch.Tensor:
        """Projected memory (B,S,D), computed once per source."""
        return self.wk(memory)

    def forward(self, q, keys, memory, pad_mask):
        """q (B,T,D) against keys/memory (B,S,D), pad_mask (B,S) True at padding -> context (B,T,D)."""
        if self.kind == "luong":
            scores = q @ keys.transpose(1, 2)  # (B,T,S)
        else:
            scores = self.v(torch.tanh(self.wq(q)[:, :, None] + keys[:, None]))[..., 0]  # (B,T,S)
        weights = scores.masked_fill(pad_mask[:, None, :], float("-inf")).softmax(-1)
        return weights @ memory


def residual_layers(n_layers: int, residual_from: int | None) -> list[bool]:
    """Which of ``n_layers`` layers are residual: the 1-based ``residual_from``-th and above."""
    if residual_from is not None and residual_from < 2:
        raise ValueError(f"residual_from={residual_from}: the first layer cannot be residual; use >= 2 or None")
    return [residual_from is not None and i + 1 >= residual_from for i in range(n_layers)]


class RNNSeq2Seq(Seq2Seq):
    """Stacked RNN encoder-decoder with attention; subclasses set ``cell``."""

    cell: type[nn.RNNBase]

    def __init__(self, src_vocab: int, tgt_vocab: int, pad_id: int, *, d_model: int = 512, n_layers: int = 2,
                 n_decoder_layers: int | None = None, dropout: float = 0.2, bidirectional: bool = True,
                 n_bidirectional_layers: int | None = None, attention: str = "luong", input_feed: bool = False,
                 residual_from: int | None = None, share_embeddings: bool = True, tie_output: bool = True):
        """``n_bidirectional_layers``: how many leading encoder layers are bidirectional (None: all);
        ``residual_from``: 1-based layer from which layers add their input to their output (None: none)."""
        super().__init__()
        n_bi = (n_layers if n_bidirectional_layers is None else n_bidirectional_layers) if bidirectional else 0
        if n_bi and d_model % 2:
            raise ValueError(f"bidirectional layers split d_model={d_model} between directions; use an even d_model")
        n_dec = n_decoder_layers or n_layers
        enc_res, dec_res = residual_layers(n_layers, residual_from), residual_layers(n_dec, residual_from)
        self.pad_id, self.input_feed, self.attention = pad_id, input_feed, attention
        self.state_names = ("h", "c") if self.cell is nn.LSTM else ("h",)
        self.src_embed = nn.Embedding(src_vocab, d_model, padding_idx=pad_id)
        share = share_embeddings and src_vocab == tgt_vocab
        self.tgt_embed = self.src_embed if share else nn.Embedding(tgt_vocab, d_model, padding_idx=pad_id)
        self.encoder = nn.ModuleList(RecurrentLayer(self.cell, d_model, d_model, dropout, i < n_bi, enc_res[i])
                                     for i in range(n_layers))
        # first decoder input: embedding [+ Bahdanau context] [+ previous attentional vector]
        d_in = d_model * (1 + (attention == "bahdanau") + input_feed)
        self.decoder = nn.ModuleList(RecurrentLayer(self.cell, d_in if i == 0 else d_model, d_model, dropout,
                                                    residual=dec_res[i]) for i in range(n_dec))
        self.bridge = nn.ModuleList(nn.Linear(d_model, d_model) for _ in self.state_names)
        # decoder layer i starts from encoder layer i's final state (the top one when the decoder is deeper)
        self.bridge_from = [min(i, n_layers - 1) for i in range(n_dec)]
        self.attn = Attention(d_model, attention)
        self.combine = nn.Linear(2 * d_model, d_model, bias=False)  # W_c of Luong et al., eq. 5
        self.drop = Dropout(dropout)
        self.proj = nn.Linear(d_model, tgt_vocab, bias=False)
        if tie_output:
            self.proj.weight = self.tgt_embed.weight

    def encode(self, src, src_lengths):
        """src (B,S), src_lengths (B,) -> decoder state (every tensor batch-first)."""
        lengths, pad = src_lengths.cpu(), padding_mask(src_lengths, src.size(1))
        x, finals = self.src_embed(src), []
        for layer in self.encoder:
            x, final = layer.run(x, lengths=lengths)
            finals.append(final)
        memory = x.masked_fill(pad[..., None], 0.0)  # (B,S,D); residual layers carry the padding's embedding
        state = {"src_memory": memory, "src_keys": self.attn.keys(memory), "src_pad": pad}
        for k, (name, bridge) in enumerate(zip(self.state_names, self.bridge)):
            enc = torch.stack([finals[j][k] for j in self.bridge_from], dim=1)  # (B,L_dec,D)
            state[name] = torch.tanh(bridge(enc))
        if self.input_feed:
            state["feed"] = memory.new_zeros(memory.size(0), memory.size(2))
        return state

    def attend(self, q, state):
        return self.attn(q, state["src_keys"], state["src_memory"], state["src_pad"])

    def attentional(self, context, h):
        """tanh(W_c [c; h]) (B,T,D), the attentional vector fed to the output layer."""
        return torch.tanh(self.combine(torch.cat([context, h], dim=-1)))

    def step(self, emb, state):
        """One decoder step: emb (B,D) -> (attentional vector (B,D), new state)."""
        parts = [emb]
        if self.attention == "bahdanau":  # context queried with the previous top state
            context = self.attend(state["h"][:, -1:], state)  # (B,1,D)
            parts.append(context[:, 0])
        if self.input_feed:
            parts.append(state["feed"])
        x = torch.cat(parts, dim=-1)[:, None]  # (B,1,D_in)
        finals = []
        for i, layer in enumerate(self.decoder):
            x, final = layer.run(x, tuple(state[n][:, i] for n in self.state_names))
            finals.append(final)
        if self.attention == "luong":
            context = self.attend(x, state)
        out = self.attentional(context, x)[:, 0]  # (B,D)
        state = {**state, **{n: torch.stack(s, dim=1) for n, s in zip(self.state_names, zip(*finals))}}
        if self.input_feed:
            state["feed"] = out
        return out, state

    def forward(self, src, src_lengths, tgt_in):
        """src (B,S), src_lengths (B,), tgt_in (B,T) -> logits (B,T,V)."""
        state = self.encode(src, src_lengths)
        y = self.tgt_embed(tgt_in)  # (B,T,D)
        if self.attention == "luong" and not self.input_feed:
            # fast path: the decoder RNN does not depend on attention, so run it over all of
            # tgt_in at once (one cuDNN call per layer) and attend afterwards
            for i, layer in enumerate(self.decoder):
                y, _ = layer.run(y, tuple(state[n][:, i] for n in self.state_names))
            out = self.attentional(self.attend(y, state), y)
        else:
            outs = []
            for t in range(y.size(1)):
                o, state = self.step(y[:, t], state)
                outs.append(o)
            out = torch.stack(outs, dim=1)  # (B,T,D)
        return self.proj(self.drop(out))

    def decode_step(self, prev, state, step):
        """prev (B,) tokens at position ``step`` -> logits (B,V) for that position."""
        out, state = self.step(self.tgt_embed(prev), state)
        return self.proj(self.drop(out)), state


class RNNLM(LanguageModel):
    """Stacked RNN language model; takes the encoder-decoder's hyperparameters and ignores encoder-only ones."""

    cell: type[nn.RNNBase]

    def __init__(self, vocab: int, *, d_model: int = 512, n_layers: int = 2, n_decoder_layers: int | None = None,
                 dropout: float = 0.2, bidirectional: bool = True, n_bidirectional_layers: int | None = None,
                 attention: str = "luong", input_feed: bool = False, residual_from: int | None = None,
                 share_embeddings: bool = True, tie_output: bool = True):
        super().__init__()
        self.tok_embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(RecurrentLayer(self.cell, d_model, d_model, dropout, residual=res)
                                    for res in residual_layers(n_decoder_layers or n_layers, residual_from))
        self.drop = Dropout(dropout)
        self.proj = nn.Linear(d_model, vocab, bias=False)
        if tie_output:
            self.proj.weight = self.tok_embed.weight

    def embed(self, tokens):
        return self.tok_embed(tokens)  # (B,T,D); dropout is applied at each block's input

    def head(self, x):
        return self.proj(self.drop(x))

    def mixing_blocks(self):
        return list(self.blocks)

    def init_state(self, batch_size: int, device=None) -> tuple[torch.Tensor, ...]:
        """The zero state of ``batch_size`` streams: (h,) or (h, c), each (B, n_layers, D), as the first chunk sees."""
        d = self.tok_embed.embedding_dim
        n = 2 if self.cell is nn.LSTM else 1
        return tuple(torch.zeros(batch_size, len(self.blocks), d, device=device) for _ in range(n))

    def forward(self, tokens, state: tuple[torch.Tensor, ...] | None = None):
        """tokens (B,T) -> logits (B,T,V); given ``state`` (:meth:`init_state`, or the state a previous call
        returned), -> (logits, final state), so that the next chunk of each stream continues from it (carried)."""
        if state is None:
            return super().forward(tokens)
        x, finals = self.embed(tokens), []
        for i, block in enumerate(self.blocks):
            x, final = block.run(x, tuple(s[:, i] for s in state))
            finals.append(final)
        return self.head(x), tuple(torch.stack(s, dim=1) for s in zip(*finals))


class LSTMSeq2Seq(RNNSeq2Seq):
    cell = nn.LSTM


class GRUSeq2Seq(RNNSeq2Seq):
    cell = nn.GRU


class LSTMLM(RNNLM):
    cell = nn.LSTM


class GRULM(RNNLM):
    cell = nn.GRU

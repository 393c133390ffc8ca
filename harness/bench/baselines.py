"""Plain-PyTorch baselines for the training benchmark, one per seqbench architecture.

Each is the straightforward way to write the same network with stock ``torch.nn`` modules
(``nn.Transformer``, multi-layer ``nn.LSTM``/``nn.GRU``, ``nn.Conv1d`` + GLU, ``nn.Dropout``),
sized from the same preset, so that ``harness.bench`` compares implementations, not
architectures: the same layers, widths, attention, dropout placement, tying and (within the
tolerance ``tests/test_bench.py`` asserts) the same parameter count. Encoder-decoders take
``forward(src (B,S), src_lengths (B,), tgt_in (B,T)) -> logits (B,T,V)`` like seqbench's.
``WordLanguageModel`` is the PyTorch examples' word-level language model.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seqbench import models
from seqbench.models.common import EOS, PAD, padding_mask, sinusoidal_table

SQRT_HALF = math.sqrt(0.5)


def tie(proj: nn.Linear, embed: nn.Embedding, enabled: bool) -> None:
    if enabled:
        proj.weight = embed.weight


class PlainTransformer(nn.Module):
    """``nn.Transformer`` with shared, scaled embeddings, sinusoidal positions and a tied output layer.

    Dropout where seqbench's Transformer has it: embeddings and sublayer outputs at ``dropout``,
    attention weights at ``attn_dropout``, the FFN hidden layer at ``act_dropout``.
    """

    def __init__(self, vocab: int, *, d_model: int, n_heads: int, n_layers: int, d_ff: int, dropout: float,
                 n_decoder_layers: int | None = None, attn_dropout: float = 0.0, act_dropout: float = 0.0,
                 pre_norm: bool = False, tie_output: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model, padding_idx=PAD)
        with warnings.catch_warnings():  # pre-norm layers cannot use nested tensors; nn.Transformer warns
            warnings.simplefilter("ignore", UserWarning)
            self.core = nn.Transformer(d_model, n_heads, n_layers, n_decoder_layers or n_layers, d_ff, dropout,
                                       batch_first=True, norm_first=pre_norm)
        for layer in (*self.core.encoder.layers, *self.core.decoder.layers):
            layer.dropout.p = act_dropout  # between the FFN's two linear layers
            for attn in (layer.self_attn, getattr(layer, "multihead_attn", None)):
                if attn is not None:
                    attn.dropout = attn_dropout
        if not pre_norm:  # post-norm layers end normalised; seqbench adds no final norm then
            self.core.encoder.norm = self.core.decoder.norm = None
        self.drop = nn.Dropout(dropout)
        self.register_buffer("pe", sinusoidal_table(1024, d_model), persistent=False)
        self.proj = nn.Linear(d_model, vocab, bias=False)
        tie(self.proj, self.embed, tie_output)
        self.scale = d_model**0.5

    def embed_positions(self, tokens):
        return self.drop(self.embed(tokens) * self.scale + self.pe[: tokens.size(1)])  # (B,T,D)

    def forward(self, src, src_lengths, tgt_in):
        T = tgt_in.size(1)
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=tgt_in.device)
        pad = padding_mask(src_lengths, src.size(1))
        y = self.core(self.embed_positions(src), self.embed_positions(tgt_in), tgt_mask=causal,
                      src_key_padding_mask=pad, memory_key_padding_mask=pad, tgt_is_causal=True)
        return self.proj(y)


class PlainRNNSeq2Seq(nn.Module):
    """Multi-layer ``nn.LSTM``/``nn.GRU`` encoder-decoder with Luong "general" attention, no input feeding.

    A bidirectional packed encoder; each decoder layer starts from tanh(W s) of the matching
    encoder layer's final state s (both directions concatenated); attentional vector
    tanh(W_c [c; h]); dropout on each layer's input and before the output layer.
    """

    def __init__(self, cell: type[nn.RNNBase], vocab: int, *, d_model: int, n_layers: int, dropout: float,
                 bidirectional: bool = True, n_decoder_layers: int | None = None, tie_output: bool = True):
        super().__init__()
        self.dirs = 2 if bidirectional else 1
        n_dec = n_decoder_layers or n_layers
        self.embed = nn.Embedding(vocab, d_model, padding_idx=PAD)
        self.drop = nn.Dropout(dropout)
        self.encoder = cell(d_model, d_model // self.dirs, n_layers, batch_first=True, dropout=dropout,
                            bidirectional=bidirectional)
        self.decoder = cell(d_model, d_model, n_dec, batch_first=True, dropout=dropout)
        self.lstm = cell is nn.LSTM
        self.bridge = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(2 if self.lstm else 1))
        self.register_buffer("bridge_from", torch.tensor([min(i, n_layers - 1) for i in range(n_dec)]),
                             persistent=False)
        self.score = nn.Linear(d_model, d_model, bias=False)  # W_a of the "general" score h^T W_a s
        self.combine = nn.Linear(2 * d_model, d_model, bias=False)
        self.proj = nn.Linear(d_model, vocab, bias=False)
        tie(self.proj, self.embed, tie_output)

    def initial_state(self, final: torch.Tensor, bridge: nn.Linear) -> torch.Tensor:
        """(L*dirs, B, H/dirs) encoder final states -> (L_dec, B, H) decoder initial states."""
        L, B = final.size(0) // self.dirs, final.size(1)
        final = final.view(L, self.dirs, B, -1).permute(0, 2, 1, 3).reshape(L, B, -1)  # [forward; backward]
        return torch.tanh(bridge(final.index_select(0, self.bridge_from)))

    def forward(self, src, src_lengths, tgt_in):
        S = src.size(1)
        packed = pack_padded_sequence(self.drop(self.embed(src)), src_lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        out, final = self.encoder(packed)
        memory, _ = pad_packed_sequence(out, batch_first=True, total_length=S)  # (B,S,D)
        finals = final if self.lstm else (final,)
        state = tuple(self.initial_state(f, b) for f, b in zip(finals, self.bridge))
        y, _ = self.decoder(self.drop(self.embed(tgt_in)), state if self.lstm else state[0])  # (B,T,D)
        scores = y @ self.score(memory).transpose(1, 2)  # (B,T,S)
        weights = scores.masked_fill(padding_mask(src_lengths, S)[:, None, :], float("-inf")).softmax(-1)
        out = torch.tanh(self.combine(torch.cat([weights @ memory, y], dim=-1)))
        return self.proj(self.drop(out))


def _weight_norm(module: nn.Module) -> nn.Module:
    return weight_norm(module)  # the constructor's ``weight_norm`` flag shadows the function there


class PlainConvS2S(nn.Module):
    """``nn.Conv1d`` + GLU encoder-decoder with multi-step attention (Gehring et al. 2017).

    Token plus learned position embeddings; centred encoder convolutions, causal (left-padded)
    decoder convolutions, residuals scaled by sqrt(0.5), attention in every decoder layer over
    (z + e); weight normalisation on convolutions and linear layers; the encoder's gradient
    scaled by 1/(2 x decoder layers) with a tensor hook.
    """

    def __init__(self, vocab: int, *, d_model: int, layers: list[tuple[int, int]], dropout: float,
                 max_positions: int = 1024, d_out: int | None = None, tie_output: bool = True,
                 weight_norm: bool = True):
        super().__init__()
        wn = _weight_norm if weight_norm else (lambda m: m)
        widths = [layers[0][0]] + [c for c, _ in layers]
        self.embed = nn.Embedding(vocab, d_model, padding_idx=PAD)
        self.src_pos, self.tgt_pos = nn.Embedding(max_positions, d_model), nn.Embedding(max_positions, d_model)
        self.drop = nn.Dropout(dropout)
        self.kernels = [k for _, k in layers]

        def residual(c_in, c):
            return wn(nn.Linear(c_in, c)) if c_in != c else nn.Identity()

        self.enc_in, self.dec_in = wn(nn.Linear(d_model, widths[0])), wn(nn.Linear(d_model, widths[0]))
        self.enc_convs = nn.ModuleList(wn(nn.Conv1d(widths[i], 2 * c, k, padding=k // 2))
                                       for i, (c, k) in enumerate(layers))
        self.enc_res = nn.ModuleList(residual(widths[i], c) for i, (c, _) in enumerate(layers))
        self.enc_out = wn(nn.Linear(widths[-1], d_model))
        self.dec_convs = nn.ModuleList(wn(nn.Conv1d(widths[i], 2 * c, k)) for i, (c, k) in enumerate(layers))
        self.dec_res = nn.ModuleList(residual(widths[i], c) for i, (c, _) in enumerate(layers))
        self.att_q = nn.ModuleList(wn(nn.Linear(c, d_model)) for c, _ in layers)
        self.att_out = nn.ModuleList(wn(nn.Linear(d_model, c)) for c, _ in layers)
        self.fc = wn(nn.Linear(widths[-1], d_out or d_model))
        self.proj = nn.Linear(d_out or d_model, vocab) if tie_output else wn(nn.Linear(d_out or d_model, vocab))
        tie(self.proj, self.embed, tie_output)
        self.grad_scale = 1.0 / (2.0 * len(layers))

    def forward(self, src, src_lengths, tgt_in):
        B, S = src.shape
        pad = padding_mask(src_lengths, S)[..., None]  # (B,S,1)
        e = self.drop(self.embed(src) + self.src_pos(torch.arange(S, device=src.device)))  # (B,S,E)
        x = self.enc_in(e)
        for conv, res in zip(self.enc_convs, self.enc_res):
            h = self.drop(x.masked_fill(pad, 0.0)).transpose(1, 2)  # (B,C,S)
            x = (F.glu(conv(h), dim=1).transpose(1, 2) + res(x)) * SQRT_HALF
        z = self.enc_out(x)
        if z.requires_grad:
            z.register_hook(lambda grad: grad * self.grad_scale)
        z = z.masked_fill(pad, 0.0)  # (B,S,E) attention keys
        ze = (z + e) * SQRT_HALF  # attention values
        scale = src_lengths.to(z.dtype).sqrt()[:, None, None]
        key_pad = pad.transpose(1, 2)  # (B,1,S)

        T = tgt_in.size(1)
        g = self.drop(self.embed(tgt_in) + self.tgt_pos(torch.arange(T, device=src.device)))  # (B,T,E)
        x = self.dec_in(g)
        for conv, k, res, q, out in zip(self.dec_convs, self.kernels, self.dec_res, self.att_q, self.att_out):
            h = F.glu(conv(F.pad(self.drop(x).transpose(1, 2), (k - 1, 0))), dim=1).transpose(1, 2)  # (B,T,C)
            d = (q(h) + g) * SQRT_HALF
            a = torch.bmm(d, z.transpose(1, 2)).masked_fill(key_pad, float("-inf")).softmax(-1)  # (B,T,S)
            h = (out(torch.bmm(a, ze) * scale) + h) * SQRT_HALF
            x = (h + res(x)) * SQRT_HALF
        return self.proj(self.drop(self.fc(x)))


class ByteNetBlock(nn.Module):
    """LayerNorm-ReLU-1x1 (D -> D/2), LayerNorm-ReLU-dilated ``nn.Conv1d``, LayerNorm-ReLU-1x1 (D/2 -> D), residual.

    The 1x1 convolutions are ``nn.Linear`` on channel-last activations (the same map); the
    dilated convolution is centred, or causal by left padding.
    """

    def __init__(self, d_model: int, kernel_size: int, dilation: int, dropout: float, causal: bool):
        super().__init__()
        half = d_model // 2
        self.net_in = nn.Sequential(nn.LayerNorm(d_model), nn.ReLU(), nn.Linear(d_model, half),
                                    nn.LayerNorm(half), nn.ReLU())
        self.conv = nn.Conv1d(half, half, kernel_size, dilation=dilation, padding=0 if causal else "same")
        self.net_out = nn.Sequential(nn.LayerNorm(half), nn.ReLU(), nn.Linear(half, d_model), nn.Dropout(dropout))
        self.left = (kernel_size - 1) * dilation if causal else 0

    def forward(self, x, pad=None):
        """x (B,T,D); pad (B,T,1) True at source padding, zeroed before the dilated convolution."""
        h = self.net_in(x)
        if pad is not None:
            h = h.masked_fill(pad, 0.0)
        h = h.transpose(1, 2)  # (B,D/2,T)
        h = self.conv(F.pad(h, (self.left, 0)) if self.left else h)
        return x + self.net_out(h.transpose(1, 2))


class PlainByteNet(nn.Module):
    """ByteNet: a dilated source network and a causal target network stacked by dynamic unfolding.

    No GLU here: seqbench's ByteNet uses the paper's ReLU residual block (Figure 3, left), and a
    baseline must compute the same function to make the timing comparison mean anything. The
    unfolding is seqbench's: the source and an EOS, zero-padded to ceil(a (|src| + 1) + b) columns.
    """

    def __init__(self, vocab: int, *, d_model: int, n_layers: int, kernel_size: int, dilations: list[int],
                 dropout: float, tie_output: bool = True, unfold_a: float = 1.2, unfold_b: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model, padding_idx=PAD)
        self.drop, self.scale = nn.Dropout(dropout), math.sqrt(d_model)
        self.encoder = nn.ModuleList(ByteNetBlock(d_model, kernel_size, dilations[i % len(dilations)], dropout, False)
                                     for i in range(n_layers))
        self.decoder = nn.ModuleList(ByteNetBlock(d_model, kernel_size, dilations[i % len(dilations)], dropout, True)
                                     for i in range(n_layers))
        self.enc_norm, self.dec_norm = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.unfold = nn.Linear(2 * d_model, d_model)
        self.proj = nn.Linear(d_model, vocab, bias=False)
        self.unfold_a, self.unfold_b = unfold_a, unfold_b
        tie(self.proj, self.embed, tie_output)

    def forward(self, src, src_lengths, tgt_in):
        n = src_lengths + 1  # with the EOS
        cols = torch.tensor([max(m, math.ceil(round(self.unfold_a * m + self.unfold_b, 9))) for m in n.tolist()],
                            device=src.device)
        W, T = int(cols.max()), tgt_in.size(1)
        tokens = F.pad(src[:, :W], (0, max(0, W - src.size(1))), value=PAD).scatter(1, src_lengths[:, None], EOS)
        pad = padding_mask(cols, W)[..., None]  # (B,W,1) past the unfolded length
        x = self.drop(self.embed(tokens) * self.scale).masked_fill(padding_mask(n, W)[..., None], 0.0)
        for block in self.encoder:
            x = block(x, pad)
        memory = self.enc_norm(x).masked_fill(pad, 0.0)  # (B,W,D)
        source = memory[:, :T] if W >= T else F.pad(memory, (0, 0, 0, T - W))  # (B,T,D), zero past it
        y = self.unfold(torch.cat([self.drop(self.embed(tgt_in) * self.scale), source], dim=-1))
        for block in self.decoder:
            y = block(y)
        return self.proj(self.dec_norm(y))


class WordLanguageModel(nn.Module):
    """``RNNModel`` of pytorch/examples ``word_language_model`` (LSTM, ``--tied`` off), verbatim in substance.

    Time-first: ``forward(input (T,B), hidden) -> (log-probabilities (T*B, V), hidden)``.
    """

    def __init__(self, ntoken: int, ninp: int = 200, nhid: int = 200, nlayers: int = 2, dropout: float = 0.2):
        super().__init__()
        self.ntoken, self.nlayers, self.nhid = ntoken, nlayers, nhid
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz: int):
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid))


# what each baseline replicates of a seqbench config; anything else fails with this list
SUPPORTED = {
    "transformer": "n_layers, n_decoder_layers, n_heads, d_model, d_ff, dropout, attn_dropout, act_dropout, "
                   "pre_norm, shared embeddings",
    "lstm": "Luong attention without input feeding, all or no encoder layers bidirectional, no residuals, "
            "shared embeddings",
    "convs2s": "uniform or per-layer stacks, odd kernels, shared embeddings",
    "bytenet": "shared embeddings",
}
SUPPORTED["gru"] = SUPPORTED["lstm"]

BASELINE_NAMES = {"transformer": "nn.Transformer", "lstm": "nn.LSTM enc-dec", "gru": "nn.GRU enc-dec",
                  "convs2s": "nn.Conv1d+GLU enc-dec", "bytenet": "nn.Conv1d dilated enc-dec"}


def _unsupported(arch: str, why: str):
    return ValueError(f"no plain-PyTorch baseline for this {arch} config: {why}; the baseline replicates "
                      f"{SUPPORTED[arch]}")


def build_baseline(cfg: Mapping, vocab: int) -> nn.Module:
    """The plain-PyTorch twin of seqbench config ``cfg`` (a shared source/target vocabulary of ``vocab``)."""
    arch = cfg["name"]
    if arch not in SUPPORTED:
        raise KeyError(f"no baseline for model {arch!r}; baselines exist for {', '.join(sorted(SUPPORTED))}")
    seqbench_cls = models.model_class(arch, "seq2seq")

    def get(key):  # the config's value, else seqbench's default
        return cfg[key] if key in cfg else models.valid_default(seqbench_cls, key)

    if not get("share_embeddings"):
        raise _unsupported(arch, "share_embeddings=false")
    if arch == "transformer":
        return PlainTransformer(vocab, d_model=get("d_model"), n_heads=get("n_heads"), n_layers=get("n_layers"),
                                n_decoder_layers=get("n_decoder_layers"), d_ff=get("d_ff"), dropout=get("dropout"),
                                attn_dropout=get("attn_dropout"), act_dropout=get("act_dropout"),
                                pre_norm=get("pre_norm"), tie_output=get("tie_output"))
    if arch in ("lstm", "gru"):
        if get("attention") != "luong" or get("input_feed"):
            raise _unsupported(arch, f"attention={get('attention')!r}, input_feed={get('input_feed')}")
        if get("residual_from") is not None or get("n_bidirectional_layers") not in (None, get("n_layers")):
            raise _unsupported(arch, f"residual_from={get('residual_from')}, "
                                     f"n_bidirectional_layers={get('n_bidirectional_layers')}")
        return PlainRNNSeq2Seq(nn.LSTM if arch == "lstm" else nn.GRU, vocab, d_model=get("d_model"),
                               n_layers=get("n_layers"), n_decoder_layers=get("n_decoder_layers"),
                               dropout=get("dropout"), bidirectional=get("bidirectional"),
                               tie_output=get("tie_output"))
    if arch == "convs2s":
        layers = get("layers") or [(get("channels") or get("d_model"), get("kernel_size"))] * get("n_layers")
        return PlainConvS2S(vocab, d_model=get("d_model"), layers=[tuple(layer) for layer in layers],
                            dropout=get("dropout"), max_positions=get("max_positions"), d_out=get("d_out"),
                            tie_output=get("tie_output"), weight_norm=get("weight_norm"))
    return PlainByteNet(vocab, d_model=get("d_model"), n_layers=get("n_layers"), kernel_size=get("kernel_size"),
                        dilations=list(get("dilations")), dropout=get("dropout"), tie_output=get("tie_output"),
                        unfold_a=get("unfold_a"), unfold_b=get("unfold_b"))

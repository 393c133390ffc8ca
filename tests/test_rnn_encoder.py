"""The encoder's length-grouped recurrence equals nn.LSTM/nn.GRU on a packed sequence (values and gradients)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seqbench.models.rnn import GRUSeq2Seq, LSTMSeq2Seq, RecurrentLayer

LENGTHS = [5, 1, 3, 5, 2, 1, 4]  # includes 1, ties, and rows shorter than the batch's longest
T = 6  # one column longer than the longest row: every row has padding


def packed_reference(layer: RecurrentLayer, x: torch.Tensor, lengths: torch.Tensor):
    """Outputs (B,T,H), zero at padding, and final states (B,H) of ``layer.rnn`` on the packed sequence."""
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    y, hn = layer.rnn(packed)
    y, _ = pad_packed_sequence(y, batch_first=True, total_length=x.size(1))
    hn = hn if isinstance(hn, tuple) else (hn,)
    return y, tuple(h.transpose(0, 1).reshape(h.size(1), -1) for h in hn)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_layer_matches_packed_values_and_gradients(cell, bidirectional):
    torch.manual_seed(0)
    layer = RecurrentLayer(cell, 4, 6, dropout=0.0, bidirectional=bidirectional).eval()
    lengths = torch.tensor(LENGTHS)
    x = torch.randn(len(LENGTHS), T, 4)
    valid = (torch.arange(T)[None] < lengths[:, None])[..., None]
    w = torch.randn(len(LENGTHS), T, 6)  # a loss weighting every valid output and every final state
    results = []
    for run in (lambda xi: packed_reference(layer, xi, lengths), lambda xi: layer.run(xi, lengths=lengths)):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        y, final = run(xi)
        loss = (y * w * valid).sum() + sum((f * (k + 2)).sin().sum() for k, f in enumerate(final))
        loss.backward()
        results.append((y * valid, final, xi.grad, [p.grad.clone() for p in layer.parameters()]))
    (y0, f0, g0, p0), (y1, f1, g1, p1) = results
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
    assert len(f1) == len(f0) == (2 if cell is nn.LSTM else 1)
    for a, b in zip(f1, f0):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g1, g0, atol=1e-5, rtol=1e-5)
    for a, b in zip(p1, p0):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_layer_outputs_zero_at_padding():
    torch.manual_seed(0)
    layer = RecurrentLayer(nn.LSTM, 4, 6, dropout=0.0, bidirectional=True)
    lengths = torch.tensor(LENGTHS)
    y, _ = layer.run(torch.randn(len(LENGTHS), T, 4), lengths=lengths)
    padding = torch.arange(T)[None] >= lengths[:, None]
    assert y[padding].abs().max() == 0 and y[~padding].abs().min() > 0


def test_layer_rejects_lengths_with_a_state():
    layer = RecurrentLayer(nn.GRU, 4, 4, dropout=0.0)
    with pytest.raises(ValueError, match="state=None"):
        layer.run(torch.randn(2, 3, 4), (torch.zeros(2, 4),), lengths=torch.tensor([3, 2]))


def packed_encode(model, src, src_lengths):
    """``model.encode`` as computed on a packed sequence through every encoder layer (the reference)."""
    x = pack_padded_sequence(model.src_embed(src), src_lengths, batch_first=True, enforce_sorted=False)
    finals = []
    for layer in model.encoder:
        y, hn = layer.rnn(x)
        hn = hn if isinstance(hn, tuple) else (hn,)
        finals.append(tuple(h.transpose(0, 1).reshape(h.size(1), -1) for h in hn))
        x = x._replace(data=y.data + x.data) if layer.residual else y
    memory, _ = pad_packed_sequence(x, batch_first=True, total_length=src.size(1))
    return memory, finals


@pytest.mark.parametrize("arch", [LSTMSeq2Seq, GRUSeq2Seq])
def test_encode_matches_packed_encoder(arch):
    """Two bidirectional layers, then a unidirectional residual one: memory (zero at padding), bridged states
    and parameter gradients equal the packed computation's."""
    torch.manual_seed(1)
    model = arch(11, 11, pad_id=0, d_model=8, n_layers=3, n_bidirectional_layers=2, residual_from=3,
                 dropout=0.0).eval()
    lengths = torch.tensor(LENGTHS)
    src = torch.randint(1, 11, (len(LENGTHS), T)).masked_fill(torch.arange(T)[None] >= lengths[:, None], 0)
    grads, outs = [], []
    for packed in (True, False):
        model.zero_grad()
        if packed:
            memory, finals = packed_encode(model, src, lengths)
            states = {n: torch.tanh(bridge(torch.stack([finals[j][k] for j in model.bridge_from], dim=1)))
                      for k, (n, bridge) in enumerate(zip(model.state_names, model.bridge))}
        else:
            state = model.encode(src, lengths)
            memory, states = state["src_memory"], {n: state[n] for n in model.state_names}
        loss = memory.square().sum() + sum(s.sum() for s in states.values())
        loss.backward()
        outs.append((memory, states))
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    assert outs[1][0][torch.arange(T)[None] >= lengths[:, None]].abs().max() == 0
    for n in model.state_names:
        torch.testing.assert_close(outs[1][1][n], outs[0][1][n], atol=1e-5, rtol=1e-5)
    assert grads[1].keys() == grads[0].keys() and any(k.startswith("encoder.0") for k in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-5, msg=name)

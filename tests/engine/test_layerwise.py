"""Layer-by-layer calibration (engine/layerwise.py): call order, groups, rows, early stop."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.core.errors import DataError
from modelpress.engine.layerwise import (
    Hessian,
    InputNorms,
    calibrate_layerwise,
    calibration_inputs,
    call_groups,
    check_layer,
    layer_rows,
)


class QKV(nn.Module):
    """q, k, v read the same tensor; o reads their sum; ``shared`` runs twice; ``unused`` never."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))
        self.shared = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)

    def forward(self, x):
        h = self.o(self.q(x) + self.k(x) + self.v(x))
        return self.shared(self.shared(h))


def test_groups_follow_call_order_and_shared_inputs():
    m = QKV()
    groups, unreached = call_groups(m, dict(m.named_children()), torch.randn(2, 8))
    assert [g.names for g in groups] == [["q", "k", "v"], ["o"], ["shared"]]
    assert [g.once for g in groups] == [True, True, False]
    assert unreached == ["unused"]


def test_each_group_sees_its_compressed_predecessors_and_forward_stops_early():
    m = QKV()
    batches = [torch.randn(4, 8) for _ in range(3)]
    seen_rows: dict[str, int] = {}
    order: list[str] = []

    def compress(name, layer, stats):
        order.append(name)
        seen_rows[name] = stats.rows
        with torch.no_grad():
            layer.weight.zero_()  # "compressed": every later layer must see zeros from it

    def observer(name, layer):
        stats = InputNorms(8)
        if name == "o":  # q, k, v were zeroed before o was observed: o's input is their biases only
            bias = m.q.bias + m.k.bias + m.v.bias
            original = stats.observe

            def check(rows):
                assert torch.allclose(rows, bias.expand_as(rows))
                original(rows)
            stats.observe = check
        return stats

    unreached = calibrate_layerwise(m, dict(m.named_children()).items(), batches, observer, compress, "test")
    assert order == ["q", "k", "v", "o", "shared"] and unreached == ["unused"]
    assert seen_rows == {"q": 12, "k": 12, "v": 12, "o": 12, "shared": 24}  # shared: both calls


def test_rows_of_linear_conv_and_padded_tokens():
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    x = torch.randn(2, 3, 8, 8)
    rows = layer_rows(conv, x)
    assert rows.shape == (2 * 4 * 4, 3 * 9)
    # a conv is a matmul of its patches with the flattened weight
    out = (rows @ conv.weight.reshape(4, -1).t() + conv.bias).reshape(2, 16, 4).transpose(1, 2).reshape(2, 4, 4, 4)
    assert torch.allclose(out, conv(x), atol=1e-5)
    lin = nn.Linear(5, 3)
    tokens = torch.randn(2, 6, 5)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert layer_rows(lin, tokens).shape == (12, 5)
    assert layer_rows(lin, tokens, mask).shape == (10, 5)  # padded positions left out


def test_hessian_and_norms():
    x = torch.randn(50, 6)
    h, n = Hessian(6), InputNorms(6)
    for chunk in x.split(20):
        h.observe(chunk)
        n.observe(chunk)
    assert torch.allclose(h.matrix, (2 / 50 * x.t() @ x).double(), atol=1e-6)
    assert torch.allclose(n.norms, x.norm(dim=0).double(), atol=1e-6)


def test_layer_checks_and_calibration_data():
    assert check_layer(nn.Linear(2, 2)) is None and check_layer(nn.Conv2d(2, 2, 3)) is None
    assert "grouped" in check_layer(nn.Conv2d(4, 4, 3, groups=2))
    assert check_layer(nn.LSTM(2, 2)) is None and check_layer(nn.GRU(2, 2)) is None

    class MyLSTM(nn.LSTM):
        def forward(self, x, hx=None):
            return super().forward(x, hx)
    assert "overrides LSTM.forward" in check_layer(MyLSTM(2, 2))
    assert "not a Linear" in check_layer(nn.Embedding(4, 2))
    with pytest.raises(DataError, match="calibrates on data"):
        calibration_inputs(None, 4, "quant.gptq")
    assert len(calibration_inputs([torch.randn(2, 3)] * 10, 4, "x")) == 4
    with pytest.raises(DataError, match="NaN"):
        calibration_inputs([torch.full((2, 3), float("nan"))], 4, "x")


def test_recurrent_rows_are_the_inputs_of_each_matrix_and_follow_edits():
    from modelpress.engine.layerwise import RecurrentInputs, recurrent_rows

    torch.manual_seed(0)
    rnn = nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(2, 5, 3)
    calls = RecurrentInputs()
    calls.observe_call((x,))
    bottom = nn.LSTM(3, 4, bidirectional=True, batch_first=True)  # layer 0 on its own, by hand
    with torch.no_grad():
        for name, p in bottom.named_parameters():
            p.copy_(getattr(rnn, name))
        y0 = bottom(x)[0]
        y = rnn(x)[0]
    rows = recurrent_rows(rnn, calls)
    first = next(rows)
    assert torch.equal(first["weight_ih_l0"], x.reshape(-1, 3))
    assert torch.equal(first["weight_ih_l0_reverse"], x.reshape(-1, 3))
    zeros = torch.zeros(2, 1, 4)
    assert torch.allclose(first["weight_hh_l0"], torch.cat([zeros, y0[:, :-1, :4]], 1).reshape(-1, 4), atol=1e-6)
    assert torch.allclose(first["weight_hh_l0_reverse"], torch.cat([y0[:, 1:, 4:], zeros], 1).reshape(-1, 4), atol=1e-6)
    second = next(rows)
    assert torch.allclose(second["weight_ih_l1"], y0.reshape(-1, 8), atol=1e-6)
    assert torch.allclose(second["weight_hh_l1"], torch.cat([zeros, y[:, :-1, :4]], 1).reshape(-1, 4), atol=1e-6)
    # an edit of layer 0 between the yields reaches layer 1's inputs
    edited = recurrent_rows(rnn, calls)
    next(edited)
    with torch.no_grad():
        rnn.weight_ih_l0.zero_()
    assert not torch.allclose(next(edited)["weight_ih_l1"], y0.reshape(-1, 8))

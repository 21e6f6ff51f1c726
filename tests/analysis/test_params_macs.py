"""Parameter counts and MAC counts checked against hand counts."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from modelpress.analysis.params import count_params, dense_bytes, sparsity
from modelpress.nn.macs import ROOT, count_macs


class LeNet5(nn.Module):
    """The classic: conv 1->6 5x5 pad 2, pool, conv 6->16 5x5, pool, fc 400-120-84-10."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(400, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


LENET_MACS = {
    "conv1": 6 * 28 * 28 * (1 * 5 * 5),    # 117,600
    "conv2": 16 * 10 * 10 * (6 * 5 * 5),   # 240,000
    "fc1": 400 * 120,                      # 48,000
    "fc2": 120 * 84,                       # 10,080
    "fc3": 84 * 10,                        # 840
}
LENET_PARAMS = (6 * 25 + 6) + (16 * 150 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)


def test_lenet5_macs_exact():
    report = count_macs(LeNet5(), torch.randn(1, 1, 28, 28))
    assert report.by_layer == LENET_MACS
    assert report.total == 416_520 == sum(LENET_MACS.values())
    assert report.effective_total == report.total
    assert report.uncounted_ops == {}


def test_macs_scale_with_batch_and_keep_training_flag():
    model = LeNet5().train()
    assert count_macs(model, torch.randn(3, 1, 28, 28)).total == 3 * 416_520
    assert model.training


def test_effective_macs_follow_weight_sparsity():
    model = LeNet5()
    with torch.no_grad():
        model.fc1.weight[:60] = 0      # half of fc1
        model.conv2.weight[:4] = 0     # a quarter of conv2
    report = count_macs(model, torch.randn(1, 1, 28, 28))
    assert report.total == 416_520
    assert report.effective_total == 416_520 - 48_000 // 2 - 240_000 // 4


def test_depthwise_separable_conv():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1))
    report = count_macs(model, torch.randn(2, 8, 10, 10))
    # depthwise: each of 8 maps of 10x10 is a 1x3x3 dot product; pointwise: 16x100 outputs x 8 in
    assert report.by_layer == {"0": 2 * 8 * 100 * 9, "1": 2 * 16 * 100 * 8}


class ManualAttention(nn.Module):
    """Single-head self-attention written with explicit matmuls."""

    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        return self.out(scores.softmax(-1) @ v)


class SdpaAttention(ManualAttention):
    def forward(self, x):
        return self.out(F.scaled_dot_product_attention(self.q(x)[:, None], self.k(x)[:, None],
                                                       self.v(x)[:, None])[:, 0])


B, S, D = 2, 5, 16
PROJ = B * S * D * D             # one D->D projection over all tokens: 2,560
SCORES = B * S * S * D           # Q @ K^T (and, same size, P @ V): 800
ATTENTION_MACS = 4 * PROJ + 2 * SCORES  # 11,840


@pytest.mark.parametrize("cls", [ManualAttention, SdpaAttention])
def test_attention_matmuls_are_counted(cls):
    report = count_macs(cls(D), torch.randn(B, S, D))
    assert report.total == ATTENTION_MACS
    assert report.by_layer[ROOT] == 2 * SCORES  # the matmuls written in forward itself
    assert report.by_layer["q"] == PROJ


def test_multihead_attention_fast_path_is_counted():
    # in eval mode + no_grad MHA runs one fused kernel that would hide its matmuls
    mha = nn.MultiheadAttention(D, num_heads=2, batch_first=True).eval()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    # two heads of width 8 do the same score MACs as one head of width 16
    assert count_macs(Wrap(), torch.randn(B, S, D)).total == ATTENTION_MACS
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_by_layer_sums_to_total_and_uncounted_ops_are_reported():
    report = count_macs(nn.TransformerEncoderLayer(D, 2, 32, batch_first=True), torch.randn(B, S, D))
    assert sum(report.by_layer.values()) == report.total == ATTENTION_MACS + 2 * B * S * D * 32
    lstm = count_macs(nn.LSTM(4, 4, batch_first=True), torch.randn(1, 3, 4))
    assert lstm.total == 0 and lstm.uncounted_ops  # visible, not silently zero


def test_count_params_and_sparsity_manual():
    model = LeNet5()
    with torch.no_grad():
        model.fc1.weight[:, :100] = 0  # 120 * 100 zeros
    counts = count_params(model)
    assert counts["total"] == LENET_PARAMS == 61_706
    assert counts["nonzero"] == LENET_PARAMS - 12_000
    assert counts["by_layer"]["fc1"] == (48_120, 48_120 - 12_000)
    assert sparsity(model) == pytest.approx(12_000 / LENET_PARAMS)
    assert dense_bytes(model) == 4 * LENET_PARAMS


def test_count_params_sees_torch_prune_masks():
    model = LeNet5()
    prune.l1_unstructured(model.fc1, "weight", amount=0.5)  # weight_orig stays dense
    counts = count_params(model)
    assert counts["total"] == LENET_PARAMS
    assert counts["by_layer"]["fc1"] == (48_120, 24_000 + 120)


def test_shared_parameters_count_once():
    emb = nn.Embedding(50, 8)
    head = nn.Linear(8, 50, bias=False)
    head.weight = emb.weight  # tied
    model = nn.Sequential(emb, head)
    assert count_params(model)["total"] == 400
    assert dense_bytes(model) == 400 * 4

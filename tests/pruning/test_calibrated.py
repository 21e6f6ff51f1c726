"""prune.wanda and prune.sparsegpt: one-shot pruning calibrated on data beats magnitude, exactly on target."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.artifact.checkpoint import save_artifact
from modelpress.artifact.loading import load_artifact
from modelpress.core.errors import ConfigError, UnsupportedError
from modelpress.core.masks import get_mask
from modelpress.core.training import TrainConfig
from modelpress.engine import MethodInputs, run_method
from modelpress.pruning.magnitude import MagnitudePruning
from modelpress.pruning.nm import NMSparsity, verify_nm
from modelpress.pruning.sparsegpt import SparseGPT
from modelpress.pruning.wanda import Wanda, wanda_mask


def outlier_mlp(seed=0):
    """An MLP whose inputs have a few large, correlated features (as transformer activations do)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10)).eval()
    mix = torch.randn(128, 128, generator=g) / 11
    scale = torch.ones(128)
    scale[:6] = 15
    batches = [(torch.randn(64, 128, generator=g) @ mix + torch.randn(128, generator=g)) * scale for _ in range(6)]
    return net, batches


def rel_error(model, ref_model, x):
    ref = ref_model(x)
    return float((model(x) - ref).pow(2).mean() / ref.pow(2).mean())


@pytest.mark.parametrize("pattern", [None, "2:4"], ids=["50%", "2:4"])
def test_sparsegpt_loses_at_most_half_of_magnitude_and_wanda_beats_it(pattern):
    net, batches = outlier_mlp()
    x = torch.cat(batches)
    common = dict(keep_first_last=False)
    if pattern:
        magnitude, _ = run_method(net, NMSparsity(keep_first_last=False))
    else:
        magnitude, _ = run_method(net, MagnitudePruning(sparsity=0.5, ranking="layer", **common))
    wanda, w_report = run_method(net, Wanda(pattern=pattern, **common), MethodInputs(data=batches))
    sgpt, s_report = run_method(net, SparseGPT(pattern=pattern, **common), MethodInputs(data=batches))
    base = rel_error(magnitude, net, x)
    assert rel_error(wanda, net, x) < base
    assert rel_error(sgpt, net, x) < 0.5 * base
    for model, report in ((wanda, w_report), (sgpt, s_report)):
        assert report.info["layer_sparsity"] == {"0": 0.5, "2": 0.5, "4": 0.5}
        for i in (0, 2, 4):
            assert float((model[i].weight == 0).float().mean()) == 0.5
            if pattern:
                assert verify_nm(model[i].weight, 2, 4)
        if pattern:
            assert report.info["pattern_ok"] is True


def test_wanda_keeps_each_rows_share_and_weighs_inputs():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    norms = torch.tensor([10.0, 1.0, 1.0, 1.0])  # input 0 matters most
    mask = wanda_mask(w, norms, 0.5)
    assert mask.tolist() == [[1, 0, 0, 1], [1, 1, 0, 0]]


def test_calibrated_pruning_on_convs_masks_survive_finetune_and_reload(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4)).eval()
    images = [torch.randn(8, 3, 6, 6) for _ in range(4)]
    for cfg in (SparseGPT(pattern="2:4"), Wanda(pattern="2:4"), SparseGPT(sparsity=0.6)):
        pruned, report = run_method(net, cfg, MethodInputs(data=images))
        assert set(report.info["layer_sparsity"]) == {"2", "4"}  # first and last kept dense
        for i in (2, 4):
            if cfg.pattern:
                assert verify_nm(pruned[i].weight, 2, 4)  # groups along (kh, kw, in), like prune.nm
            else:
                assert abs(float((pruned[i].weight == 0).float().mean()) - 0.6) < 1e-3
            assert get_mask(pruned[i], "weight") is not None
    labelled = [(x, torch.randint(0, 4, (8,))) for x in images]
    tuned, _ = run_method(net, SparseGPT(pattern="2:4"),
                          MethodInputs(data=labelled, train=TrainConfig(max_steps=3, lr=0.05)))
    assert verify_nm(tuned[2].weight, 2, 4)  # the fine-tune kept the pattern
    path = save_artifact(tuned, tmp_path / "s.safetensors")
    again, _ = load_artifact(path, base_model=net)
    x = images[0]
    assert torch.allclose(again(x), tuned(x), atol=1e-6)


def test_calibrated_pruning_on_gpt2_conv1d():
    from tests.tinymodels import tiny_gpt2

    model = tiny_gpt2().eval()
    torch.manual_seed(0)
    batches = [torch.randint(0, 100, (4, 16)) for _ in range(3)]
    for cfg in (Wanda(pattern="2:4"), SparseGPT()):
        pruned, report = run_method(model, cfg, MethodInputs(data=batches))
        assert len(report.info["layer_sparsity"]) == 7  # 8 Conv1D + lm_head, first and last dense
        c_attn = pruned.hf.transformer.h[1].attn.c_attn
        assert type(c_attn).__name__ == "Conv1D"  # pruned in place, in its [in, out] layout
        if cfg.pattern:
            assert verify_nm(c_attn.weight.t(), 2, 4)
        assert torch.isfinite(pruned(batches[0])).all()


def test_calibrated_pruning_refusals():
    net, batches = outlier_mlp()
    odd = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    with pytest.raises(UnsupportedError, match="not divisible by m=4"):
        run_method(odd, Wanda(pattern="2:4", keep_first_last=False), MethodInputs(data=[torch.randn(4, 6)]))
    with pytest.raises(ConfigError, match="N < M"):
        Wanda(pattern="4:2")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_calibrated_pruning_runs_on_cuda():
    net, batches = outlier_mlp()
    for cfg in (SparseGPT(pattern="2:4"), Wanda()):
        pruned, report = run_method(net.cuda(), cfg, MethodInputs(data=batches))
        assert pruned[2].weight.is_cuda and report.info["layer_sparsity"]["2"] == 0.5

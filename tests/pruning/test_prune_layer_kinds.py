"""Pruning methods on the layer kinds real models use (issue 15): GPT-2's ``Conv1D`` (a Linear storing
its weight ``[in, out]``) and ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (several weight matrices per layer).

Every registered pruning method that handles ``Linear`` runs from its default config on a tiny
transformer encoder, LSTM and GRU classifiers and a tiny GPT-2: an unstructured one reaches its
sparsity exactly on every selected weight matrix (N:M: the pattern along the inputs), a structural
one removes parameters or refuses with a ModelpressError (never another exception); all keep the
output shape without NaN, and their artifacts reload to the same outputs.
"""
from __future__ import annotations

import pytest
import torch
from tinymodels import TinyRNN, layer_kind_cases, tiny_gpt2
from torch import nn

from modelpress.artifact.checkpoint import save_artifact
from modelpress.artifact.loading import load_artifact
from modelpress.core.errors import ModelpressError, ScopeError
from modelpress.core.masks import get_mask
from modelpress.core.training import TrainConfig
from modelpress.engine import MethodInputs, list_methods, run_method
from modelpress.pruning.magnitude import MagnitudePruning
from modelpress.pruning.nm import NMSparsity, verify_nm

CASES = layer_kind_cases()
METHODS = [m for m in list_methods("prune.*") if "Linear" in m.layer_types]
MATRICES = ["weight_ih_l0", "weight_hh_l0", "weight_ih_l0_reverse", "weight_hh_l0_reverse",
            "weight_ih_l1", "weight_hh_l1", "weight_ih_l1_reverse", "weight_hh_l1_reverse"]
RNN_WEIGHTS = [f"rnn.{m}" for m in MATRICES]  # as pruning reports name them


def _outputs(model, x):
    with torch.no_grad():
        return model(x)


def test_method_list_covers_the_unstructured_methods():
    names = {m.name for m in METHODS}
    assert {"prune.magnitude", "prune.random", "prune.taylor", "prune.snip", "prune.iterative", "prune.nm",
            "prune.channels"} <= names


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("info", METHODS, ids=lambda i: i.name)
def test_method_runs_or_refuses_on_layer_kind(info, case, tmp_path):
    build, batches, loss_fn = CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    inputs = MethodInputs(data=batches, loss_fn=loss_fn)
    cfg = info.config_cls()
    x = batches[0][0]
    ref = _outputs(model, x)
    try:
        out_model, report = run_method(model, cfg, inputs)
    except ModelpressError as err:  # structural methods may find nothing to cut here, and say why
        assert info.structural and str(err), f"{info.name} refused {case}: {err}"
        return
    out = _outputs(out_model, x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    path = save_artifact(out_model, tmp_path / "p.safetensors")
    again, _ = load_artifact(path, base_model=model)
    assert torch.equal(_outputs(again, x), out)
    if info.structural:
        assert sum(p.numel() for p in out_model.parameters()) < sum(p.numel() for p in model.parameters())
        return
    assert not [t for t in report.unsupported_layers.values() if t in ("Conv1D", "LSTM", "GRU")]

    layer_sparsity = report.info["layer_sparsity"]
    if case in ("lstm", "gru"):
        assert set(RNN_WEIGHTS) <= set(layer_sparsity)  # every matrix, both directions, both layers
    if case == "gpt2":
        assert {"hf.transformer.h.0.mlp.c_fc", "hf.transformer.h.1.attn.c_attn"} <= set(layer_sparsity)
    weights = {n: _matrix(out_model, n) for n in layer_sparsity}
    if info.name == "prune.nm":
        for name, w in weights.items():
            assert verify_nm(w, cfg.n, cfg.m), name
            assert layer_sparsity[name] == pytest.approx(1 - cfg.n / cfg.m)
    else:  # global ranking: exactly round(sparsity * n) zeros over the selected matrices
        target = cfg.steps[-1] if info.name == "prune.iterative" else cfg.sparsity
        total = sum(w.numel() for w in weights.values())
        zeros = sum(int((w == 0).sum()) for w in weights.values())
        assert zeros == round(target * total)


def _matrix(model, name):
    """The weight a pruning report names, as [out, in] (GPT-2's Conv1D stores it [in, out])."""
    owner, _, param = name.rpartition(".")
    if param.startswith("weight_"):  # one matrix of a recurrent layer
        return getattr(model.get_submodule(owner), param)
    layer = model.get_submodule(name)
    return layer.weight.t() if type(layer).__name__ == "Conv1D" else layer.weight


def test_nm_groups_run_along_the_inputs_of_conv1d():
    torch.manual_seed(0)
    gpt2 = tiny_gpt2().eval()
    p, report = run_method(gpt2, NMSparsity(n=2, m=4), MethodInputs())
    w = p.hf.transformer.h[0].mlp.c_fc.weight  # Conv1D: [in=32, out=128]
    assert verify_nm(w.t(), 2, 4)  # each output row keeps 2 of every 4 consecutive inputs
    assert not verify_nm(w, 2, 4)  # not groups of outputs
    assert float((w == 0).float().mean()) == 0.5


def test_recurrent_masks_hold_through_fine_tuning():
    torch.manual_seed(0)
    model = TinyRNN("LSTM")
    batches = CASES["lstm"][1]
    before = model.rnn.weight_hh_l1.detach().clone()
    p, report = run_method(model, MagnitudePruning(sparsity=0.6, keep_first_last=False),
                           MethodInputs(data=batches, train=TrainConfig(epochs=3, lr=1e-2, batch_size=8)))
    assert report.fine_tuned
    rnn = p.rnn
    for name in rnn._flat_weights_names:
        if not name.startswith("weight_"):
            continue
        w, mask = getattr(rnn, name), get_mask(rnn, name)
        assert mask is not None and mask.shape == w.shape, name
        assert bool((w[mask == 0] == 0).all()), f"{name}: pruned weights came back while training"
    kept = get_mask(rnn, "weight_hh_l1") == 1
    assert not torch.equal(rnn.weight_hh_l1[kept], before[kept])  # the kept weights did train
    total = sum(getattr(rnn, n).numel() for n in MATRICES) + p.proj.weight.numel() + p.head.weight.numel()
    zeros = sum(int((getattr(rnn, n) == 0).sum()) for n in MATRICES) + int((p.proj.weight == 0).sum()) + \
        int((p.head.weight == 0).sum())
    assert zeros == round(0.6 * total)
    # the LSTM computes with the pruned matrices (not a stale flattened copy)
    plain = nn.LSTM(16, 24, num_layers=2, batch_first=True, bidirectional=True)
    plain.load_state_dict(rnn.state_dict())
    x = torch.randn(3, 5, 16)
    assert torch.equal(_outputs(rnn, x)[0], _outputs(plain, x)[0])


def test_recurrent_matrices_take_per_matrix_overrides():
    torch.manual_seed(0)
    model = TinyRNN("GRU").eval()
    cfg = MagnitudePruning(sparsity=0.5, ranking="layer", layer_sparsity={"rnn.weight_hh_l0": 0.9})
    p, report = run_method(model, cfg, MethodInputs())
    assert report.info["layer_sparsity"]["rnn.weight_hh_l0"] == pytest.approx(0.9, abs=1e-3)
    assert report.info["layer_sparsity"]["rnn.weight_ih_l1"] == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ScopeError, match="'rnn.weight_hh_l9'") as err:
        run_method(model, MagnitudePruning(layer_sparsity={"rnn.weight_hh_l9": 0.5}), MethodInputs())
    assert "rnn.weight_hh_l0_reverse" in err.value.hint  # the hint lists the matrices


def test_plain_rnn_is_pruned_too():
    torch.manual_seed(0)
    model = TinyRNN("RNN").eval()
    p, report = run_method(model, NMSparsity(n=1, m=4), MethodInputs())
    assert set(RNN_WEIGHTS) <= set(report.info["layer_sparsity"])
    assert all(verify_nm(getattr(p.rnn, n), 1, 4) for n in MATRICES)

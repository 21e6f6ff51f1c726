"""Low-rank factorization: lowrank.svd, lowrank.tucker, lowrank.cp and their FactorizedLayer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelpress import factorize
from modelpress.artifact.checkpoint import save_artifact
from modelpress.artifact.loading import load_artifact
from modelpress.core.errors import ConfigError, ScopeError
from modelpress.core.training import TrainConfig
from modelpress.engine import MethodInputs, run_method
from modelpress.lowrank.cp import CP, cp_conv
from modelpress.lowrank.layers import FactorizedLayer, energy_rank, evbmf, vbmf_rank
from modelpress.lowrank.svd import SVD, factorize_matrix_layer
from modelpress.lowrank.tucker import Tucker, tucker_conv
from modelpress.nn.macs import count_macs


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.pw(torch.relu(self.dw(torch.relu(self.conv2(x))))))
        return self.fc(torch.flatten(x, 1))


def mlp():
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 10))


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def cp_structured_weight(shape, rank, seed=0):
    """A kernel that is exactly a rank-``rank`` CP tensor (so CP can fit it)."""
    g = torch.Generator().manual_seed(seed)
    factors = [torch.randn(s, rank, generator=g) for s in shape]
    return torch.einsum("or,ir,hr,wr->oihw", *factors)


# -- layer level: error vs rank, exactness at full rank, geometry ---------------------------------
@pytest.mark.parametrize("layer", [nn.Linear(40, 24), nn.Conv2d(12, 20, 1, stride=2, padding=1)],
                         ids=["linear", "conv1x1"])
def test_svd_error_falls_with_rank_and_full_rank_is_exact(layer):
    x = torch.randn(4, 40) if isinstance(layer, nn.Linear) else torch.randn(2, 12, 9, 9)
    full = min(layer.weight.shape[0], layer.weight[0].numel())
    errs = [factorize_matrix_layer(layer, r)[1] for r in (1, 4, full // 2, full - 1, full)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 1e-5
    f, _ = factorize_matrix_layer(layer, full)
    with torch.no_grad():
        assert f(x).shape == layer(x).shape
        assert torch.allclose(f(x), layer(x), atol=1e-4)


def test_svd_error_is_the_tail_of_the_spectrum():
    layer = nn.Linear(30, 20)
    s = torch.linalg.svdvals(layer.weight.detach().double())
    _, err = factorize_matrix_layer(layer, 5)
    assert err == pytest.approx(float(s[5:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt()), rel=1e-6)


def test_energy_rank_counts_squared_singular_values():
    s = torch.tensor([3.0, 2.0, 1.0, 1.0])  # squares 9, 4, 1, 1 of 15
    assert [energy_rank(s, e) for e in (0.5, 0.65, 9 / 15, 13 / 15, 0.9, 1.0)] == [1, 2, 1, 2, 3, 4]


def low_rank_plus_noise(shape, rank, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g) if rank else 0
    return signal + noise * torch.randn(*shape, generator=g)


@pytest.mark.parametrize("shape", [(40, 60), (64, 576), (128, 64), (30, 30)],
                         ids=["wide", "unfolding", "tall", "square"])
def test_vbmf_recovers_the_rank_and_the_noise_level(shape):
    # rank-5 signal (singular values ~ sqrt(L * M)) plus noise of std 0.1: a clear spectral gap
    v = low_rank_plus_noise(shape, 5, 0.1)
    assert vbmf_rank(v) == 5
    rank, sigma2 = evbmf(v)
    assert rank == 5 and sigma2 ** 0.5 == pytest.approx(0.1, rel=0.1)
    assert vbmf_rank(v.t()) == 5  # the orientation does not matter


def test_vbmf_on_pure_noise_keeps_almost_nothing():
    for shape, seed in (((64, 576), 0), ((50, 50), 1), ((32, 16), 2)):
        v = low_rank_plus_noise(shape, 0, 1.0, seed)
        assert 1 <= vbmf_rank(v) <= 2
        assert evbmf(v)[1] ** 0.5 == pytest.approx(1.0, rel=0.15)
    assert vbmf_rank(torch.zeros(8, 12)) == 1


@pytest.mark.parametrize("geometry", [dict(stride=1, padding=1), dict(stride=2, padding=2, dilation=2),
                                      dict(stride=(2, 1), padding=(0, 2))], ids=["s1", "s2d2", "asym"])
def test_tucker_error_falls_with_rank_and_full_rank_is_exact(geometry):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, (3, 5), **geometry)
    x = torch.randn(2, 8, 11, 13)
    errs = [tucker_conv(conv, r_out, r_in)[1] for r_out, r_in in ((2, 2), (4, 4), (8, 6), (12, 8))]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 1e-5
    f, _ = tucker_conv(conv, 12, 8)
    assert [c.weight.shape[:2] for c in f] == [(8, 8), (12, 8), (12, 12)]
    with torch.no_grad():
        assert f(x).shape == conv(x).shape
        assert torch.allclose(f(x), conv(x), atol=1e-4)


@pytest.mark.parametrize("geometry", [dict(stride=1, padding=1), dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2))],
                         ids=["s1", "strided-dilated"])
def test_cp_error_falls_with_rank_and_layer_computes_its_kernel(geometry):
    conv = nn.Conv2d(6, 10, (3, 3), **geometry)
    with torch.no_grad():
        conv.weight.copy_(cp_structured_weight((10, 6, 3, 3), 5) / 10)
    x = torch.randn(2, 6, 10, 12)
    errs = [cp_conv(conv, r, n_iter_max=500)[1] for r in (1, 3, 5)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[-1] < 1e-3  # ALS recovers the rank-5 kernel
    f, _ = cp_conv(conv, 5, n_iter_max=500)
    # the four convs compute exactly a conv with the CP kernel: stride/padding/dilation split per axis
    kernel = torch.einsum("or,ir,hr,wr->oihw", f[3].weight[:, :, 0, 0], f[0].weight[:, :, 0, 0].t(),
                          f[1].weight[:, 0, :, 0].t(), f[2].weight[:, 0, 0, :].t())
    with torch.no_grad():
        ref = F.conv2d(x, kernel, conv.bias, conv.stride, conv.padding, conv.dilation)
        assert f(x).shape == conv(x).shape
        assert torch.allclose(f(x), ref, atol=1e-4)
        assert torch.allclose(f(x), conv(x), atol=1e-2 * conv(x).abs().max().item())


# -- method level: reports, parameter and MAC counts ----------------------------------------------
def test_svd_param_ratio_reports_ranks_params_and_macs():
    m = mlp()
    f, report = run_method(m, SVD(param_ratio=0.5), MethodInputs())
    # floor((0.5 * (in * out + out) - out) / (in + out)): 64->48: 13; 48->48: 11; 48->10: 4
    assert {n: r["rank"] for n, r in report.info["layers"].items()} == {"0": 13, "2": 11, "4": 4}
    assert not report.info["skipped"]
    for name, rank, (d_in, d_out) in (("0", 13, (64, 48)), ("2", 11, (48, 48)), ("4", 4, (48, 10))):
        rep = report.info["layers"][name]
        assert rep["params_before"] == d_in * d_out + d_out
        assert rep["params_after"] == rank * (d_in + d_out) + d_out <= 0.5 * rep["params_before"]
        assert isinstance(f.get_submodule(name), FactorizedLayer)
        assert 0 < rep["rel_error"] < 1
    layers = report.info["layers"]
    assert n_params(f) == n_params(m) - sum(r["params_before"] - r["params_after"] for r in layers.values())
    x = torch.randn(1, 64)
    assert count_macs(f, x).total == 13 * (64 + 48) + 11 * (48 + 48) + 4 * (48 + 10) < count_macs(m, x).total


@pytest.mark.parametrize("shape,rank", [((24, 16, 3, 3), 12), ((24, 16, 3, 3), 40), ((16, 8, 5, 3), 30)],
                         ids=["below-dims", "past-both-channel-counts", "5x3"])
def test_cp_als_fits_as_well_as_tensorly_parafac(shape, rank):
    """Our CP-ALS (no Khatri-Rao matrix) reaches tensorly's parafac error at the same rank, including
    ranks past both channel counts (the default rank of a wide conv is)."""
    from tensorly.decomposition import parafac

    from modelpress.lowrank.cp import cp_factors

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    ours = cp_factors(w, rank)
    lam, theirs = parafac(w.double().numpy(), rank=rank, init="svd", n_iter_max=100, tol=1e-8,
                          normalize_factors=True, random_state=0)
    theirs = [torch.from_numpy(f.copy()) for f in theirs]
    theirs[0] = theirs[0] * torch.from_numpy(lam.copy())[None, :]

    def error(factors):
        return float((w.double() - torch.einsum("or,ir,hr,wr->oihw", *factors)).norm() / w.double().norm())

    assert [tuple(f.shape) for f in ours] == [(s, rank) for s in shape]
    assert all(torch.isfinite(f).all() for f in ours)
    assert error(ours) <= error(theirs) + 0.01
    norms = torch.stack([f.norm(dim=0) for f in ours])  # weight spread evenly over the four factors
    assert torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-4)


def test_tucker_and_cp_report_exact_params_and_macs():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1))
    x = torch.randn(1, 16, 8, 8)
    f, report = run_method(m, Tucker(rank_ratio=0.5), MethodInputs())
    assert {n: r["rank"] for n, r in report.info["layers"].items()} == {"0": [16, 8], "2": [16, 16]}
    assert report.info["layers"]["0"]["params_after"] == 16 * 8 + 8 * 16 * 9 + 16 * 32 + 32
    tucker_macs = (64 * (16 * 8 + 8 * 16 * 9 + 16 * 32)          # conv 0 at 8x8
                   + 64 * 32 * 16 + 16 * (16 * 16 * 9 + 16 * 32))  # conv 2: 1x1 at 8x8, then 4x4
    assert count_macs(f, x).total == tucker_macs < count_macs(m, x).total
    assert n_params(f) == sum(r["params_after"] for r in report.info["layers"].values())

    f, report = run_method(m, CP(rank=12), MethodInputs())
    assert report.info["layers"]["2"]["params_after"] == 12 * (32 + 3 + 3 + 32) + 32
    cp_macs = 64 * 12 * (16 + 3 + 3 + 32) + 64 * 12 * 32 + 4 * 8 * 12 * 3 + 16 * 12 * (3 + 32)
    assert count_macs(f, x).total == cp_macs < count_macs(m, x).total


def test_tucker_vbmf_finds_the_channel_ranks_of_each_kernel():
    g = torch.Generator().manual_seed(0)
    # kernels of multilinear rank (4, 3) on the channel modes plus a little noise
    core = torch.randn(4, 3, 3, 3, generator=g)
    kernel = torch.einsum("abhw,oa,ib->oihw", core, torch.randn(24, 4, generator=g), torch.randn(16, 3, generator=g))
    m = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 32, 3, stride=2, padding=1))
    with torch.no_grad():
        m[0].weight.copy_(kernel + 0.01 * torch.randn(kernel.shape, generator=g))
    f, report = run_method(m, Tucker(vbmf=True), MethodInputs())
    assert report.info["layers"]["0"]["rank"] == [4, 3]
    w = m[2].weight.detach()  # a default-initialised (noise-like) kernel: whatever VBMF finds on each unfolding
    assert report.info["layers"]["2"]["rank"] == [vbmf_rank(w.reshape(32, -1)),
                                               vbmf_rank(w.transpose(0, 1).reshape(24, -1))]
    assert [tuple(c.weight.shape) for c in f[0]] == [(3, 16, 1, 1), (4, 3, 3, 3), (24, 4, 1, 1)]
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert f(x).shape == m(x).shape == (2, 32, 4, 4)
        assert torch.allclose(f[0](x), m[0](x), atol=0.05 * m[0](x).abs().max().item())
    assert count_macs(f, x[:1]).total < count_macs(m, x[:1]).total
    # min_rank still bounds the ranks from below
    _, report = run_method(m, Tucker(vbmf=True, min_rank=5), MethodInputs())
    assert report.info["layers"]["0"]["rank"] == [5, 5]


def test_layers_that_cannot_be_factorized_are_skipped_and_reported():
    model = ConvNet()
    for cfg in (Tucker(rank_ratio=0.5), CP(rank=4)):
        f, report = run_method(model, cfg, MethodInputs())
        assert "grouped conv" in report.info["skipped"]["dw"]
        assert type(f.dw) is nn.Conv2d and "dw" not in report.info["layers"]
    f, report = run_method(model, SVD(rank_ratio=0.25), MethodInputs())
    info = report.info
    assert "3x3 conv" in info["skipped"]["conv1"] and "pw" in info["layers"] and "fc" in info["layers"]
    assert f(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    _, report = run_method(mlp(), SVD(energy=1.0), MethodInputs())  # full rank never shrinks a layer
    assert not report.info["layers"] and set(report.info["skipped"]) == {"0", "2", "4"}


def test_keep_first_last_and_scope():
    _, report = run_method(mlp(), SVD(rank_ratio=0.2, keep_first_last=True), MethodInputs())
    assert list(report.info["layers"]) == ["2"]
    _, report = run_method(mlp(), SVD(rank_ratio=0.2, scope={"include": ["0"]}), MethodInputs())
    assert list(report.info["layers"]) == ["0"]


# -- artifacts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [SVD(rank_ratio=0.3), Tucker(rank_ratio=0.5), CP(rank=6)], ids=["svd", "tucker", "cp"])
def test_artifact_roundtrip_reproduces_outputs(cfg, tmp_path):
    torch.manual_seed(0)
    model = ConvNet().eval()
    f = factorize(model, cfg).eval()
    path = save_artifact(f, tmp_path / "m.safetensors")
    loaded, _ = load_artifact(path, base_model=ConvNet())
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), f(x))
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in f.modules()]


# -- fine-tuning ----------------------------------------------------------------------------------
def test_train_fine_tunes_the_factorized_model(toy_data):
    train, test = toy_data
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    f, report = run_method(m, SVD(rank_ratio=0.25, scope={"include": ["2"]}),
                           MethodInputs(data=train, train=TrainConfig(epochs=1)))
    assert report.fine_tuned  # the engine fine-tunes after the one-shot factorization
    plain = factorize(m, SVD(rank_ratio=0.25, scope={"include": ["2"]}))
    assert not torch.equal(f[2][0].weight, plain[2][0].weight)  # the factors themselves were trained
    _, report = run_method(m, SVD(rank_ratio=0.25), MethodInputs())  # no data: no training
    assert not report.trained and not report.fine_tuned


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("build,field", [
    (lambda: SVD(energy=1.5), "energy"), (lambda: SVD(rank_ratio=0), "rank_ratio"),
    (lambda: SVD(param_ratio=1.0), "param_ratio"), (lambda: SVD(min_rank=0), "min_rank"),
    (lambda: SVD(energy=0.9, rank_ratio=0.5), "rank_ratio, energy"),
    (lambda: Tucker(energy=-0.1), "energy"), (lambda: Tucker(rank_ratio=2), "rank_ratio"),
    (lambda: CP(rank=0), "rank"), (lambda: CP(rank=4, param_ratio=0.5), "rank, param_ratio"),
    (lambda: CP(max_error=0), "max_error"),
    (lambda: Tucker(vbmf=True, energy=0.9), "energy, vbmf"), (lambda: Tucker(vbmf=True, param_ratio=0.5), "vbmf"),
])
def test_bad_configs_name_the_field(build, field):
    with pytest.raises(ConfigError, match=field):
        build()


def test_scope_matching_nothing_is_an_error():
    with pytest.raises(ScopeError, match="fc9"):
        factorize(mlp(), SVD(scope={"include": ["fc9"]}))
    with pytest.raises(ScopeError):
        factorize(mlp(), Tucker())  # no Conv2d at all


def test_configs_round_trip():
    for cfg in (SVD(param_ratio=0.4, scope={"exclude": ["fc"]}), Tucker(energy=0.9), Tucker(vbmf=True),
                CP(rank=8, max_error=0.4)):
        assert type(cfg).from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("cfg", [CP(rank=4), Tucker(rank_ratio=0.5), SVD(rank_ratio=0.5)], ids=["cp", "tucker", "svd"])
def test_factorized_layer_exposes_the_dense_weight_model_code_reads(cfg):
    """Model code that reads ``layer.weight`` (HF ViT reads the patch projection's dtype) gets the
    dense weight the factors multiply out to: same shape, and a conv/linear with it gives the same output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=2, dilation=2), nn.Flatten(), nn.Linear(256, 10))
    out, _ = run_method(model, cfg)
    factorized = [(n, m) for n, m in out.named_modules() if isinstance(m, FactorizedLayer)]
    assert factorized
    for name, layer in factorized:
        orig = model.get_submodule(name)
        assert layer.weight.shape == orig.weight.shape and layer.weight.dtype == orig.weight.dtype
        if layer.weight.dim() == 4:
            x = torch.randn(2, orig.in_channels, 8, 8)
            dense = F.conv2d(x, layer.weight, layer.bias, orig.stride, orig.padding, orig.dilation)
        else:
            x = torch.randn(2, orig.in_features)
            dense = F.linear(x, layer.weight, layer.bias)
        torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=1e-5)

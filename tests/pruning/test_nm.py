import pytest
import torch
from torch import nn

from modelpress import Scope, TrainConfig, prune
from modelpress.core.errors import ConfigError, UnsupportedError
from modelpress.core.masks import get_mask, strip_masks
from modelpress.core.training import fit
from modelpress.pruning.nm import NMSparsity, nm_mask, verify_nm

PATTERNS = [(2, 4), (1, 4), (4, 8)]


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)  # reduction 8*3*3 = 72: divisible by 4 and 8
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def groups_channels_last(w, m):
    """Groups of m along the input dimension, conv filters flattened (kh, kw, in)."""
    rows = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1) if w.dim() == 4 else w
    return rows.reshape(-1, m)


@pytest.mark.parametrize("n, m", PATTERNS)
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_pattern_holds_and_keeps_the_largest_per_group(n, m, layer, tiny_mlp):
    if layer == "linear":
        model, name = tiny_mlp, "fc2"
    else:
        model, name = ConvNet(), "conv2"
    p = prune(model, NMSparsity(n=n, m=m, scope=Scope(include=[name])))
    orig, new = getattr(model, name).weight.detach(), getattr(p, name).weight.detach()
    assert verify_nm(new, n, m)
    assert int((new == 0).sum()) == new.numel() * (m - n) // m  # exactly 1 - n/m
    g_orig, g_new = groups_channels_last(orig, m), groups_channels_last(new, m)
    assert torch.all((g_new != 0).sum(1) == n)
    kept = torch.where(g_new != 0, g_orig.abs(), torch.inf).min(1).values
    dropped = torch.where(g_new == 0, g_orig.abs(), -torch.inf).max(1).values
    assert torch.all(kept >= dropped)  # the N largest of each group survive
    assert torch.equal(get_mask(getattr(p, name)), (new != 0).float())


def test_conv_groups_run_along_input_channels():
    w = torch.zeros(1, 4, 2, 2)
    w[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # one group: 4 input channels at position (0, 0)
    w[0, :, 1, 1] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    mask = nm_mask(w, 2, 4)
    assert mask[0, :, 0, 0].tolist() == [0, 0, 1, 1] and mask[0, :, 1, 1].tolist() == [1, 1, 0, 0]


def test_verify_nm_rejects_violations():
    w = torch.tensor([[1.0, 2.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
    assert verify_nm(w, 2, 4) and not verify_nm(w, 1, 4)
    w[0, 2] = 3.0
    assert not verify_nm(w, 2, 4)
    assert not verify_nm(torch.randn(4, 8), 2, 4)


def test_masks_keep_the_pattern_through_momentum_training(tiny_mlp, toy_data):
    train, _ = toy_data
    p = prune(tiny_mlp, NMSparsity(n=2, m=4, keep_first_last=False))
    zero_before = [m.weight == 0 for m in (p.fc1, p.fc2, p.fc3)]
    fit(p, train, TrainConfig(epochs=3, lr=0.05, optimizer="sgd", momentum=0.9))
    for zero, m in zip(zero_before, (p.fc1, p.fc2, p.fc3)):
        assert torch.all(m.weight[zero] == 0) and verify_nm(m.weight, 2, 4)
    strip_masks(p)
    assert verify_nm(p.fc2.weight, 2, 4) and get_mask(p.fc2) is None


def test_indivisible_input_dimension_is_skipped_an_error_or_padded():
    from modelpress.engine import MethodInputs, run_method
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 8), nn.Linear(8, 4), nn.Linear(4, 2))
    p, report = run_method(model, NMSparsity(n=2, m=4), MethodInputs())  # default: incompatible layers stay dense
    assert report.info["skipped"] == {"1": "input dimension 6 is not divisible by m=4"}
    assert get_mask(p[1]) is None and verify_nm(p[2].weight, 2, 4)
    with pytest.raises(UnsupportedError, match="layer '1'.*6.*not divisible by m=4"):
        prune(model, NMSparsity(n=2, m=4, incompatible="error"))
    with pytest.raises(UnsupportedError, match="layer '1'"):  # named explicitly: never skipped silently
        prune(model, NMSparsity(n=2, m=4, scope={"include": ["1", "2"]}))
    assert get_mask(model[1]) is None  # nothing touched before the error
    p = prune(model, NMSparsity(n=2, m=4, incompatible="pad"))
    w = p[1].weight
    assert verify_nm(w, 2, 4)
    assert int((w != 0).sum()) == 8 * (2 + 2)  # 6 = one full group (keeps 2) + a short group of 2 (keeps 2)


def test_config_validation():
    with pytest.raises(ConfigError, match="n .* must be smaller than m"):
        NMSparsity(n=4, m=4)
    assert NMSparsity.from_dict(NMSparsity(n=1, m=8).to_dict()) == NMSparsity(n=1, m=8)

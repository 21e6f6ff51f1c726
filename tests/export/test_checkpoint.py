import os

import pytest
import torch
from torch import nn

from modelpress import MagnitudePruning, prune
from modelpress.artifact.checkpoint import load_state, save_artifact
from modelpress.artifact.loading import load_artifact
from modelpress.core.errors import ModelLoadError
from modelpress.core.masks import get_mask


def dense_bytes(model):
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_sparse_model_is_smaller_on_disk_and_reloads_bit_exact(tmp_path):
    from tinymodels import TinyMLP
    big = TinyMLP(d_in=256, hidden=256, classes=256)
    p = prune(big, MagnitudePruning(sparsity=0.9, keep_first_last=False))
    path = save_artifact(p, tmp_path / "m.safetensors")
    # 10% values (fp32) + a 1-bit mask per weight ~ 0.1 + 1/32 of the dense bytes, plus header
    assert path.stat().st_size < dense_bytes(p) / 6
    again, header = load_artifact(path, base_model=TinyMLP(d_in=256, hidden=256, classes=256))
    for k, v in p.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert header["encodings"]["fc2.weight"]["kind"] in ("sparse", "relidx")  # the smaller one wins
    assert torch.equal(get_mask(again.fc2), (p.fc2.weight != 0).float())  # masks come back


def test_structure_changes_are_rebuilt(tmp_path, tiny_mlp):
    tiny_mlp.fc2 = nn.Sequential(nn.Linear(32, 5, bias=False), nn.Linear(5, 32))  # e.g. low-rank
    tiny_mlp.fc3 = nn.Linear(32, 4)
    path = save_artifact(tiny_mlp, tmp_path / "m.safetensors")
    from tinymodels import TinyMLP
    again, _ = load_artifact(path, base_model=TinyMLP())
    x = torch.randn(3, 16)
    assert torch.equal(again(x), tiny_mlp.eval()(x))


def test_failed_save_leaves_previous_file_intact(tmp_path, tiny_mlp, monkeypatch):
    path = save_artifact(tiny_mlp, tmp_path / "m.safetensors")
    before = path.read_bytes()
    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError):
        save_artifact(tiny_mlp, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]


@pytest.mark.parametrize("content", [b"", b"12345678", b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json"])
def test_corrupt_files_are_clear_errors(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="bad.safetensors"):
        load_state(path)


def test_truncated_file_and_wrong_architecture(tmp_path, tiny_mlp):
    path = save_artifact(tiny_mlp, tmp_path / "m.safetensors")
    data = path.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        load_artifact(tmp_path / "t.safetensors", base_model=tiny_mlp)
    other = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ModelLoadError, match="does not fit"):
        load_artifact(path, base_model=other)


def test_missing_source_needs_base_model(tmp_path, tiny_mlp):
    path = save_artifact(tiny_mlp, tmp_path / "m.safetensors")
    with pytest.raises(ModelLoadError, match="does not record how to build"):
        load_artifact(path)


class _Versioned(torch.nn.Linear):
    """Like torchvision's MNASNet: loading reads the module's version from the state-dict metadata."""

    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version") != 2:
            raise ValueError("version should be set to 1 or 2 instead of None")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


def test_modules_reading_their_state_dict_version_load(tmp_path):
    model = torch.nn.Sequential(_Versioned(4, 3))
    path = save_artifact(model, tmp_path / "v.safetensors")
    again, _ = load_artifact(path, base_model=torch.nn.Sequential(_Versioned(4, 3)))
    torch.testing.assert_close(again[0].weight, model[0].weight)


def test_a_models_own_mask_buffer_is_not_a_pruning_mask(tmp_path):
    """timm's Swin blocks hold an ``attn_mask`` buffer beside an ``attn`` module: reloading a pruned
    copy read it as the mask of ``attn`` and raised a raw AttributeError."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(8, 8)
            self.fc = nn.Linear(8, 8)
            self.register_buffer("attn_mask", torch.zeros(8, 8))

        def forward(self, x):
            return self.fc(self.attn(x) + self.attn_mask.sum())

    from modelpress.core.masks import masked_params

    model = Block()
    assert list(masked_params(model)) == []
    pruned = prune(model, MagnitudePruning(sparsity=0.5, keep_first_last=False))
    assert sorted(p for _, _, p, _ in masked_params(pruned)) == ["weight", "weight"]
    path = save_artifact(pruned, tmp_path / "p.safetensors")
    again, header = load_artifact(path, base_model=Block())
    assert header["meta"]["masked"] == ["attn.weight", "fc.weight"]
    x = torch.randn(2, 8)
    assert torch.equal(again(x), pruned(x)) and get_mask(again.fc, "weight") is not None

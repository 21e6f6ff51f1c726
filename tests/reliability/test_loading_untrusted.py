"""Loading never runs code it was not allowed to, and bad checkpoints are one-line errors."""
from __future__ import annotations

import json
import os

import pytest
import torch
from _helpers import assert_one_line_error
from safetensors.torch import save_file
from torch import nn

from modelpress.artifact import checkpoint
from modelpress.artifact.checkpoint import load_state, save_artifact
from modelpress.artifact.loading import load_artifact, load_model
from modelpress.core.errors import ModelLoadError


class _Exploit:
    """Unpickling this runs ``touch MARKER``: the classic pickle payload."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_payload_is_refused_without_running_and_names_the_flag(tmp_path, cli):
    marker = tmp_path / "pwned"
    torch.save({"state": _Exploit(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ModelLoadError, match="needs arbitrary code to load; refused") as e:
        load_model(tmp_path / "evil.pt")
    assert "--trust-remote-code" in e.value.hint and "trust_remote_code=True" in e.value.hint
    assert not marker.exists()
    res = cli("export", "-m", tmp_path / "evil.pt", "-d", "digits", "-o", tmp_path / "x.safetensors")
    assert_one_line_error(res, "evil.pt", "refused")
    assert "--trust-remote-code" in res.err and not marker.exists()
    assert not (tmp_path / "x.safetensors").exists()


def test_whole_pickled_module_loads_only_with_the_flag(tmp_path, cli):
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), tmp_path / "full.pt")
    res = cli("export", "-m", tmp_path / "full.pt", "-d", "digits", "-o", tmp_path / "a.safetensors")
    assert_one_line_error(res, "refused")
    res = cli("export", "-m", tmp_path / "full.pt", "-d", "digits", "-o", tmp_path / "a.safetensors",
              "--trust-remote-code")
    assert res.code == 0, res.text
    state = load_artifact(tmp_path / "a.safetensors", base_model=torch.load(tmp_path / "full.pt", weights_only=False))
    assert state[0][1].weight.shape == (10, 784)


def test_artifact_naming_a_factory_never_imports_it_without_trust(tmp_path):
    marker = tmp_path / "imported"
    (tmp_path / "f.py").write_text("import pathlib\n"
                                   f"pathlib.Path({str(marker)!r}).touch()\n"
                                   "import torch.nn as nn\n"
                                   "def build():\n    return nn.Linear(4, 2)\n")
    model = load_model(f"{tmp_path / 'f.py'}:build")  # the user ran it on purpose
    marker.unlink()
    path = save_artifact(model, tmp_path / "a.safetensors")
    with pytest.raises(ModelLoadError, match="built by running") as e:
        load_artifact(path)
    assert "--trust-remote-code" in e.value.hint
    assert not marker.exists()
    again, _ = load_artifact(path, trust_remote_code=True)
    assert torch.equal(again.weight, model.weight) and marker.exists()


def _bytes(path):
    return path.read_bytes()


def _rewrite_header(src, dst, edit):
    """Write ``src``'s tensors with an edited header, as a format-1 artifact (a plain JSON
    header, which loaders still accept): the tampering an attacker or a bad disk could do."""
    state, header = load_state(src)
    header = {k: v for k, v in header.items() if k != "packed"}
    header.update(format=getattr(checkpoint, "FORMAT_V1", checkpoint.FORMAT), encodings={}, ties={})
    edit(header)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst), metadata={"modelpress": json.dumps(header)})


# kind -> (make the bad file from a good one, what the one-line error says)
BAD_ARTIFACTS = {
    "empty": (lambda good, p: p.write_bytes(b""), "is empty or truncated"),
    "truncated-header": (lambda good, p: p.write_bytes(_bytes(good)[:20]), "not a valid safetensors file"),
    "truncated-data": (lambda good, p: p.write_bytes(_bytes(good)[:-100]), "not a valid safetensors file"),
    "garbage": (lambda good, p: p.write_bytes(os.urandom(4096)), "not a valid safetensors file"),
    "not-modelpress": (lambda good, p: save_file({"w": torch.zeros(2)}, str(p)), "without modelpress metadata"),
    "bad-format": (lambda good, p: _rewrite_header(good, p, lambda h: h.update(format="other/9")),
                   "has format 'other/9'"),
    "unknown-class": (lambda good, p: _rewrite_header(
        good, p, lambda h: h["structure"].update({"conv1": {"class": "os.system", "args": {}}})),
        "module class 'os.system' at 'conv1'"),
    "unknown-encoding": (lambda good, p: _rewrite_header(
        good, p, lambda h: h["encodings"].update({"fc1.weight": {"kind": "pickle"}})),
        "unknown encoding 'pickle'"),
    "unknown-source": (lambda good, p: _rewrite_header(good, p, lambda h: h.update(source={"url": "http://x"})),
                       "unknown model source"),
    "other-zoo-model": (lambda good, p: _rewrite_header(good, p, lambda h: h.update(source={"zoo": "lenet300"})),
                        "does not fit the model (LeNet300)"),
}


@pytest.mark.parametrize("kind", list(BAD_ARTIFACTS))
def test_bad_artifacts_are_one_line_model_load_errors(tmp_path, kind):
    good = save_artifact(_lenet5(), tmp_path / "good.safetensors")
    make, message = BAD_ARTIFACTS[kind]
    bad = tmp_path / f"{kind}.safetensors"
    make(good, bad)
    with pytest.raises(ModelLoadError) as e:
        load_model(bad)
    assert message in str(e.value) and "\n" not in str(e.value)


def _lenet5():
    return load_model("lenet5")


BAD_TORCH = {
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(os.urandom(2048)),
    "truncated": lambda p: (torch.save(nn.Linear(64, 64), p), p.write_bytes(p.read_bytes()[:500])),
    "weights-only": lambda p: torch.save(nn.Linear(4, 4).state_dict(), p),
}


@pytest.mark.parametrize("kind", list(BAD_TORCH))
@pytest.mark.parametrize("trust", [False, True])
def test_bad_torch_files_are_model_load_errors(tmp_path, kind, trust):
    path = tmp_path / f"{kind}.pt"
    BAD_TORCH[kind](path)
    with pytest.raises(ModelLoadError, match=kind.split("-")[0] if kind == "weights-only" else "could not be read"):
        load_model(path, trust_remote_code=trust)


def test_wrong_architecture_is_refused_not_grafted(tmp_path):
    path = save_artifact(_lenet5(), tmp_path / "lenet5.safetensors")
    with pytest.raises(ModelLoadError, match="does not fit the model .*'conv1'") as e:
        load_artifact(path, base_model=load_model("lenet300"))
    assert "different architecture" in e.value.hint
    with pytest.raises(ModelLoadError, match="does not fit the model"):
        load_artifact(path, base_model=nn.Sequential(nn.Linear(3, 3)))


def test_cli_reports_a_truncated_checkpoint_in_one_line(tmp_path, cli):
    good = save_artifact(_lenet5(), tmp_path / "good.safetensors")
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    res = cli("evaluate", "-m", bad, "-d", "digits")
    assert_one_line_error(res, "cut.safetensors", "not a valid safetensors file")
    res = cli("evaluate", "-m", tmp_path / "missing.safetensors", "-d", "digits")
    assert_one_line_error(res, "missing.safetensors")

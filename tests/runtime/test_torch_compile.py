"""The torch-compile runtime: a torch.export program (.pt2, dynamic batch) compiled by TorchInductor where
it runs; exported, checked, timed and analysed like the other runtimes' files (issue 18)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.analysis.analyze import analyze
from modelpress.core.errors import ModelLoadError, UnsupportedError
from modelpress.export.deploy import export_deployable
from modelpress.runtime import Deployed, get_runtime

RT = get_runtime("torch-compile")
pytestmark = pytest.mark.skipif(not RT.available(), reason="Inductor needs a C++ compiler")


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5)).eval()


def test_program_runs_compiled_like_pytorch_at_any_batch_size(tmp_path):
    model = small_cnn()
    path, note = export_deployable(model, torch.randn(1, 1, 8, 8), tmp_path / "cnn.pt2", fmt="pt2")  # one sample
    assert path.suffix == ".pt2" and "max abs diff" in note and not list(tmp_path.glob(".*partial*"))
    session = Deployed(path, "torch-compile").open(threads=1)
    for batch in (1, 3):
        x = torch.randn(batch, 1, 8, 8)
        (out,) = session(x)
        assert out.shape == (batch, 5) and torch.allclose(out, model(x), atol=1e-5)


def test_dict_inputs_of_a_transformer(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    bert = transformers.BertModel(config).eval()
    batch = {"input_ids": torch.randint(0, 50, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    path = RT.build(bert, batch, tmp_path)
    out = get_runtime("torch-compile").open(path)(batch)
    assert torch.allclose(out[0], bert(**batch).last_hidden_state, atol=1e-4)


def test_analyze_times_it_beside_eager_and_bad_files_are_one_line_errors(tmp_path):
    report = analyze(small_cnn(), torch.randn(2, 1, 8, 8), batch_sizes=(1,), repeats=3, runtimes=("torch-compile",))
    assert {e["engine"] for e in report.latency} == {"eager", "torch-compile"}
    assert "tc_b1_ms" in report.summary()
    bad = tmp_path / "junk.pt2"
    bad.write_bytes(b"not a program")
    with pytest.raises(ModelLoadError, match="torch.export program"):
        RT.open(bad)

    class DataDependent(nn.Module):
        def forward(self, x):
            return x[x > 0].sum(0, keepdim=True) if x.sum() > 0 else x.nonzero()

    with pytest.raises(UnsupportedError, match="torch.export could not capture DataDependent"):
        export_deployable(DataDependent(), torch.randn(4, 3), tmp_path / "d.pt2", fmt="pt2")
    assert not (tmp_path / "d.pt2").exists()


def test_cli_export_writes_a_checked_program(tmp_path, capsys):
    import sys

    from modelpress.cli import main

    old, sys.argv = sys.argv, ["modelpress", "export", "-m", "lenet300", "-d", "digits", "-o", str(tmp_path / "m"),
                               "--runtime", "torch-compile"]
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr().err
    finally:
        sys.argv = old
    assert (tmp_path / "m.pt2").is_file() and "torch.export program" in capsys.readouterr().out

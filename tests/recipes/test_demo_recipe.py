"""The demo's recipe (`modelpress demo`), shortened: it removes work and shrinks the file as it says."""
from __future__ import annotations

from modelpress import compress
from modelpress.cli.run import DEMO_RECIPE


def test_demo_recipe_cuts_macs_and_bytes(tmp_path):
    fast = ["baseline.train.epochs=1", "stage.1.finetune.epochs=0.3", "stage.2.finetune.epochs=0.1",
            "eval.latency=false", "eval.onnx=false"]
    result = compress(None, DEMO_RECIPE, out=tmp_path / "run", overrides=fast)
    base, channels, share = result.rows
    assert base["macs"] / channels["macs"] >= 4.0 and share["macs"] == channels["macs"]
    assert base["artifact_bytes"] / share["artifact_bytes"] >= 25
    assert share["accuracy"] > 0.3  # well above chance (0.10) after these very short trainings
    assert (tmp_path / "run" / "report.md").is_file()

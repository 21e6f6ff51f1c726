"""A run killed (SIGKILL) at any point resumes from the last finished stage and ends with
exactly the bytes an uninterrupted run with the same seed writes.

The kill points are exact: ``MODELPRESS_TEST_KILL_AT=<point>`` (test-only, see
``modelpress.core.io.kill_point``) makes the run SIGKILL itself there. Points between files
(``stage-1-saved``: artifact written, completion marker not yet) and inside an atomic write
(``rename:NAME``: new bytes complete in the temporary file, not yet renamed) are both covered.
"""
from __future__ import annotations

import json

import pytest
from _helpers import NO_LATENCY, forked, killed_by, tiny_mlp, toy_bundle

import modelpress.analysis.report_html as report_html
from modelpress import compress
from modelpress.artifact.checkpoint import load_state
from modelpress.core.io import KILL_ENV, TEMP_SUFFIX, write_text
from modelpress.recipes.schema import Recipe

POINTS = [
    "recipe-written",
    "baseline-saved",            # baseline.safetensors written, baseline.json not yet
    "baseline-done",
    "rename:model.safetensors",  # inside the atomic write of stage 1's artifact
    "stage-1-saved",             # stage 1 artifact written, its metrics.json not yet
    "rename:metrics.json",       # inside the atomic write of stage 1's completion marker
    "stage-1-done",              # stage 1 complete, reports not yet rewritten
    "rename:report.json",
    "stage-2-saved",
    "final-saved",               # final artifact written, final reports not yet
]


def _recipe() -> Recipe:
    return Recipe.from_dict({"version": 1, "name": "resume", "seed": 7, "eval": NO_LATENCY, "stages": [
        {"name": "p60", "method": "prune.magnitude", "config": {"sparsity": 0.6, "keep_first_last": False},
         "finetune": {"epochs": 1, "lr": 0.01}},
        {"name": "w4", "method": "quant.weight_only", "config": {"bits": 4}}]})


def _cheap_html(out_dir, *args, **kwargs):
    # as conftest's autouse stub, which a module-scoped fixture runs before
    return write_text(out_dir / "report.html", "<html></html>")


def _run(out):
    return compress(tiny_mlp(), _recipe(), toy_bundle(), out=out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report_html, "write_html_report", _cheap_html)
        out = tmp_path_factory.mktemp("uninterrupted")
        _run(out)
    return out


def _outputs(run):
    """The bytes that define a run's result: every artifact, and the reports' JSON."""
    files = {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*.safetensors")}
    files["report.json"] = json.loads((run / "report.json").read_text())
    for p in run.rglob("metrics.json"):
        files[p.relative_to(run).as_posix()] = json.loads(p.read_text())
    return files


def _assert_only_whole_files(run):
    for p in run.rglob("*"):
        if p.name.endswith(TEMP_SUFFIX):
            continue  # a temporary file of the write that was killed: never read
        if p.suffix == ".safetensors":
            load_state(p)
        elif p.suffix == ".json":
            json.loads(p.read_text())


@pytest.mark.parametrize("point", POINTS)
def test_killed_run_resumes_to_the_same_bytes(tmp_path, reference, point):
    run = tmp_path / "run"
    status = forked(lambda: _run(run), env={KILL_ENV: point})
    assert killed_by(status, 9), f"the run was not killed at {point!r} (status {status})"
    _assert_only_whole_files(run)
    if point != "final-saved":
        assert not (run / "model.safetensors").exists()

    result = _run(run)  # the same call resumes
    assert [r["label"] for r in result.rows] == ["baseline", "p60", "w4"]
    assert not list(run.rglob(f"*{TEMP_SUFFIX}"))
    got, want = _outputs(run), _outputs(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == want[name], f"{name} differs after a kill at {point!r}"


def test_cli_run_killed_mid_stage_resumes_to_the_same_artifact(tmp_path, cli, net_py):
    """The same through the command line, on a dataset by name and a model from a file."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nname: cli-resume\nseed: 3\neval: {latency: false, onnx: false}\nstages:\n"
                      "  - {method: prune.magnitude, config: {sparsity: 0.7, keep_first_last: false},\n"
                      "     finetune: {epochs: 0.5, lr: 0.005}}\n")
    args = ["compress", "-r", recipe, "-m", f"{net_py}:build", "-d", "digits"]
    assert cli(*args, "-o", tmp_path / "ref").code == 0
    status = forked(lambda: cli(*args, "-o", tmp_path / "run"), env={KILL_ENV: "stage-1-saved"})
    assert killed_by(status, 9)
    res = cli(*args, "-o", tmp_path / "run")
    assert res.code == 0 and "resuming" in res.err
    final = "model.safetensors"
    assert (tmp_path / "run" / final).read_bytes() == (tmp_path / "ref" / final).read_bytes()

"""Writes are atomic: a failed or killed write leaves the previous file, never a partial one;
outputs get normal permissions; the input model is modified only when asked (inplace=True)."""
from __future__ import annotations

import os
import stat

import pytest
import torch
from _helpers import NO_LATENCY, forked, killed_by, tiny_mlp, toy_bundle

from modelpress import MagnitudePruning, compress, prune
from modelpress.artifact.checkpoint import save_artifact
from modelpress.artifact.loading import load_artifact
from modelpress.core import io
from modelpress.recipes.schema import Recipe


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _temps(folder):
    return sorted(p.name for p in folder.rglob(f".*{io.TEMP_SUFFIX}"))


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "report.json"
    io.write_json(target, {"v": 1})
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        with io.atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "half')  # half of the new content is on disk ...
            raise RuntimeError("disk full")  # ... when the writer fails
    assert target.read_bytes() == before
    assert _temps(tmp_path) == []


def test_a_failing_artifact_save_keeps_the_previous_artifact(tmp_path, monkeypatch):
    import safetensors.torch

    model = tiny_mlp()
    path = save_artifact(model, tmp_path / "model.safetensors")
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\x00" * 100)  # a partial file ...
        raise OSError("No space left on device")  # ... then the failure

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with torch.no_grad():
        model[1].weight.zero_()
    with pytest.raises(OSError, match="No space left"):
        save_artifact(model, path)
    assert path.read_bytes() == before and _temps(tmp_path) == []
    monkeypatch.undo()
    assert not torch.equal(load_artifact(path, base_model=model)[0][1].weight, model[1].weight)


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    dest = tmp_path / "model"
    with io.atomic_dir(dest) as tmp:
        (tmp / "a.json").write_text("1")
    with pytest.raises(RuntimeError, match="failed"):
        with io.atomic_dir(dest) as tmp:
            (tmp / "a.json").write_text("2")
            raise RuntimeError("failed")
    assert [p.name for p in dest.iterdir()] == ["a.json"] and (dest / "a.json").read_text() == "1"

    def no_rename(src, dst, _real=os.replace):  # the last rename fails: the previous folder comes back
        if str(src).endswith(io.TEMP_SUFFIX) and not str(src).endswith(".old" + io.TEMP_SUFFIX):
            raise OSError("rename failed")
        return _real(src, dst)
    monkeypatch.setattr(io.os, "replace", no_rename)
    with pytest.raises(OSError, match="rename failed"):
        with io.atomic_dir(dest) as tmp:
            (tmp / "b.json").write_text("3")
    monkeypatch.undo()
    assert [p.name for p in dest.iterdir()] == ["a.json"]
    with io.atomic_dir(dest) as tmp:
        os.makedirs(tmp / "sub")
        (tmp / "sub" / "b.json").write_text("4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]   # no temporary folder left
    assert [p.name for p in dest.iterdir()] == ["sub"] and _mode(dest / "sub" / "b.json") == 0o666 & ~io._umask()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_new_files_get_the_umask_default_not_0600(tmp_path, umask):
    old = os.umask(umask)
    try:
        io.write_text(tmp_path / "a.md", "x")
        save_artifact(tiny_mlp(), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.md") == 0o666 & ~umask
    assert _mode(tmp_path / "m.safetensors") == 0o666 & ~umask


def test_a_rewrite_keeps_the_files_permissions(tmp_path):
    target = tmp_path / "secret.json"
    io.write_json(target, {"v": 1})
    os.chmod(target, 0o600)
    io.write_json(target, {"v": 2})
    assert _mode(target) == 0o600 and "2" in target.read_text()


def test_onnx_export_gets_normal_permissions(tmp_path):
    from modelpress.export.onnx import export_onnx

    old = os.umask(0o022)
    try:
        path = export_onnx(tiny_mlp(), torch.randn(2, 16), tmp_path / "m.onnx")
    finally:
        os.umask(old)
    assert _mode(path) == 0o644 and _temps(tmp_path) == []


def _recipe():
    return Recipe.from_dict({"version": 1, "name": "atomic", "eval": NO_LATENCY, "stages": [
        {"name": "p50", "method": "prune.magnitude", "config": {"sparsity": 0.5, "keep_first_last": False}}]})


def test_every_run_folder_file_is_written_by_rename(tmp_path, monkeypatch, real_html):
    """Each file a run leaves appeared by an atomic rename, none by writing in place."""
    renamed = set()
    real_replace = os.replace

    def spy(src, dst, *a, **kw):
        renamed.add(os.path.realpath(dst))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", spy)
    compress(tiny_mlp(), _recipe(), toy_bundle(), out=tmp_path / "run")
    files = {os.path.realpath(p) for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert {"model.safetensors", "report.json", "report.md", "report.html", "recipe.yaml",
            "baseline.safetensors", "metrics.json"} <= {os.path.basename(f) for f in files}
    assert files <= renamed, files - renamed


def test_a_run_killed_while_renaming_keeps_the_previous_outputs(tmp_path):
    """A finished run folder, rerun and killed just before replacing model.safetensors: the old
    artifact stays whole; the rerun after it removes the stale temporary file."""
    run = tmp_path / "run"
    compress(tiny_mlp(), _recipe(), toy_bundle(), out=run)
    before = (run / "model.safetensors").read_bytes()
    status = forked(lambda: compress(tiny_mlp(), _recipe(), toy_bundle(), out=run),
                    env={io.KILL_ENV: "rename:model.safetensors"})
    assert killed_by(status, 9)
    assert (run / "model.safetensors").read_bytes() == before
    assert len(_temps(run)) == 1  # the new, complete bytes that never got renamed
    load_artifact(run / "model.safetensors", base_model=tiny_mlp())  # whole and loadable
    compress(tiny_mlp(), _recipe(), toy_bundle(), out=run)
    assert _temps(run) == [] and (run / "model.safetensors").read_bytes() == before


def test_the_input_model_changes_only_when_inplace_is_asked():
    model = tiny_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = prune(model, MagnitudePruning(sparsity=0.5))
    assert out is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    out = prune(model, MagnitudePruning(sparsity=0.5), inplace=True)
    assert out is model and float((model[3].weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)

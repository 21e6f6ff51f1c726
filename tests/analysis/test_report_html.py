"""report.html: self-contained, the table and one plot per kind, exact Pareto front, written by
the pipeline, and rendered by headless Chromium into a screenshot that is not blank."""
from __future__ import annotations

import base64
import glob
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from modelpress import compress
from modelpress.analysis.report_html import (
    TradeoffPoint,
    pareto_front,
    per_layer_series,
    points_from_rows,
    quality_key,
    write_html_report,
)
from modelpress.pruning.sensitivity import SensitivityResult
from modelpress.recipes.schema import Recipe
from modelpress.tasks import Classification
from modelpress.zoo.datasets import DatasetBundle

ROWS = [
    {"label": "baseline", "accuracy": 0.983, "params": 61706, "nonzero": 61706, "artifact_bytes": 248624,
     "macs": 416520, "eager_b1_ms": 0.21},
    {"label": "prune", "accuracy": 0.981, "params": 61706, "nonzero": 13322, "artifact_bytes": 63272,
     "macs": 416520, "eager_b1_ms": 0.20, "eager_b1_speedup": 1.05},
    {"label": "lowrank", "accuracy": 0.978, "params": 25000, "nonzero": 25000, "artifact_bytes": 100000,
     "macs": 150000, "eager_b1_ms": 0.16},
    {"label": "int<8>", "accuracy": 0.972, "params": 25000, "nonzero": 9000, "artifact_bytes": 18000,
     "macs": 150000, "eager_b1_ms": 0.25},
]
INFOS = [
    {"stage": "prune", "method": "prune.magnitude", "layer_sparsity": {"conv2": 0.52, "fc1": 0.85}},
    {"stage": "lowrank", "method": "lowrank.tucker",
     "layers": {"conv2": {"rank": [8, 3]}, "fc1": {"rank": [12, 20]}}, "skipped": {}},
    {"stage": "int<8>", "method": "quant.mixed",
     "layers": [{"layer": "conv2", "bits": 4}, {"layer": "fc1", "bits": 8}]},
]
SENSITIVITY = SensitivityResult(metric="accuracy", baseline=0.98, sparsities=[0.5, 0.9],
                                curves={"conv2": [0.96, 0.6], "fc1": [0.979, 0.93]},
                                sizes={"conv2": 2400, "fc1": 48000})
IMG = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> Path:
    return write_html_report(tmp_path_factory.mktemp("report"), "everything", ROWS, INFOS, sensitivity=SENSITIVITY,
                             description="every kind of plot")


# -- Pareto front ----------------------------------------------------------------------------
def test_pareto_front_on_hand_made_points():
    P = TradeoffPoint
    pts = [P("big", 0.99, 100), P("dominated", 0.90, 60), P("mid", 0.95, 50), P("mid-dup", 0.95, 50),
           P("same-size-worse", 0.94, 50), P("same-q-bigger", 0.95, 70), P("small", 0.80, 10),
           P("tiny-bad", 0.70, 10), P("no-size", 1.0, None), P("nan", float("nan"), 5)]
    assert [p.label for p in pareto_front(pts)] == ["small", "mid", "mid-dup", "big"]
    lat = [P("a", 0.9, latency=2.0), P("b", 0.95, latency=1.0), P("c", 0.99, latency=3.0), P("d", 0.5)]
    assert [p.label for p in pareto_front(lat, "latency")] == ["b", "c"]
    assert pareto_front([]) == []
    with pytest.raises(ValueError, match="cost"):
        pareto_front(pts, "macs")


def test_points_from_rows_and_quality_metric():
    pts = points_from_rows(ROWS)
    assert [(p.label, p.kind, p.size, p.latency) for p in pts[:2]] == [
        ("baseline", "baseline", 248624, 0.21), ("prune", "stage", 63272, 0.20)]
    assert [p.label for p in pareto_front(pts, "size")] == ["int<8>", "prune", "baseline"]
    assert [p.label for p in pareto_front(pts, "latency")] == ["lowrank", "prune", "baseline"]
    assert quality_key([{"label": "b", "spearman": 0.8, "fidelity": 0.99}]) == "spearman"
    assert quality_key([{"label": "b"}]) is None


def test_per_layer_series_reads_every_method_family():
    assert per_layer_series(INFOS[0]) == [("sparsity", {"conv2": [0.52], "fc1": [0.85]})]
    assert per_layer_series(INFOS[1]) == [("rank", {"conv2": [8.0, 3.0], "fc1": [12.0, 20.0]})]
    assert per_layer_series(INFOS[2]) == [("bit-width", {"conv2": [4.0], "fc1": [8.0]})]
    qat = {"layers": {"fc1": {"params": 10, "weight_bits": 4, "act_bits": 8}}}
    assert per_layer_series(qat) == [("bit-width", {"fc1": [4.0]})]
    svd = {"layers": {"fc1": {"rank": 7, "params_before": 100, "params_after": 40}}}
    assert per_layer_series(svd) == [("rank", {"fc1": [7.0]})]
    channels = {"groups": [{"layers": ["conv1", "bn1"], "channels": [16, 12]}]}
    assert per_layer_series(channels) == [("channels removed", {"conv1, bn1": [0.25]})]
    assert per_layer_series({"stage": "kd", "method": "distill.kd", "T": 4.0, "layers": {"x": {"kernel": "fb"}}}) == []


# -- the HTML --------------------------------------------------------------------------------
def test_html_is_self_contained_with_table_and_one_plot_per_kind(full_report):
    html = full_report.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "every kind of plot" in html
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"<(script|link|iframe)\b", html)
    srcs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    images = IMG.findall(html)
    assert [alt for alt, _ in images] == [
        "accuracy vs size", "accuracy vs latency", "stage 1 prune (prune.magnitude) sparsity per layer",
        "stage 2 lowrank (lowrank.tucker) rank per layer", "stage 3 int&lt;8&gt; (quant.mixed) bit-width per layer",
        "per-layer sensitivity curves"]
    for _, data in images:
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        assert img.format == "PNG" and img.width >= 400 and img.height >= 150
    # the report.md table, cell for cell (labels escaped)
    for cell in ("98.30%", "248.62 KB (1.00x)", "63.27 KB (3.93x)", "13.32 K (4.63x)", "0.200 ms (1.05x)",
                 "<th>torch b1</th>", "int&lt;8&gt;"):
        assert cell in html, cell
    assert "<td>int<8>" not in html
    # the sensitivity table
    assert "<td>conv2</td><td>2,400</td><td>96.00%</td><td>60.00%</td>" in html


def test_missing_measurements_leave_notes_instead_of_plots(tmp_path):
    rows = [{"label": "baseline", "spearman": 0.80, "fidelity": 1.0, "artifact_bytes": 90_000_000},
            {"label": "int8", "spearman": 0.79, "fidelity": 0.99, "artifact_bytes": 23_000_000}]
    html = write_html_report(tmp_path, "emb", rows, [{"stage": "int8", "method": "distill.kd", "T": 4.0}]).read_text()
    assert [alt for alt, _ in IMG.findall(html)] == ["spearman vs size"]
    assert "Latency was not measured" in html and "No stage reported per-layer" in html
    assert "0.7900" in html and "Pruning sensitivity" not in html


def test_pipeline_run_folder_gets_report_html(tmp_path, tiny_mlp):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=g)).argmax(1)
    bundle = DatasetBundle(name="toy", train=TensorDataset(x[:200], y[:200]), test=TensorDataset(x[200:], y[200:]),
                           task=Classification(), num_classes=4, input_shape=(16,), meta={})
    recipe = Recipe.from_dict({"version": 1, "name": "two", "eval": {"latency": False, "onnx": False}, "stages": [
        {"name": "p50", "method": "prune.magnitude", "config": {"sparsity": 0.5, "keep_first_last": False}},
        {"name": "p80", "method": "prune.magnitude", "config": {"sparsity": 0.8, "keep_first_last": False}}]})
    res = compress(tiny_mlp, recipe, bundle, out=tmp_path)
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "modelpress report: two" in html
    assert [alt for alt, _ in IMG.findall(html)] == [
        "accuracy vs size", "stage 1 p50 (prune.magnitude) sparsity per layer",
        "stage 2 p80 (prune.magnitude) sparsity per layer"]
    assert f"{100 * res.final['accuracy']:.2f}%" in html and "Latency was not measured" in html
    assert not list(tmp_path.glob(".report.html.*"))  # written atomically, no temporary left behind


# -- headless Chromium -----------------------------------------------------------------------
def find_chromium() -> str | None:
    """``$MODELPRESS_CHROMIUM``, a Chromium/Chrome on PATH, or a browser playwright downloaded."""
    if os.environ.get("MODELPRESS_CHROMIUM"):
        return os.environ["MODELPRESS_CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    root = os.environ.get("PLAYWRIGHT_BROWSERS_PATH") or os.path.expanduser("~/.cache/ms-playwright")
    found = sorted(glob.glob(f"{root}/chromium-*/chrome-linux*/chrome")
                   + glob.glob(f"{root}/chromium_headless_shell-*/chrome-linux*/headless_shell"))
    return found[-1] if found else None


def test_headless_chromium_screenshot_is_not_blank(full_report, tmp_path):
    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium found: install it with `apt-get install -y chromium` (Debian), or "
                    "`pip install playwright && playwright install chromium`, or set MODELPRESS_CHROMIUM")
    shot = tmp_path / "report.png"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
           full_report.resolve().as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), f"chromium wrote no screenshot (exit {res.returncode}):\n{res.stderr[-3000:]}"
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape == (1600, 1200, 3)
    non_white = float((img.min(axis=2) < 235).mean())
    assert non_white > 0.03, f"only {non_white:.1%} of the screenshot is not white"
    colours = len(np.unique(img.reshape(-1, 3), axis=0))
    assert colours > 100, f"{colours} distinct colours"  # text, table shading and plots, not a flat page
    # the plots themselves were decoded and drawn: their marker/bar blue (#1971c2) is on screen
    blue = int((np.abs(img - [0x19, 0x71, 0xC2]).max(axis=2) < 30).sum())
    assert blue > 200, f"{blue} plot-blue pixels"

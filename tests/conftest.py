"""Shared fixtures: tiny models and data, a private cache, quiet progress bars."""
from __future__ import annotations

import os

import pytest
import torch
from tinymodels import TinyMLP

from modelpress.core.compat import prepare_torchvision

os.environ.setdefault("MODELPRESS_PROGRESS", "0")
os.environ.setdefault("COLUMNS", "200")  # rich consoles read it once: CLI output run in-process is not cut at 80
# Tiny models train faster on one thread, and a shared CI machine does not oversubscribe;
# set before torch starts its pools, inherited by the CLI subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # torch is imported above: set its pool too
prepare_torchvision()  # tests import transformers / torchvision themselves: the product's fix first


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Baselines trained by tests go to a per-session cache, never to the user's.
    monkeypatch.setenv("MODELPRESS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.manual_seed(0)


@pytest.fixture
def tiny_mlp():
    return TinyMLP()


@pytest.fixture
def toy_data():
    """A learnable 4-class problem: (train batches, test batches)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    w = torch.randn(16, 4, generator=g)
    y = (x @ w).argmax(1)
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 384, 64)]
    test = [(x[384:], y[384:])]
    return batches, test

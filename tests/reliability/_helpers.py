"""Shared by the reliability tests: tiny models and data, the CLI run in-process, forked runs.

Starting a ``modelpress`` subprocess costs seconds (torch import); these tests run the real
entry point ``modelpress.cli.main`` in this process instead (same argument parsing, error
printing and exit codes), and use ``os.fork`` where a run must be killed by a real signal.
"""
from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from modelpress.tasks import Classification
from modelpress.zoo.datasets import DatasetBundle

NO_LATENCY = {"latency": False, "onnx": False}


def toy_bundle(nan: bool = False) -> DatasetBundle:
    """A learnable 4-class problem on 16 features (500 train / 100 test)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=g)).argmax(1)
    if nan:
        x[3, 5] = float("nan")
        x[503, 2] = float("inf")
    return DatasetBundle(name="toy", train=TensorDataset(x[:500], y[:500]), test=TensorDataset(x[500:], y[500:]),
                         task=Classification(), num_classes=4, input_shape=(16,), meta={})


def tiny_mlp(d_in: int = 16, classes: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d_in, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, classes))


# A factory file for the CLI (`-m net.py:build`): digits are 1x28x28 images, 10 classes.
NET_PY = textwrap.dedent("""
    import torch
    from torch import nn

    class Pair(nn.Module):  # holds a Bilinear: a layer type pruning does not handle
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)
            self.bil = nn.Bilinear(16, 16, 16)

        def forward(self, x):
            return self.bil(x, torch.relu(self.fc(x)))

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))

    def build_wide_input():  # expects 1000 features: wrong for 28x28 images
        return nn.Sequential(nn.Flatten(), nn.Linear(1000, 10))

    def build_nan():
        m = build()
        with torch.no_grad():
            m[3].weight[2, 5] = float("nan")
        return m

    def build_bilinear():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), Pair(), nn.Linear(16, 10))
""")


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def assert_one_line_error(res: CliResult, *fragments: str) -> None:
    """Exit 2, exactly one ``error:`` line holding every fragment, a ``hint:``, no traceback."""
    assert res.code == 2, f"exit {res.code}\n{res.text}"
    assert "Traceback" not in res.text
    errors = [ln for ln in res.err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.err
    for f in fragments:
        assert f in errors[0], f"{f!r} not in {errors[0]!r}"
    assert any(ln.startswith("hint:") for ln in res.err.splitlines()), res.err


def start_forked(fn, *, env: dict[str, str] | None = None, output: Path | None = None,
                 sigint: bool = False) -> int:
    """Start ``fn()`` in a forked child; returns its pid. Its stdout and stderr go to ``output``
    (default: nowhere). The child exits 0 when ``fn`` returns, 1 when it raises, or with the
    status of a SystemExit. ``sigint=True`` gives the child Python's Ctrl-C handler, as in a
    terminal: a test suite started in the background (``pytest &``) inherits SIGINT ignored."""
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            if sigint:
                signal.signal(signal.SIGINT, signal.default_int_handler)
            sink = os.open(output or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(sink, 1)
            os.dup2(sink, 2)
            # the parent's pytest capture replaced sys.stdout/stderr: write to the real fds
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            os.environ.update(env or {})
            fn()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - reported through the exit status
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def wait_status(pid: int, timeout: float = 60.0) -> int:
    """The raw wait status of child ``pid`` (killed, and an AssertionError, after ``timeout``)."""
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"forked child {pid} ran past {timeout}s")
        time.sleep(0.01)


def forked(fn, *, env: dict[str, str] | None = None, output: Path | None = None, timeout: float = 60.0) -> int:
    """Run ``fn()`` in a forked child (see :func:`start_forked`) to its end; returns the wait status."""
    return wait_status(start_forked(fn, env=env, output=output), timeout)


def killed_by(status: int, sig: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == sig

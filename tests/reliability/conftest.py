"""Fixtures of the reliability tests (helpers live in ``_helpers``)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from _helpers import NET_PY, CliResult


@pytest.fixture
def net_py(tmp_path) -> Path:
    """A model factory file for the CLI: ``f"{net_py}:build"`` (see ``_helpers.NET_PY``)."""
    path = tmp_path / "net.py"
    path.write_text(NET_PY)
    return path


@pytest.fixture
def cli(capsys, monkeypatch):
    """``cli(*args)`` runs ``modelpress ARGS`` in-process through the real entry point
    (``modelpress.cli.main``: parsing, error printing, exit codes); returns code, stdout, stderr."""
    from modelpress.cli import main

    monkeypatch.setenv("MODELPRESS_PROGRESS", "0")
    monkeypatch.setenv("COLUMNS", "200")

    def run(*args) -> CliResult:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["modelpress", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(autouse=True)
def _cheap_html_report(request, monkeypatch):
    """report.html (matplotlib figures) is 90% of a tiny run's time and no test here is about
    it: write a stub, unless a test asks for ``real_html``."""
    if "real_html" in request.fixturenames:
        return
    import modelpress.analysis.report_html as report_html
    from modelpress.core.io import write_text

    monkeypatch.setattr(report_html, "write_html_report",
                        lambda out_dir, *a, **kw: write_text(Path(out_dir) / "report.html", "<html></html>"))
    monkeypatch.setattr(report_html, "render_search_html", lambda *a, **kw: "<html></html>", raising=False)


@pytest.fixture
def real_html():
    """Opt out of the report.html stub."""

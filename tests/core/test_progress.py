"""Progress where no terminal shows a live bar: plain lines a log file keeps."""
import io

from modelpress.core import progress


def test_progress_without_a_terminal_prints_a_line_per_tenth(monkeypatch, capsys):
    monkeypatch.setenv("MODELPRESS_PROGRESS", "1")
    monkeypatch.setattr(progress.console, "file", io.StringIO())  # not a terminal
    with progress.progress_bar("distill", 40) as advance:
        for _ in range(40):
            advance(note="loss 0.1")
    lines = progress.console.file.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("distill: 40/40 (100%), ") and lines[-1].endswith("loss 0.1")
    assert lines[0].startswith("distill: 4/40 (10%)") and "left" in lines[0]


def test_progress_is_silent_when_disabled(monkeypatch):
    monkeypatch.setenv("MODELPRESS_PROGRESS", "0")
    monkeypatch.setattr(progress.console, "file", io.StringIO())
    with progress.progress_bar("x", 5) as advance:
        advance()
    assert progress.console.file.getvalue() == ""

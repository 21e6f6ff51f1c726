"""Progress where no terminal shows a live bar: plain lines a log file keeps."""
import io

from rich.console import Console

from modelpress.core import progress


def to_buffer(monkeypatch) -> io.StringIO:
    buffer = io.StringIO()  # not a terminal
    monkeypatch.setattr(progress, "console", Console(file=buffer, soft_wrap=True))
    return buffer


def test_progress_without_a_terminal_prints_a_line_per_tenth(monkeypatch):
    monkeypatch.setenv("MODELPRESS_PROGRESS", "1")
    monkeypatch.setattr(progress, "QUIET_S", 0.0)
    buffer = to_buffer(monkeypatch)
    with progress.progress_bar("distill", 40) as advance:
        for _ in range(40):
            advance(note="loss 0.1")
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("distill: 40/40 (100%), ") and lines[-1].endswith("loss 0.1")
    assert lines[0].startswith("distill: 4/40 (10%)") and "left" in lines[0]


def test_short_work_prints_no_progress_line(monkeypatch):
    monkeypatch.setenv("MODELPRESS_PROGRESS", "1")
    buffer = to_buffer(monkeypatch)
    with progress.progress_bar("calibrate", 8) as advance:
        for _ in range(8):
            advance()
    assert buffer.getvalue() == ""  # done within QUIET_S


def test_progress_is_silent_when_disabled(monkeypatch):
    monkeypatch.setenv("MODELPRESS_PROGRESS", "0")
    buffer = to_buffer(monkeypatch)
    with progress.progress_bar("x", 5) as advance:
        advance()
    assert buffer.getvalue() == ""

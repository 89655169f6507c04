"""Progress where there is no terminal (CI logs, files): periodic log lines; --quiet; colours only on a
terminal and never with NO_COLOR."""

from __future__ import annotations

import io
import logging
import re

import pytest

from structprune import progress
from structprune.cli import main
from structprune.cli.shell import paint


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_log_progress_reports_start_every_interval_and_end_with_eta(caplog):
    clock = _Clock()
    with caplog.at_level(logging.INFO, logger="structprune"):
        bar = progress.LogProgress(total=10, desc="pruning (ispasp)", unit="groups", interval=5.0, clock=clock)
        for _ in range(10):
            clock.now += 2.0
            bar.update(1)
        bar.close()
        bar.close()  # a second close adds nothing
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "pruning (ispasp): 0/10 groups (0%), 0.0s elapsed"
    assert lines[1] == "pruning (ispasp): 3/10 groups (30%), 6.0s elapsed, ETA 14.0s"  # first update past 5 s
    assert lines[-1] == "pruning (ispasp): 10/10 groups (100%), 20.0s elapsed"
    assert len(lines) == 2 + 3  # start, at 6/12/18 s (every 5 s at most once per update) and the end


def test_log_progress_iterates_and_shows_postfix(caplog):
    with caplog.at_level(logging.INFO, logger="structprune"):
        bar = progress.LogProgress(range(4), desc="epoch 1/1", unit="batches", interval=0.0)
        seen = []
        for item in bar:
            seen.append(item)
            bar.set_postfix(loss="0.123")
    assert seen == [0, 1, 2, 3]
    assert caplog.records[-1].getMessage().startswith("epoch 1/1: 4/4 batches (100%)")
    assert "loss=0.123" in caplog.records[-1].getMessage()


def test_without_logging_configured_the_lines_go_to_stderr(capsys, monkeypatch):
    monkeypatch.setattr(progress.logger, "hasHandlers", lambda: False)
    progress.LogProgress(total=2, desc="work", unit="steps", interval=60.0).close()
    err = capsys.readouterr().err
    assert err.startswith("structprune: work: 0/2 steps") and err.count("\n") == 2


def test_a_bar_is_chosen_by_the_stream():
    assert isinstance(progress.bar(total=3, enabled=False), progress._Quiet)
    assert isinstance(progress.bar(total=3, desc="x"), progress.LogProgress)  # pytest's stderr is no terminal


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colours_only_on_a_terminal_and_never_with_no_color(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert progress.color_enabled(_Terminal()) and not progress.color_enabled(io.StringIO())
    monkeypatch.setattr("sys.stderr", _Terminal())
    assert paint("error:", "31") == "\x1b[31merror:\x1b[0m"
    monkeypatch.setenv("NO_COLOR", "1")
    assert paint("error:", "31") == "error:" and not progress.color_enabled(_Terminal())


@pytest.fixture
def lenet(tmp_path, fmnist_dir):
    dense = tmp_path / "lenet5.pt"
    assert main(["train", "--model", "lenet5", "--data-dir", str(fmnist_dir), "--epochs", "1", "--out", str(dense),
                 "--quiet"]) == 0
    return dense


def test_cli_logs_progress_off_terminal_and_quiet_keeps_only_the_result(lenet, tmp_path, fmnist_dir, capsys,
                                                                         monkeypatch):
    monkeypatch.setenv("STRUCTPRUNE_PROGRESS_INTERVAL", "0")
    capsys.readouterr()
    args = ["prune", str(lenet), "--ratio", "0.5", "--data-dir", str(fmnist_dir), "--calib-samples", "32"]
    assert main([*args, "--out", str(tmp_path / "a.pt")]) == 0
    out, err = capsys.readouterr()
    assert re.search(r"structprune: pruning \(ispasp\): 4/4 groups \(100%\), [\d.]+s elapsed", err)
    assert "\x1b[" not in err and "\r" not in err
    assert "ispasp (oneshot): params" in out

    assert main([*args, "--out", str(tmp_path / "b.pt"), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "pruning (ispasp)" not in err and "ispasp (oneshot): params" in out

    assert main([*args, "--out", str(tmp_path / "b.pt"), "-q"]) == 2  # errors still print
    assert "already exists" in capsys.readouterr().err

"""One progress display for nested steps; each finished step keeps a timed line; off when piped."""

from __future__ import annotations

import logging
import re

import pytest

from deploykit import progress


class _Err:
    def __init__(self, capsys) -> None:
        self.capsys = capsys

    def getvalue(self) -> str:
        return self.capsys.readouterr().err


@pytest.fixture()
def stderr(capsys):
    yield _Err(capsys)  # sys.stderr is pytest's capture (not a terminal) during the test
    progress.set_enabled(None)


def test_nested_steps_keep_timed_lines_in_order(stderr):
    progress.set_enabled(True)
    with progress.step("target tflite", total=2, unit="stage") as outer:
        with progress.step("tflite: lower", total=1, unit="model") as s:
            progress.echo("artifact written")
            s.update()
        outer.update()
        for _ in progress.track(range(3), "tflite: latency", unit="batch size"):
            pass
        outer.update()
    lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
    assert lines[0] == "artifact written"
    assert re.fullmatch(r"  tflite: lower  1/1 model  \d+\.\d s", lines[1]), lines
    assert re.fullmatch(r"  tflite: latency  3/3 batch size  \d+\.\d s", lines[2]), lines
    assert re.fullmatch(r"target tflite  2/2 stage  \d+\.\d s", lines[3]), lines
    assert progress._display is None  # the display closes with the outermost step


def test_total_can_be_set_late_and_failure_is_said(stderr):
    progress.set_enabled(True)
    with pytest.raises(RuntimeError), progress.step("calibrate: ranges", unit="sample") as s:
        s.update(8)
        s.total = 16
        raise RuntimeError("boom")
    assert re.search(r"calibrate: ranges  8/16 sample  \d+\.\d s \(failed\)", stderr.getvalue())
    assert progress._display is None


def test_disabled_prints_nothing_but_logs_durations_under_verbose(stderr, caplog):
    progress.set_enabled(False)
    with caplog.at_level(logging.DEBUG, logger="deploykit.progress"), \
            progress.step("openvino: accuracy", total=4, unit="batch") as s:
        s.update(4)
    assert stderr.getvalue() == ""
    assert re.search(r"openvino: accuracy: 4/4 batch in \d+\.\d\d s", caplog.text)
    assert s.seconds >= 0.0


def test_piped_stderr_turns_the_display_off(stderr):
    progress.set_enabled(None)
    assert not progress.enabled()  # a StringIO is not a terminal

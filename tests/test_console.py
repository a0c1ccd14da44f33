"""Console capture of one file descriptor, in process: what becomes of lines of every length.

A file stands in for the terminal (a pipe that nobody reads would fill up and block the
capture's copy to it); everything else is the real capture: a pipe dup2'ed over the fd and
the reader thread that splits what comes through it into log lines.
"""

from __future__ import annotations

import os
from pathlib import Path

from pluto.console import MAX_LINE, _Tee
from pluto.wire import LogLine


def capture(tmp_path: Path, *writes: bytes) -> tuple[list[LogLine], bytes]:
    """The log lines made of ``writes`` to a captured fd, and what still reached the fd."""
    terminal = tmp_path / "terminal"
    fd = os.open(terminal, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    lines: list[LogLine] = []
    tee = _Tee(fd, 1, lines.append)
    try:
        for data in writes:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
    finally:
        tee.restore(timeout=10)
        os.close(fd)
    return lines, terminal.read_bytes()


def test_a_line_longer_than_the_limit_goes_as_pieces_with_nothing_dropped(
        tmp_path: Path) -> None:
    long_line = "é" * MAX_LINE + "the end"  # 2 bytes a character: cut points fall mid-é
    other = "x" * (MAX_LINE // 2)
    unfinished = "€" * MAX_LINE  # 3 bytes a character, no newline: shipped at the end
    written = f"{long_line}\nshort\n{other}\n{unfinished}".encode()
    # Small writes, so the long line also arrives in many reads, without its newline.
    lines, printed = capture(tmp_path, *(written[i:i + 5000]
                                         for i in range(0, len(written), 5000)))

    assert printed == written  # still printed as it was
    texts = [line.line for line in lines]
    assert "short" in texts
    short = texts.index("short")
    assert "".join(texts[:short]) == long_line
    assert texts[short + 1] == other
    assert "".join(texts[short + 2:]) == unfinished
    assert all(len(text.encode()) <= MAX_LINE for text in texts)
    assert not any("\ufffd" in text for text in texts)  # no character was cut in two
    assert {line.stream for line in lines} == {1}


def test_a_long_line_that_arrives_in_one_read_is_not_cut_short(tmp_path: Path) -> None:
    line = "abc" * MAX_LINE
    lines, _ = capture(tmp_path, f"{line}\nnext\n".encode())
    texts = [record.line for record in lines]
    assert texts[-1] == "next"
    assert "".join(texts[:-1]) == line

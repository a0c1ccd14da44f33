"""Console capture of one file descriptor, in process: what becomes of lines of every length.

A file stands in for the terminal (a pipe that nobody reads would fill up and block the
capture's copy to it); everything else is the real capture: a pipe dup2'ed over the fd and
the reader thread that splits what comes through it into log lines.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
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
        tee.give_back()
        tee.drain(time.monotonic() + 10)
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


def run_script(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter whose stdout and stderr stand in for the terminal."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=60, check=True)


def test_two_captures_stopped_oldest_first_keep_the_terminal_and_do_not_stall() -> None:
    """Two runs finished in the order they were opened: the first gave the fds back from
    under the second and waited 2 s per fd for its pipe, which the second still held; then
    every later line of the process was lost (written to a closed descriptor)."""
    done = run_script("""
        import sys, time
        from pluto.console import ConsoleCapture
        first, second = [], []
        a = ConsoleCapture(first.append)
        print("one", flush=True)
        b = ConsoleCapture(second.append)
        print("two", flush=True)
        started = time.monotonic()
        a.stop()
        print("three", flush=True)
        b.stop()
        waited = time.monotonic() - started
        print("four", flush=True)
        sys.stderr.write("err-after\\n")
        print("RESULT", [l.line for l in first], [l.line for l in second], waited, flush=True)
    """)
    printed = done.stdout.splitlines()
    assert printed[:4] == ["one", "two", "three", "four"], done.stdout
    assert "err-after" in done.stderr
    result = printed[4]
    # The first run logs "one" (and "two", which the second copies on to it, if that copy
    # came before it finished); the second logs what came while it captured.
    assert result.startswith(("RESULT ['one'] ['two', 'three'] ",
                              "RESULT ['one', 'two'] ['two', 'three'] ")), result
    assert float(result.rsplit(" ", 1)[1]) < 1.5, result  # was 4 s (2 s a fd)


def test_output_of_a_child_that_outlives_the_capture_reaches_the_terminal() -> None:
    """A subprocess (a DataLoader worker) still running when the run finishes keeps the
    pipe open: stop() waited 2 s per fd for it, and its later lines were lost."""
    done = run_script("""
        import subprocess, sys, time
        from pluto.console import ConsoleCapture
        logged = []
        capture = ConsoleCapture(logged.append)
        child = subprocess.Popen([sys.executable, "-c", "import time\\n"
                                  "for i in range(30): print('CHILD', i, flush=True); "
                                  "time.sleep(0.1)"])
        time.sleep(0.3)
        started = time.monotonic()
        capture.stop()
        waited = time.monotonic() - started
        child.wait()
        print("RESULT", waited, "CHILD 0" in [l.line for l in logged], flush=True)
    """)
    printed = done.stdout.splitlines()
    assert [line for line in printed if line.startswith("CHILD")] == [
        f"CHILD {i}" for i in range(30)], done.stdout
    _, waited, logged_first = printed[-1].split()
    assert float(waited) < 1.5 and logged_first == "True", printed[-1]

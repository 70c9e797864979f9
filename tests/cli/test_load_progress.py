"""The progress bar of `streamquant load` and `streamquant quantize` as a user sees it: the command runs in a
subprocess whose stderr is a pseudo-terminal, and what it shows there is read back. One bar (rank 0's, at
--tp 2) of bytes and tensors; none with --no-progress; none where stderr is a pipe (the subprocess test of
test_generate.py). The bar itself: tests/test_progress.py."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from streamquant.checkpoint.reader import checkpoint_totals

REPO = Path(__file__).resolve().parents[2]  # the repository root, for the subprocess's PYTHONPATH
DEADLINE_S = 300


def run_on_terminal(args: list[str], cwd: Path, size: tuple[int, int] | None = (30, 120)) -> tuple[int, str, str]:
    """`python -m streamquant *args` with stderr on a fresh pseudo-terminal of `size` (rows, columns; None: a
    terminal that reports no size); (exit status, stdout, what the terminal showed)."""
    assert (REPO / "streamquant" / "cli" / "main.py").is_file()  # this tree, not an installed copy
    master, slave = pty.openpty()
    if size is not None:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "streamquant", *args], cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, env={**os.environ, "PYTHONPATH": str(REPO)})
    os.close(slave)
    shown, deadline = [], time.monotonic() + DEADLINE_S
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1.0)[0]:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:  # EIO: every holder of the terminal's other end has exited
                    break
                if not data:
                    break
                shown.append(data)
            elif proc.poll() is not None:
                break
        stdout = proc.communicate(timeout=60)[0].decode()
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stdout, b"".join(shown).decode(errors="replace")


def test_load_draws_one_bar_on_a_terminal_at_tp2(checkpoint, tmp_path):
    status, stdout, terminal = run_on_terminal(["load", str(checkpoint), "--tp", "2"], tmp_path)
    assert status == 0, terminal
    tensors, nbytes = checkpoint_totals(checkpoint)
    assert terminal.count("load:   0%") == 1  # rank 0 draws, rank 1 (the same terminal) does not
    final = [part for part in terminal.split("\r") if part.startswith("load: 100%")]
    assert final and f"{tensors}/{tensors} tensors" in final[-1] and "B/s" in final[-1]
    assert f"{nbytes / 1e3:.0f}k/{nbytes / 1e3:.0f}k" in final[-1]  # bytes done / total, SI units
    assert "load seconds" in stdout and "load:" not in stdout  # the bar is on stderr only


def test_no_progress_silences_the_bar_and_an_unsized_terminal_still_gets_one(checkpoint, tmp_path):
    status, _, terminal = run_on_terminal(["load", str(checkpoint), "--no-progress"], tmp_path)
    assert status == 0 and "load:" not in terminal and "tensors" not in terminal, terminal
    out = tmp_path / "q"
    status, stdout, terminal = run_on_terminal(["quantize", str(checkpoint), str(out), "--quantization", "fp8"],
                                               tmp_path, size=None)
    assert status == 0, terminal
    tensors, _ = checkpoint_totals(checkpoint)
    assert "quantize: 100%" in terminal and f"{tensors}/{tensors} tensors" in terminal
    assert "bytes in / out" in stdout

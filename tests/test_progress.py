"""Progress a user can trust (issue 17, item 5): `embedpipe run` in a terminal shows the model loading,
then a bar over documents whose total is counted up front and that moves per micro-batch, before the end."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import termios
from pathlib import Path

import pytest

from .helpers import EMBEDPIPE, EXAMPLES, cli_env

pytestmark = pytest.mark.slow

FRAME = re.compile(r"([a-z ]+):\s+(\d+)%\|[^|]*\|\s*(\d+)/(\d+) documents")


def run_in_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run the CLI with stdout and stderr on a pseudo-terminal (as a user sees it); its exit status and output."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal 120 columns wide (a new one has none), then the CLI
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.execve(EMBEDPIPE, [EMBEDPIPE, *args], env)
    output = bytearray()
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        output += data
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_run_shows_the_model_loading_then_a_bar_that_moves(tmp_path: Path) -> None:
    docs = len(list((EXAMPLES / "docs").iterdir()))
    # small micro-batches and batches: many steps to see, on any machine
    env = cli_env(EMBEDPIPE_STORE=str(tmp_path / "store"), EMBEDPIPE_MICRO_BATCH_TOKENS="512", EMBEDPIPE_BATCH_DOCS="4")
    code, output = run_in_terminal(["run", str(EXAMPLES / "docs")], env)
    assert code == 0, output
    frames = [FRAME.search(f) for f in re.split(r"[\r\n]", output)]
    frames = [(m[1].strip(), int(m[2]), int(m[3]), int(m[4])) for m in frames if m]
    assert frames, output
    assert {total for *_, total in frames} == {docs}  # counted up front: the total never grows
    phases = [phase for phase, *_ in frames]
    assert "loading the model" in phases and phases.index("loading the model") < phases.index("embedding")
    embedding = [percent for phase, percent, *_ in frames if phase == "embedding"]
    assert embedding == sorted(embedding)  # never backwards
    moving = {p for p in embedding if 0 < p < 100}
    assert len(moving) >= 3, frames  # it moved, several times, before the end
    assert f"{docs} documents ({docs} stored" in output

"""`evomerge run` with its output in a file (`nohup evomerge run ... > run.log`) writes one plain
line per trial, flushed as it happens; in a terminal it keeps the progress bar."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import tty

from reliability.harness import write_config

TRIAL = re.compile(r"^trial (\d+) \[(\d+)/2\]: rev [\d.]+, srt [\d.]+, cae [\d.]+$")


def run_search(tmp_path, zoo, name: str, stdout, stderr) -> subprocess.Popen:
    """`evomerge run` on 2 trials; the 2nd trial announces itself on stderr (an EVOMERGE_FAULT
    sleep of 0 s) while it is sampled, which dates what stdout had written by then."""
    path = write_config(tmp_path, zoo, name, n_trials=2)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffering as a user gets it
    env["EVOMERGE_FAULT"] = "nth=2:sleep@sample=0"
    return subprocess.Popen([sys.executable, "-m", "evomerge.cli", "run", str(path)],
                            stdout=stdout, stderr=stderr, env=env)


def test_redirected_output_is_one_flushed_line_per_trial(tmp_path, zoo):
    log = tmp_path / "run.log"
    with log.open("wb") as out:  # stderr to the same file, as nohup does
        assert run_search(tmp_path, zoo, "log", out, subprocess.STDOUT).wait(timeout=300) == 0
    text = log.read_text()
    assert "\r" not in text and "\x1b" not in text and "it/s" not in text and "trial/s" not in text, text
    lines = text.splitlines()
    trials = [i for i, line in enumerate(lines) if TRIAL.match(line)]
    assert [TRIAL.match(lines[i]).groups() for i in trials] == [("0", "1"), ("1", "2")], text
    start = next(i for i, line in enumerate(lines) if line.startswith("study 'log' in "))
    loaded = next(i for i, line in enumerate(lines) if line.startswith("models loaded on cpu in "))
    second_began = lines.index("evomerge-fault: trial 1 in sample: sleeping 0 s")
    assert start < loaded < trials[0] < second_began < trials[1], text  # each line was in the file when it happened


def test_a_terminal_gets_the_progress_bar(tmp_path, zoo):
    parent, child = pty.openpty()
    tty.setraw(child)  # no \n -> \r\n translation: every \r read back is the bar's
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # tqdm draws nothing 0 columns wide
    proc = run_search(tmp_path, zoo, "tty", child, child)
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(parent, 65536)
        except OSError:  # the child side closed: the process exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(parent)
    assert proc.wait(timeout=300) == 0
    text = b"".join(chunks).decode()
    assert "\r100%|" in text and "| 2/2 [" in text and re.search(r"(s/trial|trial/s), best ", text), text
    assert len([line for line in text.replace("\r", "\n").splitlines() if TRIAL.match(line)]) == 2, text

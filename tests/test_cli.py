"""The command line: an existing output is kept, and errors from the installed command carry no
traceback. The full bad-input matrix: tests/reliability/test_bad_inputs.py."""

from __future__ import annotations

import subprocess
import sys

from evomerge.cli import main


def test_existing_output_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["merge", "runs/examples/zoo_linear.yaml", "--out", str(tmp_path / "out")]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_installed_command_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(tmp_path / "x.yaml"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("evomerge: error: cannot read recipe")

"""Security: no pickle read from the study or run outputs, YAML through safe_load, remote code
and pickle weights only on request (their refusals: test_bad_inputs.py), and a storage URL's
password never printed nor stored."""

from __future__ import annotations

import re
from pathlib import Path

import sqlalchemy

from evomerge.cli import main
from reliability.harness import run_cli, write_config
from reliability.pg import PASSWORD

PACKAGE = Path(__file__).resolve().parents[2] / "evomerge"
UNSAFE = {  # pattern -> why it is not allowed in evomerge/
    r"\bimport pickle\b|\bpickle\.load|\bcloudpickle\b|\bdill\b": "unpickling runs code",
    r"torch\.load\((?![^)]*weights_only=True)": "torch.load without weights_only=True unpickles arbitrary objects",
    r"yaml\.(load|unsafe_load|full_load)\(": "YAML only through yaml.safe_load",
    r"trust_remote_code=True": "remote code only when the user passes --trust-remote-code",
    r"samplers\.CmaEsSampler|import .*\bCmaEsSampler": "Optuna's CmaEsSampler keeps its optimizer pickled in the study",
}
OUR_SYSTEM_ATTRS = re.compile(r"^(pycma:(generation|slot)|evomerge:(worker|sampled|given_back)|NSGAIISampler:generation|"
                              r"fixed_params|failed_trial|retry_history)$")


def test_the_package_reads_no_pickles_and_no_unsafe_yaml():
    found = [f"{path.relative_to(PACKAGE.parent)}:{n}: {why}" for path in sorted(PACKAGE.rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if not line.lstrip().startswith("#")
             for pattern, why in UNSAFE.items() if re.search(pattern, line)]
    assert found == []


def test_a_storage_password_is_never_printed_nor_stored(tmp_path, zoo, pg_url, capfd):
    assert PASSWORD in pg_url
    path = write_config(tmp_path, zoo, "secret", {"name": "cmaes", "popsize": 4}, 2, storage=pg_url)
    worker = run_cli(path)
    output = worker.communicate(timeout=300)[0]
    assert worker.returncode == 0, output
    for argv in (["status", str(path)], ["archive", str(path)], ["status", str(path), "--study-name", "nope"],
                 ["run", str(path), "--quiet", "--storage", pg_url.replace("127.0.0.1", "127.0.0.2")]):
        main(argv)
    printed = output + "".join(capfd.readouterr())
    assert PASSWORD not in printed and "***@127.0.0.1" in printed
    engine = sqlalchemy.create_engine(pg_url, poolclass=sqlalchemy.NullPool)
    with engine.connect() as connection:
        keys = [k for (k,) in connection.execute(sqlalchemy.text("SELECT key FROM trial_system_attributes"))]
        stored = " ".join(str(row) for table in ("study_user_attributes", "study_system_attributes", "trial_user_attributes",
                                                  "trial_system_attributes")
                          for row in connection.execute(sqlalchemy.text(f"SELECT * FROM {table}")))
    assert keys and all(OUR_SYSTEM_ATTRS.match(k) for k in keys), sorted(set(keys))  # two ints per CMA-ES trial, no optimizer
    assert PASSWORD not in stored

"""Every script in bench/ runs end to end in its smoke mode (`--smoke`: the zoo, toy sizes, outputs
under bench/out/smoke/), as a subprocess the way a user runs it, so an API change that breaks a
bench fails here instead of when someone next needs its figure. The figures of a smoke run mean
nothing; only that it completes (exit 0) and prints its report.

One torch thread per run: on a shared machine, torch's worker threads waiting on busy cores make
every step of a bench many times slower. vs_mergekit's mergekit side runs only where
mergekit-yaml is found (MERGEKIT_YAML or PATH); workers.py needs PostgreSQL (skipped without a
server, failed under EVOMERGE_REQUIRE_POSTGRES=1), backends.py vLLM (skipped without it, failed
under EVOMERGE_REQUIRE_VLLM=1). The slowest are the ones that start several `evomerge run`
processes (soak, workers) or engines (backends): their smoke runs are one kill, 2 workers x 4
trials, and 2 trials without the padded engine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reliability.harness import need_backend

REPO = Path(__file__).resolve().parents[1]
NO_SERVER = 3  # bench/workers.py's exit status when no PostgreSQL server can start

# bench -> a line its report must contain
BENCHES = {
    "vs_mergekit.py": "Targets:",
    "route_materialize.py": "zoo (0.86M)",
    "trial_overhead.py": "naive/evomerge",
    "search_efficiency.py": "evaluations to target",
    "resume_time.py": "resume of a 30-trial study",
    "soak.py": "kills survived: 1/1",
    "fitness_cost.py": "racing replay",
    "workers.py": "2 worker(s)",
    "backends.py": "same scores",
    "lora_memory.py": "adapter sources: RSS",
    "stream_merge_rss.py": "peak RSS",
}
FLAGS = {"stream_merge_rss.py": ["--quick", "--methods", "linear"]}  # its quick mode predates --smoke


def test_every_bench_has_a_smoke_run():
    assert sorted(BENCHES) == sorted(p.name for p in (REPO / "bench").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("bench", sorted(BENCHES))
def test_bench_smoke_run_completes(bench):
    if bench == "backends.py":
        need_backend("vllm")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / bench), *FLAGS.get(bench, ["--smoke"])], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    if bench == "workers.py" and proc.returncode == NO_SERVER:
        if os.environ.get("EVOMERGE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required here (EVOMERGE_REQUIRE_POSTGRES=1): {output.strip()}")
        pytest.skip(output.strip().splitlines()[-1])
    assert proc.returncode == 0, output[-3000:]
    assert BENCHES[bench] in proc.stdout, proc.stdout[-3000:]

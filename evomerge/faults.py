"""Fault injection for reliability tests, switched on by the EVOMERGE_FAULT environment variable.

A failing candidate must fail its trial and nothing else, and a worker killed at any point
must lose nothing; both are only tested if the failure can be made to happen on purpose,
at a known trial and phase. The search loop calls `begin(trial_number)` when a trial starts
and `at(phase)` at each phase; with EVOMERGE_FAULT unset both do nothing.

    EVOMERGE_FAULT="trial=3:oom"                    trial 3 runs out of memory while evaluating
    EVOMERGE_FAULT="trial=*:nan"                    every trial scores NaN
    EVOMERGE_FAULT="nth=2:sleep@store=30"           this process's 2nd trial sleeps 30 s while its result is stored
    EVOMERGE_FAULT="trial=1:error@materialize; trial=4:oom"

A rule is SELECTOR:KIND[@PHASE][=SECONDS]. Selectors: trial=N (the study's trial number),
nth=N (the N-th trial this process runs, from 1), trial=* (every trial). Kinds: oom
(torch.OutOfMemoryError, after allocating 64 MiB the failed trial must give back), nan (the
evaluator's scores become NaN), error (a RuntimeError, as from a broken evaluator), sleep
(SECONDS, default 3600: a window for the kill harness, announced on stderr as
`evomerge-fault: trial N in PHASE: sleeping S s`). Phases, in order: sample (the params are
recorded, not yet marked complete), materialize (the candidate's weights are written), items
(lm_eval fitness: a chunk of items was evaluated and the results so far stored; with racing,
after every chunk), evaluate (the evaluator ran; the default), store (the result is recorded in user attrs,
Optuna not yet told the trial is complete).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

from evomerge.errors import EvomergeError

ENV = "EVOMERGE_FAULT"
PHASES = ("sample", "materialize", "items", "evaluate", "store")
KINDS = ("oom", "nan", "error", "sleep")
OOM_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Rule:
    selector: str  # "trial", "nth" or "*"
    number: int
    kind: str
    phase: str
    seconds: float

    def matches(self, trial: int, nth: int) -> bool:
        return self.selector == "*" or (trial if self.selector == "trial" else nth) == self.number


def parse(text: str) -> list[Rule]:
    """The rules of an EVOMERGE_FAULT value; a malformed one is a user error naming the rule."""
    return [_rule(part.strip()) for part in text.split(";") if part.strip()]


def _rule(text: str) -> Rule:
    try:
        selector, action = text.split(":", 1)
        key, value = selector.split("=", 1)
        action, seconds = action.split("=", 1) if "=" in action else (action, "3600")
        kind, phase = action.split("@", 1) if "@" in action else (action, "evaluate")
        if key not in ("trial", "nth") or kind not in KINDS or phase not in PHASES:
            raise ValueError
        star = value == "*" and key == "trial"
        return Rule("*" if star else key, -1 if star else int(value), kind, phase, float(seconds))
    except ValueError:
        raise EvomergeError(f"{ENV}: cannot read rule {text!r}; expected trial=N|nth=N|trial=*:KIND[@PHASE][=SECONDS] "
                            f"with KIND one of {list(KINDS)} and PHASE one of {list(PHASES)}") from None


class _State:
    """The rules (re-read when the variable changes) and the trial this process is running."""

    text: str | None = None
    rules: list[Rule] = []
    trial = -1
    nth = 0


def _rules() -> list[Rule]:
    text = os.environ.get(ENV, "")
    if text != _State.text:
        _State.rules, _State.text = parse(text), text
    return _State.rules


def begin(trial_number: int) -> None:
    """A trial starts in this process."""
    _State.trial, _State.nth = trial_number, _State.nth + 1


def at(phase: str) -> None:
    """Sleep or raise here if a rule says so for the current trial and this phase."""
    for rule in _rules():
        if rule.phase == phase and rule.kind != "nan" and rule.matches(_State.trial, _State.nth):
            _fire(rule)


def scores(values: dict[str, float]) -> dict[str, float]:
    """The evaluator's scores, all NaN if a `nan` rule selects the current trial."""
    if any(r.kind == "nan" and r.matches(_State.trial, _State.nth) for r in _rules()):
        return {name: math.nan for name in values}
    return values


def _fire(rule: Rule) -> None:
    where = f"trial {_State.trial} in {rule.phase}"
    if rule.kind == "sleep":
        print(f"evomerge-fault: {where}: sleeping {rule.seconds:g} s", file=sys.stderr, flush=True)
        time.sleep(rule.seconds)
    elif rule.kind == "error":
        raise RuntimeError(f"injected evaluator error ({ENV}, {where})")
    else:
        import torch  # here: the search imports this module before it loads torch

        held = torch.full((OOM_BYTES,), 1, dtype=torch.uint8, device="cuda" if torch.cuda.is_available() else "cpu")
        raise torch.OutOfMemoryError(f"injected out of memory ({ENV}, {where}) holding {held.numel() >> 20} MiB")

"""Every key evomerge writes into an Optuna study, in one place: what a study holds besides
Optuna's own columns. All values are plain JSON (nothing is ever pickled).

Study user attrs (set when the study is created):
  FINGERPRINT   what the trials mean (models, search space, fitness) and how they were
                proposed (sampler, seed); see evomerge.search.identity
  OBJECTIVES    [[name, direction], ...] of the fitness spec
  N_LAYERS      decoder layers of the models the study was made with
  SOURCES       {model ref: {"objectives": {...}, "scores": {...}}}: the source models scored
                on the fitness when the study was made, the reference every merge is compared with

Trial user attrs (see evomerge.search.loop): objectives, scores, timings, recipe, device,
copy_of, error, and FAILURE = CANDIDATE_FAILURE on a trial whose candidate itself failed.

Trial system attrs: WORKER (host and pid that claimed it), SAMPLED (all its params are
recorded), RETRY_HISTORY (Optuna's: earlier attempts of a retried trial), GIVEN_BACK (how many
of those never ran), and the CMA-ES slot (GENERATION, SLOT; evomerge.search.cma_sampler).
"""

FINGERPRINT = "evomerge:fingerprint"
OBJECTIVES = "evomerge:objectives"
N_LAYERS = "evomerge:n_layers"
SOURCES = "evomerge:sources"

FAILURE = "failure"
CANDIDATE_FAILURE = "candidate"  # the value of FAILURE: not retried, a finished (failed) CMA-ES slot

WORKER = "evomerge:worker"
SAMPLED = "evomerge:sampled"
RETRY_HISTORY = "retry_history"  # written by Optuna's retry callback too: numbers of earlier attempts, the first first
GIVEN_BACK = "evomerge:given_back"
GENERATION = "pycma:generation"
SLOT = "pycma:slot"

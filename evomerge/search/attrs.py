"""Every key evomerge writes into an Optuna study, in one place: what a study holds besides
Optuna's own columns. All values are plain JSON (nothing is ever pickled).

Study user attrs (set when the study is created):
  FINGERPRINT   what the trials mean (models, search space, fitness) and how they were
                proposed (sampler, seed); see evomerge.search.identity
  OBJECTIVES    [[name, direction], ...] of the fitness spec
  N_LAYERS      decoder layers of the models the study was made with
  SOURCES       {model ref: {"objectives": {...}, "scores": {...}}}: the source models scored
                on the fitness when the study was made, the reference every merge is compared with
                (lm_eval fitness: also ITEMS and ITEM_RESULTS, on the whole split when an estimator
                is fitted on them)
  STUDY_ITEMS   lm_eval fitness: {"digest": {task: sha256 of its documents}, "subset": {task: ids
                as ranges}}: the items every candidate sees, chosen once (evomerge.search.scoring)
  IRT           estimator irt: {"rows": fully scored rows it was fitted on, "estimator": the fitted
                item parameters and anchors as plain numbers (evomerge.fitness.irt.IrtEstimator.to_json)}
  HELD_OUT + N  {spec name: {"fingerprint", "scores", "objectives", "items", "item_results"}}: trial
                N scored by `evomerge evaluate` on another fitness spec (Optuna refuses writes to a
                finished trial, so they live here); HELD_OUT + "sources" the same for the sources

Trial user attrs (see evomerge.search.loop): objectives, scores, timings, recipe, device,
copy_of, error, and FAILURE = CANDIDATE_FAILURE on a trial whose candidate itself failed.
lm_eval fitness (evomerge.search.scoring): ITEMS (items this trial evaluated itself: 0 for a
copy; a retry's carried items are its killed attempt's), ITEM_RESULTS (every item its scores
rest on, evomerge.fitness.items' JSON); with an estimator MEASURED (lm-eval's scores on those
items; `scores` are then the estimates) and IRT_ROWS (the fit it used); a PRUNED trial (racing)
has ESTIMATE, the value CMA-ES is told for it (its `value` is Optuna's and meaningless).

Trial system attrs: WORKER (host and pid that claimed it), SAMPLED (all its params are
recorded), RETRY_HISTORY (Optuna's: earlier attempts of a retried trial), GIVEN_BACK (how many
of those never ran), and the CMA-ES slot (GENERATION, SLOT; evomerge.search.cma_sampler).
"""

FINGERPRINT = "evomerge:fingerprint"
OBJECTIVES = "evomerge:objectives"
N_LAYERS = "evomerge:n_layers"
SOURCES = "evomerge:sources"
STUDY_ITEMS = "evomerge:items"
IRT = "evomerge:irt"
HELD_OUT = "evomerge:held_out:"

ITEMS = "items"
ITEM_RESULTS = "item_results"
MEASURED = "measured"
ESTIMATE = "estimate"
IRT_ROWS = "irt_rows"

FAILURE = "failure"
CANDIDATE_FAILURE = "candidate"  # the value of FAILURE: not retried, a finished (failed) CMA-ES slot

WORKER = "evomerge:worker"
SAMPLED = "evomerge:sampled"
RETRY_HISTORY = "retry_history"  # written by Optuna's retry callback too: numbers of earlier attempts, the first first
GIVEN_BACK = "evomerge:given_back"
GENERATION = "pycma:generation"
SLOT = "pycma:slot"

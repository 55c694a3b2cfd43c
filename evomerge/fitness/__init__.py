"""Fitness: what a candidate is scored on, and how (the spec, lm-eval, the zoo's scorer, per-item
results, subsets, racing, IRT estimates). Nothing here reads or writes a study: which items and
trials a study scores, and where the results are stored, is evomerge.search's part."""

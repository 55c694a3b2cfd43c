"""Where a candidate lives while it is scored: the backend materializes a recipe and hands the
evaluator something lm-eval can score.

- `hf` (default): the candidate is a Hugging Face model whose weights are written in place
  (evomerge.merge.materialize), wrapped in lm-eval's HF model class.
- `vllm`: the merged weights are streamed into a live vLLM engine built once per worker.

`candidate.py` says what a backend hands over (`Candidate`) and what a backend is: anything with `device`, `n_layers` and `materialize(recipe) -> Candidate`; `build.py` makes the run's backend (`make_backend`).
"""

"""The `evomerge` command. User errors print one line and exit 2; no tracebacks."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import NoReturn, Sequence

from evomerge.errors import EvomergeError


class _Parser(argparse.ArgumentParser):
    """Usage mistakes print one line like every other error (the usage is in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"evomerge: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _add_loading_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="merge device: cuda, cuda:1, cpu (default: cuda when available)")
    _add_opt_in_flags(p)


def _add_opt_in_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load pytorch_model*.bin weights (pickle can run code; safetensors only by default)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow models that ship their own Python code")


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--force", action="store_true", help="replace --out (and --adapter) if it exists")
    p.add_argument("--adapter", metavar="DIR", help="also write the merge as a PEFT LoRA adapter of the sources' base, "
                                                    "where one expresses it (lora_linear, task_arithmetic or linear "
                                                    "over LoRA adapters of one base)")


def _merge_and_save(recipe, args: argparse.Namespace, device: str | None, evidence=None) -> str:
    """Merge one recipe into `args.out` (and `args.adapter`): streamed from disk (evomerge.merge.stream), or,
    for a route or LoRA adapters (small: their base and factors), through the resident Materializer. Returns
    what was done, for the summary line; `evidence` (a search's trial) goes into the model cards."""
    from evomerge.export import prepare_out_dir

    prepare_out_dir(Path(args.out), args.force)  # fail before the slow part
    if args.adapter:
        from evomerge.lora_export import adapter_base

        if Path(args.adapter).resolve() == Path(args.out).resolve():
            raise EvomergeError("--adapter and --out name one folder; give the adapter its own")
        adapter_base(recipe, allow_pickle=args.allow_pickle)
        prepare_out_dir(Path(args.adapter), args.force)
    start = time.perf_counter()
    from evomerge.merge.stream import stream_merge, streamable

    if streamable(recipe, allow_pickle=args.allow_pickle):
        out = stream_merge(recipe, args.out, device=device, allow_pickle=args.allow_pickle,
                           trust_remote_code=args.trust_remote_code, force=args.force, evidence=evidence)
        return f"streamed {len(recipe.refs)} models, merged and saved {out} in {time.perf_counter() - start:.2f} s"
    from evomerge.export import save_checkpoint
    from evomerge.merge.materialize import Materializer

    materializer = Materializer.for_recipe(recipe, device=device, allow_pickle=args.allow_pickle,
                                           trust_remote_code=args.trust_remote_code)
    loaded = time.perf_counter()
    materializer.apply(recipe)
    merged = time.perf_counter()
    out = save_checkpoint(materializer, recipe, args.out, force=args.force, trust_remote_code=args.trust_remote_code,
                          evidence=evidence)
    if args.adapter:
        from evomerge.lora_export import write_adapter

        out = f"{out} and the adapter " + str(write_adapter(materializer.inputs, recipe, args.adapter, force=args.force,
                                                            allow_pickle=args.allow_pickle,
                                                            trust_remote_code=args.trust_remote_code,
                                                            evidence=evidence))
    return (f"loaded {len(materializer.sources)} models on {materializer.device} in {loaded - start:.2f} s, "
            f"merged in {merged - loaded:.2f} s, saved {out} in {time.perf_counter() - merged:.2f} s")


def cmd_merge(args: argparse.Namespace) -> None:
    from evomerge.mergekit_in import load_recipe

    recipe = load_recipe(args.recipe, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    print(f"{recipe.name}: {_merge_and_save(recipe, args, args.device)}")


def _config(args: argparse.Namespace):
    from evomerge.config import load_config

    return load_config(args.config, n_trials=getattr(args, "n_trials", None), storage=args.storage,
                       study_name=args.study_name, seed=getattr(args, "seed", None), backend=getattr(args, "backend", None))


def _existing_study(config):
    """The config's study for a read-only command: opened by storage and name; it must be the
    same search (models, search space, fitness), whatever seed or sampler it was run with."""
    from evomerge.search.identity import open_study
    from evomerge.search.storage import open_database

    return open_study(config, open_database(config.storage, config.heartbeat,
                                            reconnect_timeout_s=config.reconnect_timeout_s))


def cmd_run(args: argparse.Namespace) -> None:
    from evomerge.search.loop import Search
    from evomerge.search.report import run_with_progress, status_text

    config = _config(args)
    search = Search(config, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    run_with_progress(search, quiet=args.quiet)
    print(status_text(config, search.study))


def cmd_status(args: argparse.Namespace) -> None:
    from evomerge.search.report import status_text

    config = _config(args)
    print(status_text(config, _existing_study(config)))


def cmd_archive(args: argparse.Namespace) -> None:
    from evomerge.search.report import archive_entries, archive_json, archive_table, plot_archive

    config = _config(args)
    study = _existing_study(config)
    entries = archive_entries(config, study, estimates=args.estimates)
    print(archive_json(entries, study) if args.json else archive_table(config, entries, study))
    if args.plot:
        plot_archive(config, study, entries, args.plot)
        if not args.json:
            print(f"plot written to {args.plot}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from evomerge.fitness.spec import FitnessSpec
    from evomerge.search.held_out import evaluate_command

    config = _config(args)
    spec = FitnessSpec.load(args.fitness)  # a bad spec is reported before the study is read
    study = _existing_study(config)
    if args.device:
        config.device = args.device
    print(evaluate_command(config, study, spec, args.top, args.trials, allow_pickle=args.allow_pickle,
                           trust_remote_code=args.trust_remote_code))


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of trials, got {text!r}")
    return int(text)


def _trial_numbers(text: str) -> list[int]:
    try:
        return [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected trial numbers separated by commas (3,17,42), got {text!r}") from None


def cmd_export(args: argparse.Namespace) -> None:
    from optuna.trial import TrialState

    from evomerge.recipe import Recipe
    from evomerge.search.report import study_evidence

    config = _config(args)
    study = _existing_study(config)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    trial = trials.get(args.trial)
    if trial is None or "recipe" not in trial.user_attrs:
        raise EvomergeError(f"study {config.study_name!r} has no trial {args.trial} with a recipe; "
                            f"trials are numbered 0..{max(trials, default=-1)} (see evomerge archive {args.config})")
    if trial.state != TrialState.COMPLETE:
        print(f"note: trial {args.trial} is {trial.state.name}, exporting its recipe anyway")
    recipe = Recipe.from_dict(json.loads(trial.user_attrs["recipe"]), where=f"trial {args.trial}")
    done = _merge_and_save(recipe, args, args.device or config.device, study_evidence(config, study, trial))
    print(f"trial {args.trial} ({trial.user_attrs.get('objectives', {})}): {done}")


def cmd_demo(args: argparse.Namespace) -> None:
    from evomerge.demo import main as demo

    demo(n_trials=args.n_trials, out=args.out, quiet=args.quiet)


def cmd_zoo_build(args: argparse.Namespace) -> None:
    from evomerge.zoo import main_build

    main_build(args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="evomerge", description="Evolutionary search over model-merging recipes.")
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", help="materialize a recipe YAML and save it as a Hugging Face checkpoint")
    merge.add_argument("recipe", help="recipe YAML (see runs/examples/) or a mergekit 0.1.x config")
    _add_output_flags(merge)
    _add_loading_flags(merge)
    merge.set_defaults(func=cmd_merge)

    def study_parser(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("config", help="run config YAML (see runs/)")
        p.add_argument("--storage", help="Optuna storage URL (default: the config's, else sqlite:///runs/<name>/study.db)")
        p.add_argument("--study-name", help="study name (default: the config's name)")
        return p

    run = study_parser("run", "start or resume the search in the config's study")
    run.add_argument("--n-trials", type=int, help="total completed trials the study should reach (not: trials to add)")
    run.add_argument("--seed", type=int, help="search seed (default: the config's)")
    run.add_argument("--backend", choices=("hf", "vllm"),
                     help="where candidates are scored (default: the config's backend; its vllm options are kept)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_opt_in_flags(run)
    run.set_defaults(func=cmd_run)
    study_parser("status", "trials done/failed/running, best per objective, hypervolume, budget, ETA").set_defaults(func=cmd_status)
    archive = study_parser("archive", "the Pareto archive of the study")
    archive.add_argument("--json", action="store_true", help="print a JSON list of {number, values, recipe, held_out}")
    archive.add_argument("--plot", metavar="FILE.png", help="also plot the front, dominated trials and hypervolume")
    archive.add_argument("--estimates", action="store_true",
                         help="let trials pruned by racing compete with their estimated objectives")
    archive.set_defaults(func=cmd_archive)
    evaluate = study_parser("evaluate", "score chosen trials and the sources on another fitness spec (held-out "
                                        "tasks or splits) and store the results in the study")
    evaluate.add_argument("--fitness", required=True, help="fitness spec YAML to score on (see evaluators/)")
    chosen = evaluate.add_mutually_exclusive_group()
    chosen.add_argument("--top", type=_positive, default=3,
                        help="the K best trials: the Pareto front first, then by the scalarization (default 3)")
    chosen.add_argument("--trials", type=_trial_numbers, help="these trials instead: N,M,...")
    _add_loading_flags(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)
    export = study_parser("export", "materialize one trial's recipe and save it like `evomerge merge`")
    export.add_argument("--trial", type=int, required=True, help="trial number (see `evomerge archive`)")
    _add_output_flags(export)
    _add_loading_flags(export)
    export.set_defaults(func=cmd_export)

    demo = sub.add_parser("demo", help="search merges of the shipped zoo and compare the best with every source on "
                                       "held-out prompts (offline, about a minute; resumes if run again)")
    demo.add_argument("--n-trials", type=int, help="trials of each phase (default: runs/demo.yaml's 60, runs/demo_route.yaml's 30)")
    demo.add_argument("--out", help="folder for the demo's study, plot and best model (default: runs/demo)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo)

    zoo = sub.add_parser("zoo", help="the tiny built-in model family used by the demo and tests")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    build = zoo_sub.add_parser("build", help="train the zoo deterministically on the CPU (about a minute)")
    build.add_argument("--out", help="output directory (default: the shipped zoo inside the package)")
    build.set_defaults(func=cmd_zoo_build)
    return parser


def _no_hub_progress_bars() -> None:
    """Our own one-line summaries instead. Set before transformers loads: importing it here would
    cost a resumed search seconds before its first proposal."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # called in-process (tests, notebooks)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _no_hub_progress_bars()
    try:
        args.func(args)
    except EvomergeError as exc:
        print(f"evomerge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evomerge: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

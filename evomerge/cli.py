"""The `evomerge` command. User errors print one line and exit 2; no tracebacks."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from evomerge.errors import EvomergeError


def _add_loading_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="merge device: cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load *.bin/*.pt weights (pickle can run code; safetensors only by default)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow models that ship their own Python code")


def cmd_merge(args: argparse.Namespace) -> None:
    from evomerge.export import prepare_out_dir, save_checkpoint
    from evomerge.merge.materialize import Materializer
    from evomerge.recipe import Recipe

    recipe = Recipe.load(args.recipe)
    prepare_out_dir(Path(args.out), args.force)  # fail before the slow part
    start = time.perf_counter()
    materializer = Materializer.for_recipe(recipe, device=args.device, allow_pickle=args.allow_pickle,
                                           trust_remote_code=args.trust_remote_code)
    loaded = time.perf_counter()
    materializer.apply(recipe)
    merged = time.perf_counter()
    out = save_checkpoint(materializer, recipe, args.out, force=args.force, trust_remote_code=args.trust_remote_code)
    print(f"{recipe.method}: loaded {len(materializer.sources)} models on {materializer.device} in {loaded - start:.2f} s, "
          f"merged in {merged - loaded:.2f} s, saved {out} in {time.perf_counter() - merged:.2f} s")


def cmd_zoo_build(args: argparse.Namespace) -> None:
    from evomerge.zoo import main_build

    main_build(args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description="Evolutionary search over model-merging recipes.")
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", help="materialize a recipe YAML and save it as a Hugging Face checkpoint")
    merge.add_argument("recipe", help="recipe YAML (see runs/examples/)")
    merge.add_argument("--out", required=True, help="output checkpoint directory")
    merge.add_argument("--force", action="store_true", help="replace --out if it exists")
    _add_loading_flags(merge)
    merge.set_defaults(func=cmd_merge)

    zoo = sub.add_parser("zoo", help="the tiny built-in model family used by the demo and tests")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    build = zoo_sub.add_parser("build", help="train the zoo deterministically on the CPU (about a minute)")
    build.add_argument("--out", help="output directory (default: the shipped zoo inside the package)")
    build.set_defaults(func=cmd_zoo_build)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own one-line summaries instead
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

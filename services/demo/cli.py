"""`dsv2 train-demo`: train the shipped demo model and check it on the held-out questions.

    dsv2 train-demo                      # the shipped VL2 recipe -> services/demo/checkpoint
    dsv2 train-demo --out /tmp/v --steps 20   # every stage 20 steps (a smoke run)

The default `--recipe vl2` runs `vl2_trainer.VL2_RECIPE` (the language model on text, a reading
pre-stage for the vision tower, then pictures and text together) and writes the shipped tiny
DeepSeek-VL2 demo model.

    dsv2 train-demo --recipe text --out /tmp/demo                 # the text-only model
    dsv2 train-demo --recipe text --out /tmp/demo --seed 1 --steps 300    # one custom stage
    dsv2 train-demo --recipe text --init-from /tmp/demo --out /tmp/demo2 --steps 500 --lr 1e-3

`--recipe text` (the DeepSeek-V2 text model the demo was before pictures; `trainer.RECIPE`
without --steps/--lr/--init-from) needs --out: the shipped folder holds the VL2 model.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from services.demo.evaluate import DEFAULT_CHECKPOINT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from services.demo.trainer import TrainConfig

    defaults = TrainConfig()
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint folder to write"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="fixes data and init")
    parser.add_argument("--steps", type=int, default=None, help="one stage of this many steps")
    parser.add_argument(
        "--batch-size", type=int, default=None, help=f"default {defaults.batch_size}"
    )
    parser.add_argument("--lr", type=float, default=None, help=f"peak LR ({defaults.lr})")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads")
    parser.add_argument(
        "--save-dtype", choices=("float32", "bfloat16"), default=defaults.save_dtype
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="continue from this checkpoint instead of a random init (a second stage)",
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=defaults.warmup_steps, help="linear LR warm-up"
    )
    parser.add_argument(
        "--save-every", type=int, default=0, help="also save the checkpoint every N steps"
    )
    parser.add_argument(
        "--mul-format",
        choices=("split", "fused"),
        default=defaults.mul_format,
        help="how × answers write a carry column (one custom stage; the recipe sets its own)",
    )
    parser.add_argument(
        "--no-eval", action="store_true", help="skip the held-out check after training"
    )
    parser.add_argument(
        "--recipe",
        choices=("text", "vl2"),
        default="vl2",
        help="vl2: the shipped DeepSeek-VL2 demo model; text: a DeepSeek-V2 text-only model",
    )
    parser.add_argument(
        "--device", default="cpu", help="vl2 recipe: the torch device to train on (cpu, cuda)"
    )


def run(args: argparse.Namespace) -> int:
    from services.demo.evaluate import evaluate, load_causal_backend
    from services.demo.trainer import TrainConfig, recipe, train

    if (args.steps is not None and args.steps < 1) or (
        args.batch_size is not None and args.batch_size < 1
    ):
        print("--steps and --batch-size must be at least 1")
        return 2
    if args.recipe == "vl2":
        return run_vl2(args)
    if args.out.resolve() == DEFAULT_CHECKPOINT.resolve():
        print(
            "--recipe text needs --out: the shipped checkpoint folder holds the DeepSeek-VL2 "
            "demo model (services/demo/README.md)"
        )
        return 2
    if args.batch_size is None:
        args.batch_size = TrainConfig().batch_size
    if args.init_from is not None and not (args.init_from / "config.json").is_file():
        print(f"--init-from {args.init_from}: no config.json there")
        return 2
    common = {
        "batch_size": args.batch_size,
        "threads": args.threads,
        "save_dtype": args.save_dtype,
        "save_every": args.save_every,
        "warmup_steps": args.warmup_steps,
    }
    if args.steps is None and args.lr is None and args.init_from is None:
        stages = recipe(args.seed, **common)
    else:
        one = dataclasses.replace(
            TrainConfig(), seed=args.seed, mul_format=args.mul_format, **common
        )
        if args.steps is not None:
            one.steps = args.steps
        if args.lr is not None:
            one.lr = args.lr
        stages = [one]
    init_from = args.init_from
    for i, cfg in enumerate(stages):
        result = train(cfg, args.out, init_from=init_from)
        print(
            f"stage {i + 1}/{len(stages)}: trained {result.parameters:,} parameters for "
            f"{result.steps} steps in {result.seconds / 60:.1f} min "
            f"(final loss {result.final_loss:.4f}); wrote {args.out}"
        )
        init_from = args.out  # the next stage continues from what this one wrote
    if args.no_eval:
        return 0
    report = evaluate(load_causal_backend(args.out))
    print(report.summary())
    return 0


def run_vl2(args: argparse.Namespace) -> int:
    import dataclasses as dc
    import time

    import torch

    from services.demo.evaluate import evaluate_vl2, load_vl2_backend
    from services.demo.vl2_trainer import recipe_config, train_vl2

    if args.init_from is not None or args.lr is not None:
        print("--init-from and --lr apply to the text recipe only")
        return 2
    cfg = recipe_config(
        seed=args.seed,
        threads=args.threads,
        device=args.device,
        save_dtype=args.save_dtype,
        warmup_steps=args.warmup_steps,
    )
    if args.steps is not None:  # a smoke run: every stage this many steps
        cfg.stages = [dc.replace(stage, steps=args.steps) for stage in cfg.stages]
    if args.batch_size is not None:  # every stage, the reading pre-stage's too
        cfg.batch_size = args.batch_size
        cfg.stages = [
            dc.replace(
                stage,
                batch_size=None,
                reading_batch_size=args.batch_size if stage.reading_batch_size else 0,
            )
            for stage in cfg.stages
        ]
    started = time.perf_counter()
    _, results = train_vl2(cfg, args.out)
    for i, result in enumerate(results):
        print(
            f"stage {i + 1}/{len(results)} {result.name}: {result.steps} steps in "
            f"{result.seconds / 60:.1f} min ({result.steps / result.seconds:.2f} steps/s, "
            f"final loss {result.final_loss:.4f})"
        )
    print(f"trained in {(time.perf_counter() - started) / 60:.1f} min; wrote {args.out}")
    if args.no_eval:
        return 0
    torch.set_num_threads(1)  # greedy decoding of small batches: one thread is fastest
    for line in evaluate_vl2(load_vl2_backend(args.out, args.device)):
        print(line)
    return 0

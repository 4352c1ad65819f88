"""`mmllm build`: a preset (random weights), or pretrained components composed, saved as a Hub-ready folder."""

import argparse
from pathlib import Path

NAME = "build"
HELP = "build a preset or compose components into a Hub-ready folder"
DESCRIPTION = None


def add_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--preset", help="preset name (configuration/<name>.json)")
    command.add_argument("--vision", help="pretrained vision model (folder or Hub id)")
    command.add_argument("--text", help="pretrained causal LM (folder or Hub id)")
    command.add_argument("--projector", default="mlp", help="projector type for --vision/--text")
    command.add_argument("--modality-adaptive", action="store_true", help="switch the modality-adaptive module on")
    command.add_argument("output", type=Path, help="folder to write (must not exist)")


def run(args: argparse.Namespace) -> None:
    """Build a preset (random weights) or compose pretrained components into a Hub-ready folder."""
    from ..configuration_mmllm import MMLLMConfig
    from ..export.saving import save_model_folder
    from ..modeling_mmllm import MMLLMForConditionalGeneration
    from ..processing_mmllm import MMLLMProcessor

    if args.preset:
        model = MMLLMForConditionalGeneration(MMLLMConfig.from_preset(args.preset))
        processor = MMLLMProcessor.from_preset(args.preset)
    elif args.vision and args.text:
        model, processor = MMLLMForConditionalGeneration.from_components(
            args.vision, args.text, projector=args.projector, modality_adaptive=args.modality_adaptive
        )
    else:
        raise ValueError("Give --preset NAME, or --vision and --text (folders or Hub ids).")
    save_model_folder(model, processor, args.output)
    print(f"saved ({model.num_parameters():,} parameters) to {args.output}")

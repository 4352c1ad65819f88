"""Packing multimodal rows (TRL's `packing: true`, best-fit decreasing) and padding-free batches (`padding_free:
true`), which TRL's SFTTrainer refuses for vision datasets (library side).

A pack is a list of row indices whose token counts (images, video and audio expanded as the collator writes them)
sum to at most `max_length`; rows are never split, so neither are their media. TRL's own best-fit-decreasing
packer picks the packs (it runs on a stand-in of token lists); the collator turns each pack of a batch into one
padding-free sequence (`MultimodalCollator.padding_free`).
"""

from itertools import accumulate

from datasets import Dataset
from trl.data_utils import pack_dataset

from ..configuration_mmllm import backbone_context
from .collator import row_token_counts


def row_lengths(collator, dataset) -> list[int]:
    """Tokens of each row as the collator writes them (media expanded, cut at the collator's `max_length`)."""
    limit = collator.max_length
    return [tokens if limit is None else min(tokens, limit) for tokens, _ in row_token_counts(collator, dataset)]


def pack_rows(lengths: list[int], max_length: int, seed: int = 0) -> Dataset:
    """Packs of row indices (`{"pack": [i, j, ...]}`), each at most `max_length` tokens (a longer row counts as
    `max_length`: the collator cuts it there), by TRL's best-fit decreasing packer; the rows are shuffled first
    (`seed`), as TRL does before packing."""
    stand_in = Dataset.from_dict({"input_ids": [[index] * length for index, length in enumerate(lengths)]})
    packed = pack_dataset(stand_in.shuffle(seed=seed), max_length, strategy="bfd")
    packs = [
        [ids[offset] for offset in accumulate(seq_lengths[:-1], initial=0)]
        for ids, seq_lengths in zip(packed["input_ids"], packed["seq_lengths"], strict=True)
    ]
    return Dataset.from_dict({"pack": packs})


def pack_length(recipe, config) -> int:
    """The token budget of a pack: the recipe's `max_length`, else the backbone's context (the longest sequence it
    was made for); a clear error when neither is set."""
    length = recipe.max_length or backbone_context(config)
    if length is None:
        raise ValueError(
            "packing needs a max_length (the tokens of one pack) and this backbone has no fixed context to take "
            "it from: set max_length in the recipe (e.g. --max_length 2048)."
        )
    return length


def check_packing(recipe, config) -> None:
    """Refuse what packing cannot do exactly: cross-attention fusion (each token attends to its own row's images,
    which one packed row of several examples cannot say) and strategies that split rows (and their media)."""
    if config.fusion == "cross_attention":
        raise ValueError(
            "packing / padding_free put several rows in one sequence, and cross-attention fusion (flamingo) attends "
            "per sequence to its images: set packing: false and padding_free: false for this model."
        )
    if recipe.packing and recipe.packing_strategy != "bfd":
        raise ValueError(
            f"packing_strategy={recipe.packing_strategy!r} splits rows, and a row's images must stay with its text: "
            "use packing_strategy: bfd."
        )


__all__ = ["check_packing", "pack_length", "pack_rows", "row_lengths"]

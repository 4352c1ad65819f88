"""AnyRes (LLaVA-NeXT's high resolution) for every input projector: tile counts, token counts, tile packing.

The image processor (transformers' `LlavaNextImageProcessorPil`) picks the best grid of `image_grid_pinpoints` for
each image, resizes and pads it, and cuts it into encoder-sized tiles after a resized global view. A projector that
keeps the patch grid (`linear`, `mlp`) is packed as LLaVA-NeXT packs it: the global view's tokens, then the tiles'
patch grid with the letterbox padding cut away (`unpad_image`) and `image_newline` after each row. A projector with
a fixed token count (`abstractor`, `qformer`, `resampler`) keeps every view's tokens: `(tiles + 1) x
image_seq_length`. The processor counts tokens with the same functions, so the two cannot disagree.
"""

import math

import torch
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)


def num_views(image_size, pinpoints: list[list[int]], tile_size: int) -> int:
    """Views of one image `(height, width)`: the global view and the tiles of its best grid."""
    return image_size_to_num_patches(image_size=image_size, grid_pinpoints=pinpoints, patch_size=tile_size)


def unpadded_grid(image_size, pinpoints: list[list[int]], tile_size: int, patches: int) -> tuple[int, int]:
    """Rows and columns of patch tokens left of an image's tile grid once the letterbox padding is cut away
    (LLaVA-NeXT's count, as `LlavaNextProcessor` computes it)."""
    height, width = (int(side) for side in image_size)
    best_height, best_width = select_best_resolution([height, width], pinpoints)
    rows, columns = patches * (best_height // tile_size), patches * (best_width // tile_size)
    if width / height > columns / rows:
        new_height = int(round(height * (columns / width), 7))
        rows -= (rows - new_height) // 2 * 2
    else:
        new_width = int(round(width * (rows / height), 7))
        columns -= (columns - new_width) // 2 * 2
    return rows, columns


def num_image_tokens(image_size, pinpoints, tile_size: int, image_seq_length: int, grid: bool) -> int:
    """Soft tokens of one tiled image: LLaVA-NeXT's count for a grid projector, `views x image_seq_length` else."""
    if not grid:
        return num_views(image_size, pinpoints, tile_size) * image_seq_length
    patches = math.isqrt(image_seq_length)
    rows, columns = unpadded_grid(image_size, pinpoints, tile_size, patches)
    return image_seq_length + rows * (columns + 1)


def pack_grid_features(
    features: torch.Tensor, image_size, pinpoints, tile_size: int, newline: torch.Tensor
) -> torch.Tensor:
    """One image's projected views `[views, patches^2, hidden]` -> `[tokens, hidden]`: the global view, then the
    tiles' patch grid unpadded with `newline` after each row (LLaVA-NeXT's `pack_image_features`)."""
    base, tiles = features[0], features[1:]
    if not len(tiles):
        return base
    patches = math.isqrt(base.shape[0])
    grid_rows, grid_columns = get_anyres_image_grid_shape(image_size, pinpoints, tile_size)
    grid = tiles.view(grid_rows, grid_columns, patches, patches, -1).permute(4, 0, 2, 1, 3)
    grid = unpad_image(grid.flatten(1, 2).flatten(2, 3), image_size)
    newlines = newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid)
    grid = torch.cat((grid, newlines), dim=-1).flatten(1, 2).transpose(0, 1)
    return torch.cat((base, grid))


__all__ = ["num_image_tokens", "num_views", "pack_grid_features", "unpadded_grid"]

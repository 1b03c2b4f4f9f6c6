"""SD3's fixed 2D sin-cos positional embedding: the table, crops per resolution, and the
two training options around it.

The MMDiT stores one table of G x G positions (`pos_embed`, (1, G*G, hidden); G = 192 for
SD3 M and 3.5 L, 384 for 3.5 M). An image of h x w patches uses an h x w window of it:

- by default the **centre** window (top = (G - h) // 2, left = (G - w) // 2), as sd-scripts
  and diffusers do;
- with `--pos_emb_random_crop_rate p`, a uniformly random window for a forward pass with
  probability p (one draw per batch; SD3.5 M model card);
- with `--enable_scaled_pos_embed` (SD3.5 M, experimental; KohakuBlueleaf's scheme in
  sd-scripts), a table is computed per training resolution so that the centre region of every
  resolution sees the same positional values; the table is chosen by the image's patch area.

Each 1-D embedding is concat(sin(p * w), cos(p * w)) with w_i = 10000^(-i / (D/4)); the
first half of the channels encodes the column, the second half the row (the MAE layout the
checkpoints were trained with).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# sd-scripts builds each scaled table 1.5x the training size, so buckets with other aspect
# ratios of about the same area still fit inside it.
SCALED_TABLE_RATIO = 1.5
SCALED_BASE_SIZE = 16


# ---------------------------------------------------------------------------------------------
# Tables.

def _sincos_1d(embed_dim: int, positions: Tensor) -> Tensor:
    """(M,) positions -> (M, embed_dim): sin half then cos half, frequencies in float64."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.reshape(-1).to(torch.float64)[:, None] * omega[None]
    return torch.cat((angles.sin(), angles.cos()), dim=1)


def _table_from_grid(embed_dim: int, rows: Tensor, cols: Tensor) -> Tensor:
    """rows (H,), cols (W,) coordinates -> (1, H*W, embed_dim) float32, row-major."""
    if embed_dim % 4:
        raise ValueError(f"the positional embedding width {embed_dim} must be a multiple of 4")
    grid_rows = rows[:, None].expand(len(rows), len(cols))
    grid_cols = cols[None, :].expand(len(rows), len(cols))
    table = torch.cat((_sincos_1d(embed_dim // 2, grid_cols), _sincos_1d(embed_dim // 2, grid_rows)), dim=1)
    return table.float()[None]


def sincos_table(embed_dim: int, grid_size: int) -> Tensor:
    """The plain table over integer positions 0..G-1 (1, G*G, embed_dim)."""
    coords = torch.arange(grid_size, dtype=torch.float32)
    return _table_from_grid(embed_dim, coords, coords)


def scaled_sincos_table(embed_dim: int, grid_size: int, sample_size: int,
                        base_size: int = SCALED_BASE_SIZE) -> Tensor:
    """A G x G table whose central `sample_size` window spans the same coordinate range for
    every sample size (positions scaled by base_size / sample_size and centred)."""
    # float32 grid arithmetic, as the reference computes it, then float64 trigonometry.
    coords = torch.arange(grid_size, dtype=torch.float32) / grid_size
    scale = base_size * grid_size / sample_size
    shift = scale * (grid_size - sample_size) / (2 * grid_size)
    coords = coords * scale - shift
    return _table_from_grid(embed_dim, coords, coords)


# ---------------------------------------------------------------------------------------------
# Windows.

def center_offsets(table_size: int, h: int, w: int) -> tuple[int, int]:
    return (table_size - h) // 2, (table_size - w) // 2


def random_offsets(table_size: int, h: int, w: int, generator: torch.Generator | None = None) -> tuple[int, int]:
    top = int(torch.randint(0, table_size - h + 1, (1,), generator=generator))
    left = int(torch.randint(0, table_size - w + 1, (1,), generator=generator))
    return top, left


def check_fits(table_size: int, h: int, w: int) -> None:
    if h > table_size or w > table_size:
        raise ValueError(
            f"the image is {h}x{w} patches, but the positional embedding covers at most {table_size}x{table_size} "
            f"({table_size * 16}x{table_size * 16} pixels); train or sample at a smaller resolution."
        )


def crop_table(table: Tensor, table_size: int, h: int, w: int, top: int, left: int) -> Tensor:
    """The h x w window at (top, left) of a (1, G*G, D) table, as (1, h*w, D)."""
    check_fits(table_size, h, w)
    spatial = table.reshape(1, table_size, table_size, table.shape[-1])
    return spatial[:, top: top + h, left: left + w].reshape(1, h * w, table.shape[-1])


def latent_sizes_for_resolutions(resolutions: list[tuple[int, int]], vae_stride: int = 8) -> list[int]:
    """sd-scripts' latent size per dataset resolution (W, H): round(sqrt(W * H)) // 8, deduplicated."""
    return sorted({round(math.sqrt(w * h)) // vae_stride for w, h in resolutions})


# ---------------------------------------------------------------------------------------------
# Scaled tables (--enable_scaled_pos_embed).

@dataclass
class ScaledPosEmbeds:
    """One table per training resolution, chosen by patch area.

    Areas up to the midpoint between two consecutive square sizes use the smaller size's
    table; the largest size accepts areas up to (1.5 * size)^2. An image taller or wider than
    its table gets a bigger table of the same scaling, built on first use."""

    hidden_size: int
    patched_sizes: list[int]
    max_areas: list[int]
    tables: dict[int, Tensor] = field(default_factory=dict)

    @classmethod
    def for_latent_sizes(cls, hidden_size: int, latent_sizes: list[int], patch_size: int) -> "ScaledPosEmbeds":
        if not latent_sizes:
            raise ValueError("scaled positional embeddings need at least one training resolution")
        patched = sorted({size // patch_size for size in latent_sizes})
        areas = [(patched[i - 1] ** 2 + patched[i] ** 2) // 2 for i in range(1, len(patched))]
        areas.append(int((patched[-1] * SCALED_TABLE_RATIO) ** 2))
        tables = {p: scaled_sincos_table(hidden_size, int(p * SCALED_TABLE_RATIO), p) for p in patched}
        return cls(hidden_size, patched, areas, tables)

    def table_for(self, h: int, w: int, device: torch.device | str | None = None) -> tuple[Tensor, int]:
        """(table, its grid size) for an image of h x w patches, on `device` (kept there, so a
        training run copies each table to the GPU once)."""
        area = h * w
        size = next((p for p, limit in zip(self.patched_sizes, self.max_areas) if area <= limit), None)
        if size is None:
            raise ValueError(
                f"an image of {h}x{w} patches is larger than every resolution prepared for scaled positional "
                f"embeddings (training sizes {self.patched_sizes} patches); include its resolution in the dataset."
            )
        table = self.tables[size]
        table_size = math.isqrt(table.shape[1])
        if h > table_size or w > table_size:
            table_size = max(h, w)
            logger.warning("scaled positional embedding for %dx%d patches: the image is taller or wider than "
                           "its %d-patch table; building a %d-patch table", h, w, size, table_size)
            table = scaled_sincos_table(self.hidden_size, table_size, size)
            self.tables[size] = table
        if device is not None and table.device != torch.device(device):
            table = table.to(device)
            self.tables[size] = table
        return table, table_size

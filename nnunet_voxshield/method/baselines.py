"""Baselines that need no optimisation: uniform random noise, and class-wise textures (a shortcut baseline).

Uniform noise in [-eps, eps] is also the paper's initialisation of the bilevel loop.

The class-wise variant of unlearnable examples (Huang et al., ICLR 2021) plants a pattern that predicts the label
better than the image does. Here each label gets a periodic random sign texture whose tile is mirror-symmetric, so
nnU-Net's mirroring and random patch positions only translate it (a convolutional victim sees the same texture).
"""
import numpy as np
import torch

from nnunet_voxshield.method.budget import project

TILE = 4  # voxels per period along each axis


def uniform_delta(eps: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                  headroom: np.ndarray | None = None) -> torch.Tensor:
    """delta [C, *mask.shape] uniform in [-eps_c, eps_c] inside `mask` (and the clip window), zero elsewhere."""
    u = torch.from_numpy(rng.uniform(-1, 1, (len(eps), *mask.shape)).astype(np.float32))
    bound = torch.from_numpy(np.asarray(eps, dtype=np.float32))
    return project(u * bound.view(-1, 1, 1, 1), bound, torch.from_numpy(mask), _tensor(headroom))


def label_textures(labels: list[int], n_channels: int, seed: int) -> dict[int, np.ndarray]:
    """label -> [C, TILE, TILE, TILE] array of +-1 with zero mean, symmetric under flips about the tile centre."""
    rng = np.random.default_rng(seed)
    n_half = (TILE // 2) ** 3
    balanced = np.repeat([-1.0, 1.0], n_half // 2)  # zero mean: no per-label offset that z-scoring would absorb
    textures = {}
    for label in labels:
        half = np.stack([rng.permutation(balanced) for _ in range(n_channels)]).reshape(n_channels, *(TILE // 2,) * 3)
        for axis in (1, 2, 3):
            half = np.concatenate([half, np.flip(half, axis)], axis=axis)
        textures[label] = half
    return textures


def classwise_delta(labels: np.ndarray, mask: np.ndarray, eps: np.ndarray, textures: dict,
                    headroom: np.ndarray | None = None) -> torch.Tensor:
    """delta [C, *labels.shape]: eps_c times the label's texture inside `mask` (clamped into the clip window),
    zero elsewhere."""
    reps = [int(np.ceil(s / TILE)) for s in labels.shape]
    delta = np.zeros((len(eps), *labels.shape), dtype=np.float32)
    for label, texture in textures.items():
        tiled = np.tile(texture, (1, *reps))[(slice(None), *[slice(0, s) for s in labels.shape])]
        where = (labels == label) & mask
        delta[:, where] = tiled[:, where] * np.asarray(eps, dtype=np.float32)[:, None]
    bound = torch.from_numpy(np.asarray(eps, dtype=np.float32))
    return project(torch.from_numpy(delta), bound, torch.from_numpy(mask), _tensor(headroom))


def _tensor(array: np.ndarray | None) -> torch.Tensor | None:
    return None if array is None else torch.from_numpy(array)

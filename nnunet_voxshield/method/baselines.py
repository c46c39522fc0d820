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
GRATING_DIRECTIONS = ((1, 0, 0), (0, 1, 0), (0, 0, 1))
"""Along the axes only: nnU-Net's mirroring turns a diagonal grating into another direction, an axial one into
itself (shifted)."""
GRATING_PERIODS = (4.0, 8.0)
"""Voxels of the preprocessed grid; apart by more than nnU-Net's scaling range (0.7-1.4), so that scaling never turns
one period into the other."""
GRATING_METHODS = ("codes", "presence", "absence", "rim", "parity", "twoscale")
"""The methods whose code is fixed gratings per label on nnU-Net's preprocessed grid."""
PARITY_DIRECTIONS = tuple((i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1) if i or j or k)
"""The seven codes (-1)^(a.x) of period 2: which axes alternate. Mirroring maps each onto itself (up to sign), and
each is read from a voxel and its six neighbours, so it marks a label to the voxel, where a longer period cannot."""
LEVEL_SPACING = 0.25
"""Normalised units between neighbouring labels' intensity levels (`levels`): the voxels of one label end up within
a few hundredths of its level after nnU-Net renormalises a protected case, far less than this."""


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


def label_gratings(labels: list[int], seed: int, presence: bool = False) -> dict[int, tuple]:
    """label -> (unit direction, period, phase) of a square-wave grating on nnU-Net's preprocessed grid.

    Each label gets its own direction and period, so a small filter tells them apart whatever the patch position,
    and a square wave spends the whole L-inf budget at every voxel. With `presence`, every label gets label 1's code:
    one code that only says "foreground here".
    """
    rng = np.random.default_rng(seed)
    out = {}
    for i, label in enumerate(labels):
        direction = np.asarray(GRATING_DIRECTIONS[i % len(GRATING_DIRECTIONS)], dtype=np.float64)
        period = GRATING_PERIODS[(i // len(GRATING_DIRECTIONS)) % len(GRATING_PERIODS)]
        out[label] = (direction, period, float(rng.uniform(0, 2 * np.pi)))
    return {label: out[labels[0]] for label in labels} if presence else out


def background_grating(seed: int) -> tuple:
    """The background's code under `rim`, in `label_gratings`' form: another direction and period than the presence
    grating (label_gratings' first), so that neither mirroring nor nnU-Net's scaling turns one into the other."""
    phase = np.random.default_rng([seed, 1]).uniform(0, 2 * np.pi)
    return np.asarray(GRATING_DIRECTIONS[1], dtype=np.float64), GRATING_PERIODS[1], float(phase)


def label_parities(labels: list[int], seed: int) -> dict[int, tuple]:
    """label -> (a, 2, phase 0 or pi): a period-2 parity code per label, in `label_gratings`' form.

    The seed draws which of the seven codes each label gets (and its sign); more than seven labels reuse codes.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(PARITY_DIRECTIONS))
    return {label: (np.asarray(PARITY_DIRECTIONS[order[i % len(order)]], dtype=np.float64), 2.0,
                    float(np.pi * rng.integers(2)))
            for i, label in enumerate(labels)}


def method_gratings(method: str, labels: list[int], seed: int) -> list[tuple[float, dict]]:
    """The fixed code of a grating method (GRATING_METHODS) as (weight, gratings) layers, for `layered_code`.

    `twoscale` gives half the budget to each label's grating, which a victim learns first, and half to its parity
    code, which says where the label ends. `absence` puts the presence grating on the background (label 0) instead;
    `rim` keeps it on the labels and gives the background a code of its own, so both sides of a label's edge carry one.
    """
    if method == "absence":
        return [(1.0, {0: label_gratings(labels, seed)[labels[0]]})]
    if method == "rim":
        return [(1.0, {**label_gratings(labels, seed, presence=True), 0: background_grating(seed)})]
    if method == "twoscale":
        return [(0.5, label_gratings(labels, seed)), (0.5, label_parities(labels, seed))]
    if method == "parity":
        return [(1.0, label_parities(labels, seed))]
    return [(1.0, label_gratings(labels, seed, presence=method == "presence"))]


def layered_code(labels_preprocessed: np.ndarray, layers: list[tuple[float, dict]]) -> np.ndarray:
    """The weighted sum of the layers' codes on the preprocessed grid (within +-1 when the weights sum to 1)."""
    return sum(weight * grating_code(labels_preprocessed, gratings) for weight, gratings in layers)


def coded_region(layers: list[tuple[float, dict]], labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Where a grating method's code may be written on the raw grid: the ROI voxels whose label carries a code.
    Pulled back from the preprocessed grid, a code spills over its labels' edges; this keeps `absence`'s off the
    labels and the label codes off whatever background a wider ROI adds."""
    return mask & np.isin(labels, sorted({label for _, gratings in layers for label in gratings}))


def grating_code(labels_preprocessed: np.ndarray, gratings: dict) -> np.ndarray:
    """+-1 where a label's grating is on (by its sign), 0 on background: the code on the preprocessed grid."""
    code = np.zeros(labels_preprocessed.shape, dtype=np.float32)
    for label, (direction, period, phase) in gratings.items():
        where = labels_preprocessed == label
        coords = np.stack(np.nonzero(where)).astype(np.float64)  # the wave is needed on the label's voxels only
        wave = np.cos(2 * np.pi * np.tensordot(direction, coords, axes=1) / period + phase)
        code[where] = np.where(wave >= 0, 1.0, -1.0)
    return code


def label_levels(images: list[np.ndarray], label_maps: list[np.ndarray], labels: list[int],
                 spacing: float = LEVEL_SPACING) -> np.ndarray:
    """[len(labels), C] intensity levels, one per label and channel, in nnU-Net's normalised units.

    Per channel: the levels closest (least squares) to the labels' mean intensities over all cases ([C, ...] images,
    label maps on the same grid) that keep the means' order and lie at least `spacing` apart. Near its label's own
    intensities, a small budget flattens most of a label onto its level, and no two labels share one.
    """
    n_channels = images[0].shape[0]
    sums, counts = np.zeros((len(labels), n_channels)), np.zeros(len(labels))
    for image, label_map in zip(images, label_maps):
        for i, label in enumerate(labels):
            where = label_map == label
            sums[i] += image[:, where].sum(1)
            counts[i] += where.sum()
    means = sums / np.maximum(counts, 1)[:, None]
    return np.stack([spread_apart(means[:, c], spacing) for c in range(n_channels)], axis=1)


def spread_apart(values: np.ndarray, spacing: float) -> np.ndarray:
    """The points closest (least squares) to `values` in the same order, neighbours at least `spacing` apart.

    With u_i = t_i - spacing * i over the sorted values the constraint is "u nondecreasing": an isotonic
    regression, solved exactly by pooling adjacent violators.
    """
    order = np.argsort(values, kind="stable")
    steps = spacing * np.arange(len(values))
    blocks = []  # [sum, count] of pooled runs, their means nondecreasing
    for v in values[order] - steps:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] * blocks[-1][1] > blocks[-1][0] * blocks[-2][1]:
            total, n = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += n
    out = np.empty(len(values))
    out[order] = np.concatenate([np.full(n, total / n) for total, n in blocks]) + steps
    return out


def level_code(image: np.ndarray, label_map: np.ndarray, labels: list[int], levels: np.ndarray,
               eps: np.ndarray) -> np.ndarray:
    """[C, ...] code in budget units: inside each label, the step toward its level, (level - x) / eps_c clipped to
    +-1 (so eps times it lands a voxel on the level where the budget reaches); 0 on background."""
    code = np.zeros(image.shape, dtype=np.float32)
    scale = np.asarray(eps, dtype=np.float64)[:, None]
    for i, label in enumerate(labels):
        where = label_map == label
        code[:, where] = np.clip((levels[i][:, None] - image[:, where]) / scale, -1, 1)
    return code


def pull_back(code: np.ndarray, resample) -> np.ndarray:
    """The cropped-grid pattern whose resampling is closest (least squares, axis by axis) to `code` on the
    preprocessed grid; `code` itself when nnU-Net does not resample the case."""
    out = np.asarray(code, dtype=np.float64)
    for axis, matrix in enumerate(resample.matrices(torch.float64)):
        if matrix is not None:
            out = np.moveaxis(np.tensordot(np.linalg.pinv(matrix.numpy()), np.moveaxis(out, axis, 0), axes=1), 0, axis)
    return out


def code_delta(code_preprocessed: np.ndarray, resample, eps: np.ndarray, mask: np.ndarray,
               headroom: np.ndarray | None = None) -> torch.Tensor:
    """delta [C, *mask.shape] on the cropped grid: eps_c times the pulled-back code ([1, ...]: one code for every
    channel, or [C, ...]), projected to the budget, the region and the clip window."""
    bound = torch.from_numpy(np.asarray(eps, dtype=np.float32))
    pattern = torch.from_numpy(np.stack([pull_back(c, resample) for c in code_preprocessed]).astype(np.float32))
    return project(bound.view(-1, 1, 1, 1) * pattern, bound, torch.from_numpy(mask), _tensor(headroom))


def _tensor(array: np.ndarray | None) -> torch.Tensor | None:
    return None if array is None else torch.from_numpy(array)

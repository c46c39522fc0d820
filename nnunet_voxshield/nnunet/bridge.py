"""The bridge between a raw case and nnU-Net's preprocessed grid.

A perturbation is stored on the "cropped grid": nnU-Net's array after transpose_forward and crop_to_nonzero, in
normalised units, before resampling. From there it maps exactly in both directions: forward to what the network
sees (`resampler(grid)`, nnU-Net's own resampling reproduced in torch) and back to the raw file (`delta_to_raw`,
a per-channel scale, a pad and a transpose). `CaseGrid` records everything those two maps need.
"""
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.preprocessing.cropping.cropping import create_nonzero_mask, crop_to_nonzero

from nnunet_voxshield.errors import VoxShieldError
from nnunet_voxshield.nnunet.resampling import Resampler, resampling_kwargs_of

# the +-5 sigma z-score window of the paper maps to [0, 1]: 10 normalised units
ZSCORE_WINDOW = 10.0
CLIPPING_SCHEMES = {"CTNormalization", "RescaleTo01Normalization", "RGBTo01Normalization"}  # see _clip_window
NORM_EPS = 1e-8  # nnU-Net's lower bound on the std it divides by (float32 targets)


@dataclass
class CaseGrid:
    """Geometry and intensity scale of one case, from the reader's array to nnU-Net's preprocessed array.

    Spatial tuples after `shape_raw` are in transposed (nnU-Net's internal) axis order; bbox is half-open.
    `raw_per_norm[c]` is d raw / d normalised of channel c; `window[c]` is the width, in normalised units, of the
    intensity window that the paper maps to [0, 1] (budgets like 4/255 are fractions of it).
    """
    identifier: str
    image_files: list
    seg_file: str | None
    transpose_forward: tuple
    transpose_backward: tuple
    shape_raw: tuple
    bbox: tuple
    shape_cropped: tuple
    shape_preprocessed: tuple
    spacing_cropped: tuple
    target_spacing: tuple
    normalization_schemes: tuple
    raw_per_norm: np.ndarray
    window: np.ndarray
    nonzero_mask_cropped: np.ndarray
    seg_cropped: np.ndarray | None  # the label map on the cropped grid (None without a label file)
    resampling_kwargs: dict
    headroom: np.ndarray | None = None
    """[2, C, *shape_cropped] float16, normalised units: how far each voxel may move down (<= 0) and up (>= 0) before
    nnU-Net's normalisation clips it (CT's percentile window; the 0-1 range of RescaleTo01 and RGB). 0 and 0 where
    the voxel is already outside the window. None when no channel's scheme clips."""

    @property
    def shape_before_cropping(self) -> tuple:
        return tuple(self.shape_raw[i] for i in self.transpose_forward)

    @property
    def spacing_reader(self) -> tuple:
        """The spacing in the reader's axis order (what nnU-Net's properties call `spacing`)."""
        return tuple(self.spacing_cropped[i] for i in self.transpose_backward)

    @property
    def n_channels(self) -> int:
        return len(self.normalization_schemes)


def _to_transposed(data: np.ndarray, transpose: tuple) -> np.ndarray:
    return data.transpose([0, *[i + 1 for i in transpose]])


def _channel_scales(scheme: str, image: np.ndarray, norm_mask: np.ndarray, use_mask: bool,
                    nonzero_mask: np.ndarray, intensity_properties: dict) -> tuple[float, float]:
    """(raw_per_norm, window) of one cropped float32 channel, with nnU-Net's own statistics and arithmetic."""
    if scheme == "ZScoreNormalization":
        std = image[norm_mask].std() if use_mask else image.std()
        return max(float(std), NORM_EPS), ZSCORE_WINDOW
    if scheme == "CTNormalization":
        return max(float(intensity_properties["std"]), NORM_EPS), ZSCORE_WINDOW
    if scheme == "NoNormalization":
        values = image[nonzero_mask]
        return 1.0, ZSCORE_WINDOW * (float(values.std()) if values.size else 1.0)
    if scheme == "RescaleTo01Normalization":
        return max(float(image.max() - image.min()), NORM_EPS), 1.0
    if scheme == "RGBTo01Normalization":
        return 255.0, 1.0
    raise VoxShieldError(f"normalization scheme '{scheme}' is not supported by VoxShield; use a channel name that "
                         f"selects nnU-Net's ZScore, CT, noNorm, rescale_to_0_1 or rgb_to_0_1 normalization")


def read_case(image_files, seg_file, plans_manager) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """The case as the plans' reader returns it: (images [C, ...], seg [1, ...] or None, properties)."""
    reader = plans_manager.image_reader_writer_class()
    raw, properties = reader.read_images(list(image_files))
    seg = reader.read_seg(seg_file)[0] if seg_file is not None else None
    return raw, seg, properties


def to_cropped_grid(array: np.ndarray, grid: "CaseGrid") -> np.ndarray:
    """A reader-layout array [C, *shape_raw] -> nnU-Net's transposed and cropped grid [C, *shape_cropped]."""
    return _to_transposed(array, grid.transpose_forward)[(slice(None), *bounding_box_to_slice(
        [list(b) for b in grid.bbox]))]


def _clip_window(scheme: str, image: np.ndarray, intensity_properties: dict):
    """(normalised image before clipping, lower, upper) for schemes whose normalisation clips; None for the rest.

    CT clips to the foreground's 0.5 and 99.5 percentiles before the z-score; RescaleTo01 maps the image's own min
    and max to 0 and 1 (a voxel pushed beyond them would rescale every other voxel); RGBTo01 refuses values outside
    0-255. A perturbation that stays inside the window passes all three unchanged (up to the scale).
    """
    image = image.astype(np.float64) if scheme in CLIPPING_SCHEMES else image
    if scheme == "CTNormalization":
        p = intensity_properties
        std = max(float(p["std"]), NORM_EPS)
        return ((image - p["mean"]) / std, (p["percentile_00_5"] - p["mean"]) / std,
                (p["percentile_99_5"] - p["mean"]) / std)
    if scheme == "RescaleTo01Normalization":
        low = float(image.min())
        return (image - low) / max(float(image.max()) - low, NORM_EPS), 0.0, 1.0
    if scheme == "RGBTo01Normalization":
        return image / 255.0, 0.0, 1.0
    return None


def _headroom(schemes, cropped: np.ndarray, intensity: dict) -> np.ndarray | None:
    """Per voxel and channel, how far delta may go down and up inside the clip window (see CaseGrid.headroom)."""
    if not CLIPPING_SCHEMES.intersection(schemes):
        return None
    windows = [_clip_window(s, cropped[c], intensity.get(str(c), {})) for c, s in enumerate(schemes)]
    room = np.empty((2, *cropped.shape), dtype=np.float16)
    for c, w in enumerate(windows):
        if w is None:
            room[0, c], room[1, c] = -np.inf, np.inf
            continue
        u, lo, hi = w
        inside = (u >= lo) & (u <= hi)
        room[0, c] = _toward_zero(np.where(inside, lo - u, 0.0))
        room[1, c] = _toward_zero(np.where(inside, hi - u, 0.0))
    return room


def _toward_zero(values: np.ndarray) -> np.ndarray:
    """float16 that never exceeds `values` in magnitude: a bound rounded outwards would let the clip bite."""
    f = values.astype(np.float16)
    over = np.abs(f.astype(np.float64)) > np.abs(values)
    f[over] = np.nextafter(f[over], np.float16(0))
    return f


def preprocess_case(image_files, seg_file, plans_manager, configuration_manager, dataset_json, identifier: str,
                    loaded: tuple | None = None):
    """Run the plans' own preprocessor on one case in memory -> (data_pre, seg_pre, properties, CaseGrid).

    `loaded` is what `read_case` returned for these files, when the caller has read them already.
    """
    if isinstance(dataset_json, str):
        dataset_json = load_json(dataset_json)
    raw, seg, properties = loaded if loaded is not None else read_case(image_files, seg_file, plans_manager)
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    data_pre, seg_pre, properties = preprocessor.run_case_npy(raw, seg, properties, plans_manager,
                                                              configuration_manager, dataset_json)

    tf, tb = tuple(plans_manager.transpose_forward), tuple(plans_manager.transpose_backward)
    raw_t = _to_transposed(raw, tf)
    bbox = tuple(tuple(int(v) for v in b) for b in properties["bbox_used_for_cropping"])
    slicer = bounding_box_to_slice([list(b) for b in bbox])
    nonzero_mask = create_nonzero_mask(raw_t)[slicer]
    # the z-score mask exactly as nnU-Net builds it: crop_to_nonzero marks 'outside' as -1 in the seg
    seg_t = None if seg is None else _to_transposed(seg, tf)
    _, seg_marked, _ = crop_to_nonzero(raw_t, seg_t)
    norm_mask = seg_marked[0] >= 0
    cropped = raw_t[(slice(None), *slicer)].astype(np.float32)

    schemes = tuple(configuration_manager.normalization_schemes)
    intensity = plans_manager.foreground_intensity_properties_per_channel
    scales = [_channel_scales(s, cropped[c], norm_mask, bool(configuration_manager.use_mask_for_norm[c]),
                              nonzero_mask, intensity.get(str(c), {})) for c, s in enumerate(schemes)]
    spacing_cropped = tuple(float(properties["spacing"][i]) for i in tf)
    target = list(configuration_manager.spacing)
    if len(target) < 3:  # 2d configurations keep the spacing between slices
        target = [spacing_cropped[0], *target]
    grid = CaseGrid(
        identifier=identifier, image_files=list(image_files), seg_file=seg_file,
        transpose_forward=tf, transpose_backward=tb,
        shape_raw=tuple(int(s) for s in raw.shape[1:]), bbox=bbox,
        shape_cropped=tuple(int(s) for s in properties["shape_after_cropping_and_before_resampling"]),
        shape_preprocessed=tuple(int(s) for s in data_pre.shape[1:]),
        spacing_cropped=spacing_cropped, target_spacing=tuple(float(s) for s in target),
        normalization_schemes=schemes,
        raw_per_norm=np.array([s[0] for s in scales], dtype=np.float64),
        window=np.array([s[1] for s in scales], dtype=np.float64),
        nonzero_mask_cropped=nonzero_mask,
        seg_cropped=None if seg_t is None else seg_t[0][slicer],
        resampling_kwargs=resampling_kwargs_of(configuration_manager),
        headroom=_headroom(schemes, cropped, intensity),
    )
    return data_pre, seg_pre, properties, grid


def resampler(grid: CaseGrid) -> Resampler:
    """The exact torch resampling for this case's cropped -> preprocessed grid (shared between equal geometries)."""
    kwargs = tuple(sorted((k, v) for k, v in grid.resampling_kwargs.items()))
    return _cached_resampler(grid.shape_cropped, grid.shape_preprocessed, grid.spacing_cropped,
                             grid.target_spacing, kwargs)


@lru_cache(maxsize=64)
def _cached_resampler(shape_in, shape_out, spacing_in, spacing_out, kwargs) -> Resampler:
    return Resampler(shape_in, shape_out, spacing_in, spacing_out, dict(kwargs))


def delta_to_raw(delta_cropped: np.ndarray, grid: CaseGrid) -> np.ndarray:
    """Normalised delta on the cropped grid -> raw-unit delta in the reader's array layout [C, *shape_raw] (float64).

    Outside the crop box the delta is zero. Keeping voxels that are zero in every channel at zero (they decide the
    crop box) is the writer's job, which sees the source values.
    """
    expected = (grid.n_channels, *grid.shape_cropped)
    if tuple(delta_cropped.shape) != expected:
        raise ValueError(f"delta has shape {tuple(delta_cropped.shape)}, expected {expected}")
    scaled = np.asarray(delta_cropped, dtype=np.float64) * grid.raw_per_norm[:, None, None, None]
    full = np.zeros((grid.n_channels, *grid.shape_before_cropping), dtype=np.float64)
    full[(slice(None), *bounding_box_to_slice([list(b) for b in grid.bbox]))] = scaled
    return _to_transposed(full, grid.transpose_backward)

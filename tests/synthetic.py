"""Tiny raw nnU-Net datasets made by the tests themselves (no downloads)."""
import hashlib
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter


def _case(rng, shape, channels, body, dtype, body_radius=0.95):
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    c = rng.uniform(-0.25, 0.25, 3)
    r = rng.uniform(0.35, 0.5, 3)
    d = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2
    seg = np.zeros(shape, np.uint8)
    seg[d < 1] = 1
    seg[d < 0.35] = 2
    radius2 = zz ** 2 + yy ** 2 + xx ** 2
    body_mask = radius2 < body_radius ** 2 if body else np.ones(shape, bool)
    seg[~body_mask] = 0
    images = []
    for ch, kind in enumerate(channels):
        base = gaussian_filter(rng.normal(0, 1, shape), 2) * 3
        img = base + 10 * (seg == 1) * (1 + 0.5 * ch) + 25 * (seg == 2) + rng.normal(0, 1.5, shape)
        if kind == "CT":
            img = img * 20 - 100  # HU-like
        elif kind == "CTAir":  # a chest-like scan: air around the body, a bone shell, soft tissue and a lesion
            img = img * 4 + 20
            img[(radius2 > 0.8 ** 2) & body_mask] = 1200 + rng.normal(0, 40, shape)[(radius2 > 0.8 ** 2) & body_mask]
            img[~body_mask] = -1000 + rng.normal(0, 5, shape)[~body_mask]
        elif kind == "rgb_to_0_1":
            img = np.clip(img * 4 + 60, 0, 255)
        else:
            img = img + 50
        if kind != "CTAir":
            img[~body_mask] = 0
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            img = np.clip(np.round(img), info.min, info.max)
        images.append(img.astype(dtype))
    return images, seg


def write_image(arr_zyx: np.ndarray, path: Path, spacing_xyz, origin=(3.0, -2.0, 1.5)) -> None:
    img = sitk.GetImageFromArray(arr_zyx)
    img.SetSpacing(tuple(float(s) for s in spacing_xyz))
    img.SetOrigin(origin)
    img.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    sitk.WriteImage(img, str(path))


def make_raw_dataset(raw_root, dataset_id: int, name: str = "Tiny", n_train: int = 8, n_test: int = 2,
                     shape=(32, 32, 32), spacing_xyz=(1.0, 1.0, 1.0), channels=("MRI",),
                     dtype=np.float32, file_ending: str = ".nii.gz", body: bool = False, seed: int = 0,
                     vary_shape: bool = False, body_radius: float = 0.95, vary_spacing: bool = False) -> Path:
    """Write `DatasetXXX_Name` with ellipsoid labels (1 outer, 2 inner); shape is (z, y, x) of the arrays.

    Channel names select nnU-Net's normalisation as usual ("CT", "noNorm", "rescale_to_0_1", "rgb_to_0_1", anything
    else z-scores); "CTAir" is a CT channel (dataset.json says "CT") with air (-1000 HU) around the body and a bone
    shell (+1200 HU), both far outside nnU-Net's CT clip window. `body` zeroes (for CTAir: fills with air) voxels
    outside a sphere of `body_radius` so that crop-to-nonzero and masked z-scoring come into play. `vary_spacing`
    gives every case its own slice spacing, so that nnU-Net resamples them.
    """
    rng = np.random.default_rng(seed)
    root = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train + n_test):
        split = "Tr" if i < n_train else "Ts"
        case = f"{name.lower()}_{i:03d}"
        shp = tuple(s + (int(rng.integers(-2, 3)) if vary_shape else 0) for s in shape)
        spacing = (*spacing_xyz[:2], spacing_xyz[2] * (1 + 0.15 * (i % 3)) if vary_spacing else spacing_xyz[2])
        images, seg = _case(rng, shp, channels, body, dtype, body_radius)
        for ch, img in enumerate(images):
            write_image(img, root / f"images{split}" / f"{case}_{ch:04d}{file_ending}", spacing)
        write_image(seg, root / f"labels{split}" / f"{case}{file_ending}", spacing)
    dataset_json = {
        "channel_names": {str(i): "CT" if c == "CTAir" else c for i, c in enumerate(channels)},
        "labels": {"background": 0, "outer": 1, "inner": 2},
        "numTraining": n_train,
        "file_ending": file_ending,
        "name": name,
        "description": "VoxShield test dataset",
        "reference": "made by tests/synthetic.py",
    }
    (root / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return root


def tree_hash(folder: Path) -> str:
    """Hash of every file name and byte below `folder`: proves a dataset was not modified."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def neighbour_products(values: np.ndarray, inside: np.ndarray, axis: int) -> tuple:
    """The distinct values of values[v] * values[v + e_axis] over pairs of voxels both inside `inside`: how a
    period-2 code reads along one axis (one value, -1 or 1, when the axis alternates everywhere or nowhere)."""
    n = values.shape[axis]
    a, b = np.take(values, range(0, n - 1), axis), np.take(values, range(1, n), axis)
    both = np.take(inside, range(0, n - 1), axis) & np.take(inside, range(1, n), axis)
    return tuple(np.unique((a * b)[both]))

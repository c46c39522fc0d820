"""The preview PNG: written atomically, a real PNG of sensible size, profile function called as documented."""
import numpy as np
import pytest
import torch
from matplotlib.image import imread

from nnunet_voxshield.release.preview import save_preview
from nnunet_voxshield.errors import VoxShieldError


def stand_in_profile(x: torch.Tensor, slice_axis: int) -> torch.Tensor:
    """Mean absolute change between adjacent slices: enough to draw a profile without the real ZDiv."""
    dim = x.ndim - 3 + slice_axis
    in_plane = tuple(d for d in range(x.ndim - 3, x.ndim) if d != dim)
    return torch.diff(x, dim=dim).abs().mean(dim=in_plane)


def _pair(shape=(2, 20, 18, 16)):
    rng = np.random.default_rng(0)
    clean = rng.normal(100, 20, shape).astype(np.float32)
    return clean, clean + rng.uniform(-2, 2, shape).astype(np.float32)


@pytest.mark.parametrize("slice_axis", [0, 2])
def test_writes_a_png_and_calls_the_profile_per_volume(tmp_path, slice_axis):
    clean, protected = _pair()
    calls = []

    def recording_profile(x, axis):
        calls.append((tuple(x.shape), axis))
        return stand_in_profile(x, axis)

    path = save_preview(tmp_path / "sub" / "preview.png", clean, protected, slice_axis, "case 0", recording_profile)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = imread(path).shape[:2]
    assert 600 <= width <= 2000 and 800 <= height <= 2000
    assert calls == [(clean.shape[1:], slice_axis)] * 3  # clean, protected, delta of channel 0
    assert [p.name for p in path.parent.iterdir()] == ["preview.png"]  # no temporary file left


def test_overwrites_and_survives_zero_delta(tmp_path):
    clean, _ = _pair()
    path = tmp_path / "p.png"
    path.write_bytes(b"old")
    save_preview(path, clean, clean.copy(), 1, "identical", stand_in_profile)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_works_with_the_real_zdiv_profile(tmp_path):
    objectives = pytest.importorskip("nnunet_voxshield.method.objectives")
    clean, protected = _pair()
    assert save_preview(tmp_path / "p.png", clean, protected, 0, "real", objectives.zdiv_profile).exists()


@pytest.mark.parametrize("clean_shape, protected_shape, axis", [
    ((1, 8, 8, 8), (1, 8, 8, 9), 0), ((8, 8, 8), (8, 8, 8), 0), ((1, 8, 8, 8), (1, 8, 8, 8), 3)])
def test_bad_input_raises_and_writes_nothing(tmp_path, clean_shape, protected_shape, axis):
    with pytest.raises((ValueError, VoxShieldError)):
        save_preview(tmp_path / "p.png", np.zeros(clean_shape), np.zeros(protected_shape), axis, "x",
                     stand_in_profile)
    assert not any(tmp_path.iterdir())

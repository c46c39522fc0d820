"""The torch Resampler equals nnU-Net's own data resampling, and is differentiable."""
import numpy as np
import pytest
import torch
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape, resample_data_or_seg_to_shape

from nnunet_voxshield.nnunet import resampling
from nnunet_voxshield.nnunet.resampling import BAND_TOL, BandedMatrix, Resampler, slice_axis_matrix, spline_matrix

PLANS_KWARGS = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}  # nnU-Net's default plans

# (cropped shape (z,y,x), spacing in, spacing out, expected separate-z axis or None)
CASES = {
    "upsample": ((10, 12, 11), (1.0, 1.0, 1.0), (0.7, 0.8, 0.9), None),
    "downsample": ((14, 16, 13), (1.0, 1.0, 1.0), (1.3, 1.5, 1.2), None),
    "mixed": ((12, 20, 18), (1.0, 1.0, 1.0), (1.0, 0.8, 0.8), None),
    "separate_z_up": ((6, 20, 18), (4.0, 1.0, 1.0), (3.0, 0.9, 1.1), 0),
    "separate_z_down": ((9, 14, 15), (4.0, 1.0, 1.0), (5.0, 1.2, 0.8), 0),
    "separate_z_last_axis": ((14, 12, 6), (1.0, 1.0, 4.0), (0.8, 1.0, 3.0), 2),
    "separate_z_inplane_only": ((7, 15, 13), (4.0, 1.0, 1.0), (4.0, 0.8, 0.9), 0),
}


def _image(shape, seed):
    """Two channels with sharp edges, zeros and a wide range: clipping and edge handling both matter."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (2, *shape)).astype(np.float32)
    x[0, : shape[0] // 3] = 0
    x[1] *= 40
    x[1, :, :, -2:] = 300
    return x


@pytest.mark.parametrize("name", list(CASES))
def test_matches_nnunet_resampling(name):
    shape, sp_in, sp_out, axis = CASES[name]
    new_shape = tuple(int(s) for s in compute_new_shape(shape, sp_in, sp_out))
    assert new_shape != shape
    x = _image(shape, seed=len(name))
    ref = resample_data_or_seg_to_shape(x, new_shape, sp_in, sp_out, **PLANS_KWARGS)

    r = Resampler(shape, new_shape, sp_in, sp_out, PLANS_KWARGS)
    assert not r.is_identity
    assert (r.axis if r.do_separate_z else None) == axis
    ours = r.like_nnunet(torch.from_numpy(x)).numpy()
    data_range = float(x.max() - x.min())
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-5 * data_range

    # the linear part alone (what a perturbation sees) differs from nnU-Net only where the clip acts
    linear = r(torch.from_numpy(x)).numpy()
    unclipped = (linear >= x.min(axis=(1, 2, 3), keepdims=True)) & (linear <= x.max(axis=(1, 2, 3), keepdims=True))
    if axis is None:
        assert np.abs(linear - ref)[unclipped].max() <= 1e-5 * data_range


def test_linear_part_is_exact_for_small_signals():
    """A perturbation far from the data's extremes resamples exactly linearly: R(x + d) - R(x) == R(d)."""
    shape, sp_in, sp_out, _ = CASES["separate_z_up"]
    new_shape = tuple(int(s) for s in compute_new_shape(shape, sp_in, sp_out))
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (1, *shape))
    x[..., 0, 0], x[..., 0, 1] = 50, -50  # per-slice extremes far from everything else: the clip never acts
    d = rng.uniform(-0.157, 0.157, x.shape)
    ref = (resample_data_or_seg_to_shape(x + d, new_shape, sp_in, sp_out, **PLANS_KWARGS)
           - resample_data_or_seg_to_shape(x, new_shape, sp_in, sp_out, **PLANS_KWARGS))
    ours = Resampler(shape, new_shape, sp_in, sp_out, PLANS_KWARGS)(torch.from_numpy(d)).numpy()
    mask = np.ones(new_shape, bool)
    mask[:, :3, :3] = False  # around the planted extremes
    assert np.abs(ours - ref)[:, mask].max() < 1e-9


def test_identity_and_batch_dim():
    r = Resampler((5, 6, 7), (5, 6, 7), (1, 1, 1), (1, 1, 1), PLANS_KWARGS)
    x = torch.randn(2, 5, 6, 7)
    assert r.is_identity and r(x) is x and r.like_nnunet(x) is x

    shape, sp_in, sp_out, _ = CASES["mixed"]
    new_shape = tuple(int(s) for s in compute_new_shape(shape, sp_in, sp_out))
    r = Resampler(shape, new_shape, sp_in, sp_out, PLANS_KWARGS)
    batch = torch.randn(3, 2, *shape, dtype=torch.float64)
    out = r(batch)
    assert out.shape == (3, 2, *new_shape)
    assert torch.allclose(out[1], r(batch[1]))


def test_reads_configuration_manager_kwargs():
    """force_separate_z from the plans is honoured (False disables the anisotropic path)."""
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
    cm = ConfigurationManager({"architecture": {}, "resampling_fn_data": "resample_data_or_seg_to_shape",
                               "resampling_fn_data_kwargs": {**PLANS_KWARGS, "force_separate_z": False}})
    r = Resampler((6, 20, 18), (8, 22, 16), (4, 1, 1), (3, 0.9, 1.1), cm)
    assert not r.do_separate_z


@pytest.mark.parametrize("name", ["downsample", "separate_z_up"])
def test_gradcheck(name):
    shape, sp_in, sp_out, _ = CASES[name]
    small = tuple(max(3, s // 2) for s in shape)
    new_shape = tuple(int(s) for s in compute_new_shape(small, sp_in, sp_out))
    r = Resampler(small, new_shape, sp_in, sp_out, PLANS_KWARGS)
    x = torch.randn(1, *small, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(r, (x,), eps=1e-6, atol=1e-6, fast_mode=True)


# ---- the banded operator -------------------------------------------------------------------------------------------
# CT-sized in-plane axes (512 at 0.7 / 0.8 mm resampled to 0.75 mm) and a slice axis, each along a first, middle and
# last tensor axis (the three code paths of BandedMatrix.apply)
AXES = [("spline", 512, 546), ("spline", 512, 478), ("slice", 60, 75), ("slice", 60, 48)]
LAYOUTS = [((-1, 3), 0), ((2, -1, 5), 1), ((3, -1), 1)]  # shape with -1 at the resampled axis, that axis


def _dense(kind, n_in, n_out):
    return spline_matrix(n_in, n_out, 3) if kind == "spline" else slice_axis_matrix(n_in, n_out, 0)


@pytest.mark.parametrize("kind,n_in,n_out", AXES)
def test_banded_matrix_equals_dense_to_float32_rounding(kind, n_in, n_out):
    dense = _dense(kind, n_in, n_out)
    banded = BandedMatrix(dense)
    if kind == "spline":
        assert banded.width <= 64 and banded.nbytes < dense.nbytes / 4  # narrow: cost ~ n_in, not n_in^2
    else:
        assert banded.width == 1  # nearest neighbour
    assert np.abs(banded.to_dense() - dense).max() <= BAND_TOL * np.abs(dense).max()
    rng = np.random.default_rng(n_out)
    for shape, dim in LAYOUTS:
        shape = tuple(n_in if s == -1 else s for s in shape)
        x = rng.normal(0, 1, shape) * 100
        ref = np.moveaxis(np.moveaxis(x, dim, -1) @ dense.T, -1, dim)  # float64, exact matrix
        ours32 = banded.apply(torch.from_numpy(x).float(), dim).double().numpy()
        ours64 = banded.apply(torch.from_numpy(x), dim).numpy()
        scale = np.abs(x).max() * np.abs(dense).sum(axis=1).max()  # bound on any output's magnitude
        assert ours32.shape == ref.shape
        assert np.abs(ours32 - ref).max() <= 4 * np.finfo(np.float32).eps * scale
        assert np.abs(ours64 - ref).max() <= 1e-11 * scale


@pytest.mark.parametrize("kind,n_in,n_out", AXES)
def test_banded_transpose_is_exact(kind, n_in, n_out):
    banded = BandedMatrix(_dense(kind, n_in, n_out))
    assert np.array_equal(banded.T.to_dense(), banded.to_dense().T)
    assert banded.T.T is banded


@pytest.mark.parametrize("slab_elements", [None, 1])  # default slabs (here one), and one slice per slab
def test_banded_resampler_gradient_is_transposed_dense_matrices(slab_elements, monkeypatch):
    """autograd through the banded Resampler equals applying the transposed dense matrices to the output gradient."""
    if slab_elements is not None:
        monkeypatch.setattr(resampling, "SLAB_ELEMENTS", slab_elements)
    shape, sp_in, sp_out = (7, 512, 40), (5.0, 0.8, 0.8), (4.0, 0.75, 0.75)  # separate z along axis 0, 7 -> 9 slices
    new_shape = tuple(int(s) for s in compute_new_shape(shape, sp_in, sp_out))
    r = Resampler(shape, new_shape, sp_in, sp_out, PLANS_KWARGS)
    assert r.do_separate_z and r.axis == 0 and all(m is not None for m in r.banded)
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(0, 1, (2, *shape))).requires_grad_(True)
    y = r(x)
    fwd = x.detach().numpy()
    for a, m in enumerate(r.matrices(torch.float64)):
        fwd = np.moveaxis(np.moveaxis(fwd, a + 1, -1) @ m.numpy().T, -1, a + 1)
    assert np.abs(y.detach().numpy() - fwd).max() <= 1e-10 * np.abs(fwd).max()
    g = rng.normal(0, 1, (2, *new_shape))
    y.backward(torch.from_numpy(g))
    ref = g
    for a, m in enumerate(r.matrices(torch.float64)):
        ref = np.moveaxis(np.moveaxis(ref, a + 1, -1) @ m.numpy(), -1, a + 1)  # (M^T applied) = g @ M
    assert np.abs(x.grad.numpy() - ref).max() <= 1e-10 * np.abs(ref).max()

    x32 = torch.from_numpy(rng.normal(0, 1, (1, *shape))).float().requires_grad_(True)
    y32 = r(x32)
    assert y32.dtype == torch.float32
    y32.backward(torch.ones_like(y32))
    ref32 = np.ones((1, *new_shape))
    for a, m in enumerate(r.matrices(torch.float64)):
        ref32 = np.moveaxis(np.moveaxis(ref32, a + 1, -1) @ m.numpy(), -1, a + 1)
    assert np.abs(x32.grad.double().numpy() - ref32).max() <= 1e-5 * np.abs(ref32).max()


def test_banded_resampler_is_twice_differentiable():
    shape, sp_in, sp_out, _ = CASES["separate_z_down"]
    new_shape = tuple(int(s) for s in compute_new_shape(shape, sp_in, sp_out))
    r = Resampler(shape, new_shape, sp_in, sp_out, PLANS_KWARGS)
    x = torch.randn(1, *shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: r(t) ** 2, (x,), eps=1e-6, atol=1e-6, fast_mode=True)

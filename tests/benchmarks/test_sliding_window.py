"""The tile-by-tile sliding window reproduces nnUNetPredictor's logits and the exact whole-volume gradient."""
import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from sliding_window import sliding_window_backward, sliding_window_logits, sliding_window_vjp

N_LABELS = 3
PATCH = (32, 32, 32)
CASE_SHAPES = [(40, 44, 36), (20, 44, 30), (32, 32, 32)]  # several tiles; smaller than the patch (padding); 1 tile


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_unet(in_channels=1, dim=3, deep_supervision=False, dtype=torch.float32, seed=0):
    """An nnU-Net-style PlainConvUNet (instance norm, leaky ReLU), small enough for float64 on a CPU."""
    torch.manual_seed(seed)
    conv, norm = (torch.nn.Conv3d, torch.nn.InstanceNorm3d) if dim == 3 else (torch.nn.Conv2d, torch.nn.InstanceNorm2d)
    net = PlainConvUNet(in_channels, 4, (4, 8, 16, 16), conv, 3, (1, 2, 2, 2), 2, N_LABELS, 1, conv_bias=True,
                        norm_op=norm, norm_op_kwargs={'eps': 1e-5, 'affine': True}, nonlin=torch.nn.LeakyReLU,
                        nonlin_kwargs={'inplace': True}, deep_supervision=deep_supervision)
    return net.to(dtype).eval()


def stock_predictor(network, patch_size, use_gaussian=True, device=torch.device('cpu')):
    """nnUNetPredictor around `network` without mirroring, configured through a minimal plans dict."""
    plans = PlansManager({'configurations': {'3d_fullres': {'patch_size': list(patch_size), 'architecture': {}}}})
    dataset_json = {'labels': {'background': 0, **{f'label{i}': i for i in range(1, N_LABELS)}}}
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=use_gaussian, use_mirroring=False, device=device,
                                allow_tqdm=False)
    predictor.manual_initialization(network, plans, plans.get_configuration('3d_fullres'), None, dataset_json,
                                    'nnUNetTrainer', None)
    return predictor


def reference_logits(network, x, patch_size):
    """Whole-volume sliding window in one autograd graph: the definition the tile-by-tile gradient must match."""
    padded, unpad = pad_nd_image(x, patch_size, 'constant', {'value': 0}, True, None)
    weight = compute_gaussian(tuple(patch_size), 1. / 8, 10, dtype=x.dtype, device=x.device)
    total = torch.zeros((N_LABELS, *padded.shape[1:]), dtype=x.dtype, device=x.device)
    weight_sum = torch.zeros(padded.shape[1:], dtype=x.dtype, device=x.device)
    steps = compute_steps_for_sliding_window(padded.shape[1:], patch_size, 0.5)
    for sx in steps[0]:
        for sy in steps[1]:
            for sz in steps[2]:
                box = tuple(slice(s, s + p) for s, p in zip((sx, sy, sz), patch_size))
                placed = F.pad(network(padded[(slice(None), *box)][None])[0] * weight,
                               [a for s, p, n in reversed(list(zip((sx, sy, sz), patch_size, padded.shape[1:])))
                                for a in (s, n - s - p)])
                total = total + placed
                weight_sum[box] += weight
    return (total / weight_sum)[(slice(None), *unpad[1:])]


def nnunet_fp16_weight_sum(shape, patch_size):
    """nnUNetPredictor's per-voxel Gaussian weight sum on the case grid, in its float16 (2D tiles broadcast on z)."""
    padded, unpad = pad_nd_image(torch.zeros(1, *shape[-len(patch_size):]), patch_size, 'constant', {'value': 0},
                                 True, None)
    weight = compute_gaussian(tuple(patch_size), 1. / 8, 10, dtype=torch.float16, device=torch.device('cpu'))
    total = torch.zeros(padded.shape[1:], dtype=torch.float16)
    for starts in itertools.product(*compute_steps_for_sliding_window(padded.shape[1:], patch_size, 0.5)):
        total[tuple(slice(s, s + p) for s, p in zip(starts, patch_size))] += weight
    return total[unpad[1:]].expand(shape)


def assert_close_to_fp16_reference(ours, stock, patch_size, ulps=4):
    """nnUNetPredictor weights and accumulates in float16, which underflows where its weight sum is subnormal
    (far corners of tiles at the case border): compare where it is a normal float16, allowing a few float16 ulps
    of the logits' range. Returns the tolerance and the compared voxels."""
    ours, stock = ours.cpu(), stock.cpu().float()
    compared = nnunet_fp16_weight_sum(stock.shape[1:], patch_size) >= torch.finfo(torch.float16).tiny
    assert compared.float().mean() > 0.75
    tolerance = ulps * torch.finfo(torch.float16).eps * stock.abs().max().item()
    assert (ours - stock)[:, compared].abs().max().item() <= tolerance
    return tolerance, compared


@pytest.mark.parametrize('shape', CASE_SHAPES)
@pytest.mark.parametrize('channels', [1, 2])
def test_logits_match_nnunet_predictor(shape, channels):
    net = small_unet(channels)
    x = torch.randn(channels, *shape, generator=torch.Generator().manual_seed(1))
    stock = stock_predictor(net, PATCH).predict_sliding_window_return_logits(x)
    ours = sliding_window_logits(net, x, PATCH)
    assert ours.shape == stock.shape == (N_LABELS, *shape)
    tolerance, compared = assert_close_to_fp16_reference(ours, stock, PATCH)
    if shape != PATCH:  # the comparison is sharp enough to see the weighting: uniform weights would fail it
        uniform = sliding_window_logits(net, x, PATCH, use_gaussian=False)
        assert (uniform - stock.float())[:, compared].abs().max().item() > 5 * tolerance


def test_uniform_weighting_matches_nnunet_predictor():
    net = small_unet()
    x = torch.randn(1, 40, 44, 36, generator=torch.Generator().manual_seed(2))
    stock = stock_predictor(net, PATCH, use_gaussian=False).predict_sliding_window_return_logits(x)
    torch.testing.assert_close(sliding_window_logits(net, x, PATCH, use_gaussian=False), stock.float(),
                               rtol=0, atol=4 * torch.finfo(torch.float16).eps * stock.abs().max().item())


def test_2d_network_on_3d_case_matches_nnunet_predictor():
    net = small_unet(dim=2)
    x = torch.randn(1, 3, 40, 20, generator=torch.Generator().manual_seed(3))  # 2nd in-plane axis gets padded
    stock = stock_predictor(net, (32, 32)).predict_sliding_window_return_logits(x)
    assert_close_to_fp16_reference(sliding_window_logits(net, x, (32, 32)), stock, (32, 32))


def test_deep_supervision_uses_full_resolution_head():
    plain = small_unet()
    supervised = small_unet(deep_supervision=True)
    supervised.load_state_dict(plain.state_dict())
    x = torch.randn(1, 40, 44, 36, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(sliding_window_logits(supervised, x, PATCH), sliding_window_logits(plain, x, PATCH),
                               rtol=0, atol=0)


def segmentation_like_loss(target, clean_logits):
    """Cross-entropy minus a semantic-disruption term: nonlinear in A, gradient nonzero everywhere."""
    return lambda logits: (F.cross_entropy(logits[None], target[None])
                           - (logits - clean_logits).abs().mean())


def corner_loss(weights):
    """Depends on one corner only, so most tiles get a zero seed and are skipped."""
    return lambda logits: (logits[:, :6, :7, :5] * weights).sum() + logits[:, :6, :7, :5].pow(2).mean()


@pytest.mark.parametrize('shape', CASE_SHAPES[:2])
@pytest.mark.parametrize('loss_kind', ['segmentation', 'corner'])
def test_gradient_equals_whole_volume_autograd_float64(shape, loss_kind):
    net = small_unet(dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, *shape, generator=g, dtype=torch.float64)
    if loss_kind == 'segmentation':
        loss_fn = segmentation_like_loss(torch.randint(0, N_LABELS, shape, generator=g),
                                         torch.randn(N_LABELS, *shape, generator=g, dtype=torch.float64))
    else:
        loss_fn = corner_loss(torch.randn(N_LABELS, 6, 7, 5, generator=g, dtype=torch.float64))

    x_ref = x.clone().requires_grad_(True)
    ref_logits = reference_logits(net, x_ref, PATCH)
    ref_loss = loss_fn(ref_logits)
    ref_grad, = torch.autograd.grad(ref_loss, x_ref)

    tile_passes = []
    hook = net.register_forward_hook(lambda *_: tile_passes.append(1))
    result = sliding_window_backward(net, x, loss_fn, PATCH)
    hook.remove()
    padded_shape = [max(s, p) for s, p in zip(shape, PATCH)]
    n_tiles = math.prod(len(s) for s in compute_steps_for_sliding_window(padded_shape, PATCH, 0.5))
    if loss_kind == 'segmentation':
        assert len(tile_passes) == 2 * n_tiles
    else:  # tiles that do not see the corner are not recomputed
        assert n_tiles < len(tile_passes) < 2 * n_tiles
    torch.testing.assert_close(result.logits, ref_logits.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(result.loss, ref_loss.detach(), rtol=1e-10, atol=0)
    assert ref_grad.abs().max() > 0
    torch.testing.assert_close(result.grad, ref_grad, rtol=0, atol=1e-10 * ref_grad.abs().max().item())
    assert all(p.grad is None for p in net.parameters())  # the surrogate's weights are left untouched


def test_gradient_float32_within_relative_1e4():
    """Against whole-volume autograd in float32 too (float32 itself is ~2e-4 from float64 at the worst voxel)."""
    net = small_unet()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 40, 44, 36, generator=g)
    loss_fn = segmentation_like_loss(torch.randint(0, N_LABELS, (40, 44, 36), generator=g),
                                     torch.randn(N_LABELS, 40, 44, 36, generator=g))
    x_ref = x.clone().requires_grad_(True)
    ref_grad, = torch.autograd.grad(loss_fn(reference_logits(net, x_ref, PATCH)), x_ref)
    grad = sliding_window_backward(net, x, loss_fn, PATCH).grad
    assert grad.dtype == torch.float32
    assert (grad - ref_grad).abs().max() <= 1e-4 * ref_grad.abs().max()


def test_vjp_equals_whole_volume_vector_jacobian_product():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 20, 44, 30, generator=g, dtype=torch.float64)
    u = torch.randn(N_LABELS, 20, 44, 30, generator=g, dtype=torch.float64)
    net = small_unet(in_channels=2, dtype=torch.float64)
    x_ref = x.clone().requires_grad_(True)
    ref, = torch.autograd.grad(reference_logits(net, x_ref, PATCH), x_ref, u)
    torch.testing.assert_close(sliding_window_vjp(net, x, u, PATCH), ref, rtol=0, atol=1e-10 * ref.abs().max().item())


class SavedTensorMeter:
    """Peak bytes of tensors held by live autograd graphs: what back-propagation memory grows with."""

    class _Held:
        def __init__(self, meter, tensor):
            self.meter, self.tensor, self.nbytes = meter, tensor, tensor.nbytes
            meter.live += self.nbytes
            meter.peak = max(meter.peak, meter.live)

        def __del__(self):
            self.meter.live -= self.nbytes

    def __init__(self):
        self.live = self.peak = 0

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: self._Held(self, t), lambda held: held.tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def test_backprop_memory_depends_on_patch_not_case():
    """One tile's graph at a time: the peak saved for backward is the same for 1 tile and 8 tiles, while
    whole-volume autograd, the meter's positive control, holds every tile's graph at once."""
    net = small_unet()

    def peaks(edge):
        x = torch.randn(1, edge, edge, edge, generator=torch.Generator().manual_seed(9))
        with SavedTensorMeter() as ours:
            sliding_window_backward(net, x, lambda logits: logits.square().mean(), PATCH)
        with SavedTensorMeter() as whole:
            x = x.requires_grad_(True)
            torch.autograd.grad(reference_logits(net, x, PATCH).square().mean(), x)
        return ours.peak, whole.peak

    ours_small, whole_small = peaks(32)
    ours_large, whole_large = peaks(48)
    assert ours_small > 0 and ours_large == ours_small
    assert whole_large > 6 * whole_small


def test_rejects_patch_with_wrong_dimensionality():
    with pytest.raises(ValueError, match='patch_size'):
        sliding_window_logits(small_unet(), torch.zeros(1, 32, 32, 32), (32, 32, 32, 32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_autocast_logits_and_gradient(monkeypatch):
    device = torch.device('cuda')
    net = small_unet().to(device)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 40, 44, 36, generator=g).to(device)
    stock = stock_predictor(net, PATCH, device=device).predict_sliding_window_return_logits(x)
    ours = sliding_window_logits(net, x, PATCH)  # autocast on by default on CUDA, as in nnUNetPredictor
    assert_close_to_fp16_reference(ours, stock, PATCH, ulps=16)  # both run the network in float16

    loss_fn = segmentation_like_loss(torch.randint(0, N_LABELS, (40, 44, 36), generator=g).to(device),
                                     torch.randn(N_LABELS, 40, 44, 36, generator=g).to(device))
    x_ref = x.double().requires_grad_(True)
    ref_grad, = torch.autograd.grad(loss_fn(reference_logits(copy.deepcopy(net).double(), x_ref, PATCH)), x_ref)
    # TF32 convolutions would be the error measured, not the tiling
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    exact = sliding_window_backward(net, x, loss_fn, PATCH, autocast=False).grad
    assert (exact.double() - ref_grad).abs().max() <= 1e-3 * ref_grad.abs().max()
    mixed = sliding_window_backward(net, x, loss_fn, PATCH).grad  # float16 tiles, no underflow of the tiny seeds
    assert torch.nn.functional.cosine_similarity(mixed.flatten().double(), ref_grad.flatten(), dim=0) > 0.99

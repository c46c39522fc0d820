"""Class-wise textures: one pattern per label, shared by all cases, mirror-symmetric, within the budget."""
import numpy as np

from nnunet_voxshield.method.baselines import TILE, classwise_delta, label_textures
from synthetic import neighbour_products


def test_textures_are_signs_symmetric_under_flips_and_differ_per_label():
    tex = label_textures([1, 2, 3], n_channels=2, seed=0)
    for t in tex.values():
        assert t.shape == (2, TILE, TILE, TILE)
        assert set(np.unique(t)) <= {-1.0, 1.0}
        np.testing.assert_array_equal(t.mean(axis=(1, 2, 3)), 0)
        for axis in (1, 2, 3):
            np.testing.assert_array_equal(t, np.flip(t, axis))
    assert not np.array_equal(tex[1], tex[2])
    np.testing.assert_array_equal(label_textures([1], 2, seed=0)[1], tex[1])


def test_delta_is_the_label_texture_times_eps_inside_the_mask_only():
    labels = np.zeros((9, 10, 11), int)
    labels[:, :5] = 1
    labels[:, 5:8] = 2
    mask = labels > 0
    mask[0] = False
    eps = np.array([0.2, 0.5])
    tex = label_textures([1, 2], 2, seed=3)
    delta = classwise_delta(labels, mask, eps, tex).numpy()
    assert delta.shape == (2, 9, 10, 11)
    np.testing.assert_allclose(np.abs(delta[:, mask]), eps[:, None] * np.ones((1, mask.sum())))
    assert not delta[:, ~mask].any()
    # periodic: the same label shows the same texture one period away, in any case
    np.testing.assert_array_equal(delta[:, 1:5, 0:4, 0:4], delta[:, 5:9, 0:4, 0:4])
    np.testing.assert_allclose(delta[:, 1:5, 0:4, 0:4] / eps[:, None, None, None],
                               np.roll(tex[1], -1, axis=1))


def test_gratings_differ_per_label_and_presence_shares_one():
    from nnunet_voxshield.method.baselines import label_gratings
    def flat(codes):
        return [(tuple(d), p, phase) for d, p, phase in codes.values()]
    codes = flat(label_gratings([1, 2, 3], seed=0))
    assert len({(d, p) for d, p, _ in codes}) == 3
    assert flat(label_gratings([1, 2, 3], seed=0)) == codes and flat(label_gratings([1, 2, 3], seed=1)) != codes
    presence = flat(label_gratings([1, 2, 3], seed=0, presence=True))
    assert presence[0] == presence[1] == presence[2]


def test_code_delta_is_the_grating_within_budget_region_and_window():
    from nnunet_voxshield.method.baselines import code_delta, grating_code, label_gratings
    from nnunet_voxshield.nnunet.resampling import Resampler
    labels = np.zeros((12, 12, 12), dtype=np.int16)
    labels[2:6] = 1
    labels[6:10] = 2
    code = grating_code(labels, label_gratings([1, 2], seed=0))
    assert set(np.unique(code[labels > 0])) == {-1.0, 1.0} and not code[labels == 0].any()
    mask = labels > 0
    identity = Resampler(labels.shape, labels.shape, (1, 1, 1), (1, 1, 1), {"order": 3, "order_z": 0})
    eps = np.array([0.2])
    delta = code_delta(code[None], identity, eps, mask)
    np.testing.assert_allclose(delta[0].numpy(), 0.2 * code, atol=1e-6)  # no resampling: the code itself
    room = np.zeros((2, 1, *labels.shape), dtype=np.float16)
    room[0], room[1] = -0.05, 0.1
    clipped = code_delta(code[None], identity, eps, mask, room)
    assert float(clipped.min()) >= -0.05 - 1e-6 and float(clipped.max()) <= 0.1 + 1e-6


def test_code_pulled_back_through_a_real_resampling_survives_it():
    """On a case nnU-Net resamples, R(pull_back(code)) is the code again (least squares through the exact operator)."""
    import torch
    from nnunet_voxshield.method.baselines import grating_code, label_gratings, pull_back
    from nnunet_voxshield.nnunet.resampling import Resampler
    labels = np.zeros((16, 16, 16), dtype=np.int16)
    labels[3:13, 3:13, 3:13] = 1
    code = grating_code(labels, label_gratings([1], seed=0))
    resample = Resampler((12, 14, 16), (16, 16, 16), (4.0, 1.1, 1.0), (3.0, 1.0, 1.0), {"order": 3, "order_z": 0})
    back = resample(torch.from_numpy(pull_back(code, resample)))
    assert np.corrcoef(back.numpy().ravel(), code.ravel())[0, 1] > 0.8


def test_parity_codes_alternate_along_their_own_axes_per_label_and_mirror_onto_themselves():
    from nnunet_voxshield.method.baselines import PARITY_DIRECTIONS, grating_code, label_parities
    labels = np.zeros((10, 12, 9), dtype=np.int16)
    labels[:, 2:6], labels[:, 6:11] = 1, 2
    parities = label_parities([1, 2], seed=0)
    def flat(codes):
        return [(tuple(a), period, phase) for a, period, phase in codes.values()]
    assert flat(label_parities([1, 2], seed=0)) == flat(parities)
    assert any(flat(label_parities([1, 2], seed=s)) != flat(parities) for s in (1, 2, 3))
    assert {a for a, _, _ in flat(label_parities(list(range(1, 8)), seed=5))} == set(PARITY_DIRECTIONS)
    code = grating_code(labels, parities)
    assert set(np.unique(code[labels > 0])) == {-1.0, 1.0} and not code[labels == 0].any()
    signatures = set()
    for label, (a, period, _) in parities.items():
        assert period == 2.0
        # read from a voxel and its neighbours: each axis alternates or not, everywhere inside the label
        signature = tuple(neighbour_products(code, labels == label, axis) for axis in range(3))
        assert signature == tuple((-1.0 if bit else 1.0,) for bit in a)
        signatures.add(signature)
        for axis in range(3):  # nnU-Net's mirroring: the same code, at most with its sign flipped
            mirrored = np.flip(code, axis)[np.flip(labels, axis) == label]
            redrawn = grating_code(np.flip(labels, axis), parities)[np.flip(labels, axis) == label]
            assert np.array_equal(mirrored, redrawn) or np.array_equal(mirrored, -redrawn)
    assert len(signatures) == 2


def test_twoscale_gives_half_the_budget_to_the_grating_and_half_to_the_parity_code():
    from nnunet_voxshield.method.baselines import label_gratings, layered_code, method_gratings
    labels = np.zeros((16, 16, 16), dtype=np.int16)
    labels[:, 2:8], labels[:, 8:15] = 1, 2
    code = layered_code(labels, method_gratings("twoscale", [1, 2], seed=0))
    assert set(np.unique(code[labels > 0])) == {-1.0, 0.0, 1.0} and not code[labels == 0].any()
    np.testing.assert_array_equal(code, layered_code(labels, method_gratings("twoscale", [1, 2], seed=0)))
    # what is left after the grating's half is a parity code: each axis alternates everywhere inside a label, or nowhere
    rest = code - 0.5 * layered_code(labels, [(1.0, label_gratings([1, 2], seed=0))])
    assert set(np.unique(np.abs(rest[labels > 0]))) == {0.5}
    for label in (1, 2):
        assert all(len(neighbour_products(rest, labels == label, axis)) == 1 for axis in range(3))


def test_rim_keeps_the_presence_grating_on_the_labels_and_gives_the_background_another():
    from nnunet_voxshield.method.baselines import GRATING_PERIODS, layered_code, method_gratings
    labels = np.zeros((16, 16, 16), dtype=np.int16)
    labels[4:12, 2:8, 3:13], labels[4:12, 8:14, 3:13] = 1, 2
    code = layered_code(labels, method_gratings("rim", [1, 2], seed=0))
    presence = layered_code(labels, method_gratings("presence", [1, 2], seed=0))
    np.testing.assert_array_equal(code[labels > 0], presence[labels > 0])
    assert set(np.unique(code)) == {-1.0, 1.0}  # a square wave on every voxel, background included
    np.testing.assert_array_equal(code, layered_code(labels, method_gratings("rim", [1, 2], seed=0)))
    assert not np.array_equal(code, layered_code(labels, method_gratings("rim", [1, 2], seed=1)))
    # the background's grating runs along another axis, with the longer period: constant along the presence axis (0)
    # and repeating every GRATING_PERIODS[1] voxels along axis 1
    background = np.where(labels == 0, code, np.nan)[:, :, 0]
    np.testing.assert_array_equal(background, np.broadcast_to(background[:1], background.shape))
    period = int(GRATING_PERIODS[1])
    np.testing.assert_array_equal(background[:, period:], background[:, :-period])
    assert not np.array_equal(background[:, period // 2:], background[:, :-(period // 2)])


def test_levels_are_the_label_means_spread_apart_as_little_as_possible():
    from nnunet_voxshield.method.baselines import label_levels, spread_apart
    np.testing.assert_allclose(spread_apart(np.array([0.9, -1.0, 0.1]), 0.25), [0.9, -1.0, 0.1])  # already apart
    np.testing.assert_allclose(spread_apart(np.array([0.1, 0.0, 0.05]), 0.25), [0.3, -0.2, 0.05])  # centred ladder
    np.testing.assert_allclose(spread_apart(np.array([0.0, 0.1, 2.0]), 0.25), [-0.075, 0.175, 2.0])  # only the pair
    rng = np.random.default_rng(0)
    labels = np.zeros((8, 8, 8), dtype=np.int16)
    labels[:, :3], labels[:, 3:6] = 1, 2
    # channel 0: label 1 far brighter than label 2 (levels = means); channel 1: 0.1 apart, the other way round
    clean = np.stack([np.where(labels == 1, 1.0, 0.2), np.where(labels == 1, -0.05, 0.05)])
    images = [clean + 0.01 * rng.normal(size=clean.shape) for _ in range(3)]
    levels = label_levels(images, [labels] * 3, [1, 2], spacing=0.25)
    means = np.array([[np.mean([x[c][labels == k].mean() for x in images]) for c in range(2)] for k in (1, 2)])
    np.testing.assert_allclose(levels[:, 0], means[:, 0])
    np.testing.assert_allclose(levels[1, 1] - levels[0, 1], 0.25)
    np.testing.assert_allclose(levels[:, 1].mean(), means[:, 1].mean())


def test_level_code_moves_each_label_onto_its_level_as_far_as_the_budget_reaches():
    from nnunet_voxshield.method.baselines import level_code
    labels = np.zeros((6, 6, 6), dtype=np.int16)
    labels[:3], labels[3:5] = 1, 2
    image = np.random.default_rng(1).normal(size=(2, 6, 6, 6))
    levels, eps = np.array([[0.5, -0.2], [-0.4, 0.1]]), np.array([0.3, 0.6])
    code = level_code(image, labels, [1, 2], levels, eps)
    assert code.shape == image.shape and np.abs(code).max() <= 1 and not code[:, labels == 0].any()
    moved = image + eps[:, None, None, None] * code
    for i, label in enumerate((1, 2)):
        for c in range(2):
            x, y = image[c][labels == label], moved[c][labels == label]
            reachable = np.abs(levels[i, c] - x) <= eps[c]
            np.testing.assert_allclose(y[reachable], levels[i, c], atol=1e-6)  # flat where the budget reaches
            np.testing.assert_allclose(np.abs(y - x)[~reachable], eps[c], atol=1e-6)  # a full step toward it elsewhere
            assert np.all(np.abs(y - levels[i, c]) <= np.abs(x - levels[i, c]) + 1e-9)


def test_each_grating_code_is_written_only_on_the_labels_that_carry_it_inside_the_roi():
    from nnunet_voxshield.method.baselines import coded_region, method_gratings
    labels = np.zeros((6, 6, 6), dtype=np.int16)
    labels[1:5, 1:3, 1:5], labels[1:5, 3:5, 1:5] = 1, 2
    roi = np.ones(labels.shape, dtype=bool)
    roi[0] = False
    for method, region in (("presence", labels > 0), ("codes", labels > 0), ("absence", labels == 0),
                           ("rim", np.ones(labels.shape, dtype=bool))):
        np.testing.assert_array_equal(coded_region(method_gratings(method, [1, 2], seed=0), labels, roi), region & roi)

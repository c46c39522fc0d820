"""Class-wise textures: one pattern per label, shared by all cases, mirror-symmetric, within the budget."""
import numpy as np

from nnunet_voxshield.method.baselines import TILE, classwise_delta, label_textures


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
    delta = code_delta(code, identity, eps, mask)
    np.testing.assert_allclose(delta[0].numpy(), 0.2 * code, atol=1e-6)  # no resampling: the code itself
    room = np.zeros((2, 1, *labels.shape), dtype=np.float16)
    room[0], room[1] = -0.05, 0.1
    clipped = code_delta(code, identity, eps, mask, room)
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

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

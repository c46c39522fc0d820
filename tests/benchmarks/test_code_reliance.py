"""code_reliance's inputs: the perturbation alone is protected minus clean inside nnU-Net's nonzero region and nothing
outside it, and label maps that differ between the two sets stop the script."""
import numpy as np
import pytest

from code_reliance import INPUTS, reliance_inputs


class Preprocessed:
    """Stands in for an nnU-Net preprocessed dataset: load_case -> (data, seg, seg_prev, properties)."""

    def __init__(self, cases):
        self.cases = cases

    def load_case(self, case):
        return (*self.cases[case], None, {})


def test_the_perturbation_alone_is_protected_minus_clean_inside_the_region():
    rng = np.random.default_rng(0)
    seg = rng.integers(-1, 3, (1, 6, 7, 8))  # -1: outside nnU-Net's nonzero region
    clean, delta = rng.normal(size=(1, 6, 7, 8)), rng.normal(size=(1, 6, 7, 8))
    inputs = reliance_inputs(Preprocessed({"a": (clean, seg)}), Preprocessed({"a": (clean + delta, seg)}), ["a"])
    assert list(inputs) == list(INPUTS)
    np.testing.assert_array_equal(inputs["clean"][0][0], clean)
    np.testing.assert_allclose(inputs["protected"][0][0], clean + delta)
    alone = inputs["perturbation alone"][0][0]
    np.testing.assert_allclose(alone[seg >= 0], delta[seg >= 0])
    assert not alone[seg < 0].any()
    assert all(np.array_equal(s, seg) for cases in inputs.values() for _, s in cases)


def test_different_label_maps_stop_the_script():
    seg = np.zeros((1, 4, 4, 4), dtype=np.int8)
    other = seg.copy()
    other[0, 0, 0, 0] = 1
    x = np.zeros((1, 4, 4, 4))
    with pytest.raises(SystemExit, match="label maps"):
        reliance_inputs(Preprocessed({"a": (x, seg)}), Preprocessed({"a": (x, other)}), ["a"])


def test_clean_errors_split_the_labelled_voxels_into_missed_and_mislabelled():
    """Shares of the labelled voxels pooled over cases; voxels outside nnU-Net's region (-1) count nowhere."""
    from code_reliance import clean_errors
    from nnunet_voxshield.nnunet.scoring import dice_per_label
    reference = np.array([[0, 0, 1, 1], [2, 2, 2, -1]])
    prediction = np.array([[1, 0, 0, 1], [2, 1, 0, 2]])
    errors = clean_errors([prediction, prediction], [reference, reference], [dice_per_label(prediction, reference,
                                                                                              [1, 2])] * 2)
    assert errors["missed"] == pytest.approx(2 / 5)  # one voxel of label 1 and one of label 2 called background
    assert errors["other label"] == pytest.approx(1 / 5)
    assert errors["false foreground"] == pytest.approx(1 / 5)
    assert errors["dice per label"] == {"1": pytest.approx(2 / 5), "2": pytest.approx(2 / 5)}

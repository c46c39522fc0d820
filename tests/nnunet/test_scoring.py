"""Dice arithmetic of the shortcut diagnostics and the fresh-network probe."""
import numpy as np

from nnunet_voxshield.nnunet.scoring import dice_per_label, mean_dice


def test_dice_per_label_and_mean():
    reference = np.zeros((4, 4, 4), dtype=np.int16)
    reference[:2] = 1
    prediction = np.zeros_like(reference)
    prediction[:1] = 1
    prediction[3, 0, 0] = 2
    dice = dice_per_label(prediction, reference, [1, 2, 3])
    assert dice[1] == 2 * 16 / (16 + 32) and dice[2] == 0.0 and dice[3] is None
    assert mean_dice([dice, {1: 1.0, 2: None}]) == np.mean([2 / 3, 0.0, 1.0])
    assert mean_dice([{1: None}]) is None

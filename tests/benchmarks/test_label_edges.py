"""label_edges' measures on a synthetic case whose answers are known: a label with a sharp edge against a dark
region, one that blends into its surroundings, and a constant-amplitude code on both."""
import numpy as np
import pytest

from label_edges import label_edges


def test_a_sharp_dark_edge_a_soft_edge_and_the_code_on_the_border():
    image = np.zeros((1, 20, 20, 20))
    seg = np.zeros((1, 20, 20, 20), dtype=np.int16)
    seg[0, 4:10, 4:10, 4:10] = 1
    image[0, 4:10, 4:10, 4:10] = 1.0
    image[0, 4:10, 4:10, 10:12] = -3.0  # a dark band on one side of label 1, inside its 2-voxel rim
    seg[0, 12:18, 12:18, 12:18] = 2
    image[0, 12:18, 12:18, 12:18] = 0.1  # label 2 barely differs from the background
    code = np.where(seg > 0, 0.5 * np.sign(np.sin(np.arange(20)))[None, None, None], 0.0)
    rows = label_edges([(image, seg)], [1, 2, 3], [code])
    assert set(rows) == {1, 2}  # a label no case contains has no row
    assert rows[1]["voxels"] == rows[2]["voxels"] == 216
    assert rows[1]["border gradient"] > 5 * rows[2]["border gradient"]
    assert rows[1]["interior gradient"] == pytest.approx(0.0) and rows[2]["interior gradient"] == pytest.approx(0.0)
    rim = (10 ** 3 - 6 ** 3)  # the 2-voxel dilation (cross-shaped steps) is inside this cube shell
    assert 0 < rows[1]["dark rim share"] and rows[1]["dark rim share"] >= 72 / rim
    assert rows[2]["dark rim share"] == 0.0
    assert rows[1]["border perturbation"] == pytest.approx(0.5, abs=0.05)
    assert rows[2]["border perturbation"] == pytest.approx(0.5, abs=0.05)

"""Thick-slice inputs: the warning ``detect`` gives, and the benchmark's slice thickening."""

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from SpatialMSMALib.detection import coarse_voxel_warnings  # noqa: E402
from SpatialMSMALib.io import Volume  # noqa: E402


def volume_with_spacing(spacing, shape=(4, 4, 4)):
    return Volume(np.zeros(shape, np.float32), np.diag([*spacing, 1.0]))


def test_only_inputs_coarser_than_the_grid_are_warned_about_naming_the_file():
    fine, thick = volume_with_spacing((1, 1, 1)), volume_with_spacing((0.9, 0.9, 5))
    messages = coarse_voxel_warnings({"t1": fine, "t2": thick}, 2.0,
                                     {"t1": "a_t1.nii.gz", "t2": "a_t2.nii.gz"})
    assert len(messages) == 1
    assert messages[0].startswith("T2 'a_t2.nii.gz' has voxels of 0.9 x 0.9 x 5.0 mm")
    assert "model's 2 mm grid" in messages[0]
    # the grid's own spacing, and header rounding within 5%, are not coarse
    assert coarse_voxel_warnings({"t1": volume_with_spacing((2, 2, 2)),
                                  "t2": volume_with_spacing((2, 2, 2.1))}, 2.0) == []
    # both coarse: T1 first; a missing T2 is skipped; no file name -> the channel alone
    both = coarse_voxel_warnings({"t1": volume_with_spacing((1, 2.2, 1)), "t2": thick}, 2.0)
    assert [m.split(" has")[0] for m in both] == ["T1", "T2"]
    assert coarse_voxel_warnings({"t1": volume_with_spacing((3, 3, 3)), "t2": None}, 4.0) == []


def test_thick_slices_average_each_group_where_its_thin_slices_were():
    from thick_slices import thick_slices

    rng = np.random.default_rng(0)
    rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.0, 1.2, 0.8])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    data = rng.normal(size=(3, 4, 10)).astype(np.float32)
    thick = thick_slices(Volume(data, affine), 3)
    assert thick.data.shape == (3, 4, 3)  # the tenth slice does not fill a group: dropped
    np.testing.assert_allclose(thick.data[:, :, 1], data[:, :, 3:6].mean(-1), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(thick.affine[:3, :3], axis=0), [1.0, 1.2, 2.4])
    # thick voxel (i, j, g) sits at the mean RAS position of thin voxels (i, j, 3g .. 3g + 2)
    for i, j, g in ((0, 0, 0), (2, 3, 2), (1, 2, 1)):
        thin = [affine @ [i, j, 3 * g + s, 1] for s in range(3)]
        np.testing.assert_allclose(thick.affine @ [i, j, g, 1], np.mean(thin, 0), atol=1e-9)
    mask = np.zeros((1, 1, 6), bool)
    mask[0, 0, [0, 1, 3]] = True  # 2 of 3 inside, then 1 of 3
    assert thick_slices(Volume(mask, affine), 3, binary=True).data[0, 0].tolist() == [True, False]
    same = Volume(data, affine)
    assert thick_slices(same, 1) is same


def test_detect_warns_about_a_thick_t2_and_still_finds_the_lesion(detection_setup):
    from thick_slices import thick_slices

    from SpatialMSMALib.detection import detect
    from SpatialMSMALib.io import load_volume

    paths = detection_setup["paths"]
    t1 = load_volume(paths["t1"])
    t2 = thick_slices(load_volume(paths["t2"]), 3)
    detection = detect(detection_setup["model"], t1, t2, load_volume(paths["brain_mask"]),
                       names={"t2": "thick_t2.nii.gz"})
    coarse = [w for w in detection.warnings if "coarser than the model" in w]
    assert coarse == [w for w in detection.warnings if w.startswith("T2 'thick_t2.nii.gz' has "
                                                                     "voxels of 2.0 x 2.0 x 6.0")]
    assert len(coarse) == 1
    # the heat map is still on the T1's grid and peaks at the lesion
    assert detection.heat.shape == t1.data.shape
    lesion = load_volume(paths["lesion"]).data > 0
    inside = detection.heat[lesion & detection.brain_mask].mean()
    outside = detection.heat[~lesion & detection.brain_mask].mean()
    assert inside > outside

"""Metrics against values computed by hand and against MONAI."""

import numpy as np
import pytest
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
)

from SpatialMSMALib import metrics


def cube(shape, low, size):
    m = np.zeros(shape, bool)
    m[low[0] : low[0] + size, low[1] : low[1] + size, low[2] : low[2] + size] = True
    return m


def sphere(shape, center, radius, spacing=(1, 1, 1)):
    grid = np.indices(shape).transpose(1, 2, 3, 0) * np.asarray(spacing)
    return np.linalg.norm(grid - np.asarray(center) * np.asarray(spacing), axis=-1) <= radius


def test_dice_by_hand():
    a = cube((20, 20, 20), (2, 2, 2), 4)  # 64 voxels
    b = cube((20, 20, 20), (4, 2, 2), 4)  # overlap 2x4x4 = 32
    assert metrics.dice(a, b) == pytest.approx(2 * 32 / 128)
    assert metrics.dice(a, a) == 1.0
    assert metrics.dice(a, np.zeros_like(a)) == 0.0
    assert metrics.dice(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_shifted_cube_distances_by_hand():
    # a cube shifted by 3 voxels along i with 2 mm spacing on i: the far faces are 6 mm apart
    a = cube((30, 30, 30), (5, 5, 5), 10)
    b = cube((30, 30, 30), (8, 5, 5), 10)
    d = metrics.surface_distances(a, b, spacing=(2.0, 1.0, 1.0), percentile=100)
    assert d["hd99"] == pytest.approx(6.0)
    assert d["hd99_truth_to_pred"] == pytest.approx(6.0)
    identical = metrics.surface_distances(a, a, spacing=(1, 1, 1))
    assert identical["hd99"] == 0 and identical["msd"] == 0


def test_directed_distance_is_not_symmetric():
    big = cube((30, 30, 30), (5, 5, 5), 12)
    small = cube((30, 30, 30), (9, 9, 9), 4)
    d = metrics.surface_distances(prediction=big, truth=small, spacing=(1, 1, 1), percentile=100)
    # truth (small inner cube) surface to the big cube's surface: its corners lie 4 voxels from
    # the nearest big face (i=5 -> i=9); the big cube's corners are far from the small cube
    assert d["hd99_truth_to_pred"] == pytest.approx(4.0)
    assert d["hd99"] > d["hd99_truth_to_pred"]


def test_empty_prediction_gives_nan_distances():
    t = cube((10, 10, 10), (2, 2, 2), 3)
    d = metrics.surface_distances(np.zeros_like(t), t, spacing=(1, 1, 1))
    assert all(np.isnan(v) for v in d.values())


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 0.5)])
def test_distances_match_monai(spacing):
    shape = (40, 44, 48)
    truth = sphere(shape, (20, 22, 24), 8, spacing)
    pred = sphere(shape, (23, 21, 26), 7, spacing) | cube(shape, (2, 2, 2), 3)
    ours = metrics.surface_distances(pred, truth, spacing)
    y_pred = torch.from_numpy(pred[None, None].astype(np.float32))
    y = torch.from_numpy(truth[None, None].astype(np.float32))
    hd = compute_hausdorff_distance(y_pred, y, percentile=99, spacing=list(spacing)).item()
    hd_t2p = compute_hausdorff_distance(
        y, y_pred, percentile=99, directed=True, spacing=list(spacing)
    ).item()
    msd = compute_average_surface_distance(y_pred, y, symmetric=True, spacing=list(spacing)).item()
    msd_t2p = compute_average_surface_distance(y, y_pred, spacing=list(spacing)).item()
    assert ours["hd99"] == pytest.approx(hd, rel=1e-5)
    assert ours["hd99_truth_to_pred"] == pytest.approx(hd_t2p, rel=1e-5)
    assert ours["msd"] == pytest.approx(msd, rel=1e-5)
    assert ours["msd_truth_to_pred"] == pytest.approx(msd_t2p, rel=1e-5)


def test_component_detection_by_hand():
    shape = (40, 40, 40)
    truth = cube(shape, (2, 2, 2), 3) | cube(shape, (20, 20, 20), 5) | cube(shape, (30, 2, 2), 2)
    # touches lesion 1 at one voxel, covers lesion 2, plus two false components;
    # the diagonal neighbour (6,6,6)-(7,7,7) is one component under 26-connectivity
    pred = np.zeros(shape, bool)
    pred[4, 4, 4] = True
    pred[5, 5, 5] = True  # diagonal to (4,4,4): same component
    pred |= cube(shape, (21, 21, 21), 2)
    pred[35, 35, 35] = True
    pred[10, 30, 10] = True
    r = metrics.component_detection(pred, truth, spacing=(1, 1, 2))
    assert r["n_truth"] == 3 and r["n_detected"] == 2
    assert r["tpr"] == pytest.approx(2 / 3)
    assert r["n_pred"] == 4 and r["n_pred_true"] == 2
    assert r["ppv"] == pytest.approx(0.5)
    assert sorted(r["truth_sizes_mm3"]) == [16.0, 54.0, 250.0]


def test_tpr_by_size_and_summary_pooling():
    rows = metrics.tpr_by_size([60, 150, 500, 12000], [True, False, True, True])
    by_bin = {tuple(r["bin_mm3"]): r for r in rows}
    assert by_bin[(50.0, 200.0)]["n"] == 2 and by_bin[(50.0, 200.0)]["tpr"] == 0.5
    assert by_bin[(5000.0, 15000.0)]["tpr"] == 1.0
    shape = (20, 20, 20)
    truth = cube(shape, (2, 2, 2), 4)
    case_hit = metrics.evaluate_case(truth.copy(), truth, (1, 1, 1))
    case_empty = metrics.evaluate_case(np.zeros_like(truth), truth, (1, 1, 1))
    s = metrics.summarize([case_hit, case_empty])
    assert s["n_volumes"] == 2
    assert s["dice"]["mean"] == pytest.approx(0.5)
    assert s["hd99"]["n_undefined"] == 1 and s["hd99"]["n"] == 1
    assert s["pooled_tpr"] == 0.5


def test_healthy_false_positive_burden():
    pred = cube((20, 20, 20), (1, 1, 1), 5) | cube((20, 20, 20), (10, 10, 10), 2)
    r = metrics.false_positive_burden(pred, spacing=(2, 2, 2))
    assert r["fp_volume_ml"] == pytest.approx((125 + 8) * 8 / 1000)
    assert r["flagged_ml"] == r["fp_volume_ml"]
    assert r["fp_components"] == 2


def test_false_positives_of_a_lesioned_scan_exclude_the_lesion():
    pred = cube((20, 20, 20), (1, 1, 1), 5) | cube((20, 20, 20), (10, 10, 10), 2)
    truth = cube((20, 20, 20), (2, 2, 2), 2)  # 8 voxels inside the first predicted cube
    r = metrics.false_positive_burden(pred, (2, 2, 2), truth)
    assert r["flagged_ml"] == pytest.approx((125 + 8) * 8 / 1000)
    assert r["fp_volume_ml"] == pytest.approx((125 - 8 + 8) * 8 / 1000)
    assert r["fp_components"] == 1  # the small cube; the large one touches the lesion
    case = metrics.evaluate_case(pred, truth, (2, 2, 2))
    assert case["fp_volume_ml"] == r["fp_volume_ml"] and case["n_pred_true"] == 1


def test_operating_point_metrics_are_the_threshold_dependent_part_of_a_case():
    pred = cube((20, 20, 20), (1, 1, 1), 5) | cube((20, 20, 20), (10, 10, 10), 2)
    truth = cube((20, 20, 20), (2, 2, 2), 2) | cube((20, 20, 20), (15, 2, 15), 2)
    quick = metrics.evaluate_operating_point(pred, truth, (2, 2, 2))
    full = metrics.evaluate_case(pred, truth, (2, 2, 2))
    assert "hd99" not in quick and "hd99" in full
    assert {k: full[k] for k in quick} == quick
    assert quick["tpr"] == 0.5 and quick["ppv"] == 0.5 and quick["fp_components"] == 1
    summary = metrics.split_summary([quick, metrics.evaluate_operating_point(
        pred, np.zeros_like(truth), (2, 2, 2))])
    assert summary["lesioned"]["pooled_tpr"] == 0.5
    assert summary["healthy"]["median_flagged_ml"] == pytest.approx((125 + 8) * 8 / 1000)


def test_auroc_auprc():
    truth = np.zeros((10, 10, 10), bool)
    truth[:2] = True
    perfect = truth.astype(float) + 0.01 * np.random.default_rng(0).random(truth.shape)
    auroc, auprc = metrics.voxel_auroc_auprc(perfect, truth)
    assert auroc == 1.0 and auprc == 1.0
    inverted_auroc, _ = metrics.voxel_auroc_auprc(-perfect, truth)
    assert inverted_auroc == 0.0
    # a mask that excludes every positive makes the metric undefined
    assert np.isnan(metrics.voxel_auroc_auprc(perfect, truth, mask=~truth)[0])


def test_dice_matches_monai():
    shape = (30, 32, 34)
    truth = sphere(shape, (15, 16, 17), 7)
    pred = sphere(shape, (17, 15, 18), 6) | cube(shape, (1, 1, 1), 3)
    monai_dice = compute_dice(
        torch.from_numpy(pred[None, None].astype(np.float32)),
        torch.from_numpy(truth[None, None].astype(np.float32)),
    ).item()
    assert metrics.dice(pred, truth) == pytest.approx(monai_dice, rel=1e-6)


def test_split_summary_pools_large_lesions_and_healthy_burden():
    evaluate_case, split_summary = metrics.evaluate_case, metrics.split_summary
    truth = np.zeros((30, 30, 30), bool)
    truth[2:12, 2:12, 2:7] = True  # 500 voxels of 1 mm^3 = 0.5 mL: counts as large
    truth[20:23, 20:23, 20:23] = True  # 27 mm^3
    hit_large = np.zeros_like(truth)
    hit_large[5, 5, 5] = True
    hit_small = np.zeros_like(truth)
    hit_small[21, 21, 21] = True
    healthy_pred = np.zeros_like(truth)
    healthy_pred[0:10, 0:10, 0:2] = True  # 0.2 mL
    empty = np.zeros_like(truth)
    cases = [evaluate_case(hit_large, truth, (1, 1, 1)),
             evaluate_case(hit_small, truth, (1, 1, 1)),
             evaluate_case(healthy_pred, empty, (1, 1, 1)), evaluate_case(empty, empty, (1, 1, 1))]
    out = split_summary(cases)
    assert (out["n_lesioned"], out["n_healthy"]) == (2, 2)
    assert out["n_lesions_ge_0.5ml"] == 2 and out["pooled_tpr_lesions_ge_0.5ml"] == 0.5
    assert out["lesioned"]["pooled_tpr"] == 0.5
    assert out["healthy"]["median_flagged_ml"] == pytest.approx(0.1)
    assert out["healthy"]["max_flagged_ml"] == pytest.approx(0.2)
    assert out["healthy"]["mean_false_components"] == 0.5

"""Per-scan standardisation of component heat maps (SpatialMSMALib.scan_standardization)."""

import numpy as np
import pytest

from SpatialMSMALib.scan_standardization import (
    ScanStandardization,
    parse_rules,
    scan_statistics,
)

SHAPE = (16, 14, 12)


def _region():
    region = np.zeros(SHAPE, bool)
    region[2:-2, 2:-2, 2:-2] = True
    return region


def test_statistics_are_the_median_and_iqr_inside_the_region(rng):
    region = _region()
    heat = np.full(SHAPE, np.nan, np.float32)
    values = rng.permutation(np.arange(region.sum(), dtype=np.float32))
    heat[region] = values
    heat[0, 0, 0] = 1e6  # outside the region: ignored
    n = region.sum()
    stats = scan_statistics(heat, region)
    assert stats["median"] == pytest.approx((n - 1) / 2)
    assert stats["iqr"] == pytest.approx((n - 1) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="too few"):
        scan_statistics(heat, np.zeros(SHAPE, bool))


def test_robust_rule_removes_a_scans_offset_and_scale_but_keeps_a_focal_excess(rng):
    region = _region()
    base = rng.normal(0, 1, SHAPE).astype(np.float32)
    lesion = np.zeros(SHAPE, bool)
    lesion[6:8, 6:8, 6:8] = True
    quiet = base.copy()
    quiet[lesion] += 4.0
    loud = 3.0 * base + 5.0  # a healthy scan whose map is high and wide everywhere
    rule = ScanStandardization.fit("robust", [base, 2 * base - 1], [region, region])
    stats = [scan_statistics(h, region) for h in (base, 2 * base - 1)]
    assert rule.reference_median == pytest.approx(np.median([s["median"] for s in stats]))
    assert rule.reference_iqr == pytest.approx(np.median([s["iqr"] for s in stats]))
    assert rule.n_scans == 2
    out_loud, factors = rule.apply(loud, region)
    assert factors["scale"] == pytest.approx(rule.reference_iqr / (3 * stats[0]["iqr"]),
                                             rel=1e-5)
    out_base, _ = rule.apply(base, region)
    np.testing.assert_allclose(out_loud, out_base, atol=1e-4)  # the loud scan is undone
    out_quiet, _ = rule.apply(quiet, region)
    # 8 lesion voxels of ~1,000 barely move the statistics: the excess survives
    excess = (out_quiet - out_base)[lesion]
    scale = rule.reference_iqr / stats[0]["iqr"]
    assert excess == pytest.approx(4.0 * scale, rel=0.05)
    assert np.isnan(rule.apply(np.where(region, base, np.nan), region)[0][~region]).all()


def test_ratio_rule_scales_a_positive_map_to_the_reference_median(rng):
    region = _region()
    heat = rng.gamma(2.0, 1.0, SHAPE).astype(np.float32)
    rule = ScanStandardization("ratio", reference_median=1.5, reference_iqr=1.0)
    out, factors = rule.apply(4 * heat, region)
    assert factors["offset"] == 0.0
    assert scan_statistics(out, region)["median"] == pytest.approx(1.5, rel=1e-5)
    np.testing.assert_allclose(out, heat * 1.5 / scan_statistics(heat, region)["median"],
                               rtol=1e-5)
    with pytest.raises(ValueError, match="positive scan median"):
        rule.apply(-heat, region)


def test_invalid_rules_and_settings_are_refused():
    with pytest.raises(ValueError, match="one of"):
        ScanStandardization("zscore", 0.0, 1.0)
    with pytest.raises(ValueError, match="IQR must be positive"):
        ScanStandardization("robust", 0.0, 0.0)
    with pytest.raises(ValueError, match="positive reference median"):
        ScanStandardization("ratio", -1.0, 1.0)
    assert parse_rules("none", True) == {}
    assert parse_rules("robust", True) == {"flow": "robust"}
    assert parse_rules("robust,ratio", True) == {"flow": "robust", "normative": "ratio"}
    assert parse_rules("none,ratio", True) == {"normative": "ratio"}
    assert parse_rules("robust,none", False) == {"flow": "robust"}
    for bad in ("zscore", "robust,ratio,ratio", ""):
        with pytest.raises(ValueError, match="scan standardisation must be"):
            parse_rules(bad, True)
    with pytest.raises(ValueError, match="has none"):
        parse_rules("robust,ratio", False)

"""Benchmark cohort: reproducibility, splits, lesion rules."""

import json

import numpy as np
import pytest
from scipy import ndimage

from SpatialMSMALib.anatomy import load_mni152_2009a
from SpatialMSMALib.cli import main
from SpatialMSMALib.cohort import (
    CohortSizes,
    load_manifest,
    make_benchmark,
    plan_cohort,
    save_montage,
)
from SpatialMSMALib.errors import InputError
from SpatialMSMALib.io import load_volume
from SpatialMSMALib.lesions import LesionConfig, simulate_lesions
from SpatialMSMALib.synthesis import (
    SubjectConfig,
    diffeomorphic_displacement,
    synthesize_subject,
)

TINY = CohortSizes(
    n_train=1, n_val=0, n_test_healthy=0, n_test_lesioned=2, n_loao_healthy=0, n_loao_lesioned=0
)


@pytest.fixture(scope="module")
def mni():
    return load_mni152_2009a()


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    # at 4 mm: the same generator, a quarter of the 2 mm default's synthesis time
    coarse = SubjectConfig(spacing_mm=4.0)
    a, b, c = (make_benchmark(tmp_path / name, sizes=TINY, seed=seed, progress=False,
                              subject_config=coarse)
               for name, seed in (("a", 7), ("b", 7), ("c", 8)))
    files = sorted(p.name for p in a.parent.iterdir())
    assert len(files) == 3 * 5 + 2
    for name in files:
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes(), name
    assert (a.parent / "train_000_t1.nii.gz").read_bytes() != (
        c.parent / "train_000_t1.nii.gz"
    ).read_bytes()


def test_manifest_contents_and_refusal_to_overwrite(tmp_path):
    path = make_benchmark(tmp_path, sizes=TINY, seed=1, progress=False)
    manifest = load_manifest(tmp_path)
    assert manifest["holdout_anatomy"] is None  # only the nilearn template here
    ids = {s["id"]: s for s in manifest["subjects"]}
    assert set(ids) == {"train_000", "test_lesioned_000", "test_lesioned_001"}
    assert ids["train_000"]["n_lesions"] == 0 and not ids["train_000"]["lesioned"]
    for s in manifest["subjects"]:
        lesion = load_volume(tmp_path / s["lesion_mask"], allow_empty=True)
        brain = load_volume(tmp_path / s["brain_mask"]).data > 0
        spacing_ml = np.prod(lesion.spacing) / 1000
        assert s["lesion_volume_ml"] == pytest.approx(lesion.data.sum() * spacing_ml, abs=1e-3)
        assert not np.any((lesion.data > 0) & ~brain)
        tissue = load_volume(tmp_path / s["tissue"]).data
        assert set(np.unique(tissue)) <= {0, 1, 2, 3}
        assert np.all((tissue > 0) == brain)
    assert manifest["lesion_statistics"]["n_subjects"] == 2
    with pytest.raises(InputError, match="refusing to overwrite"):
        make_benchmark(tmp_path, sizes=TINY, seed=1, progress=False)
    before = path.read_bytes()
    assert path.read_bytes() == before


def test_montage_of_a_healthy_only_cohort(tmp_path):
    """A training cohort has no lesion to centre on: the montage shows its subjects' middle
    slices instead of failing after the cohort was written."""
    import matplotlib.image

    healthy = CohortSizes(n_train=2, n_val=0, n_test_healthy=0, n_test_lesioned=0,
                          n_loao_healthy=0, n_loao_lesioned=0)
    manifest = make_benchmark(tmp_path / "c", sizes=healthy, seed=3, progress=False)
    png = save_montage(manifest, tmp_path / "m" / "montage.png")
    pixels = matplotlib.image.imread(png)
    assert pixels.shape[1] > pixels.shape[0] * 0.8  # two subjects side by side, two rows
    assert pixels[..., :3].std() > 0.1  # an image, not a blank page
    empty = tmp_path / "e"
    empty.mkdir()
    data = json.loads(manifest.read_text())
    data["subjects"] = []
    (empty / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="no subject to show"):
        save_montage(empty / "manifest.json", tmp_path / "never.png")
    assert not (tmp_path / "never.png").exists()


def test_plan_holds_out_one_anatomy_for_loao():
    subjects, holdout = plan_cohort(
        ["mni152_2009a", "mni152nlin6asym", "colin27"], CohortSizes(), seed=0
    )
    assert holdout == "colin27"
    for s in subjects:
        assert (s["anatomy"] == "colin27") == s["split"].startswith("loao")
    assert len({s["seed"] for s in subjects}) == len(subjects)
    assert {s["anatomy"] for s in subjects if s["split"] == "train"} == {
        "mni152_2009a",
        "mni152nlin6asym",
    }


def test_lesions_follow_the_protocol(mni):
    subject = synthesize_subject(mni, seed=3)
    spacing = subject.grid.spacing
    wm = (subject.tissue_labels == 3).astype(np.float32)
    brain = subject.brain_mask > 0
    volumes = []
    for seed in range(4):
        t1, t2, mask, lesions = simulate_lesions(
            subject.t1, subject.t2, wm, brain, spacing, np.random.default_rng(seed), LesionConfig()
        )
        labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
        assert n == len(lesions) > 0  # no two lesions touch
        sizes = [les["volume_mm3"] for les in lesions]
        assert min(sizes) >= 50 and max(sizes) <= 15000
        assert mask.sum() * np.prod(spacing) <= 20000 + 1e-6
        assert np.all(brain[mask > 0])
        inside = mask > 0
        # darker on T1, brighter on T2 on average inside lesions; untouched far away
        assert np.mean(t1[inside] / subject.t1[inside]) < 0.95
        assert np.mean(t2[inside] / subject.t2[inside]) > 1.05
        far = ~ndimage.binary_dilation(inside, iterations=4)
        np.testing.assert_array_equal(t1[far], subject.t1[far])
        volumes += sizes
    assert max(volumes) > 1000 and min(volumes) < 500  # sizes actually span the bins


def test_deformation_is_invertible():
    d = diffeomorphic_displacement((40, 48, 40), 2.0, 4.0, 20.0, np.random.default_rng(0))
    assert np.abs(d).max() > 1.0  # something happened (mm)
    grads = [np.gradient(d[i] / 2.0) for i in range(3)]
    jac = (
        np.array([[grads[i][j] for j in range(3)] for i in range(3)])
        + np.eye(3)[:, :, None, None, None]
    )
    det = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))
    assert det.min() > 0


def test_cli_make_benchmark_and_evaluate(tmp_path, capsys):
    rc = main(
        [
            "make-benchmark",
            "--out",
            str(tmp_path),
            "--n-train",
            "0",
            "--n-val",
            "0",
            "--n-test-healthy",
            "0",
            "--n-test-lesioned",
            "1",
            "--seed",
            "5",
            "--deformation-mm",
            "5",
            "--control-spacing-mm",
            "20",
        ]
    )
    assert rc == 0
    assert "manifest.json" in capsys.readouterr().out
    recorded = load_manifest(tmp_path / "manifest.json")["subject_config"]
    assert recorded["deformation_mm"] == 5.0 and recorded["control_spacing_mm"] == 20.0
    rc = main(["make-benchmark", "--out", str(tmp_path / "bad"), "--deformation-mm", "-1"])
    assert rc == 2 and "--deformation-mm" in capsys.readouterr().err
    truth = tmp_path / "test_lesioned_000_lesionmask.nii.gz"
    rc = main(["evaluate", "--pred", str(truth), "--truth", str(truth), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert rc == 0 and result["dice"] == 1.0 and result["hd99"] == 0.0 and result["tpr"] == 1.0
    rc = main(["evaluate", "--pred", str(tmp_path / "nope.nii.gz"), "--truth", str(truth)])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.nii.gz" in err and "does not exist" in err


@pytest.mark.slow
def test_default_size_cohort_follows_the_protocol(tmp_path):
    """The default-size cohort (about 4 minutes on 2 cores): splits and lesion statistics."""
    manifest = load_manifest(make_benchmark(tmp_path, seed=0, progress=False))
    splits = {}
    for s in manifest["subjects"]:
        splits[s["split"]] = splits.get(s["split"], 0) + 1
    assert splits == {"train": 40, "val": 10, "test_healthy": 10, "test_lesioned": 20}
    stats = manifest["lesion_statistics"]
    assert stats["lesion_volume_mm3"]["min"] >= 50
    assert stats["lesion_volume_mm3"]["max"] <= 15000
    assert stats["load_ml"]["max"] <= 20.0
    assert all(n > 0 for n in stats["size_bins_mm3"].values())


def test_pooled_cohorts_keep_their_scans_apart_and_one_cohort_is_unchanged(tmp_path):
    import sys
    from pathlib import Path

    from SpatialMSMALib.dataset import manifest_scans, model_space, pooled_manifest_scans

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
    from add_normative import build_parser
    from bundle_model import describe_cohort
    from train_score import cohort_record, scan_lists

    sizes = CohortSizes(n_train=1, n_val=1, n_test_healthy=0, n_test_lesioned=0,
                        n_loao_healthy=0, n_loao_lesioned=0)
    small = SubjectConfig(spacing_mm=4.0)
    a, b = (make_benchmark(tmp_path / name, sizes=sizes, seed=seed, progress=False,
                           subject_config=small) for name, seed in (("a", 3), ("b", 4)))
    splits = ("train", "val")
    single = pooled_manifest_scans(a, splits)
    assert single == manifest_scans(a, splits)
    assert [r.id for r in single["train"]] == ["train_000"]

    args = build_parser().parse_args(["--model", "m.pt", "--manifest", str(a), str(b),
                                      "--work", "w", "--out", "o.pt"])
    pooled = scan_lists(args)
    assert [r.id for r in pooled["train"]] == ["c0_train_000", "c1_train_000"]
    assert [r.id for r in pooled["val"]] == ["c0_val_000", "c1_val_000"]
    assert pooled["train"][0].t1 == single["train"][0].t1
    assert pooled["train"][1].t1.parent == (tmp_path / "b")
    # one cache, two cohorts with the same ids: each keeps its own scan
    cache = tmp_path / "cache"
    first, second = model_space(pooled["train"], cache, 4.0, progress=False)
    again = model_space(pooled["train"][1:], cache, 4.0, progress=False)[0]
    assert np.abs(first.image - second.image).max() > 0.1
    assert np.array_equal(again.image, second.image)
    for twice in ([a, a], [tmp_path / "a", a], [b, tmp_path / "b"]):
        with pytest.raises(InputError, match="given twice"):
            pooled_manifest_scans(twice, splits)
    # provenance and registry: one cohort stays a path, several are listed and described
    assert cohort_record([a]) == str(a) and cohort_record([a, b]) == [str(a), str(b)]
    assert [describe_cohort(m)["cohort_seed"] for m in (a, b)] == [3, 4]
    assert "seed 4" in describe_cohort(b)["description"]

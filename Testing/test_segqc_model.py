"""GNSM on label maps: noise, training on toy maps, scoring, the model file and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from SpatialMSMALib.segqc.corruptions import corrupt
from SpatialMSMALib.segqc.model import (
    SegQCConfig,
    SegQCModel,
    TrainingMap,
    class_balanced_mean,
    noisy_labels,
    train_seg_qc,
)

TOY_SHAPE = (32, 32, 32)
CLASS_INTENSITY = np.array([-1.0, -0.5, 0.1, 0.8], np.float32)


def _toy_subject(seed: int) -> TrainingMap:
    """A nested-ellipsoid 'brain' (CSF rim, GM shell, WM core) with a random shape, and an
    image whose intensity follows the tissue (plus noise), -1 outside the brain."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in TOY_SHAPE], indexing="ij")
    scale = 1 + 0.08 * rng.standard_normal(3)
    r = np.sqrt(sum((g * s) ** 2 for g, s in zip(grids, scale, strict=True)))
    r = r + 0.05 * np.sin(4 * grids[0] + rng.uniform(0, 6)) * np.cos(3 * grids[1])
    labels = np.zeros(TOY_SHAPE, np.uint8)
    labels[r < 0.85] = 1
    labels[r < 0.72] = 2
    labels[r < 0.45] = 3
    image = CLASS_INTENSITY[labels] + 0.05 * rng.standard_normal(TOY_SHAPE).astype(np.float32)
    image[labels == 0] = -1.0
    return TrainingMap(f"toy_{seed}", labels, image[None].astype(np.float32))


# 150 steps on toy maps: enough for the sum over levels to separate damaged maps (the
# bundled model's default read-out, the noisiest level alone, needs the full training; it is
# tested on the bundled model below)
TOY_CONFIG = SegQCConfig(channels=(8, 16), embed_dim=16, num_levels=4, shape=TOY_SHAPE,
                         crop=16, batch_size=4, steps=150, learning_rate=3e-3, warmup_steps=10,
                         spacing_mm=4.0, mix_max=0.5, readout="class_balanced_kl")


@pytest.fixture(scope="module")
def toy_model() -> SegQCModel:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the same reductions on every machine
    try:
        train = [_toy_subject(s) for s in range(6)]
        val = [_toy_subject(s) for s in (100, 101, 102)]
        return train_seg_qc(train, val, TOY_CONFIG, progress=False)
    finally:
        torch.set_num_threads(threads)


def test_noise_target_is_the_exp_concrete_score_direction():
    """The training target is the probability vector of the closed-form ExpConcrete score:
    tau (K softmax(target) - 1) equals the gnsm.noise score of y under the mixed logits."""
    from SpatialMSMALib.gnsm.noise import exp_concrete_score

    codes = torch.tensor([[0, 1, 2, 3, 3, 1]])
    taus, mixes = torch.tensor([3.0]), torch.tensor([0.2])
    uniform = torch.rand((1, 4, 6), generator=torch.Generator().manual_seed(0))
    y, target = noisy_labels(codes, taus, mixes, 4, uniform)
    assert torch.allclose(y.exp().sum(1), torch.ones(1, 6), atol=1e-5)
    alpha = torch.log(0.8 * torch.nn.functional.one_hot(codes, 4).float() + 0.05)
    expected = exp_concrete_score(y.movedim(1, -1), alpha, taus.view(1, 1, 1))
    got = 3.0 * (4 * target.exp() - 1).movedim(1, -1)
    assert torch.allclose(got, expected, atol=1e-4)


def test_class_balanced_mean_weighs_classes_equally():
    labels = np.array([1, 1, 1, 1, 1, 1, 1, 1, 2, 2])
    loss = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1], float)
    # plain mean 0.2; class-balanced: CSF 0, GM 1 -> 0.5 (WM absent, skipped)
    assert class_balanced_mean(loss, labels, labels) == pytest.approx(0.5)
    # a voxel the denoiser calls WM joins the WM region
    predicted = labels.copy()
    predicted[0] = 3
    assert class_balanced_mean(loss, labels, predicted) == pytest.approx((0 + 1 + 0) / 3)


def test_soft_dice_error_values():
    from SpatialMSMALib.segqc.model import soft_dice_error

    codes = torch.tensor([0, 1, 1, 2, 3, 3, 3, 3])
    exact = torch.nn.functional.one_hot(codes, 4).T.float()
    assert soft_dice_error(codes, exact) == pytest.approx(0.0)
    # a posterior that calls every CSF voxel GM: CSF Dice 0, GM 2*1/(1+3), WM 1
    wrong = exact.clone()
    wrong[2, 1:3], wrong[1, 1:3] = 1.0, 0.0
    assert soft_dice_error(codes, wrong) == pytest.approx(1 - (0 + 0.5 + 1) / 3)


def test_training_lowers_the_loss(toy_model):
    history = toy_model.info["history"]
    assert history[-1]["step"] == TOY_CONFIG.steps
    first, last = np.mean([h["loss"] for h in history[:2]]), np.mean(
        [h["loss"] for h in history[-3:]])
    assert last < 0.6 * first


def test_damaged_maps_score_higher_than_good_ones_and_the_map_shows_where(toy_model):
    good_scores, bad_scores = [], []
    for seed in (200, 201, 202):
        subject = _toy_subject(seed)
        clean = toy_model.score_map(subject.labels, subject.image)
        good_scores.append(clean.score)
        for kind in ("shift", "swap", "noise", "erode"):
            damaged = corrupt(subject.labels, kind, 1.0, np.random.default_rng(seed))
            result = toy_model.score_map(damaged, subject.image)
            bad_scores.append(result.score)
            changed = damaged != subject.labels
            # the per-voxel map is higher where the labels were changed
            assert result.voxel_map[changed].mean() > 2 * result.voxel_map[~changed].mean()
    assert min(bad_scores) > max(good_scores)
    # every read-out is computed and finite
    assert set(result.readouts) == {"class_balanced_kl", "plain_mean_kl", "soft_dice_error",
                                    "top_level_kl", "top_level_dice_error",
                                    "top_level_soft_dice_error"}
    assert all(np.isfinite(v) for v in result.readouts.values())
    # percentiles: good maps fall among the validation maps, damaged ones above all
    assert toy_model.percentile(max(bad_scores) + 1) == 100.0
    assert toy_model.percentile(-1.0) == 0.0


def test_scores_are_deterministic_and_survive_save_and_load(toy_model, tmp_path):
    subject = _toy_subject(300)
    first = toy_model.score_map(subject.labels, subject.image)
    again = toy_model.score_map(subject.labels, subject.image)
    assert first.score == again.score
    path = toy_model.save(tmp_path / "qc.pt")
    loaded = SegQCModel.load(path)
    assert loaded.config == toy_model.config
    np.testing.assert_array_equal(loaded.good_scores, toy_model.good_scores)
    assert loaded.score_map(subject.labels, subject.image).score == pytest.approx(
        first.score, rel=1e-6)
    with pytest.raises(FileExistsError):
        toy_model.save(path)


def test_bad_inputs_are_refused(toy_model):
    from SpatialMSMALib.errors import InputError

    subject = _toy_subject(400)
    with pytest.raises(InputError, match="labels must be 0..3"):
        toy_model.score_map(subject.labels.astype(np.int64) + 5, subject.image)
    with pytest.raises(InputError, match="model grid"):
        toy_model.score_map(subject.labels[:16], subject.image)


def test_training_resumes_from_its_state_file(tmp_path):
    config = SegQCConfig(**{**TOY_CONFIG.__dict__, "steps": 20})
    train = [_toy_subject(s) for s in range(2)]
    path = tmp_path / "state.pt"
    straight = train_seg_qc(train, train[:1], config, progress=False)
    short = SegQCConfig(**{**config.__dict__})
    # stop after 10 steps by checkpointing at 10 and interrupting through the log hook
    def stop(entry):
        if entry["step"] == 10:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_seg_qc(train, train[:1], short, progress=False, checkpoint_path=path, log=stop)
    resumed = train_seg_qc(train, train[:1], config, progress=False, checkpoint_path=path,
                           resume=True)
    for a, b in zip(straight.network.state_dict().values(),
                    resumed.network.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_seg_qc_cli_on_a_cohort_subject(tmp_path, toy_model):
    """End to end on a native 4 mm subject: registration, the map on the label grid, the
    report, refusal to overwrite, and clear errors for bad label files."""
    from SpatialMSMALib.cli import main
    from SpatialMSMALib.cohort import CohortSizes, make_benchmark
    from SpatialMSMALib.io import load_volume, save_volume
    from SpatialMSMALib.segqc.data import cohort_label_maps
    from SpatialMSMALib.synthesis import SubjectConfig

    sizes = CohortSizes(n_train=1, n_val=0, n_test_healthy=0, n_test_lesioned=0,
                        n_loao_healthy=0, n_loao_lesioned=0)
    manifest = make_benchmark(tmp_path / "cohort", sizes=sizes, seed=5, progress=False,
                              subject_config=SubjectConfig(spacing_mm=2.0))
    cohort = tmp_path / "cohort"
    (subject_id, labels, image), = cohort_label_maps(
        manifest, ("train",), tmp_path / "cache", spacing=4.0, progress=False,
        images=True)["train"]
    config = SegQCConfig(**{**TOY_CONFIG.__dict__, "shape": labels.shape, "steps": 5})
    model = train_seg_qc([TrainingMap(subject_id, labels, image)] * 2,
                         [TrainingMap(subject_id, labels, image)] * 2, config, progress=False)
    model_path = model.save(tmp_path / "qc4mm.pt")
    tissue = cohort / f"{subject_id}_tissue.nii.gz"
    t1 = cohort / f"{subject_id}_t1.nii.gz"
    out = tmp_path / "qc"
    args = ["seg-qc", "--labels", str(tissue), "--image", str(t1), "--model", str(model_path),
            "--device", "cpu"]
    assert main([*args, "--out", str(out)]) == 0
    report = json.loads((out / "qc_report.json").read_text())
    assert np.isfinite(report["qc_score"]) and len(report["per_level"]) == config.num_levels
    native = load_volume(tissue, what="labels")
    qc_map = load_volume(out / "qc_map.nii.gz")
    assert qc_map.shape == native.shape
    np.testing.assert_allclose(qc_map.affine, native.affine, atol=1e-5)
    assert qc_map.data[native.data > 0].mean() > 0  # the map covers the brain
    assert main([*args, "--out", str(out)]) == 2  # refuses to overwrite
    bad = tmp_path / "bad_labels.nii.gz"
    save_volume(bad, native.data.astype(np.int16) * 3, native.affine)
    assert main(["seg-qc", "--labels", str(bad), "--image", str(t1), "--model",
                 str(model_path)]) == 2
    assert main(["seg-qc", "--labels", str(tmp_path / "nope.nii.gz"), "--image", str(t1),
                 "--model", str(model_path)]) == 2
    # several maps of one scan share its preprocessing: the first map's score and map are
    # those of the single-map run above, bit for bit; a list report names each map's file
    shifted = save_volume(tmp_path / "shifted.nii.gz", np.roll(native.data, 2, axis=0),
                          native.affine)
    several = tmp_path / "qc_several"
    assert main([*args[:2], str(tissue), str(shifted), *args[3:], "--out", str(several)]) == 0
    reports = json.loads((several / "qc_report.json").read_text())
    assert [r["labels"] for r in reports] == [str(tissue), str(shifted)]
    assert [r["qc_map"] for r in reports] == ["qc_map_1.nii.gz", "qc_map_2.nii.gz"]
    assert reports[0]["qc_score"] == report["qc_score"]
    assert reports[1]["qc_score"] != report["qc_score"]
    np.testing.assert_array_equal(load_volume(several / "qc_map_1.nii.gz").data, qc_map.data)
    # a bad map among several: refused before any work, nothing written
    refused = tmp_path / "qc_refused"
    assert main([*args[:2], str(tissue), str(bad), *args[3:], "--out", str(refused)]) == 2
    assert not refused.exists()


def test_bundled_qc_model_is_registered_and_flags_a_shifted_map(tmp_path, capsys):
    """The bundled model (no --model): registry checksum, and on a native 2 mm cohort
    subject (the model grid's spacing; a 4 mm map, blocky on that grid, is flagged even when
    clean) the clean map passes while maps shifted by one and two voxels score increasingly
    higher and are flagged."""
    import hashlib

    from SpatialMSMALib.cli import main
    from SpatialMSMALib.cohort import CohortSizes, make_benchmark
    from SpatialMSMALib.io import load_volume, save_volume
    from SpatialMSMALib.model import MODEL_DIR, REGISTRY
    from SpatialMSMALib.synthesis import SubjectConfig

    entry = json.loads(REGISTRY.read_text())["seg_qc"]
    file = MODEL_DIR / entry["file"]
    assert hashlib.sha256(file.read_bytes()).hexdigest() == entry["sha256"]
    assert "not for clinical use" in entry["training_data"]["description"]
    sizes = CohortSizes(n_train=0, n_val=0, n_test_healthy=1, n_test_lesioned=0,
                        n_loao_healthy=0, n_loao_lesioned=0)
    make_benchmark(tmp_path / "cohort", sizes=sizes, seed=11, progress=False,
                   subject_config=SubjectConfig(spacing_mm=2.0))
    cohort = tmp_path / "cohort"
    t1 = next(cohort.glob("*_t1.nii.gz"))
    mask = next(cohort.glob("*_brainmask.nii.gz"))
    tissue = next(cohort.glob("*_tissue.nii.gz"))
    native = load_volume(tissue, what="labels")
    labels = [tissue] + [save_volume(tmp_path / f"shifted{voxels}.nii.gz",
                                     np.roll(native.data, voxels, axis=0), native.affine)
                         for voxels in (1, 2)]
    capsys.readouterr()
    assert main(["seg-qc", "--labels", *map(str, labels), "--image", str(t1), "--mask",
                 str(mask), "--json", "--device", "cpu"]) == 0
    clean, one, two = json.loads(capsys.readouterr().out)
    assert clean["qc_score"] < one["qc_score"] < two["qc_score"]
    assert not clean["flagged"]
    assert one["flagged"] and two["flagged"] and one["percentile_among_good"] == 100.0


def test_deformed_crops_are_exact_without_deformation_and_plausible_with_it():
    from SpatialMSMALib.segqc.model import SegQCConfig, TrainingMap, _deformed_crop

    labels = np.zeros((48, 48, 48), np.int16)
    labels[8:40, 8:40, 8:40] = 1
    labels[16:32, 16:32, 16:32] = 2
    image = labels[None].astype(np.float32) + 0.5
    item = TrainingMap("cube", labels, image)
    generator = torch.Generator().manual_seed(0)
    plain, plain_image = _deformed_crop(item, [8, 8, 8], 32, SegQCConfig(), generator)
    np.testing.assert_array_equal(plain, labels[8:40, 8:40, 8:40])
    np.testing.assert_allclose(plain_image, image[:, 8:40, 8:40, 8:40])
    config = SegQCConfig(deform_voxels=1.5, scale_jitter=0.1)
    warped, warped_image = _deformed_crop(item, [8, 8, 8], 32, config, generator)
    assert warped.dtype == labels.dtype and set(np.unique(warped)) <= {0, 1, 2}
    changed = (warped != plain).mean()
    assert 0.005 < changed < 0.3, changed
    # image and labels move together: the image is still label + 0.5 away from edges
    inner = warped_image[0][warped == 2]
    assert np.median(inner) == pytest.approx(2.5, abs=0.01)

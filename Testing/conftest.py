import os
from contextlib import contextmanager
from dataclasses import asdict

import numpy as np
import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (``pytest -n 2``) two test processes share the cores: one compute
    # thread each, also in the CLI subprocesses the tests start (they inherit the variables).
    torch.set_num_threads(1)
    for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_variable] = "1"


# The test files that take longest (seconds of one pytest-xdist worker on 2 cores,
# 2026-12-02), run first: the default run deals whole files to two workers
# (``-n 2 --dist loadfile``, pyproject.toml), and starting with the long ones lets the two
# finish together instead of one waiting for the other's last long file.
LONGEST_FILES_FIRST = ("test_spatial.py", "test_brain_mask_source.py", "test_viewer_browser.py",
                       "test_preprocessing.py", "test_segqc_model.py", "test_bundled_model.py",
                       "test_slicer_logic.py", "test_normative.py",
                       "test_model_and_typicality_cli.py", "test_without_mask.py")


def pytest_collection_modifyitems(config, items):
    """Collection order: the files of :data:`LONGEST_FILES_FIRST` first, in that order,
    then the rest; the order within a file is kept."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def load_benchmark_script(name: str):
    """Import ``benchmarks/<name>.py`` (the scripts are not a package) as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def two_scan_test_cohort(folder):
    """A benchmark cohort of one healthy and one lesioned test subject (4 mm, seed 2):
    ``{"test_healthy": [ScanFiles], "test_lesioned": [ScanFiles]}``."""
    from SpatialMSMALib.cohort import CohortSizes, make_benchmark
    from SpatialMSMALib.dataset import manifest_scans
    from SpatialMSMALib.synthesis import SubjectConfig

    sizes = CohortSizes(n_train=0, n_val=0, n_test_healthy=1, n_test_lesioned=1,
                        n_loao_healthy=0, n_loao_lesioned=0)
    manifest = make_benchmark(folder, sizes=sizes, seed=2, progress=False,
                              subject_config=SubjectConfig(spacing_mm=4.0))
    return manifest_scans(manifest, ("test_healthy", "test_lesioned"))


_REGISTRATIONS: dict[str, tuple[np.ndarray, list]] = {}


@contextmanager
def remembered_registrations():
    """While active, ``preprocessing.register_to_template`` returns the transform it found
    before when it is given the same registration again in this test process (the same
    template, T1 voxels, affine, brain mask, degrees of freedom and version) instead of
    repeating it (about 30 s for a 1 mm scan on 2 cores); the step records it appended to
    ``steps`` then are appended again. For tests of what detection does after registration;
    registration itself, and that a repeated detection is the same bit for bit, are tested
    where this is not active."""
    import copy
    import hashlib

    from SpatialMSMALib import preprocessing

    register = preprocessing.register_to_template

    def remembered(template, t1, affine, brain_mask, dof, steps, **options):
        digest = hashlib.sha256(repr((dof, sorted(options.items()))).encode())
        for array in (template.t1, template.grid.affine, t1, affine, brain_mask):
            array = np.ascontiguousarray(array if array is not None else np.empty(0))
            digest.update(repr((array.shape, array.dtype.str)).encode())
            digest.update(array.tobytes())
        key = digest.hexdigest()
        if key not in _REGISTRATIONS:
            before = len(steps)
            transform = register(template, t1, affine, brain_mask, dof, steps, **options)
            _REGISTRATIONS[key] = (transform, copy.deepcopy(steps[before:]))
        else:
            steps.extend(copy.deepcopy(_REGISTRATIONS[key][1]))
        return _REGISTRATIONS[key][0].copy()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(preprocessing, "register_to_template", remembered)
        yield


@pytest.fixture
def reuse_registrations():
    """:func:`remembered_registrations` for one test."""
    with remembered_registrations():
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def tiny_spatial_config(steps):
    """A small, fast Spatial-MSMA flow training configuration for tests."""
    from SpatialMSMALib.spatial import SpatialFlowConfig
    from SpatialMSMALib.spatial_training import SpatialTrainConfig

    flow = asdict(SpatialFlowConfig(num_features=4, flow_layers=2, hidden=16,
                                    position_frequencies=2, global_features=2))
    return SpatialTrainConfig(flow=flow, steps=steps, scans_per_batch=4, locations_per_scan=128,
                              learning_rate=3e-3, warmup_steps=10, validate_every=50,
                              checkpoint_every=50, val_locations_per_scan=512)


@pytest.fixture(scope="session")
def detection_setup(tmp_path_factory):
    """A tiny score net + a flow trained on noisy model-space copies of one healthy scan,
    calibrated on two more; and a copy of that scan with a lesion."""
    from SpatialMSMALib.anatomy import load_mni152_2009a
    from SpatialMSMALib.inference import compute_features, prepare
    from SpatialMSMALib.io import Volume, save_volume
    from SpatialMSMALib.model import AnomalyModel
    from SpatialMSMALib.score import GeometricNoiseSchedule, ScoreUNet
    from SpatialMSMALib.spatial import Calibration
    from SpatialMSMALib.spatial_training import LocationSet, SpatialTrainer
    from SpatialMSMALib.synthesis import SubjectConfig, synthesize_subject
    from SpatialMSMALib.typicality import TypicalityModel

    folder = tmp_path_factory.mktemp("detect")
    torch.manual_seed(0)
    model = AnomalyModel(ScoreUNet(3, 2, (4, 8), 8).eval(), GeometricNoiseSchedule(0.05, 1.0, 4))
    subject = synthesize_subject(load_mni152_2009a(), seed=3, config=SubjectConfig())
    base = prepare(model, Volume(subject.t1, subject.grid.affine),
                   Volume(subject.t2, subject.grid.affine))
    rng = np.random.default_rng(0)
    sets, wholes = [], []
    for _ in range(6):
        image = (base.image + rng.normal(0, 0.03, base.image.shape) * base.brain_mask)
        scan = type("S", (), {"image": image.astype(np.float32), "brain_mask": base.brain_mask})
        local, whole = compute_features(model, scan)
        sets.append(LocationSet.from_arrays(local, scan.image, base.brain_mask, 4))
        wholes.append(whole)
    config = tiny_spatial_config(200)
    config.flow.update(num_features=4, hidden=32, flow_layers=3)
    trainer = SpatialTrainer(config, sets[:4], sets[4:], folder / "flow")
    trainer.run(progress=False)
    model.spatial = trainer.flow.eval()
    model.calibration = Calibration([1e-6, 1.0], [1.0, 0.0], smoothing_mm=2.0)
    from SpatialMSMALib.detection import model_heat_map

    healthy = []
    for s in sets[4:]:
        local = s.norms.float().numpy()
        full = np.zeros((4, *base.brain_mask.shape), np.float32)
        full[:, base.brain_mask] = local.T
        heat = model_heat_map(model, base.image, base.brain_mask, full)
        healthy.append(heat[base.brain_mask])
    model.calibration = Calibration.from_healthy(healthy, min_component_ml=0.2)
    model.typicality = TypicalityModel.fit(np.stack(wholes), models=("knn",))
    path = model.save(folder / "model.pt")

    # a lesion: 12 mm radius ball in the right hemisphere, T1 x0.5, T2 x2
    ijk = np.indices(subject.t1.shape)
    centre_ras = np.array([26.0, -10.0, 20.0])
    centre_ijk = np.linalg.solve(subject.grid.affine, np.r_[centre_ras, 1])[:3]
    ball = (((ijk - centre_ijk[:, None, None, None]) * 2.0) ** 2).sum(0) <= 12.0**2
    ball &= subject.brain_mask > 0
    paths = {}
    for name, data in (("t1", np.where(ball, subject.t1 * 0.5, subject.t1)),
                       ("t2", np.where(ball, subject.t2 * 2.0, subject.t2)),
                       ("lesion", ball.astype(np.uint8)),
                       ("brain_mask", (subject.brain_mask > 0).astype(np.uint8))):
        paths[name] = save_volume(folder / f"les_{name}.nii.gz", data.astype(np.float32),
                                  subject.grid.affine)
    return {"model": model, "path": path, "paths": paths, "centre_ras": centre_ras,
            "folder": folder, "base": base}

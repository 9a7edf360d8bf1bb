"""The model provenance in ``report.json``: what a model was made from, without the trainer's
folders."""

import json
import types

import numpy as np

from SpatialMSMALib.detection import Detection, without_local_folders
from SpatialMSMALib.spatial import Calibration

PROVENANCE = {
    "cohort": {"manifest": "/home/trainer/cohorts/train_cohort", "splits": ["train", "val"]},
    "refused_scans": [{"id": "train_002", "reason": "T1 '/home/trainer/cohorts/train_cohort/"
                       "train_002_t1.nii.gz': registration failed (NCC 0.396 < 0.5)"}],
    "typicality_cohort": {"manifest": "/tmp/w/aug2x/manifest.json"},
    "score_checkpoint_sha256": "ab" * 32,
    "notes": "0.3 mL/scan, 1/2 of the levels, n/a",
    "n_healthy": 49,
}


def test_paths_in_the_provenance_keep_only_their_last_component():
    cleaned = without_local_folders(PROVENANCE)
    assert cleaned["cohort"] == {"manifest": "train_cohort", "splits": ["train", "val"]}
    assert cleaned["refused_scans"][0]["reason"] == (
        "T1 'train_002_t1.nii.gz': registration failed (NCC 0.396 < 0.5)")
    assert cleaned["typicality_cohort"]["manifest"] == "manifest.json"
    # what is not an absolute path is untouched, and the input is not modified
    for key in ("score_checkpoint_sha256", "notes", "n_healthy"):
        assert cleaned[key] == PROVENANCE[key]
    assert PROVENANCE["cohort"]["manifest"].startswith("/home/trainer")


def test_the_report_shows_the_provenance_without_the_trainers_folders():
    shape = (2, 2, 2)
    detection = Detection(np.zeros(shape, np.float32), np.ones(shape, bool),
                          np.zeros(shape, np.int16), np.eye(4), 1.0, 0.01, 0.0, [],
                          np.zeros(shape, np.float32), np.zeros((1, *shape), np.float32),
                          np.ones(shape, bool))
    model = types.SimpleNamespace(channel_names=["T1"], spacing_mm=2.0, brain_masks="given",
                                  provenance=PROVENANCE,
                                  calibration=Calibration([1e-6, 1.0], [1.0, 0.0],
                                                          smoothing_mm=2.0))
    text = json.dumps(detection.report(model))
    assert "/home/trainer" not in text and "/tmp/w" not in text
    assert json.loads(text)["model"]["provenance"]["cohort"]["manifest"] == "train_cohort"

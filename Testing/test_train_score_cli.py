"""training/train_score.py end to end: manifest -> cache -> checkpoint; 2-rank DDP on gloo."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from SpatialMSMALib.checkpoint import load_checkpoint
from SpatialMSMALib.cohort import CohortSizes, make_benchmark
from SpatialMSMALib.score.training import ScoreTrainConfig
from SpatialMSMALib.synthesis import SubjectConfig

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_score.py"
TINY = [
    "--channels",
    "4",
    "8",
    "--embed-dim",
    "8",
    "--crop",
    "16",
    "--batch-size",
    "2",
    "--num-levels",
    "5",
    "--warmup-steps",
    "1",
    "--validate-every",
    "2",
    "--checkpoint-every",
    "2",
    "--spacing",  # a 4 mm model grid and 4 mm scans: the same path, an eighth of the voxels
    "4",
]


def _train_args(cohort, out, steps):
    return ["--manifest", str(cohort), "--out", str(out), "--steps", str(steps), *TINY]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    sizes = CohortSizes(
        n_train=2, n_val=1, n_test_healthy=0, n_test_lesioned=0, n_loao_healthy=0, n_loao_lesioned=0
    )
    make_benchmark(root, sizes=sizes, seed=3, progress=False,
                   subject_config=SubjectConfig(spacing_mm=4.0))
    return root


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    command = [sys.executable, str(SCRIPT), *_train_args(cohort, out, steps=4)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result


def test_single_process_run_writes_checkpoints_and_cache(trained):
    out, result = trained
    assert "done: step 4" in result.stdout
    assert len(list((out / "cache").glob("*.npz"))) == 3
    checkpoint = load_checkpoint(out / "last.pt", kind="score-model")
    assert checkpoint["extra"]["step"] == 4
    assert checkpoint["config"]["channels"] == [4, 8]
    assert (out / "best.pt").exists()


def test_two_gloo_ranks_end_with_identical_weights(cohort, trained):
    out, _ = trained  # reuses the preprocessing cache of the single-process run
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        str(SCRIPT),
        *_train_args(cohort, out, steps=3),
        "--save-rank-weights",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = torch.load(out / "rank0.pt", weights_only=True)
    rank1 = torch.load(out / "rank1.pt", weights_only=True)
    torch.manual_seed(0)  # the trainer's initial weights
    initial = ScoreTrainConfig(channels=[4, 8], embed_dim=8).build_model(2).state_dict()
    changed = False
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
        changed |= not torch.equal(rank0[key], initial[key])
    assert changed

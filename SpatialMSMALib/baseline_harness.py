"""Process-level pieces of the side-by-side benchmark (``benchmarks/baselines.py``): what a
fitted method is, how it scores a model-space scan, and how its cost is measured in a fresh
process (spawned, so everything here must be importable and picklable from a library module).
"""

from __future__ import annotations

import hashlib
import json
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from .baselines import (
    AutoencoderConfig,
    LocationGMM,
    RestorationConfig,
    VoxelZScore,
    build_autoencoder,
    reconstruction_residual,
    restoration_residual,
)
from .detection import model_heat_map, native_detection
from .inference import compute_features, select_device
from .io import load_volume
from .model import AnomalyModel
from .spatial import scored_region, smooth_in_region


@dataclass
class Size:
    """How much of the cohort and of each training budget a run uses (``None``: all)."""

    train: int | None = None
    val: int | None = None
    healthy: int | None = None  # per test split
    lesioned: int | None = None
    autoencoder_steps: int = 1500
    gmm_locations_per_scan: int = 20000
    cost_scans: int = 3
    reference_train_steps: int = 3
    reference_levels_timed: int = 2
    reference_flow_locations: int = 131072


SIZES = {"default": Size(),
         "quick": Size(train=6, val=3, healthy=1, lesioned=2, autoencoder_steps=100,
                       gmm_locations_per_scan=5000, cost_scans=1, reference_train_steps=1,
                       reference_levels_timed=1, reference_flow_locations=16384)}


# -- method objects ------------------------------------------------------------------------
@dataclass
class Fitted:
    """What a method needs to score a model-space scan (``save``/``load``: the cost probes
    get it through a file)."""

    name: str
    zscore: VoxelZScore | None = None
    gmm: LocationGMM | None = None
    autoencoder: dict | None = None  # {"config": ..., "state": ...}
    restoration: RestorationConfig | None = None
    seconds_to_fit: float = 0.0
    notes: dict = field(default_factory=dict)
    identity: dict = field(default_factory=dict)  # what its maps depend on (cache key)

    def save(self, path: str | Path) -> Path:
        """Tensors and JSON text only, so ``load`` needs no pickle (``weights_only``)."""
        payload = {"name": self.name}
        if self.zscore is not None:
            payload["zscore"] = {"mean": torch.from_numpy(self.zscore.mean),
                                 "sd": torch.from_numpy(self.zscore.sd)}
        if self.gmm is not None:
            g = self.gmm.model
            payload["gmm"] = {key: torch.from_numpy(np.asarray(value, np.float64)) for key, value in
                              (("mean", self.gmm.mean), ("sd", self.gmm.sd),
                               ("weights", g.weights_), ("means", g.means_),
                               ("covariances", g.covariances_),
                               ("precisions_cholesky", g.precisions_cholesky_))}
        if self.autoencoder is not None:
            payload["autoencoder"] = {"config": json.dumps(self.autoencoder["config"]),
                                      "in_channels": int(self.autoencoder["in_channels"]),
                                      "state": self.autoencoder["state"]}
        if self.restoration is not None:
            payload["restoration"] = json.dumps(asdict(self.restoration))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        torch.save(payload, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Fitted:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        fitted = cls(payload["name"])
        if "zscore" in payload:
            fitted.zscore = VoxelZScore(payload["zscore"]["mean"].numpy(),
                                        payload["zscore"]["sd"].numpy())
        if "gmm" in payload:
            from sklearn.mixture import GaussianMixture

            g = {k: v.numpy() for k, v in payload["gmm"].items()}
            model = GaussianMixture(len(g["weights"]), covariance_type="full")
            model.weights_, model.means_ = g["weights"], g["means"]
            model.covariances_, model.precisions_cholesky_ = (g["covariances"],
                                                              g["precisions_cholesky"])
            fitted.gmm = LocationGMM(g["mean"], g["sd"], model)
        if "autoencoder" in payload:
            ae = payload["autoencoder"]
            fitted.autoencoder = {"config": json.loads(ae["config"]),
                                  "in_channels": ae["in_channels"], "state": ae["state"]}
        if "restoration" in payload:
            fitted.restoration = RestorationConfig(**json.loads(payload["restoration"]))
        return fitted


def raw_map(fitted: Fitted, model: AnomalyModel, scan, local, device, ae_net=None):
    """The method's model-grid score map ``(X, Y, Z)`` before post-processing. ``local``:
    the scan's ``(L, X, Y, Z)`` score norms (spatial-msma and msma-gmm only)."""
    region = scored_region(scan.brain_mask, model.calibration.rim_mm, model.spacing_mm)
    if fitted.name == "spatial-msma":
        if local is None:  # an intensity-only flow: no score norms were computed
            local = np.zeros((0, *scan.brain_mask.shape), np.float32)
        return model_heat_map(model, scan.image, scan.brain_mask, local, device)
    if fitted.name == "voxel-zscore":
        raw = fitted.zscore.score(scan.image)
    elif fitted.name == "msma-gmm":
        raw = fitted.gmm.score(local, region)
    elif fitted.name == "autoencoder":
        raw = reconstruction_residual(ae_net, scan.image, scan.brain_mask, device)
    elif fitted.name == "restoration":
        raw = restoration_residual(model.score_net.to(device), scan.image, scan.brain_mask,
                                   fitted.restoration, device)
    else:
        raise ValueError(fitted.name)
    return smooth_in_region(raw, region, model.calibration.smoothing_mm / model.spacing_mm)


def load_ae(fitted: Fitted, device):
    config = AutoencoderConfig(**fitted.autoencoder["config"])
    net = build_autoencoder(config, fitted.autoencoder["in_channels"])
    net.load_state_dict(fitted.autoencoder["state"])
    return net.to(device).eval()


def score_digest(model: AnomalyModel) -> str:
    """12 hex digits naming the score network (feature caches are keyed by it): the score
    checkpoint's SHA-256 from the provenance, else a hash of the network's weights."""
    known = model.provenance.get("score_checkpoint_sha256")
    if known:
        return known[:12]
    h = hashlib.sha256()
    for key, value in sorted(model.score_net.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:12]


def needs_features(name: str, model: AnomalyModel | None = None) -> bool:
    """Whether method ``name``'s map reads the score norms: the GMM always, Spatial-MSMA
    when its flow does (``model`` given; an intensity-only flow does not)."""
    if name == "spatial-msma" and model is not None:
        return bool(model.spatial.config.score_features)
    return name in ("spatial-msma", "msma-gmm")


# -- costs -----------------------------------------------------------------------------
def _peak_rss_gb() -> float:
    """This process's peak resident memory (GiB). Linux's ``VmHWM`` restarts at ``exec``;
    ``ru_maxrss`` does not (a spawned child would report its parent's size at fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def _probe(request: dict) -> dict:
    """In a fresh process: time one method from the model-space scan to native labels."""
    from .dataset import ScanFiles, model_space

    device = select_device(request["device"])
    model = AnomalyModel.load(request["model"])
    size = Size(**request["size"])
    rows = [ScanFiles(**{k: Path(v) if v and k != "id" else v for k, v in r.items()})
            for r in request["rows"]]
    scans = model_space(rows, request["cache"], model.spacing_mm, demons=model.demons,
                        brain_masks=model.brain_masks,
                        progress=False, version=model.preprocess_version,
                        channels=len(model.channel_names))
    name = request["name"]
    out = {"seconds": [], "stages": []}
    if name == "reference-scale":
        out.update(reference_scale_cost(model, scans[0], rows[0], size, device))
    else:
        fitted = Fitted.load(request["fitted"])
        ae_net = load_ae(fitted, device) if name == "autoencoder" else None
        holder = SimpleNamespace(calibration=model.calibration, heat_units=model.heat_units)
        for scan, row in zip(scans, rows, strict=True):
            brain = load_volume(row.brain_mask, what="brain mask").data > 0
            stages = {}
            t0 = time.perf_counter()
            local = None
            if needs_features(name):  # Spatial-MSMA: detect computes them for the report
                local, _ = compute_features(model, scan, device)
                stages["score_features"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            heat = raw_map(fitted, model, scan, local, device, ae_net)
            stages["map"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            native_detection(holder, heat, scan.mapping, brain)
            stages["post_process"] = time.perf_counter() - t1
            out["seconds"].append(time.perf_counter() - t0)
            out["stages"].append(stages)
    out["peak_rss_gb"] = _peak_rss_gb()
    return out


def measure_cost(name: str, fitted: Fitted | None, model_path, cache, rows, device,
                 size: Size, work: Path, timeout_s: float = 7200) -> dict:
    """Run ``_probe`` in a new Python process (``python -m SpatialMSMALib.baseline_harness
    REQUEST``: its own peak memory, nothing inherited) on the model-space scans of ``rows``
    (read from ``cache``). Failures come back as ``{"error": ...}``, never a hang."""
    import subprocess
    import sys

    work = Path(work) / "probes"
    work.mkdir(parents=True, exist_ok=True)
    request = {"name": name, "model": str(model_path), "cache": str(cache),
               "device": str(device), "size": asdict(size),
               "rows": [{k: (str(v) if v is not None else None) for k, v in asdict(r).items()}
                        for r in rows],
               "fitted": str(fitted.save(work / f"{name}.pt")) if fitted else None,
               "result": str(work / f"{name}.json")}
    request_path = work / f"{name}.request.json"
    request_path.write_text(json.dumps(request))
    Path(request["result"]).unlink(missing_ok=True)
    try:
        done = subprocess.run([sys.executable, "-m", "SpatialMSMALib.baseline_harness",
                               str(request_path)], capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"the cost probe ran longer than {timeout_s:.0f} s"}
    if done.returncode != 0 or not Path(request["result"]).exists():
        tail = (done.stderr or "").strip().splitlines()[-3:]
        return {"error": f"the cost probe failed (exit {done.returncode}): {' | '.join(tail)}"}
    result = json.loads(Path(request["result"]).read_text())
    if result.get("seconds"):
        result["seconds_per_volume"] = float(np.median(result["seconds"]))
    return result


def reference_scale_cost(model, scan, row, size: Size, device) -> dict:
    """A ~40M-parameter score network and a 20-layer 256-unit flow, trained for a few steps
    and timed at every voxel of the model grid: per-level and per-location costs are
    measured on ``reference_levels_timed`` levels and ``reference_flow_locations``
    locations and scaled linearly to 20 levels and the whole grid (stated in the output)."""
    from SpatialMSMALib.score import ScoreUNet
    from SpatialMSMALib.score.features import score_norm_features
    from SpatialMSMALib.spatial import (
        SpatialFlowConfig,
        build_spatial_flow,
        downsample_scan,
        normalised_positions,
    )

    levels = len(model.sigmas)
    net = ScoreUNet(3, scan.image.shape[0], (80, 160, 320, 640), 256).to(device)
    flow_config = SpatialFlowConfig(num_features=levels, in_channels=scan.image.shape[0],
                                    flow_layers=20, hidden=256)
    flow = build_spatial_flow(flow_config).to(device)
    params = {"score_network": sum(p.numel() for p in net.parameters()),
              "flow": sum(p.numel() for p in flow.parameters())}
    x = torch.from_numpy(scan.image).to(device)
    generator = torch.Generator().manual_seed(0)
    # brief training: denoising score matching on 32^3 crops, flow NLL on 4096 locations
    optimiser = torch.optim.Adam(list(net.parameters()) + list(flow.parameters()), 1e-4)
    index = torch.from_numpy(np.argwhere(scan.brain_mask))
    train_seconds = {"score_step": [], "flow_step": []}
    for _ in range(size.reference_train_steps):
        t0 = time.perf_counter()
        crop = x[:, 32:64, 40:72, 32:64][None].expand(2, -1, -1, -1, -1)
        sigma = model.sigmas[torch.randint(levels, (2,), generator=generator)].to(device)
        noise = torch.randn(crop.shape, generator=generator).to(device)
        target = -noise / sigma.view(-1, 1, 1, 1, 1)
        loss = ((net(crop + sigma.view(-1, 1, 1, 1, 1) * noise, sigma) - target) ** 2
                * sigma.view(-1, 1, 1, 1, 1) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        train_seconds["score_step"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pick = index[torch.randint(len(index), (4096,), generator=generator)]
        norms = torch.rand(4096, levels, generator=generator).to(device) + 0.1
        lowres = downsample_scan(x, flow_config.encoder_downsample)[None]
        owner = torch.zeros(4096, dtype=torch.long, device=device)
        loss = -flow(norms, normalised_positions(pick.to(device), scan.brain_mask.shape),
                     lowres, owner).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        train_seconds["flow_step"].append(time.perf_counter() - t0)
    net.eval()
    timed = size.reference_levels_timed
    t0 = time.perf_counter()
    local, _ = score_norm_features(net, x, model.sigmas[:timed], sigmas_per_pass=1)
    per_level = (time.perf_counter() - t0) / timed
    every_voxel = np.ones(scan.brain_mask.shape, bool)
    n_all = int(every_voxel.sum())
    subset = np.zeros(n_all, bool)
    subset[: size.reference_flow_locations] = True
    region = subset.reshape(every_voxel.shape)
    fake_local = torch.rand((levels, *every_voxel.shape), generator=generator) + 0.1
    t0 = time.perf_counter()
    flow.eval().heat_map(fake_local, scan.image, region, device=device)
    per_location = (time.perf_counter() - t0) / int(region.sum())
    holder = SimpleNamespace(calibration=model.calibration, heat_units=model.heat_units)
    brain = load_volume(row.brain_mask, what="brain mask").data > 0
    t0 = time.perf_counter()
    native_detection(holder, np.zeros(every_voxel.shape, np.float32), scan.mapping, brain)
    post = time.perf_counter() - t0
    del local
    stages = {"score_features": per_level * levels, "map": per_location * n_all,
              "post_process": post}
    return {"seconds": [sum(stages.values())], "stages": [stages], "parameters": params,
            "train_seconds_per_step": {k: float(np.median(v)) for k, v in
                                       train_seconds.items()},
            "measured": {"levels_timed": timed, "levels": levels,
                         "flow_locations_timed": int(region.sum()),
                         "grid_locations": n_all,
                         "note": "score network timed on the whole model grid for "
                                 f"{timed} of {levels} noise levels, flow on "
                                 f"{int(region.sum())} of {n_all} locations, both scaled "
                                 "linearly; its detection is not evaluated (trained for a "
                                 "few steps only)"}}




if __name__ == "__main__":  # the cost probe's process (see measure_cost)
    import sys

    probe_request = json.loads(Path(sys.argv[1]).read_text())
    probe_result = _probe(probe_request)
    Path(probe_request["result"]).write_text(json.dumps(probe_result))

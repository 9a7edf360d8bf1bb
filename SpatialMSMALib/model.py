"""The deployable anomaly model: one safe checkpoint file with everything inference needs.

``AnomalyModel`` holds the score network (EMA weights) with its noise schedule, the feature
settings, the preprocessing grid, and the MSMA typicality model (auxiliary density models and
their healthy reference scores), and the Spatial-MSMA flow with its calibration. It is what
the CLI, the Slicer module and the browser viewer load.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .errors import InputError
from .normative import NormativeContrast
from .preprocessing import (
    BRAIN_MASK_SOURCES,
    PREPROCESS_VERSION,
    DemonsConfig,
    PreprocessConfig,
)
from .registry import MODEL_DIR, REGISTRY, bundled_models  # noqa: F401 - re-exported
from .scan_standardization import ScanStandardization
from .score.features import FEATURE_VERSION
from .score.network import ScoreUNet
from .score.schedule import GeometricNoiseSchedule
from .spatial import (
    Calibration,
    FlowEnsemble,
    SpatialFlow,
    SpatialFlowConfig,
    flow_from_state,
)
from .typicality import TypicalityModel

MODEL_KIND = "spatial-msma-model"
BUNDLED_MODEL = MODEL_DIR / "spatial_msma.pt"


@dataclass
class FeatureConfig:
    neighbourhood: int = 3
    sigmas_per_pass: int = 2  # measured fastest on 2 cores (benchmarks/score_forward.py)
    margin: int = 8


@dataclass
class AnomalyModel:
    """Score network + schedule + settings (+ typicality model).

    Attributes:
        score_net: the noise-conditional network (eval mode, EMA weights).
        schedule: its noise levels; ``schedule.sigmas`` is ``(L,)``, descending.
        spacing_mm / shape: the model grid (see ``template.model_grid``).
        channel_names: e.g. ``["T1", "T2"]``; the input channels the network expects.
        features: score-norm feature settings.
        typicality: MSMA auxiliary models, or None.
        spatial: the Spatial-MSMA conditional flow (``SpatialFlow``, or a ``FlowEnsemble``
            of several, whose heat map is their mean NLL), or None (MSMA-only model).
        calibration: healthy heat-map quantiles and post-processing settings (with spatial).
        provenance: plain data on how it was made (checkpoint digests, cohort, steps).
        demons: the deformable preprocessing step its flow was trained with
            (``preprocessing.DemonsConfig``), or None (affine only).
        normative: the normative blob-contrast model fused with the flow's heat map
            (``normative.NormativeContrast``), or None (the flow's NLL alone).
        component_calibrations: with ``normative``: ``{"flow": ..., "normative": ...}``,
            each map's own healthy calibration, which turns it into evidence
            (``normative.fused_heat``); ``calibration`` is then that of the fused map.
        preprocess_version: the ``preprocessing.PREPROCESS_VERSION`` of the scans its
            typicality model and flow were fitted on (files without it: 1); detection
            repeats that version (``preprocess_config``).
        scan_standardization: ``{"flow": ..., "normative": ...}`` per-scan rules
            (``scan_standardization.ScanStandardization``) applied to each component map
            before its calibration, or None (maps used as they are).
        brain_masks: ``"given"`` (trained on scans with their brain masks; a scan without
            one takes the atlas mask) or ``"atlas"`` (trained with every scan's mask set
            aside; detection then sets a given mask aside too,
            ``PreprocessConfig.brain_masks``).
    """

    score_net: ScoreUNet
    schedule: GeometricNoiseSchedule
    spacing_mm: float = 2.0
    shape: tuple[int, int, int] = (96, 112, 96)
    channel_names: list = field(default_factory=lambda: ["T1", "T2"])
    features: FeatureConfig = field(default_factory=FeatureConfig)
    typicality: TypicalityModel | None = None
    spatial: SpatialFlow | None = None
    calibration: Calibration | None = None
    provenance: dict = field(default_factory=dict)
    demons: DemonsConfig | None = None
    preprocess_version: int = PREPROCESS_VERSION
    normative: NormativeContrast | None = None
    component_calibrations: dict | None = None
    scan_standardization: dict | None = None
    brain_masks: str = "given"

    @property
    def heat_units(self) -> str:
        """What a heat-map value is: the flow's NLL (``nats``), or for a model with the
        normative contrast model the summed healthy evidence of both maps
        (``-log10 FPR``, see ``normative.fused_heat``)."""
        return "nats" if self.normative is None else "-log10 FPR"

    @property
    def sigmas(self) -> torch.Tensor:
        return self.schedule.sigmas

    def preprocess_config(self) -> PreprocessConfig:
        """How scans are brought onto this model's grid (detection and training alike)."""
        return PreprocessConfig(spacing_mm=self.spacing_mm, shape=tuple(self.shape),
                                demons=self.demons, version=self.preprocess_version,
                                brain_masks=self.brain_masks)

    def feature_cache_name(self, digest: str | None = None) -> str:
        """Folder name of a feature cache of this score network on this model's model-space
        scans (a deformable model's scans differ, so it has its own). ``digest`` names the
        network; default: the first 12 hex digits of its checkpoint's SHA-256."""
        digest = digest or self.provenance["score_checkpoint_sha256"][:12]
        name = f"features_{digest}" + (f"_{self.demons.tag}" if self.demons else "")
        # features of scans preprocessed by the model's version of the pipeline
        name += f"_p{self.preprocess_version}" if self.preprocess_version > 1 else ""
        return name + f"_f{FEATURE_VERSION}"  # and computed by this version of the features

    @classmethod
    def from_score_checkpoint(cls, path: str | Path, **kwargs) -> AnomalyModel:
        """Build from a ``training/train_score.py`` checkpoint (EMA weights)."""
        from .score.training import CHECKPOINT_KIND, ScoreTrainConfig

        checkpoint = load_checkpoint(path, kind=CHECKPOINT_KIND)
        config = ScoreTrainConfig(**checkpoint["config"])
        extra = checkpoint["extra"]
        if "network" in extra:
            net = ScoreUNet.from_config(extra["network"])
        else:  # checkpoints written before the network config was stored
            net = config.build_model(extra["in_channels"], extra.get("spatial_dims", 3))
        net.load_state_dict(checkpoint["states"]["ema"])
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        provenance = {"score_checkpoint_sha256": digest,
                      "score_training_step": extra.get("total_steps", extra["step"]),
                      "score_train_config": checkpoint["config"]}
        if extra.get("initialised_from"):
            provenance["score_initialised_from"] = extra["initialised_from"]
        provenance.update(kwargs.pop("provenance", {}))
        channel_names = ["T1", "T2"][: extra["in_channels"]]
        return cls(net.eval(), config.schedule(), channel_names=channel_names,
                   provenance=provenance, **kwargs)

    @classmethod
    def from_score_source(cls, path: str | Path) -> AnomalyModel:
        """The score network of a ``train_score.py`` checkpoint, or of a model file (such as
        the bundled ``spatial_msma.pt``), for ``train_spatial.py`` to fit a new flow,
        calibration and typicality model on: a model file's own are dropped, its score
        network, grid and feature settings kept. ``provenance["score_checkpoint_sha256"]``
        identifies the score network either way (a model file's records the checkpoint it
        was built from), so feature caches are shared between the two sources.

        Raises:
            InputError: naming ``path`` if it is neither.
        """
        from .score.training import CHECKPOINT_KIND

        kind = load_checkpoint(path)["kind"]
        if kind == CHECKPOINT_KIND:
            return cls.from_score_checkpoint(path)
        if kind != MODEL_KIND:
            raise InputError(f"{path}: holds a '{kind}', neither a score checkpoint "
                             f"('{CHECKPOINT_KIND}') nor a model file ('{MODEL_KIND}')")
        model = cls.load(path)
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        kept = ("score_checkpoint_sha256", "score_training_step", "score_train_config",
                "score_initialised_from")
        provenance = {k: model.provenance[k] for k in kept if k in model.provenance}
        provenance.setdefault("score_checkpoint_sha256", digest)
        provenance["score_model_file"] = {"name": Path(path).name, "sha256": digest}
        return cls(model.score_net, model.schedule, spacing_mm=model.spacing_mm,
                   shape=model.shape, channel_names=model.channel_names,
                   features=model.features, provenance=provenance)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        config = {
            "score_net": self.score_net.config,
            "schedule": {"sigma_min": self.schedule.sigma_min,
                         "sigma_max": self.schedule.sigma_max,
                         "num_levels": self.schedule.num_levels},
            "spacing_mm": self.spacing_mm,
            "shape": list(self.shape),
            "channel_names": list(self.channel_names),
            "features": vars(self.features),
            "typicality": None,
            "spatial": None,
            "calibration": None,
            "demons": asdict(self.demons) if self.demons is not None else None,
            "preprocess_version": int(self.preprocess_version),
            "brain_masks": self.brain_masks,
        }
        states = {"score_net": self.score_net.state_dict()}
        if self.typicality is not None:
            config["typicality"], states["typicality"] = self.typicality.to_state()
        if self.spatial is not None:
            config["spatial"] = asdict(self.spatial.config)
            if isinstance(self.spatial, FlowEnsemble):
                config["spatial_members"] = len(self.spatial)
            states["spatial"] = {k: v.detach().cpu() for k, v in self.spatial.state_dict().items()}
        if self.calibration is not None:
            config["calibration"] = self.calibration.to_dict()
        if self.normative is not None:
            if set(self.component_calibrations or {}) != {"flow", "normative"}:
                raise ValueError("a model with a normative contrast model needs the flow's "
                                 "and the normative map's own calibrations")
            config["normative"], states["normative"] = self.normative.to_state()
            config["component_calibrations"] = {
                k: v.to_dict() for k, v in self.component_calibrations.items()}
        if self.scan_standardization is not None:
            config["scan_standardization"] = {
                k: v.to_dict() for k, v in self.scan_standardization.items()}
        return save_checkpoint(path, MODEL_KIND, config, states, {"provenance": self.provenance},
                               overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path | None = None) -> AnomalyModel:
        """Load a model file (default: the bundled model); raises InputError if unusable."""
        if path is None:
            path = BUNDLED_MODEL
            if not path.exists():
                raise InputError(
                    "no bundled model is installed yet: pass --model MODEL (a file written by "
                    "training/fit_msma.py)"
                )
        checkpoint = load_checkpoint(path, kind=MODEL_KIND)
        config = checkpoint["config"]
        version = config.get("preprocess_version", 1)
        if not isinstance(version, int) or version < 1:
            raise InputError(f"{path}: invalid preprocessing version {version!r} in the "
                             "model file (expected an integer >= 1)")
        if version > PREPROCESS_VERSION:
            raise InputError(
                f"{path}: fitted on scans of preprocessing version {version}, newer than "
                f"this library's ({PREPROCESS_VERSION}); upgrade SpatialMSMALib")
        brain_masks = config.get("brain_masks", "given")  # files before the option: given
        if brain_masks not in BRAIN_MASK_SOURCES:
            raise InputError(f"{path}: unknown brain-mask source {brain_masks!r} in the model "
                             f"file (expected one of {', '.join(BRAIN_MASK_SOURCES)})")
        net_config = config["score_net"]
        net = ScoreUNet.from_config(net_config)
        net.load_state_dict(checkpoint["states"]["score_net"])
        typicality = None
        if config.get("typicality") is not None:
            typicality = TypicalityModel.from_state(config["typicality"],
                                                    checkpoint["states"]["typicality"])
        spatial = None
        if config.get("spatial") is not None:
            members = config.get("spatial_members", 1)
            if not isinstance(members, int) or members < 1:
                raise InputError(f"{path}: invalid number of flows {members!r} in the model "
                                 "file (expected an integer >= 1)")
            try:
                spatial = flow_from_state(SpatialFlowConfig(**config["spatial"]),
                                          checkpoint["states"]["spatial"], members)
            except (RuntimeError, TypeError, ValueError) as e:  # weights unlike the config
                first_line = str(e).strip().splitlines()[0]
                raise InputError(f"{path}: the flow's weights do not match its configuration "
                                 f"({members} flow(s)): {first_line}") from None
        calibration = None
        if config.get("calibration") is not None:
            try:
                calibration = Calibration(**config["calibration"])
            except (TypeError, ValueError) as e:  # a newer library's fields, a bad value
                raise InputError(f"{path}: unusable calibration in the model file ({e}); "
                                 "a newer SpatialMSMALib may have written it") from None
        normative, component_calibrations = None, None
        if config.get("normative") is not None:
            try:
                normative = NormativeContrast.from_state(config["normative"],
                                                         checkpoint["states"]["normative"])
                component_calibrations = {k: Calibration(**v) for k, v in
                                          config["component_calibrations"].items()}
            except (KeyError, TypeError, ValueError) as e:
                raise InputError(f"{path}: unusable normative contrast model in the model "
                                 f"file ({e})") from None
        standardization = None
        if config.get("scan_standardization") is not None:
            try:
                standardization = {k: ScanStandardization(**v) for k, v in
                                   config["scan_standardization"].items()}
            except (TypeError, ValueError) as e:
                raise InputError(f"{path}: unusable per-scan standardisation in the model "
                                 f"file ({e})") from None
        s = config["schedule"]
        return cls(
            net.eval(),
            GeometricNoiseSchedule(s["sigma_min"], s["sigma_max"], s["num_levels"]),
            spacing_mm=config["spacing_mm"],
            shape=tuple(config["shape"]),
            channel_names=config["channel_names"],
            features=FeatureConfig(**config["features"]),
            typicality=typicality,
            spatial=spatial,
            calibration=calibration,
            provenance=checkpoint["extra"].get("provenance", {}),
            demons=DemonsConfig(**config["demons"]) if config.get("demons") else None,
            preprocess_version=version,
            normative=normative,
            component_calibrations=component_calibrations,
            scan_standardization=standardization,
            brain_masks=brain_masks,
        )

    def __post_init__(self):
        if self.score_net.config["spatial_dims"] == 3:
            # inference only: channels-last 3D weights let oneDNN use its fast kernels
            self.score_net.to(memory_format=torch.channels_last_3d)

    def to(self, device: str | torch.device) -> AnomalyModel:
        self.score_net.to(device)
        if self.spatial is not None:
            self.spatial.to(device)
        return self


def resolve_model(path: str | Path | None, has_t2: bool, t1_name=None,
                  has_mask: bool = True) -> AnomalyModel:
    """The model to run on a scan: ``path`` if given, else the bundled model whose channels
    match the inputs (T1 + T2, or T1 only) and, among those, the one made for scans with a
    brain mask (``brain_masks`` "given") or for scans without one ("atlas", trained with
    every mask set aside), as ``has_mask`` says; the other one when only one is installed.
    Refuses a T1-only scan for a two-channel model with a message that says what is
    missing."""
    scan = f"'{t1_name}'" if t1_name else "this scan"
    if path is not None:
        model = AnomalyModel.load(path)
        if len(model.channel_names) == 2 and not has_t2:
            raise InputError(f"model '{path}' needs T1 + T2; give --t2 for {scan} (or use a "
                             "T1-only model)")
        return model
    entries = bundled_models()
    wanted = ["T1", "T2"] if has_t2 else ["T1"]
    matching = [e for e in entries if e["channels"] == wanted]
    preferred = "given" if has_mask else "atlas"
    matching.sort(key=lambda e: e.get("brain_masks", "given") != preferred)
    for entry in matching:
        file = MODEL_DIR / entry["file"]
        if not file.exists():
            raise InputError(f"bundled model '{file}' listed in {REGISTRY.name} is missing; "
                             "reinstall the package")
        return AnomalyModel.load(file)
    if not has_t2 and any(e["channels"] == ["T1", "T2"] for e in entries):
        raise InputError(f"the bundled model needs T1 + T2 and no T1-only model is installed; "
                         f"give --t2 for {scan}")
    return AnomalyModel.load(None)

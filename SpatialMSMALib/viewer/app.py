"""``spatial-msma view``: the "Detect anomalies" flow of the Slicer module in a browser.

A trame-slicer application (real MRML scene, slice views and a 3D view rendered on the server
and streamed to the page) around the same Qt-free logic class as the 3D Slicer module,
:class:`SpatialMSMALib.slicer_logic.SpatialMSMALogic`:

- scans come from the configured data folder, from files named on the command line, from
  uploads (size-limited) or from the generated demo scan; every file name a client sends is
  resolved by :class:`~SpatialMSMALib.viewer.files.ScanSources`, which refuses anything else;
- "Detect anomalies" runs ``spatial-msma detect`` in a child process (progress from its tqdm
  output, Cancel terminates it), then shows its outputs with ``load_outputs``: heat map as the
  slice views' foreground, one segment per component, the components list;
- the threshold (voxel false-positive rate on healthy brains), minimum-size and opacity sliders
  re-threshold the stored heat map without running a network (``rethreshold``);
- clicking a component centres the views on it; "Export" downloads the segmentation
  (.seg.nrrd), the label volume (.nii.gz, byte-identical to the CLI's ``labels.nii.gz`` at the
  same operating point) or the heat map.

Rendering is offscreen (Mesa EGL by default: ``VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from ..errors import InputError
from .files import AccessError, ScanSources, UploadBatch

log = logging.getLogger(__name__)

#: Roles of the input scans, their labels in the page and whether they are label maps.
ROLES = {"t1": ("T1-weighted scan", False), "t2": ("T2-weighted scan (optional)", False),
         "mask": ("Brain mask (optional)", True)}
FPR_RANGE_LOG10 = (-4.0, -1.0)
#: the threshold slider's step (log10 of the voxel false-positive rate)
FPR_STEP_LOG10 = 0.05
#: Slider values arriving within this many seconds are applied as one re-threshold.
COALESCE_S = 0.03
#: export kind -> (downloaded file name, button text)
EXPORT_KINDS = {"seg.nrrd": ("anomalies.seg.nrrd", "Export .seg.nrrd"),
                "nii.gz": ("anomalies.nii.gz", "Export labels .nii.gz"),
                "heat.nii.gz": ("anomaly_heatmap.nii.gz", "Export heat map")}


def _trame():
    """trame imports, only where the viewer runs (the ``viewer`` extra)."""
    try:
        from trame.app import TrameApp
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise InputError("the browser viewer needs trame-slicer: pip install "
                         "'SpatialMSMALib[viewer]'") from e
    return TrameApp



def slider_position(fpr: float) -> float:
    """The threshold slider's position for voxel false-positive rate ``fpr``: its log10,
    clamped to :data:`FPR_RANGE_LOG10` and snapped to the slider's step grid (a value off
    the grid would be snapped by the slider at the first key press, so ten steps would not
    move it by ten steps). The rate in use is shown as text beside it."""
    low, high = FPR_RANGE_LOG10
    value = min(max(math.log10(max(fpr, 1e-12)), low), high)
    return round(low + round((value - low) / FPR_STEP_LOG10) * FPR_STEP_LOG10, 2)

class AnomalyViewer(_trame()):
    """The viewer application; keep a reference to it while the server runs (the views go
    black when the application object is garbage-collected).

    Args:
        sources: where scans may be read from (data folder, uploads, command-line files).
        work_dir: folder for detection runs and exports of this server.
        model_path: model file for detection (None: the bundled model matching the inputs).
        device: ``cpu``, ``cuda`` or ``auto`` for the detection process.
        initial: ``{"t1": choice, ...}`` selected when the page first loads.
        server: a trame server (None: the default one).
    """

    def __init__(self, sources: ScanSources, work_dir: Path, *, model_path=None,
                 device: str = "auto", initial: dict | None = None, server=None):
        super().__init__(server)
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories
        from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

        from ..slicer_logic import SpatialMSMALogic

        self.sources = sources
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.model_path = str(model_path) if model_path else None
        self.device = device
        self.server.enable_module(trame_slicer_module)
        self.slicer_app = SlicerApp()
        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.layout_manager = LayoutManager(self.slicer_app.scene,
                                            self.slicer_app.view_manager, self.server)
        views = {name: getattr(ViewLayoutDefinition, f"{name}_view")()
                 for name in ("axial", "coronal", "sagittal", "threed")}
        self.layout_manager.register_layout("four-up", Layout(LayoutDirection.Horizontal, [
            Layout(LayoutDirection.Vertical, [views["axial"], views["coronal"]]),
            Layout(LayoutDirection.Vertical, [views["sagittal"], views["threed"]])]))
        self.layout_manager.set_layout("four-up")
        self.logic = SpatialMSMALogic(self.slicer_app.scene)
        self.nodes: dict = dict.fromkeys(ROLES)
        self.loaded_choice: dict = dict.fromkeys(ROLES)
        self.process: asyncio.subprocess.Process | None = None
        self.cancelled = False
        self.run_count = 0
        self.upload: UploadBatch | None = None
        self._published: dict = {}
        self._pending: dict = {}
        self._pending_handle = None
        self._tasks: set = set()
        self._init_state(initial or {})
        self._build_ui()
        for role, choice in (initial or {}).items():
            if choice:
                self._load_role(role, choice)

    # -- state -------------------------------------------------------------------------
    def _init_state(self, initial: dict) -> None:
        s = self.state
        s.trame__title = "Spatial-MSMA anomaly detection"
        s.scan_choices = self.sources.choices()
        for role in ROLES:
            s[f"{role}_choice"] = initial.get(role)
        s.busy = False
        s.progress = 0
        s.status = "Choose a T1 scan (and T2), then Detect anomalies."
        s.error = ""
        s.warnings = ""
        s.has_result = False
        s.opacity = 0.5
        s.fpr_log10 = -2.0
        s.fpr_text = ""
        s.threshold_text = ""
        s.min_size_ml = 0.0
        s.components = []
        s.upload_limit_bytes = self.sources.upload_limit_bytes
        s.demo_busy = False
        s.result_version = 0
        s.volume_rendering = False
        s.loaded_roles = []
        s.change("t1_choice")(lambda t1_choice, **_: self._on_choice("t1", t1_choice))
        s.change("t2_choice")(lambda t2_choice, **_: self._on_choice("t2", t2_choice))
        s.change("mask_choice")(lambda mask_choice, **_: self._on_choice("mask", mask_choice))
        s.change("fpr_log10")(self._on_fpr)
        s.change("min_size_ml")(self._on_min_size)
        s.change("opacity")(self._on_opacity)
        s.change("volume_rendering")(self._on_volume_rendering)

    def _show_error(self, message: str) -> None:
        log.warning("viewer: %s", message)
        self.state.error = message

    # -- scans ---------------------------------------------------------------------------
    def _on_choice(self, role: str, choice) -> None:
        if choice == self.loaded_choice[role]:
            return
        if choice is None or choice == "":
            with self.state:
                self._remove_node(role)
                self._clear_result()
            return
        with self.state:
            self._load_role(role, choice)

    def _clear_result(self) -> None:
        """A new input invalidates the shown result: remove it (never show a heat map over
        another scan)."""
        if self.logic.detection is None and self.logic.heat_node is None:
            return
        self.logic.clear_result()
        self.state.has_result = False
        self.state.components = []
        self.state.status = "Inputs changed: detect again for a new result."

    def _remove_node(self, role: str) -> None:
        node = self.nodes.get(role)
        if node is not None and node.GetScene() is not None:
            self.slicer_app.scene.RemoveNode(node)
        self.nodes[role] = None
        self.loaded_choice[role] = None
        self.state.loaded_roles = [r for r, n in self.nodes.items() if n is not None]

    def _load_role(self, role: str, choice: str) -> None:
        """Read the chosen file (resolved by :class:`ScanSources`) into the scene."""
        from ..io import load_volume
        from ..slicer_logic import add_volume_node

        label, is_labelmap = ROLES[role]
        try:
            path = self.sources.resolve(choice)
            volume = load_volume(path, what=label)
        except InputError as e:  # keep what was loaded before
            self.state[f"{role}_choice"] = self.loaded_choice[role]
            self._show_error(str(e))
            return
        self._remove_node(role)
        self._clear_result()
        node = add_volume_node(self.slicer_app.scene, volume, f"{role.upper()} {path.name}",
                               labelmap=is_labelmap)
        node.SetAttribute("SpatialMSMA.path", str(path))
        self.nodes[role] = node
        self.loaded_choice[role] = choice
        self.state.loaded_roles = [r for r, n in self.nodes.items() if n is not None]
        self.state.error = ""
        if role == "t1":
            self._show_t1(node)
            self.state.status = f"Loaded {path.name}. Detect anomalies when ready."

    def _show_t1(self, node) -> None:
        """T1 as the slice views' background; the 3D view shows the three slice planes (with
        the heat map and segments on them) and, when asked, a volume rendering (seconds per
        frame on a CPU renderer, and it re-renders with every slider move)."""
        display = self.slicer_app.display_manager
        display.show_volume_in_slice_background(node)
        display.show_volume_in_slice_foreground(self.logic.heat_node)
        for view in self.slicer_app.view_manager.get_slice_views():
            view.set_visible_in_3d(True)
        self._on_volume_rendering(self.state.volume_rendering)
        display.reset_views()

    def _on_volume_rendering(self, volume_rendering, **_) -> None:
        node = self.nodes.get("t1")
        if node is None:
            return
        vr = self.slicer_app.volume_rendering
        if volume_rendering:
            vr_display = (vr.get_vr_display_node(node) if vr.has_vr_display_node(node)
                          else vr.create_display_node(node, ""))
            vr_display.SetVisibility(True)
        elif vr.has_vr_display_node(node):
            vr.get_vr_display_node(node).SetVisibility(False)

    def refresh_choices(self) -> None:
        self.state.scan_choices = self.sources.choices()

    async def make_demo(self) -> None:
        """Select the demo scan (the same sample as ``spatial-msma demo``; generated once
        into the cache, see :func:`SpatialMSMALib.demo.cached_sample`)."""
        from ..demo import cached_sample

        with self.state:
            self.state.demo_busy = True
            self.state.status = "Preparing the demo scan (simulated lesions)..."
        try:
            paths = await asyncio.to_thread(cached_sample)
            extra = [paths[key] for key in ("t1", "t2", "brain_mask")
                     if paths[key] not in self.sources.extra_files]
            self.sources.extra_files.extend(extra)
            with self.state:
                self.refresh_choices()
                self.state.t1_choice = self.sources.choice_for(paths["t1"])
                self.state.t2_choice = self.sources.choice_for(paths["t2"])
                self.state.mask_choice = self.sources.choice_for(paths["brain_mask"])
        except Exception as e:  # shown in the page
            with self.state:
                self._show_error(f"could not build the demo scan: {e}")
        finally:
            with self.state:
                self.state.demo_busy = False

    # -- uploads -------------------------------------------------------------------------
    def upload_chunk(self, files: list) -> None:
        """Called by the page's chunked uploader; an empty list ends the request."""
        if self.upload is None:
            self.upload = UploadBatch(self.sources.upload_limit_bytes)
        if files:
            if self.upload.files is None:
                return  # this request was already refused
            try:
                for client_file in files:
                    self.upload.add(client_file)
            except AccessError as e:
                self.upload.files = None
                with self.state:
                    self._show_error(str(e))
            return
        batch, self.upload = self.upload, None
        if batch.files:
            written = batch.save(self.sources.upload_dir)
            with self.state:
                self.refresh_choices()
                self.state.error = ""
                self.state.status = "Uploaded " + ", ".join(p.name for p in written)
                self._guess_roles(written)

    def _guess_roles(self, written: list[Path]) -> None:
        """Fill empty scan slots from uploaded file names that say t1 / t2 / mask."""
        for path in written:
            name = path.name.lower()
            role = ("mask" if "mask" in name else "t2" if "t2" in name
                    else "t1" if "t1" in name else None)
            if role and not self.state[f"{role}_choice"]:
                self.state[f"{role}_choice"] = f"upload:{path.name}"

    # -- detection -----------------------------------------------------------------------
    def detect(self) -> None:
        """Start detection in the background and return at once (a handler that awaited the
        whole run would keep trame's busy indicator animating, which costs a CPU renderer
        about a fifth of a core for the whole run)."""
        self._background(self._run_detection())

    def start_demo(self) -> None:
        self._background(self.make_demo())

    def _background(self, coroutine) -> None:
        """Run ``coroutine`` on the server's loop, holding a reference until it ends."""
        self._tasks.add(task := asyncio.ensure_future(coroutine))
        task.add_done_callback(self._tasks.discard)

    async def _run_detection(self) -> None:
        """Run ``spatial-msma detect`` on the chosen files in a child process."""
        from ..slicer_logic import cli_error_message, detect_command, parse_cli_progress

        if self.process is not None or self.state.busy:
            return
        state = self.state
        try:
            paths = {role: self.sources.resolve(state[f"{role}_choice"])
                     for role in ROLES if state[f"{role}_choice"]}
            if "t1" not in paths:
                raise InputError("choose a T1 scan first")
            self.run_count += 1
            out_dir = Path(tempfile.mkdtemp(prefix=f"run{self.run_count}_", dir=self.work_dir))
            args = detect_command(out_dir / "out", paths["t1"], paths.get("t2"),
                                  paths.get("mask"), model=self.model_path, device=self.device)
        except InputError as e:
            with state:
                self._show_error(str(e))
            return
        self.cancelled = False
        with state:
            state.busy, state.progress, state.error, state.warnings = True, 0, "", ""
            state.status = "Starting detection..."
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, *args, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env)
        if self.cancelled:  # Cancel arrived while the process was starting
            self.process.terminate()
        stderr_text = []

        async def read_stderr():
            while chunk := await self.process.stderr.read(4096):
                text = chunk.decode(errors="replace")
                stderr_text.append(text)
                percent, line = parse_cli_progress(text)
                with state:
                    if percent is not None:
                        state.progress = percent
                    if line:
                        state.status = line[-140:]

        stdout, _ = await asyncio.gather(self.process.stdout.read(), read_stderr())
        code = await self.process.wait()
        self.process = None
        with state:
            state.busy = False
            if self.cancelled:
                state.status, state.progress = "Detection cancelled.", 0
                return
            if code != 0:
                state.status = "Detection failed."
                self._show_error(cli_error_message("".join(stderr_text)))
                return
            try:
                self.logic.load_model(self.model_path, has_t2="t2" in paths,
                                      has_mask="mask" in paths)
                self.logic.load_outputs(out_dir / "out", reference_node=self.nodes["t1"])
                self.logic.set_heat_opacity(state.opacity)
            except InputError as e:
                self._show_error(f"could not show the result: {e}")
                return
            state.progress = 100
            state.warnings = " ".join(f"Warning: {w}" for w in self.logic.detection.warnings)
            self._publish_result()
            summary = stdout.decode(errors="replace").strip().splitlines()
            if summary:
                state.status = summary[0]

    def cancel(self) -> None:
        if not self.state.busy:
            return
        self.cancelled = True
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()

    # -- result and sliders --------------------------------------------------------------
    def _publish_result(self) -> None:
        """Copy the logic's current detection into the page state (sliders, list)."""
        detection = self.logic.detection
        state = self.state
        state.has_result = True
        self._published = {
            "fpr_log10": slider_position(detection.fpr),
            "min_size_ml": float(self.logic.operating.min_component_ml)}
        state.fpr_log10 = self._published["fpr_log10"]
        state.min_size_ml = self._published["min_size_ml"]
        state.fpr_text = f"{100 * detection.fpr:.3g} % of healthy brain voxels"
        state.threshold_text = f"{detection.threshold:.3f} {detection.heat_units}"
        state.status = (f"{len(detection.components)} components at voxel false-positive "
                        f"rate {100 * detection.fpr:.3g} %")
        state.components = [
            {"label": c.label, "title": f"Anomaly {c.label}: {c.volume_ml:.2f} mL",
             "subtitle": f"peak {c.peak_score:.2f} {detection.heat_units}, RAS "
                         + ", ".join(f"{v:.0f}" for v in c.centroid_ras_mm)}
            for c in detection.components]
        state.result_version += 1

    def _request(self, key: str, value: float) -> None:
        """Queue a slider value; bursts (dragging, key repeat) become one re-threshold with
        the latest values, run :data:`COALESCE_S` after the first of them. Values the server
        itself just published (echoed back by the state) are ignored."""
        if self.logic.detection is None:
            return
        if self._published.get(key) == value and key not in self._pending:
            return
        self._pending[key] = value
        if self._pending_handle is None:
            loop = asyncio.get_event_loop()
            self._pending_handle = loop.call_later(COALESCE_S, self._apply_pending)

    def _apply_pending(self) -> None:
        pending, self._pending, self._pending_handle = self._pending, {}, None
        kwargs = {}
        if "fpr_log10" in pending:
            kwargs["fpr"] = 10.0 ** float(pending["fpr_log10"])
        if "min_size_ml" in pending:
            kwargs["min_component_ml"] = float(pending["min_size_ml"])
        start = time.perf_counter()
        with self.state:
            try:
                self.logic.rethreshold(**kwargs)
            except InputError as e:
                self._show_error(str(e))
                return
            self._publish_result()
        log.debug("re-threshold %s in %.3f s", kwargs, time.perf_counter() - start)

    def _on_fpr(self, fpr_log10, **_):
        self._request("fpr_log10", float(fpr_log10))

    def _on_min_size(self, min_size_ml, **_):
        self._request("min_size_ml", float(min_size_ml))

    def _on_opacity(self, opacity, **_):
        if self.logic.heat_node is not None:
            self.logic.set_heat_opacity(float(opacity))

    def centre(self, label) -> None:
        try:
            self.logic.component_centre(int(label))
        except InputError as e:
            self._show_error(str(e))

    def export(self, kind: str):
        """Write the current result (``kind`` in :data:`EXPORT_KINDS`) and hand its bytes to
        the page, which saves them as a download."""
        if kind not in EXPORT_KINDS:
            raise AccessError(f"unknown export kind '{kind}'")
        folder = Path(tempfile.mkdtemp(prefix="export_", dir=self.work_dir))
        path = folder / EXPORT_KINDS[kind][0]
        if kind == "heat.nii.gz":
            self.logic.export_heat_map(path)
        else:
            self.logic.export_segmentation(path)
        return self.server.protocol.addAttachment(path.read_bytes())

    # -- page ----------------------------------------------------------------------------
    def _build_ui(self) -> None:
        from trame.ui.vuetify3 import SinglePageWithDrawerLayout
        from trame.widgets import html
        from trame.widgets import vuetify3 as v3

        chunk_trigger = self.server.trigger_name(self.upload_chunk)
        export_trigger = self.server.trigger_name(self.export)
        limit_mb = self.sources.upload_limit_bytes / 2**20
        upload_js = (
            "const files = $event.target.files; let total = 0;"
            "for (const f of files) { total += f.size; }"
            f"if (total > upload_limit_bytes) {{ error = 'upload refused: larger than the "
            f"limit of {limit_mb:.0f} MB (start the viewer with --upload-limit-mb to change "
            "it)'; }"
            f"else {{ window.load_files_by_chunks(files, {{ trigger_name: '{chunk_trigger}' }}); }}"
        )
        with SinglePageWithDrawerLayout(self.server, full_height=True) as self.ui:
            self.ui.title.set_text("Spatial-MSMA anomaly detection")
            with self.ui.toolbar:
                v3.VSpacer()
                html.Div("Research use only, not for clinical use",
                         classes="text-caption mr-4")
            with self.ui.drawer as drawer:
                drawer.width = 380
                with v3.VContainer(classes="pa-3"):
                    for role, (label, _) in ROLES.items():
                        v3.VSelect(label=label, items=("scan_choices",),
                                   v_model=(f"{role}_choice",), clearable=role != "t1",
                                   density="compact", hide_details=True, classes="mb-2",
                                   id=f"{role}-select", disabled=("busy",))
                    with html.Div(classes="d-flex align-center mb-2"):
                        v3.VFileInput(label="Upload scans", multiple=True,
                                      density="compact", hide_details=True,
                                      prepend_icon="mdi-upload", id="upload",
                                      accept=".nii,.nii.gz,.gz,.nrrd", change=upload_js,
                                      disabled=("busy",))
                        v3.VBtn("Demo scan", click=self.start_demo, id="demo-button",
                                loading=("demo_busy",), disabled=("busy",),
                                variant="tonal", classes="ml-2")
                    v3.VCheckbox(v_model=("volume_rendering",), density="compact",
                                 hide_details=True, id="volume-rendering",
                                 label="3D volume rendering (slow without a GPU)")
                    with html.Div(classes="d-flex mb-2"):
                        v3.VBtn("Detect anomalies", click=self.detect, color="primary",
                                id="detect-button", disabled=("busy || !t1_choice",),
                                classes="flex-grow-1")
                        v3.VBtn("Cancel", click=self.cancel, id="cancel-button",
                                disabled=("!busy",), variant="outlined", classes="ml-2")
                    v3.VProgressLinear(model_value=("progress",), height=6,
                                       indeterminate=("busy && progress === 0",),
                                       color="primary", classes="mb-1")
                    html.Div("{{ status }}", id="status", classes="text-caption mb-2")
                    html.Div("{{ result_version }}", id="result-version", style="display: none;")
                    v3.VAlert(text=("error",), type="error", density="compact",
                              v_show=("error",), closable=True, id="error",
                              classes="mb-2 text-caption")
                    v3.VAlert(text=("warnings",), type="warning", density="compact",
                              v_show=("warnings",), closable=True, id="warnings",
                              classes="mb-2 text-caption")
                    with html.Div(v_show=("has_result",), id="result-panel"):
                        v3.VDivider(classes="mb-2")
                        html.Div("Threshold: {{ fpr_text }} ({{ threshold_text }})",
                                 classes="text-caption", id="threshold-text")
                        v3.VSlider(v_model=("fpr_log10",), min=FPR_RANGE_LOG10[0],
                                   max=FPR_RANGE_LOG10[1], step=FPR_STEP_LOG10, id="fpr-slider",
                                   hide_details=True, density="compact",
                                   prepend_icon="mdi-tune-vertical")
                        html.Div("Minimum component size: {{ min_size_ml.toFixed(2) }} mL",
                                 classes="text-caption")
                        v3.VSlider(v_model=("min_size_ml",), min=0, max=5, step=0.05,
                                   id="min-size-slider", hide_details=True,
                                   density="compact", prepend_icon="mdi-resize")
                        html.Div("Heat-map opacity", classes="text-caption")
                        v3.VSlider(v_model=("opacity",), min=0, max=1, step=0.05,
                                   id="opacity-slider", hide_details=True,
                                   density="compact", prepend_icon="mdi-opacity")
                        html.Div("{{ components.length }} components (click to centre)",
                                 classes="text-caption mt-2", id="component-count")
                        with v3.VList(density="compact", max_height=220,
                                      classes="overflow-y-auto", id="components"):
                            v3.VListItem(v_for="c in components", key="c.label",
                                         title=("c.title",), subtitle=("c.subtitle",),
                                         click=(self.centre, "[c.label]"))
                        with html.Div(classes="d-flex flex-wrap mt-2"):
                            for kind, (name, text) in EXPORT_KINDS.items():
                                v3.VBtn(
                                    text, id=f"export-{kind.replace('.', '-')}", size="small",
                                    variant="tonal", classes="mr-1 mb-1",
                                    click=(f"utils.download('{name}', trigger('{export_trigger}',"
                                           f" ['{kind}']), 'application/octet-stream')"))
            with self.ui.content:
                with html.Div(classes="d-flex flex-row fill-height", style="height: 100%;"):
                    self.layout_manager.initialize_layout_grid(self.ui)


def serve(*, data_dir=None, files: dict | None = None, model_path=None, host="127.0.0.1",
          port: int = 8080, token: str | None = None, device: str = "auto",
          work_dir=None, upload_limit_mb: float = 512, open_browser: bool = False) -> int:
    """Start the viewer and block until it stops (Ctrl-C).

    Args:
        data_dir: folder whose scans clients may open (read-only), or None.
        files: ``{"t1": path, "t2": path, "mask": path}`` given on the command line; they are
            offered and selected when the page loads.
        token: access token, required when ``host`` is not a loopback address; clients open
            ``http://HOST:PORT/?secret=TOKEN``.
    """
    from .files import check_bind, check_port_free

    check_bind(host, token)
    check_port_free(host, port)
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="spatial_msma_view_"))
    sources = ScanSources(data_dir, work / "uploads",
                          upload_limit_bytes=int(upload_limit_mb * 2**20))
    initial = {}
    for role, path in (files or {}).items():
        if path is None:
            continue
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{ROLES[role][0]} '{path}' does not exist")
        sources.extra_files.append(path.resolve())
        initial[role] = sources.choice_for(path.resolve())
    from trame.app import get_server

    server = get_server("spatial_msma_view", client_type="vue3")
    # trame parses sys.argv for its own options: give it only what this command decided
    server.cli.set_defaults(authKey=token or "wslink-secret")
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        app = AnomalyViewer(sources, work, model_path=model_path, device=device,
                            initial=initial, server=server)
        url = f"http://{host}:{port}/" + (f"?secret={token}" if token else "")
        print(f"Spatial-MSMA viewer: open {url}", flush=True)
        app.server.start(host=host, port=port, open_browser=open_browser,
                         show_connection_info=False)
    finally:
        sys.argv = argv
    return 0

"""Browser viewer latency: page load -> first heat map on the demo scan, and slider ->
updated overlay, measured in Debian's headless chromium against a real `spatial-msma view`.

Each repeat starts a fresh server (new work folder, so the demo scan is generated again),
opens the page, clicks "Demo scan", clicks "Detect anomalies" and stops the clock when the
axial view first shows overlay pixels (the screenshot is polled). Then the threshold slider is
moved one step at a time (keyboard), alternating direction, and the time until the axial
view's pixels change is recorded (screenshot polling: each poll costs ~30-80 ms, so these are
upper bounds).

    python benchmarks/viewer_latency.py --repeats 3 --slider-moves 9 \
        --out benchmarks/results/viewer_latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from SpatialMSMALib.viewer import launch


def one_run(browser, work: Path, slider_moves: int) -> dict:
    process, url, _ = launch.start_viewer(work)
    try:
        t0 = time.perf_counter()
        vp = launch.ViewerPage.open(browser, url)
        t_page = time.perf_counter() - t0
        empty = vp.view_shot()
        vp.page.click("#demo-button")
        vp.wait_state("s.get('t1_choice') && s.get('mask_choice') && !s.get('demo_busy')",
                      timeout_s=300)
        anatomy = vp.settled_shot(previous=empty, poll_s=0.2)
        t_demo = time.perf_counter() - t0
        vp.page.click("#detect-button")
        vp.wait_state("s.get('busy')", timeout_s=60)
        deadline = time.time() + 900
        while time.time() < deadline:
            shot = vp.view_shot()
            if launch.overlay_pixels(shot) > 50 and vp.state("has_result"):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("no heat map within 15 minutes")
        t_heat = time.perf_counter() - t0
        if vp.state("error"):
            raise RuntimeError(vp.state("error"))
        latencies = []
        thumb = vp.page.locator(".v-slider:has(#fpr-slider) .v-slider-thumb")
        for move in range(slider_moves):
            before = vp.settled_shot(poll_s=0.3)
            thumb.focus()
            start = time.perf_counter()
            vp.page.keyboard.press("ArrowLeft" if move % 2 else "ArrowRight")
            changed = vp.first_change(before, timeout_s=10)
            latencies.append(None if changed is None else time.perf_counter() - start)
        vp.page.close()
        return {"page_ready_s": t_page, "demo_loaded_s": t_demo,
                "first_heat_map_s": t_heat, "detect_s": t_heat - t_demo,
                "slider_latency_s": latencies, "anatomy_std": float(anatomy.std())}
    finally:
        launch.stop_viewer(process)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slider-moves", type=int, default=9)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/viewer_latency.json"))
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    runs = []
    with sync_playwright() as p, tempfile.TemporaryDirectory() as tmp:
        browser = p.chromium.launch(executable_path=args.chromium, args=launch.CHROMIUM_ARGS)
        for repeat in range(args.repeats):
            run = one_run(browser, Path(tmp) / f"r{repeat}", args.slider_moves)
            print(f"repeat {repeat}: page {run['page_ready_s']:.1f} s, demo loaded "
                  f"{run['demo_loaded_s']:.1f} s, first heat map {run['first_heat_map_s']:.1f}"
                  f" s; slider " + ", ".join("-" if x is None else f"{x:.2f}"
                                             for x in run["slider_latency_s"]), flush=True)
            runs.append(run)
        browser.close()
    sliders = [x for run in runs for x in run["slider_latency_s"] if x is not None]
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                   "no GPU; chromium headless and the server on the same machine",
        "first_heat_map_s_median": statistics.median(r["first_heat_map_s"] for r in runs),
        "first_heat_map_s": [r["first_heat_map_s"] for r in runs],
        "detect_s_median": statistics.median(r["detect_s"] for r in runs),
        "slider_latency_s_median": statistics.median(sliders) if sliders else None,
        "slider_latency_s_max": max(sliders) if sliders else None,
        "slider_moves_without_change": sum(x is None for r in runs
                                           for x in r["slider_latency_s"]),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

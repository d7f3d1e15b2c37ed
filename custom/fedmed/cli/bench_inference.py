"""Inference throughput on CPU: images/s of the batched forward pass per batch size, end-to-end images/s of
scripts/infer's pipeline (DICOM decode, preprocessing, prediction, JSON/CSV, database log; with and without
Grad-CAM overlays), the cost of one Grad-CAM heatmap, and the latency of one study (model load included, as a
clinician's single-study call pays it). Writes docs/bench_inference.md.

    python scripts/bench_inference.py [--studies 64] [--image-size 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fedmed.data.synthetic import DEFAULT_HOSPITALS, write_site
from fedmed.inference.model_file import META_THRESHOLD_METHOD, META_THRESHOLDS, write_model_file
from fedmed.inference.predict import HeatmapMaker, Preprocessor, predict_batches
from fedmed.inference.run import InferenceOptions, run_inference
from fedmed.inference.studies import discover_studies, load_study
from fedmed.job.constants import CXR14_FINDINGS
from fedmed.models.network import build_densenet121
from fedmed.paths import CHECKOUT

KEY = b"benchmark-site-secret-0123456789"


def timed(fn, repeats: int) -> tuple[float, float]:
    """(best wall seconds, best CPU seconds of this process) over `repeats` calls. The machine is shared, so wall
    time depends on the neighbours; with one torch thread, CPU time is the steadier measure of the work itself."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return wall, cpu


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", type=int, default=64)
    p.add_argument("--stored-size", type=int, default=256, help="pixels stored in the generated DICOM")
    p.add_argument("--image-size", type=int, default=128, help="model input size (the job's default)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=CHECKOUT / "docs" / "bench_inference.md")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        labels = (rng.random((a.studies, len(CXR14_FINDINGS))) < 0.1).astype(int)
        with tqdm(total=a.studies, desc="generating studies") as bar:
            write_site(
                tmp / "site",
                labels,
                ["test"] * a.studies,
                DEFAULT_HOSPITALS[0].scanner,
                rng,
                a.stored_size,
                progress=bar.update,
            )
        dicom = tmp / "site" / "dicom"
        torch.manual_seed(0)
        model = build_densenet121(len(CXR14_FINDINGS)).eval()
        model_path = tmp / "global_model.pt"
        # Thresholds that make exactly one finding positive per study, so the heatmap run draws one overlay each.
        thresholds = {f: 1.01 for f in CXR14_FINDINGS}
        thresholds["Effusion"] = 0.0
        write_model_file(
            model_path,
            model.state_dict(),
            {"round": 0, "image_size": a.image_size, META_THRESHOLDS: thresholds, META_THRESHOLD_METHOD: "bench"},
        )

        prep = Preprocessor(a.image_size)
        images = torch.stack(
            [prep(im.pixels) for plan in discover_studies(dicom).studies for im in load_study(plan)[0]]
        )
        rows = []
        for batch in (1, 8, 32):
            predict_batches(model, images[:batch], batch)  # warm-up
            t, c = timed(lambda: predict_batches(model, images, batch), a.repeats)
            rows.append(("forward pass only", batch, len(images) / t, 1000 * c / len(images)))
            tqdm.write(f"forward, batch {batch}: {len(images) / t:.1f} images/s")

        cam = HeatmapMaker(build_densenet121(len(CXR14_FINDINGS)).eval(), CXR14_FINDINGS)
        cam(images[0], "Effusion")  # warm-up
        t_cam, c_cam = (x / 8 for x in timed(lambda: [cam(images[i], "Effusion") for i in range(8)], a.repeats))

        def pipeline(heatmaps: bool, batch: int, root: Path, out: str):
            return run_inference(
                root,
                model_path,
                InferenceOptions(
                    out_dir=tmp / out,
                    pseudonym_key=KEY,
                    batch_size=batch,
                    heatmaps=heatmaps,
                    record_dir=tmp / f"{out}-record",  # not the user's state dir
                ),
            )

        for heatmaps in (False, True):
            t, c = timed(lambda: pipeline(heatmaps, 16, dicom, f"run_{heatmaps}"), a.repeats)
            label = "scripts/infer pipeline" + (", 1 Grad-CAM overlay per study" if heatmaps else ", no overlays")
            rows.append((label, 16, a.studies / t, 1000 * c / a.studies))
            tqdm.write(f"{label}: {a.studies / t:.1f} images/s")

        one_study = sorted(dicom.iterdir())[0]
        latencies = [timed(lambda: pipeline(True, 16, one_study, f"one_{i}"), 1) for i in range(a.repeats)]
        latency_wall = statistics.median(w for w, _ in latencies)
        latency_cpu = statistics.median(c for _, c in latencies)

    lines = [
        "# Inference throughput (CPU)",
        "",
        f"`python scripts/bench_inference.py --studies {a.studies} --image-size {a.image_size} --threads {a.threads}` "
        f"on {platform.machine()} ({platform.processor() or 'cpu'}), torch {torch.__version__}, "
        f"{a.threads} torch thread(s); best of {a.repeats}. DenseNet-121, {a.image_size} px input, "
        f"{a.studies} synthetic one-image studies stored at {a.stored_size} px.",
        "",
        "images/s is wall-clock on a machine shared with other jobs (it moves with their load); CPU ms per image is "
        "this process's CPU time, the steadier figure of the work itself.",
        "",
        "| what | batch | images/s (wall) | CPU ms per image |",
        "|---|---|---|---|",
        *[f"| {what} | {batch} | {ips:.1f} | {ms:.0f} |" for what, batch, ips, ms in rows],
        "",
        f"One Grad-CAM heatmap (forward + backward of one image): {1000 * t_cam:.0f} ms wall, {1000 * c_cam:.0f} ms CPU.",
        "",
        f"Latency of one study end to end (model file read, network built, one image decoded and predicted, one overlay, "
        f"JSON/CSV/database written; Python start-up and imports not included): median "
        f"{1000 * latency_wall:.0f} ms wall, {1000 * latency_cpu:.0f} ms CPU over {a.repeats} runs.",
        "",
        "The pipeline rows include DICOM decoding, preprocessing, the JSON/CSV outputs and one database row per study; "
        "the overlay run draws one Grad-CAM overlay per study (one positive finding each, set by thresholds).",
    ]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

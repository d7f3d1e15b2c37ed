"""Benchmark: one FL round's bytes on the wire and wall time with no HE, selective HE (the classifier head) and
full-model HE, on DenseNet-121 (7.0 M values) with 3 hospitals.

    python scripts/bench_he.py [--sites 3] [--images 64] [--image-size 128] [--modes none,selective,full]
                               [--out docs/bench_he.md]

Each mode runs in its own process (so its peak memory is its own) through the same code the Executor and the
Controller run: the site encrypts its update (fedmed.security.ckks) and NVFlare serializes it exactly as it goes on
the wire (FLModel -> Shareable -> FOBS bytes); the server deserializes, validates (clear part and ciphertexts),
aggregates (geometric median on the clear part, then the homomorphic weighted sum with the median's weights) and
serializes the new global model for each site; a site deserializes and decrypts it. Full-model HE cannot use the
geometric median (the server cannot measure distances between ciphertexts), so it is FedAvg on ciphertexts.

Round wall time = one local training epoch (measured once on real synthetic images, the same for every mode) +
the slowest site's encode + the server's screen/aggregate/encode + a site's decode. Sites run in parallel in a
real federation, so per-site steps count once; network transfer time is left out (bytes are reported instead).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

from fedmed.cli.bench_sites import measure_training
from fedmed.paths import CHECKOUT

REPO = CHECKOUT

MODES = ("none", "selective", "full")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def site_updates(base: dict, k: int, seed: int) -> list[dict]:
    """K distinct site updates around one really trained model (sites differ, as real ones do)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(k):
        out.append(
            {
                n: (v + rng.normal(0, 1e-3, v.shape).astype(v.dtype)) if v.dtype.kind == "f" else v.copy()
                for n, v in base.items()
            }
        )
    return out


def measure_mode(mode: str, updates: list, global_params: dict, queue) -> None:
    """One round's transport, crypto and aggregation for `mode`; puts a dict of measurements on the queue."""
    import numpy as np
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from nvflare.app_common.decomposers import common_decomposers
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils
    from nvflare.fuel.utils import fobs

    from fedmed.flare.wire import to_site_result
    from fedmed.job import constants as C
    from fedmed.models.network import HEAD_PREFIX
    from fedmed.security import ckks
    from fedmed.server.aggregation import find_update_problem
    from fedmed.server.rounds import EncryptionSpec, RoundEngine, RoundRules

    common_decomposers.register()
    fobs.loads(fobs.dumps(FLModelUtils.to_shareable(FLModel(params={"warm": np.zeros(4)}))))  # first-call set-up
    rss0 = _peak_rss_mb()
    names: tuple = ()
    client_ctx = server_ctx = None
    if mode != "none":
        keys = ckks.generate_key_set()
        tmp = Path(REPO / "runs" / "bench_he" / f"keys_{mode}")
        ckks.write_key_files(keys, tmp / "server", [tmp / "site"])
        client_ctx = ckks.load_client_context(tmp / "site" / ckks.CLIENT_CONTEXT_FILE)
        server_ctx = ckks.load_server_context(tmp / "server" / ckks.SERVER_CONTEXT_FILE)
        selectors = (
            [HEAD_PREFIX] if mode == "selective" else [n for n, v in global_params.items() if v.dtype.kind == "f"]
        )
        names = ckks.resolve_encrypted_names(list(global_params), selectors)
    shapes = {n: global_params[n].shape for n in names}

    # Sites: encrypt the selected layers, serialize the update as NVFlare does.
    wire, encode_s = [], []
    for i, params in enumerate(updates):
        t0 = time.perf_counter()
        meta = {C.META_NUM_SAMPLES: 100 + 10 * i}
        if names:
            clear, block = ckks.encrypt_selected(params, names, client_ctx)
            meta[C.META_ENCRYPTED] = block.to_wire()
        else:
            clear = params
        wire.append(
            fobs.dumps(FLModelUtils.to_shareable(FLModel(params_type=ParamsType.FULL, params=clear, meta=meta)))
        )
        encode_s.append(time.perf_counter() - t0)

    # Server: deserialize, validate, aggregate, serialize the new global model.
    t0 = time.perf_counter()
    results = [FLModelUtils.from_shareable(fobs.loads(b)) for b in wire]
    sites = [f"site-{i}" for i in range(len(results))]
    if mode == "full":  # nothing in clear to take a median of (a benchmark-only mode): FedAvg on ciphertexts
        reference = {n: v for n, v in global_params.items() if n not in names}
        for r in results:
            problem = find_update_problem(r.params, reference) or ckks.find_encrypted_problem(
                r.meta[C.META_ENCRYPTED], names, shapes, server_ctx
            )
            if problem:
                raise RuntimeError(f"{mode}: update rejected: {problem}")
        counts = {s: r.meta[C.META_NUM_SAMPLES] for s, r in zip(sites, results)}
        clear_params = {n: v for n, v in results[0].params.items()}
        total = sum(counts.values())
        weights = {s: counts[s] / total for s in sites}
        meta = {"round": 0}
        blocks = [ckks.EncryptedLayers.from_wire(r.meta[C.META_ENCRYPTED]) for r in results]
        meta[C.META_ENCRYPTED] = ckks.weighted_sum(blocks, [weights[s] for s in sites], server_ctx).to_wire()
    else:  # the deployed server's round: the round engine, as the Controller calls it
        for s, r in zip(sites, results):
            r.meta["client_name"] = s  # what NVFlare's ModelController sets from the connection
        encryption = EncryptionSpec(server_ctx, names, shapes) if names else None
        engine = RoundEngine(RoundRules("geometric_median", min_clients=len(sites)), encryption)
        reference = {n: v for n, v in global_params.items() if n not in names}
        report = engine.step(0, reference, [to_site_result(r) for r in results], sites)
        if not report.aggregated or any(u.status != "accepted" for u in report.updates):
            raise RuntimeError(f"{mode}: round not aggregated as expected: {report.problem or report.updates}")
        clear_params, weights = report.params, report.weights
        meta = {"round": 0}
        if names:
            meta[C.META_ENCRYPTED] = report.encrypted.to_wire()
    down = fobs.dumps(FLModelUtils.to_shareable(FLModel(params_type=ParamsType.FULL, params=clear_params, meta=meta)))
    server_s = time.perf_counter() - t0

    # A site: deserialize and decrypt the global model.
    t0 = time.perf_counter()
    received = FLModelUtils.from_shareable(fobs.loads(down))
    if names:
        full = ckks.merge_decrypted(received.params, received.meta[C.META_ENCRYPTED], client_ctx)
    else:
        full = received.params
    decode_s = time.perf_counter() - t0
    # Check the round was right: the decrypted global model is the weighted combination of the updates.
    expected = sum(
        weights[s] * updates[i][names[0] if names else "class_layers.out.bias"].astype(np.float64)
        for i, s in enumerate(sites)
    )
    err = float(np.max(np.abs(full[names[0] if names else "class_layers.out.bias"] - expected)))
    queue.put(
        {
            "mode": mode,
            "encrypted_values": int(sum(np.prod(shapes[n]) for n in names)),
            "bytes_up": [len(b) for b in wire],
            "bytes_down": len(down),
            "encode_s": encode_s,
            "server_s": server_s,
            "decode_s": decode_s,
            "check_error": err,
            "peak_rss_mb": _peak_rss_mb(),
            "rss_before_mb": rss0,
        }
    )


def run_mode(mode: str, updates: list, global_params: dict) -> dict:
    ctx = mp.get_context("fork")  # the child inherits the updates without copying them through a pipe
    queue = ctx.Queue()
    proc = ctx.Process(target=measure_mode, args=(mode, updates, global_params, queue))
    proc.start()
    try:
        result = queue.get(timeout=3600)
    except Exception:
        result = None
    proc.join(timeout=60)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if result is None:
        return {"mode": mode, "failed": f"exit code {proc.exitcode} (out of memory if -9)"}
    return result


def write_report(rows: list, train_s: float, args, path: Path) -> None:
    base = next(r for r in rows if r["mode"] == "none")
    base_over = max(base["encode_s"]) + base["server_s"] + base["decode_s"]
    base_bytes = sum(base["bytes_up"]) + base["bytes_down"] * len(base["bytes_up"])
    lines = [
        "# bench_he: bytes on the wire and round time, no HE vs selective vs full-model HE",
        "",
        f"`python scripts/bench_he.py --sites {args.sites} --images {args.images} --image-size {args.image_size}` "
        f"on this machine ({time.strftime('%Y-%m-%d')}). DenseNet-121, 14 outputs; CKKS N=8192, coefficient modulus "
        "[60, 40, 40], scale 2^40 (TenSEAL 0.3.18). One local epoch on "
        f"{args.images} images at {args.image_size} px took **{train_s:.1f} s** (the same in every mode).",
        "",
        "| mode | values encrypted | bytes up per site | bytes down per site | round bytes (all sites) | x none | "
        "site encode s | server s | site decode s | HE/transport overhead s | x none | round s | x none | "
        "peak RSS MB | max error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['mode']} | | | | | | | | | | | | | failed: {r['failed']} | |")
            continue
        over = max(r["encode_s"]) + r["server_s"] + r["decode_s"]
        total_bytes = sum(r["bytes_up"]) + r["bytes_down"] * len(r["bytes_up"])
        lines.append(
            f"| {r['mode']} | {r['encrypted_values']:,} | {max(r['bytes_up']) / 1e6:.1f} MB | "
            f"{r['bytes_down'] / 1e6:.1f} MB | {total_bytes / 1e6:.1f} MB | {total_bytes / base_bytes:.3f} | "
            f"{max(r['encode_s']):.2f} | {r['server_s']:.2f} | {r['decode_s']:.2f} | {over:.2f} | "
            f"{over / base_over:.2f} | {train_s + over:.1f} | {(train_s + over) / (train_s + base_over):.3f} | "
            f"{r['peak_rss_mb']:.0f} | {r['check_error']:.1e} |"
        )
    lines += [
        "",
        "Round s = the local epoch + the slowest site's encode + the server + a site's decode (sites work in",
        "parallel; network time left out). Max error: decrypted global head vs the plaintext weighted combination.",
        "Targets: selective HE <= 1.10x plaintext round time and <= 1.10x bytes on the wire.",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    (path.with_suffix(".json")).write_text(json.dumps({"train_s": train_s, "rows": rows}, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--images", type=int, default=64, help="training images in the timed local epoch")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "bench_he.md")
    a = p.parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or "none" not in modes:
        p.error(f"--modes must include 'none' and only {MODES}, got {modes}")
    if a.sites < 1 or a.images < 4:
        p.error("--sites must be >= 1 and --images >= 4")
    import torch
    from tqdm import tqdm

    torch.set_num_threads(1)  # as at a site configured with one thread; keeps runs comparable on a busy machine
    print(f"[bench_he] timing one local epoch on {a.images} images at {a.image_size} px")
    train_s, start, trained = measure_training(a.images, a.image_size, a.seed)
    updates = site_updates(trained, a.sites, a.seed)
    rows = []
    for mode in tqdm(modes, desc="modes"):
        rows.append(run_mode(mode, updates, start))
        tqdm.write(f"[bench_he] {mode}: {json.dumps({k: v for k, v in rows[-1].items() if k != 'mode'})[:300]}")
    write_report(rows, train_s, a, a.out)
    print(a.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Red team: every attack one hostile hospital can make, and the published colluding attacks by one or two
hospitals (fedmed.sim.redteam.COLLUSION_ROWS), played through fedmed's round engine in-process.

    fedmed-redteam [--rounds 3] [--per-site 100] [--image-size 64] [--out docs/redteam.md]

Writes one row per attack (what the server did, what the database holds, final AUROC against the honest sites
alone) to --out, and exits 1 if any attack was not held. The logic is fedmed.sim.redteam; this is its command line.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fedmed.sim import redteam


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/redteam"), help="synthetic hospitals (generated once)")
    p.add_argument("--honest", type=int, default=4, help="honest hospitals beside the hostile one")
    p.add_argument("--per-site", type=int, default=100)
    p.add_argument("--num-test", type=int, default=200)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument(
        "--attack-from",
        type=int,
        default=2,
        help="round (1-based) from which the hostile site attacks; before it, it is an honest hospital",
    )
    p.add_argument(
        "--validation",
        action="store_true",
        help="also screen by the server's validation score (the Controller's opt-in validation_images)",
    )
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: two processes with 2 OpenMP threads each on 2 cores can run 100x slower)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tolerance", type=float, default=0.02, help="AUROC distance to honest-only that counts as held")
    p.add_argument(
        "--extra-seeds",
        type=int,
        nargs="*",
        default=[1, 2],
        help="training seeds besides 0 over which an accepted attack's AUROC gap to the stayed-honest run is averaged "
        "(honest outcomes at this size spread over ~0.05 AUROC, so one run cannot judge 0.02); none: seed 0 alone",
    )
    p.add_argument(
        "--centred-clipping",
        action="store_true",
        help="combine by centred clipping around the server's momentum (RoundRules.centred_clipping; not with HE)",
    )
    p.add_argument("--only", nargs="*", help="attack kinds to run (default: all)")
    p.add_argument("--out", type=Path, default=Path("docs/redteam.md"))
    a = p.parse_args(argv)
    rows = [r for r in redteam.ROWS if not a.only or r.attack.kind in a.only]
    if a.centred_clipping:  # refused with HE by the round engine: the server cannot form an encrypted momentum
        rows = [r for r in rows if not r.he]
    if not rows:
        p.error(f"--only matches no attack; kinds: {[r.attack.kind for r in redteam.ROWS]}")
    torch.set_num_threads(a.threads)
    t0 = time.time()
    names = redteam.make_sites(a.data, a.honest, a.per_site, seed=0, num_test=a.num_test)
    if not 1 <= a.attack_from <= a.rounds:
        p.error(f"--attack-from must be in [1, --rounds], got {a.attack_from}")
    train, test, val = redteam.load_sites(a.data, names, a.image_size)
    bench = redteam.Bench(
        train, test, a.rounds, a.attack_from - 1, a.batch_size, val if a.validation else None, a.centred_clipping
    )
    refs = {}
    for he in sorted({r.he for r in rows}):
        refs[he] = redteam.honest_references(bench, he=he)
        tqdm.write(f"honest references{' (HE on)' if he else ''}: {refs[he]}")
    setup = (
        f"{a.honest} honest hospitals of {a.per_site} synthetic radiographs and one hostile hospital (same kind "
        f"of data; honest until round {a.attack_from}, it attacks from then on: a site that turns hostile; in the "
        "rows marked '2 colluding sites' the last honest hospital colludes with it and both send the crafted point), "
        f"{a.rounds} rounds from a fresh model, {a.image_size} px, geometric median with trust and quarantine"
        + (f", validation screening on {a.per_site} server images" if a.validation else "")
        + f", global test set of {a.num_test} images. 'Had it stayed honest' is the same federation, same "
        "seeds, with the hostile site honest in every round (with HE on for the HE rows). Held: the update "
        "rejected/quarantined/refused with a recorded reason in every round it attacked, or final AUROC no more "
        f"than {a.tolerance} below that"
        + (
            f" (for an accepted attack, the mean gap over training seeds 0, {', '.join(map(str, a.extra_seeds))}: "
            "one run's gap carries the honest spread shown below)"
            if a.extra_seeds
            else ""
        )
        + "."
    )
    command = "fedmed-redteam " + shlex.join(argv if argv is not None else sys.argv[1:])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as dbs:
        for row in tqdm(rows, desc="attacks"):
            # A folder per row: each record keeps its audit heads file beside it, which a second, new database in
            # the same folder would read as its own emptied chain (and refuse to write).
            row_dir = Path(dbs) / f"{row.attack.kind}-{row.colluders}"
            row_dir.mkdir()
            res = redteam.run_row(row, bench, refs[row.he], row_dir, a.tolerance, a.extra_seeds)
            tqdm.write(
                f"{row.name}: {'held' if res.held else 'NOT HELD'} ({res.how}); AUROC {res.auroc:.3f} vs "
                f"{res.honest_auroc:.3f} had it stayed honest"
            )
            results.append(res)
            if len(results) < len(rows):  # a run cut short (an hour or more on a shared CPU) still leaves its rows
                so_far = redteam.markdown(results, command.strip(), time.time() - t0, setup)
                a.out.write_text(f"**Partial: {len(results)} of {len(rows)} rows so far.**\n\n{so_far}")
    text = redteam.markdown(results, command.strip(), time.time() - t0, setup)
    a.out.write_text(text)
    print(text)
    return 0 if all(r.held for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

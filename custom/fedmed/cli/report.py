"""Write an HTML report (the global model's score per round, named for what it is: global test or the sites'
weighted validation; test loss when there is a test set; per-site trust, privacy spend, update decisions; the
cross-site evaluation's site x model heatmap) with the same figures as PNG, from the database.
RUN: the run number, its uid or a unique prefix (as fedmed-rounds and fedmed-submit --resume take it). A wrong URL,
a database that does not exist (nothing is created) or an unknown run is one line, exit 2.

    fedmed-report --out runs/report [--db-url URL] [--run-id RUN]   (default $FEDMED_DB_URL, latest run)
        [--model best_model.pt]     (its model card and not-for-clinical-use line head the report)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedmed.cli.reading import ReadError, open_reader, pick_run
from fedmed.display.report import write_report
from fedmed.job.constants import ENV_DB_URL


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db-url", default=os.environ.get(ENV_DB_URL))
    p.add_argument("--run-id", metavar="RUN", help="run number, uid or a unique prefix of it (default: the latest)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", type=Path, help="the run's global or best model file: its model card is shown")
    a = p.parse_args(argv)
    if not a.db_url:
        p.error(f"give --db-url or set {ENV_DB_URL}")
    try:
        repo = open_reader(a.db_url)
    except ReadError as e:
        print(f"fedmed-report: {e}", file=sys.stderr)
        return 2
    try:
        run_id = pick_run(repo, a.run_id)
        model = None
        if a.model:
            from fedmed.inference.model_file import read_model_file

            model = read_model_file(a.model)
        path = write_report(repo, run_id, a.out, model)
    except ReadError as e:
        print(f"fedmed-report: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"cannot write report: {e}", file=sys.stderr)
        return 1
    finally:
        repo.close()
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Write tests/data/record_0012.json with fedmed at commit 139cc06 (Alembic head 0012, update digests by SHA-256):
PYTHONPATH=<checkout of 139cc06>/custom python tests/data/make_record_0012.py tests/data/record_0012.json WORKDIR
"""

import datetime as dt, hashlib, json, sys
from pathlib import Path
from sqlalchemy import MetaData, create_engine, select
from fedmed.store.repository import AlertRecord, Repository, RoundRecord, UpdateRecord

out, work = Path(sys.argv[1]), Path(sys.argv[2])
work.mkdir(parents=True, exist_ok=True)
db = work / "fedmed.db"
key = bytes(range(32))
heads = work / "audit_heads.log"
url = f"sqlite:///{db}"
repo = Repository(url, audit_key=key, heads_file=heads)
repo.start_run("old-run", "demo", "job-old", "geometric_median", 2, {"lr": 1e-3})
for n in (1, 2):
    sha = lambda s: hashlib.sha256(f"{s}:{n}".encode()).hexdigest()
    repo.record_round(
        "old-run",
        RoundRecord(
            n,
            (
                UpdateRecord(
                    "hospital-a",
                    "accepted",
                    100,
                    update_norm=1.5,
                    update_sha256=sha("a"),
                    trust=0.9,
                    epsilon=1.0 + n,
                    delta=1e-5,
                    metrics={"val_auroc/Mass": 0.7},
                ),
                UpdateRecord("hospital-b", "rejected", 80, reason="norm too large", update_sha256=sha("b"), trust=0.4),
            ),
            test_loss=0.3,
            score=0.6 + n / 100,
            score_name="mean_auroc",
            score_source="global_test",
            mean_auroc=0.6 + n / 100,
            test_metrics={"auroc/Mass": 0.6},
            alerts=(AlertRecord("hospital-b", "rejected", "norm too large"),),
        ),
    )
repo.finish_run("old-run", "finished", 2, 0.62)
assert repo.verify_audit() is None
repo.close()
engine = create_engine(url)
meta = MetaData()
meta.reflect(engine)


def plain(v):
    return v.isoformat() if isinstance(v, (dt.datetime, dt.date)) else v


tables = {}
with engine.connect() as c:
    rev = c.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    assert rev == "0012", rev
    for t in meta.sorted_tables:  # parents first: the loader inserts in this order
        name = t.name
        if name == "alembic_version":
            continue
        rows = [dict(r._mapping) for r in c.execute(select(t).order_by(*t.primary_key.columns))]
        tables[name] = [{k: plain(v) for k, v in r.items()} for r in rows]
out.write_text(
    json.dumps(
        {
            "_comment": "Written by fedmed at commit 139cc06 (Alembic revision 0012, update digests by SHA-256 in update_sha256) with audit key bytes(range(32)) by tests/data/make_record_0012.py; regenerate only from that code.",
            "audit_key_hex": key.hex(),
            "heads": heads.read_text().splitlines(),
            "tables": {k: v for k, v in tables.items() if v},
        },
        indent=1,
    )
    + "\n"
)
print({k: len(v) for k, v in tables.items() if v})

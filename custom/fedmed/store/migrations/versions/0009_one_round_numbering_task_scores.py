"""rounds numbered from 1; task-neutral score columns

Rounds were numbered from 0 in the database and from 1 in the logs, the report and the admin's progress: every
round_num (and runs.best_round) moves up by one, so the best model a log calls round 5 is round 5 here too. An alert
about the whole run had round_num -1; it becomes 0 ("no round").

rounds.test_mean_auroc held the mean AUROC, labelled "test" even when it came from the sites' validation scores and
not the task's score (the brain task scores accuracy): it becomes rounds.mean_auroc, and the round's score gets its own
columns: score (the task's score), score_name ("mean_auroc" for chest_xray14, "accuracy" for brain_mri) and
score_source ("global_test" when the round was scored on the server's test set, recognised by a recorded test loss,
else "site_validation"). client_updates gets val_score, the task's score on the site's validation set (its
val_mean_auroc stays what it was). For old brain runs the accuracy comes from round_metrics where it was recorded,
else the score stays NULL.

No value this revision keeps changes meaning, so a row as it was before can be recomputed from the row after (round
minus one, the old column name, without the new columns: fedmed.store.audit.rows_before_0009). The keyed audit
chain covers rows by their hashes: fedmed.store.repository writes one keyed "schema_migration" entry after this
revision, carrying each row's hash as it was before (checked against the chain by fedmed-audit-verify) and as it is
now, so an existing record keeps verifying and an edit made before the migration is still found.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29 21:10:00
"""

import json

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

ROUND_TABLES = ('rounds', 'client_updates', 'round_metrics', 'privacy_spend', 'alerts', 'site_trust')
# Frozen here (a migration must not change when fedmed.job.tasks does): each task's score when this revision was written.
SCORE_NAMES = {'chest_xray14': 'mean_auroc', 'brain_mri': 'accuracy'}
SHIFT = 1_000_000  # renumber through values no row holds, so (run, round) stays unique at every step


def _shift_rounds(delta: int) -> None:
    for table in ROUND_TABLES:
        op.execute(f"UPDATE {table} SET round_num = round_num + {SHIFT + delta}")
        op.execute(f"UPDATE {table} SET round_num = round_num - {SHIFT}")
    op.execute(f"UPDATE runs SET best_round = best_round + {delta} WHERE best_round IS NOT NULL")


def _task_of(config_json) -> str:
    try:
        return json.loads(config_json or '{}').get('task') or 'chest_xray14'
    except ValueError:
        return 'chest_xray14'


def upgrade() -> None:
    with op.batch_alter_table('rounds') as batch:
        batch.alter_column('test_mean_auroc', new_column_name='mean_auroc')
        batch.add_column(sa.Column('score', sa.Float(), nullable=True))
        batch.add_column(sa.Column('score_name', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('score_source', sa.String(length=30), nullable=True))
    with op.batch_alter_table('client_updates') as batch:
        batch.add_column(sa.Column('val_score', sa.Float(), nullable=True))
    conn = op.get_bind()
    for run_id, config_json in conn.execute(sa.text("SELECT id, config_json FROM runs")).all():
        name = SCORE_NAMES.get(_task_of(config_json), 'mean_auroc')
        params = {'run': run_id, 'name': name}
        conn.execute(
            sa.text(
                "UPDATE rounds SET score_name = :name, score_source = CASE WHEN test_loss IS NULL THEN 'site_validation' "
                "ELSE 'global_test' END WHERE run_id = :run"
            ),
            params,
        )
        if name == 'mean_auroc':
            conn.execute(sa.text("UPDATE rounds SET score = mean_auroc WHERE run_id = :run"), params)
            conn.execute(sa.text("UPDATE client_updates SET val_score = val_mean_auroc WHERE run_id = :run"), params)
            continue
        conn.execute(
            sa.text(
                "UPDATE rounds SET score = (SELECT m.value FROM round_metrics m WHERE m.run_id = rounds.run_id "
                "AND m.round_num = rounds.round_num AND m.scope = 'global_test' AND m.metric = :name) "
                "WHERE run_id = :run"
            ),
            params,
        )
        conn.execute(
            sa.text(
                "UPDATE client_updates SET val_score = (SELECT m.value FROM round_metrics m JOIN sites s "
                "ON s.name = m.scope WHERE m.run_id = client_updates.run_id AND m.round_num = client_updates.round_num "
                "AND s.id = client_updates.site_id AND m.metric = :metric) WHERE run_id = :run"
            ),
            {**params, 'metric': 'val_' + name},
        )
    _shift_rounds(+1)


def downgrade() -> None:
    _shift_rounds(-1)
    with op.batch_alter_table('client_updates') as batch:
        batch.drop_column('val_score')
    with op.batch_alter_table('rounds') as batch:
        batch.drop_column('score_source')
        batch.drop_column('score_name')
        batch.drop_column('score')
        batch.alter_column('mean_auroc', new_column_name='test_mean_auroc')

"""fedmed.flare.anchors: the Controller's record reads for fedmed.server.anchors, through one Repository held for the job."""

from dataclasses import asdict

from fedmed.flare.anchors import close_watch, open_watch
from fedmed.security import signing
from fedmed.store import receipts
from fedmed.store.repository import Repository


def _receipt(tmp_path) -> dict:
    """A well-formed receipt, signed by a server, naming a chain head this record never held."""
    signing.generate_site_keys(tmp_path / "server-keys", "server")
    server = signing.load_site_keys(tmp_path / "server-keys")
    return asdict(receipts.make_receipt("run-1", 3, receipts.ChainHead("a" * 64, 1, "0" * 64), server))


def test_the_watch_reads_the_record_through_one_repository_for_the_job_and_closes_it_at_the_end(tmp_path):
    url = f"sqlite:///{tmp_path / 'fedmed.db'}"
    Repository(url).close()  # the record the Controller's RunRecorder made
    raw, errors = _receipt(tmp_path), []
    watch = open_watch(url, None, errors.append)
    held = watch.receipt_check.repository()  # opened for the earlier ledger heads, kept
    answers = [watch.receipt_check(raw) for _ in range(3)]  # three sites (or rounds) echo a receipt
    assert errors == [] and all("the record was rewritten after the site received it" in a for a in answers)
    assert watch.receipt_check.repository() is held
    close_watch(watch)
    assert watch.receipt_check.repository() is not held  # closed: a check after the end opens a new one


def test_a_record_that_fails_a_read_is_logged_and_read_again_at_the_next_receipt(tmp_path):
    url = f"sqlite:///{tmp_path / 'fedmed.db'}"
    raw, errors = _receipt(tmp_path), []
    watch = open_watch(url, None, errors.append)  # no record yet: its earlier heads cannot be read
    assert errors == [
        "cannot read the sites' earlier ledger heads from the record (OperationalError); this job checks each "
        "site's ledger against its own earlier rounds only"
    ]
    assert watch.receipt_check(raw) is None  # not held against the site: the record could not answer
    assert errors[1] == "cannot check a site's audit receipt against the record (OperationalError)"
    Repository(url).close()  # the record is back
    assert "the record was rewritten after the site received it" in watch.receipt_check(raw)
    assert len(errors) == 2
    close_watch(watch)

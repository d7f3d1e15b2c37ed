"""fedmed.models.weights.save_state: a model saved again with the same content is copied from the file written last
with it (issue 30: a server round saved the same model 2-4 times, ~0.2 s of CPU each), never a stale one."""

import numpy as np
import torch

from fedmed.models import weights
from fedmed.models.weights import load_state, save_state


def state(seed) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((4, 3)).astype(np.float32), "n": np.array(7, np.int64)}


def serialisations(monkeypatch) -> list:
    """Counts the real torch.save calls save_state makes (it still runs)."""
    calls = []
    real = torch.save

    def counted(obj, f, *a, **kw):
        calls.append(str(f))
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(weights.torch, "save", counted)
    return calls


def same(path, params, meta):
    got, got_meta = load_state(path)
    assert got_meta == meta and set(got) == set(params)
    assert all(np.array_equal(got[k], params[k]) and got[k].dtype == params[k].dtype for k in params)


def test_the_same_model_saved_under_another_name_is_copied_and_loads_the_same(tmp_path, monkeypatch):
    calls = serialisations(monkeypatch)
    params, meta = state(0), {"round": 3, "card": {"sites": ["a", "b"]}}
    save_state(params, tmp_path / "global.pt", meta, reuse=True)
    save_state(params, tmp_path / "runs" / "round_0003.pt", meta, reuse=True)  # the run's copy of the round
    assert len(calls) == 1
    same(tmp_path / "global.pt", params, meta)
    same(tmp_path / "runs" / "round_0003.pt", params, meta)


def test_new_parameters_or_meta_are_serialised_afresh(tmp_path, monkeypatch):
    calls = serialisations(monkeypatch)
    params, meta = state(1), {"round": 1}
    save_state(params, tmp_path / "a.pt", meta, reuse=True)
    moved = {k: v.copy() for k, v in params.items()}
    moved["w"][0, 0] += 1  # one value changed
    save_state(moved, tmp_path / "b.pt", meta, reuse=True)
    save_state(params, tmp_path / "c.pt", {"round": 2}, reuse=True)  # same parameters, other meta
    assert len(calls) == 3
    same(tmp_path / "b.pt", moved, meta)
    same(tmp_path / "c.pt", params, {"round": 2})


def test_a_file_changed_on_disk_since_it_was_written_is_not_copied(tmp_path, monkeypatch):
    calls = serialisations(monkeypatch)
    params, meta = state(2), {"round": 5}
    save_state(params, tmp_path / "a.pt", meta, reuse=True)
    (tmp_path / "a.pt").write_bytes(b"not a model any more")  # someone else's write
    save_state(params, tmp_path / "b.pt", meta, reuse=True)
    assert len(calls) == 2
    same(tmp_path / "b.pt", params, meta)
    (tmp_path / "b.pt").unlink()  # gone: written afresh again
    save_state(params, tmp_path / "c.pt", meta, reuse=True)
    assert len(calls) == 3
    same(tmp_path / "c.pt", params, meta)


def test_without_reuse_every_save_is_serialised(tmp_path, monkeypatch):
    calls = serialisations(monkeypatch)
    params, meta = state(3), {"round": 1}
    save_state(params, tmp_path / "a.pt", meta)  # a site saving its one model a round: no digest, no copy
    save_state(params, tmp_path / "b.pt", meta)
    assert len(calls) == 2
    same(tmp_path / "b.pt", params, meta)


def test_the_parameter_digest_keeps_its_stream_name_dtype_shape_bytes():
    # Records of earlier runs hold this digest: the cached header must hash the very bytes str() gave.
    import hashlib

    from fedmed.models.weights import params_sha256

    params = {"b": np.arange(6, dtype=np.int64).reshape(2, 3), "a": np.ones((2, 2), np.float32).T}
    h = hashlib.sha256()
    for k in sorted(params):
        v = np.ascontiguousarray(params[k])
        h.update(k.encode() + str(v.dtype).encode() + str(v.shape).encode() + v.tobytes())
    assert params_sha256(params) == params_sha256(dict(params)) == h.hexdigest()


def hashes(monkeypatch) -> list:
    """Counts the real params_sha256 passes over a model (they still run)."""
    calls = []
    real = weights.params_sha256

    def counted(params):
        calls.append(len(params))
        return real(params)

    monkeypatch.setattr(weights, "params_sha256", counted)
    return calls


def test_a_remembered_digest_is_the_reuse_key_without_a_second_pass(tmp_path, monkeypatch):
    params, meta = state(4), {"round": 4}
    expected = weights.params_sha256(params)
    saved, hashed = serialisations(monkeypatch), hashes(monkeypatch)
    assert weights.remember_digest(params) == expected  # the server's one hash a round, for the record
    save_state(params, tmp_path / "global.pt", meta, reuse=True)
    save_state(params, tmp_path / "runs" / "round_0004.pt", meta, reuse=True)
    save_state(params, tmp_path / "best.pt", {**meta, "score": 0.7}, reuse=True)
    assert len(hashed) == 1 and len(saved) == 2  # one hash (remember_digest); the round copy copied
    same(tmp_path / "runs" / "round_0004.pt", params, meta)
    same(tmp_path / "best.pt", params, {**meta, "score": 0.7})


def test_a_replaced_array_is_hashed_afresh_and_never_copied_from_the_old_file(tmp_path, monkeypatch):
    saved, hashed = serialisations(monkeypatch), hashes(monkeypatch)
    params, meta = state(5), {"round": 5}
    weights.remember_digest(params)
    save_state(params, tmp_path / "a.pt", meta, reuse=True)
    params["w"] = params["w"] + 1  # the dict changed after its digest was taken
    save_state(params, tmp_path / "b.pt", meta, reuse=True)
    assert len(hashed) == 2 and len(saved) == 2
    same(tmp_path / "b.pt", params, meta)


def test_only_the_latest_remembered_model_is_held(tmp_path):
    first, second = state(6), state(7)
    weights.remember_digest(first)
    weights.remember_digest(second)
    assert [held for held, _, _ in weights._KNOWN] == [second]  # an older model's ~28 MB are not kept resident

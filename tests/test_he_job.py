"""Selective HE in the real NVFlare simulator: the server aggregates the head blind, holds no secret key, keeps the
global head encrypted, refuses a site with another federation's keys; the hospitals' copies are usable."""

import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedmed.data.loading import load_test
from fedmed.data.synthetic import DEFAULT_HOSPITALS, generate_hospitals
from fedmed.job import constants as C
from fedmed.job.tasks import CHEST_XRAY14
from fedmed.learning.training import evaluate, predict
from fedmed.models.network import HEAD_PREFIX, build_densenet121, load_numpy_state
from fedmed.security import ckks
from test_job import JOB, SITES, _simulate, _write_site_configs

HEAD = ("class_layers.out.weight", "class_layers.out.bias")


def _own_folder(path):
    """Each record in a folder of its own: records beside each other share the default audit key and heads file,
    and a second, empty record beside the first one's heads is refused (it reads as an emptied record)."""
    path.mkdir(parents=True, exist_ok=True)
    return path


def _server_app(ws):
    return ws / "cxr_densenet" / "server" / "simulate_job" / "app_server"


def _site_final_model(ws, site):
    path = ws / "cxr_densenet" / site / "simulate_job" / f"app_{site}" / "final_global_model.pt"
    return {k: v.numpy() for k, v in torch.load(path, weights_only=True)["state_dict"].items()}


def _evaluate(params, test):
    model = build_densenet121(14)
    load_numpy_state(model, params)
    return evaluate(model, test, CHEST_XRAY14).mean_auroc, predict(model, test, task=CHEST_XRAY14)[1]


@pytest.mark.integration
def test_he_run_matches_plain_run_and_server_never_holds_the_key(tiny_hospitals, tmp_path):
    _write_site_configs(tiny_hospitals, share={"hospital-a"})  # hospital-a's policy lends its local model
    common = ("--rounds", "2", "--aggregation", "fedavg")  # same weights in both runs: only HE differs
    try:
        plain_repo, plain_run = _simulate(
            tiny_hospitals, tmp_path / "plain", _own_folder(tmp_path / "plain-db") / "plain.db", *common
        )
        he_repo, he_run = _simulate(
            tiny_hospitals, tmp_path / "he", _own_folder(tmp_path / "he-db") / "he.db", *common, "--he"
        )
    finally:
        _write_site_configs(tiny_hospitals)

    # Cross-site evaluation with HE: every hospital scored the global model (its head decrypted at each site, never
    # at the server); no local model was asked for, not even hospital-a's, which it lends without HE.
    cross = {(c["model"], c["site"]): c for c in he_repo.cross_site_results(he_run)}
    assert len(cross) == 6 and all(cross[("global", s)]["status"] == "evaluated" for s in SITES)
    assert all(cross[(s, s)]["status"] == "not_shared" and "HE is on" in cross[(s, s)]["reason"] for s in SITES)
    plain_cross = {(c["model"], c["site"]): c["status"] for c in plain_repo.cross_site_results(plain_run)}
    assert all(plain_cross[("hospital-a", s)] == "evaluated" for s in SITES)

    ws = tmp_path / "he"
    server_ws = ws / "cxr_densenet" / "server"
    # No secret key anywhere in the server's workspace; its context is public.
    assert not list(server_ws.rglob(ckks.CLIENT_CONTEXT_FILE))
    server_ctx = ckks.load_server_context(server_ws / "startup" / ckks.SERVER_CONTEXT_FILE)
    assert server_ctx.context.is_private() is False

    # The server's global model keeps the head encrypted; the clear part has no head at all.
    saved = torch.load(_server_app(ws) / "global_model.pt", weights_only=True)
    assert not set(HEAD) & set(saved["state_dict"]) and len(saved["state_dict"]) > 300
    block = ckks.EncryptedLayers.from_wire(saved["meta"][C.META_ENCRYPTED])
    assert block.names == HEAD and block.key_id == server_ctx.key_id

    # Each hospital keeps a usable copy: the server's ciphertexts decrypt (with a hospital key) to that copy.
    hospital_key = ckks.load_client_context(ws / "cxr_densenet_he_keys" / "hospital-a" / ckks.CLIENT_CONTEXT_FILE)
    decrypted = ckks.merge_decrypted({k: v.numpy() for k, v in saved["state_dict"].items()}, block, hospital_key)
    copies = {site: _site_final_model(ws, site) for site in SITES}
    for site in SITES:
        assert set(copies[site]) == set(decrypted)
        for k in HEAD:
            np.testing.assert_allclose(copies[site][k], decrypted[k], atol=1e-6)

    # Every update was accepted, with the hash of its ciphertexts recorded (BLAKE3 since revision 0013).
    ups = he_repo.client_updates(he_run)
    assert len(ups) == 6 and all(u["status"] == "accepted" and len(u["update_blake3"]) == 64 for u in ups)
    assert all(u["update_sha256"] is None for u in ups)

    # Same training with HE as without, to within CKKS noise: final global test AUROC within 0.01.
    plain = torch.load(_server_app(tmp_path / "plain") / "global_model.pt", weights_only=True)["state_dict"]
    plain = {k: v.numpy() for k, v in plain.items()}
    for k in HEAD:
        assert np.max(np.abs(plain[k] - decrypted[k])) < 1e-3
    # Scored on 200 fresh test images (the 16-image tiny test set makes AUROC too coarse to compare at 0.01).
    generate_hospitals(tmp_path / "eval", [replace(DEFAULT_HOSPITALS[0], num_images=4)], num_test=200, seed=11, size=64)
    test = load_test(
        tmp_path / "eval" / "global_test" / "dicom", tmp_path / "eval" / "global_test" / "labels.csv", 64, CHEST_XRAY14
    )
    (auroc_plain, p_plain), (auroc_he, p_he) = _evaluate(plain, test), _evaluate(copies["hospital-b"], test)
    assert np.max(np.abs(p_plain - p_he)) < 0.01
    assert abs(auroc_plain - auroc_he) <= 0.01, (auroc_plain, auroc_he)


@pytest.mark.integration
def test_site_with_another_federations_keys_is_rejected_and_recorded(tiny_hospitals, tmp_path):
    """hospital-c's kit carries keys from another provisioning: its update is refused with the reason, the round
    goes on with the other two."""
    _write_site_configs(tiny_hospitals)
    ws, db = tmp_path / "ws", tmp_path / "foreign.db"
    driver = textwrap.dedent(f"""
        import importlib.util
        from pathlib import Path
        from fedmed.security import ckks
        from fedmed.flare.fedjob import he_keys_dir_for, prepare_simulator_keys, run_simulation
        spec = importlib.util.spec_from_file_location("job", {str(JOB)!r}); job = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(job)
        ws, sites, name = Path({str(ws)!r}), {list(SITES)!r}, job.CONFIG.name
        j = job.build_job(sites=sites, data_root=Path({str(tiny_hospitals)!r}), num_rounds=1, min_clients=2,
                          image_size=64, batch_size=4, he_layers=[{HEAD_PREFIX!r}], he_keys_dir=he_keys_dir_for(ws, name),
                          cross_site_eval=False)
        prepare_simulator_keys(ws, sites, name)
        ckks.write_key_files(ckks.generate_key_set(), ws / "elsewhere", [he_keys_dir_for(ws, name) / "hospital-c"])
        run_simulation(j, sites, ws, 3)
    """)
    env = dict(os.environ, FEDMED_DB_URL=f"sqlite:///{db}")
    proc = subprocess.run([sys.executable, "-c", driver], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from fedmed.store.repository import Repository

    repo = Repository(f"sqlite:///{db}", create_schema=False)
    run_id = repo.latest_run_id()
    assert repo.get_run(run_id).status == "finished"
    ups = {u["site"]: u for u in repo.client_updates(run_id)}
    assert ups["hospital-c"]["status"] == "rejected" and "another key set" in ups["hospital-c"]["reason"]
    assert ups["hospital-c"]["aggregation_weight"] in (None, 0.0)
    assert ups["hospital-a"]["status"] == "accepted" and ups["hospital-b"]["status"] == "accepted"
    assert ("hospital-c", "rejected") in [(a["site"], a["kind"]) for a in repo.alerts(run_id)]

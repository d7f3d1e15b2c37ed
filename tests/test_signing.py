"""A hospital's update and the server's global model carry ML-DSA-65 + Ed25519 signatures; forgers try to get past."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedmed.security import signing
from fedmed.security.signing import SignatureError

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "signing_keys.py"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    out = {}
    for site in ("hospital-a", "hospital-b", "server"):
        signing.generate_site_keys(root / site / "local", site)
        out[site] = signing.load_site_keys(root / site / "local")
    return out


def _update(**change):
    rng = np.random.default_rng(0)
    args = dict(
        job_id="job-1",
        round_num=3,
        site="hospital-a",
        params={
            "features.conv0.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
            "classifier.bias": np.zeros(14, np.float32),
        },
        encrypted_block={
            "names": ["classifier.weight"],
            "shapes": [[14, 8]],
            "chunks": [b"\x01" * 40, b"\x02" * 9],
            "key_id": "ctx-1",
        },
        num_samples=120,
        metrics={"train_loss": 0.4, "val_auroc/Mass": 0.7},
        privacy={"epsilon": 1.5, "delta": 1e-5},
    )
    args.update(change)
    return args


def test_a_signed_update_verifies(keys):
    digest = signing.update_digest(**_update())
    sig = signing.sign(digest, keys["hospital-a"])
    assert len(sig) == signing.SIGNATURE_BYTES == 3409
    assert signing.verify(digest, sig, keys["hospital-a"].public) is None


def test_a_missing_signature_is_refused_with_the_reason(keys):
    digest = signing.update_digest(**_update())
    for missing in (None, b""):
        with pytest.raises(SignatureError, match="unsigned: no signature from hospital-a"):
            signing.verify(digest, missing, keys["hospital-a"].public)
    with pytest.raises(SignatureError, match="must be bytes, got str"):
        signing.verify(digest, "c2lnbmF0dXJl", keys["hospital-a"].public)
    with pytest.raises(SignatureError, match="malformed signature: 100 bytes"):
        signing.verify(digest, b"FMS1" + b"\0" * 96, keys["hospital-a"].public)


@pytest.mark.parametrize(
    "change",
    [
        {
            "params": {
                "features.conv0.weight": np.ones((4, 3, 3, 3), np.float32),
                "classifier.bias": np.zeros(14, np.float32),
            }
        },
        {"num_samples": 100000},  # a site claims more data to weigh more
        {"metrics": {"train_loss": 0.4, "val_auroc/Mass": 0.99}},
        {"privacy": {"epsilon": 0.1, "delta": 1e-5}},
        {"round_num": 4},  # replaying last round's update
        {"job_id": "job-2"},
        {"site": "hospital-b"},
        {
            "encrypted_block": {
                "names": ["classifier.weight"],
                "shapes": [[14, 8]],
                "chunks": [b"\x01" * 40, b"\x03" * 9],
                "key_id": "ctx-1",
            }
        },
        {"encrypted_block": None},
    ],
)
def test_an_altered_update_fails_both_signatures(keys, change):
    sig = signing.sign(signing.update_digest(**_update()), keys["hospital-a"])
    altered = signing.update_digest(**_update(**change))
    with pytest.raises(SignatureError, match="Ed25519 and ML-DSA-65 signature of hospital-a does not verify"):
        signing.verify(altered, sig, keys["hospital-a"].public)


def test_the_digest_covers_dtype_shape_and_names_not_just_bytes():
    a = np.arange(6, dtype=np.float32)
    base = signing.update_digest(**_update(params={"w": a}))
    assert signing.update_digest(**_update(params={"w": a.view(np.int32)})) != base  # same bytes, other dtype
    assert signing.update_digest(**_update(params={"w": a.reshape(2, 3)})) != base
    assert signing.update_digest(**_update(params={"v": a})) != base
    assert signing.update_digest(**_update(params={"w": a.astype(">f4")})) != base  # other byte order
    assert signing.update_digest(**_update(params={"w": a.copy()})) == base
    assert signing.update_digest(
        **_update(params={"w": np.asfortranarray(a.reshape(2, 3)).T.copy().T})
    ) == signing.update_digest(**_update(params={"w": a.reshape(2, 3)}))  # memory layout does not matter


def test_one_half_of_the_hybrid_is_not_enough(keys):
    """A forger who breaks only Ed25519 (or only ML-DSA) still fails: each half is checked."""
    digest = signing.update_digest(**_update())
    sig = bytearray(signing.sign(digest, keys["hospital-a"]))
    ed_at = len(signing.MAGIC) + signing.FINGERPRINT
    forged_pq = bytes(sig[:-1]) + bytes([sig[-1] ^ 1])
    with pytest.raises(SignatureError, match=r"^ML-DSA-65 signature of hospital-a does not verify"):
        signing.verify(digest, forged_pq, keys["hospital-a"].public)
    forged_ed = bytes(sig[:ed_at]) + bytes([sig[ed_at] ^ 1]) + bytes(sig[ed_at + 1 :])
    with pytest.raises(SignatureError, match=r"^Ed25519 signature of hospital-a does not verify"):
        signing.verify(digest, forged_ed, keys["hospital-a"].public)


def test_a_signature_by_another_hospital_is_refused(keys):
    """hospital-b signs an update in hospital-a's name, first plainly, then claiming hospital-a's fingerprint."""
    digest = signing.update_digest(**_update())
    by_b = signing.sign(digest, keys["hospital-b"])
    with pytest.raises(SignatureError, match="not hospital-a's installed key"):
        signing.verify(digest, by_b, keys["hospital-a"].public)
    fp_a = keys["hospital-a"].public.fingerprint
    disguised = signing.MAGIC + fp_a + by_b[len(signing.MAGIC) + signing.FINGERPRINT :]
    with pytest.raises(SignatureError, match="Ed25519 and ML-DSA-65 signature of hospital-a does not verify"):
        signing.verify(digest, disguised, keys["hospital-a"].public)


def test_global_model_signatures_cannot_stand_in_for_updates(keys):
    params = _update()["params"]
    g = signing.global_model_digest("job-1", 3, params)
    sig = signing.sign_global_model(g, keys["server"])
    assert signing.verify_global_model(g, sig, keys["server"].public) is None
    with pytest.raises(SignatureError, match="global model was altered"):
        signing.verify_global_model(signing.global_model_digest("job-1", 4, params), sig, keys["server"].public)
    with pytest.raises(SignatureError, match="does not verify"):
        signing.verify(g, sig, keys["server"].public)  # the same bytes, as an 'update': another purpose


def test_unsignable_values_are_named():
    with pytest.raises(ValueError, match="non-finite"):
        signing.update_digest(**_update(metrics={"loss": float("nan")}))
    with pytest.raises(ValueError, match="dtype object"):
        signing.update_digest(**_update(params={"w": np.array([object()])}))
    with pytest.raises(ValueError, match="malformed encrypted block"):
        signing.update_digest(**_update(encrypted_block={"names": ["x"]}))
    with pytest.raises(ValueError, match="encrypted chunks must be bytes"):
        signing.update_digest(**_update(encrypted_block={"names": ["x"], "shapes": [[1]], "chunks": ["abc"]}))
    with pytest.raises(ValueError, match="32 bytes"):
        signing.sign(b"short", None)


def test_key_files_are_private_kept_and_checked(tmp_path):
    local = tmp_path / "kit" / "local"
    pub = signing.generate_site_keys(local, "hospital-a")
    assert stat.S_IMODE((local / signing.PRIVATE_FILE).stat().st_mode) == 0o600
    assert signing.load_site_keys(local).public.fingerprint == pub.fingerprint
    assert signing.load_public_keys(local / signing.PUBLIC_FILE).fingerprint == pub.fingerprint
    with pytest.raises(signing.KeyFileError, match="already exists"):
        signing.generate_site_keys(local, "hospital-a")
    assert signing.load_site_keys(local).public.fingerprint == pub.fingerprint  # not replaced
    os.chmod(local / signing.PRIVATE_FILE, 0o640)
    with pytest.raises(signing.KeyFileError, match="readable by others"):
        signing.load_site_keys(local)
    with pytest.raises(signing.KeyFileError, match="no signing key"):
        signing.load_site_keys(tmp_path / "nowhere")
    with pytest.raises(signing.KeyFileError, match="site name"):
        signing.generate_site_keys(tmp_path / "x", "../server")


def test_a_swapped_public_key_is_not_installed_quietly(tmp_path, keys):
    a = tmp_path / "a.pub"
    a.write_text(keys["hospital-a"].public.to_json())
    server_local = tmp_path / "server" / "local"
    dest = signing.install_public_keys(a, signing.site_key_path(server_local, "hospital-a"), "hospital-a")
    assert signing.install_public_keys(a, dest, "hospital-a") == dest  # the same key again: fine
    impostor = tmp_path / "impostor.pub"
    impostor.write_text(
        signing.PublicKeys("hospital-a", keys["hospital-b"].public.mldsa, keys["hospital-b"].public.ed25519).to_json()
    )
    with pytest.raises(signing.KeyFileError, match="already holds another key of 'hospital-a'"):
        signing.install_public_keys(impostor, dest, "hospital-a")
    with pytest.raises(signing.KeyFileError, match="is the key of 'hospital-a', not 'hospital-b'"):
        signing.install_public_keys(a, signing.site_key_path(server_local, "hospital-b"), "hospital-b")
    edited = json.loads(a.read_text())
    edited["ed25519"] = keys["hospital-b"].public.ed25519.public_bytes_raw().hex()  # half-swapped bundle
    bad = tmp_path / "bad.pub"
    bad.write_text(json.dumps(edited))
    with pytest.raises(signing.KeyFileError, match="fingerprint does not match"):
        signing.load_public_keys(bad)
    bad.write_text("{not json")
    with pytest.raises(signing.KeyFileError, match="malformed public key bundle"):
        signing.load_public_keys(bad)
    assert list(signing.load_site_public_keys(server_local)) == ["hospital-a"]


def test_the_key_commands_generate_export_and_install(tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120
        )

    hosp, server = tmp_path / "hospital-a", tmp_path / "server"
    assert run("generate", hosp, "hospital-a").returncode == 0
    assert run("generate", server, "server").returncode == 0
    out = run("export", hosp, "--out", tmp_path / "a.pub")
    assert out.returncode == 0 and "hospital-a: fingerprint" in out.stderr
    ok = run("install-site", server, tmp_path / "a.pub")
    assert ok.returncode == 0, ok.stderr
    assert (server / "local" / "site_keys" / "hospital-a.pub").is_file()
    assert run("install-server", hosp, server / "local" / signing.PUBLIC_FILE).returncode == 0
    wrong = run("install-server", hosp, tmp_path / "a.pub")
    assert wrong.returncode == 1 and "is the key of 'hospital-a', not 'server'" in wrong.stderr
    again = run("generate", hosp, "hospital-a")
    assert again.returncode == 1 and "already exists" in again.stderr


def _format_1(domain: bytes, fields: list) -> bytes:
    """The digest sites signed before BLAKE3 (format 1): SHA-256 over the same length-prefixed fields, each array's
    raw bytes in place of their BLAKE3."""
    import hashlib
    import struct

    h = hashlib.sha256()
    for b in [domain, *fields]:
        h.update(struct.pack(">Q", len(b)) + b)
    return h.digest()


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _format_1_update_digest(a: dict) -> bytes:
    names = sorted(a["params"])
    arrays = [np.ascontiguousarray(a["params"][n]) for n in names]
    enc = a["encrypted_block"]
    head = {"job_id": a["job_id"], "round": a["round_num"], "site": a["site"], "num_samples": a["num_samples"]}
    return _format_1(
        b"fedmed-update/1",
        [
            _canonical({**head, "metrics": a["metrics"], "privacy": a["privacy"]}),
            _canonical([[n, x.dtype.str, list(x.shape)] for n, x in zip(names, arrays)]),
            *(x.reshape(-1).view(np.uint8).tobytes() for x in arrays),
            _canonical({"names": enc["names"], "shapes": enc["shapes"], "key_id": enc["key_id"]}),
            _canonical(len(enc["chunks"])),
            *enc["chunks"],
        ],
    )


def test_a_signature_over_an_old_format_digest_never_verifies_as_the_new_one(keys, monkeypatch):
    """Format 1 (SHA-256, domain fedmed-update/1) is what sites signed before; the pinned value is what that code gave
    for this update (commit 139cc06). A signature over it, or over BLAKE3 under the old domain, fails the server's
    format-2 check."""
    old = _format_1_update_digest(_update())
    assert old.hex() == "65ecf30b248f806bca8f007f4aed6a53ab24f96aa365a80e2b1055b52065f49d"
    new = signing.update_digest(**_update())
    assert signing.DOMAIN_UPDATE == b"fedmed-update/2" and new != old
    with pytest.raises(SignatureError, match="Ed25519 and ML-DSA-65 signature of hospital-a does not verify"):
        signing.verify(new, signing.sign(old, keys["hospital-a"]), keys["hospital-a"].public)
    monkeypatch.setattr(signing, "DOMAIN_UPDATE", b"fedmed-update/1")
    old_domain = signing.update_digest(**_update())  # BLAKE3, the new layout, the old domain
    monkeypatch.undo()
    assert old_domain not in (new, old)
    with pytest.raises(SignatureError, match="does not verify"):
        signing.verify(new, signing.sign(old_domain, keys["hospital-a"]), keys["hospital-a"].public)
    params = _update()["params"]
    old_global = bytes.fromhex("522befd6202b4ab00991a9c75a7d6b3723c888b7f54951deed6fa78a6c4ea0e8")  # format 1
    with pytest.raises(SignatureError, match="global model was altered"):
        signing.verify_global_model(
            signing.global_model_digest("job-1", 3, params),
            signing.sign_global_model(old_global, keys["server"]),
            keys["server"].public,
        )


def test_the_signed_digest_reads_the_parameters_through_the_digest_the_server_records():
    """hash_params once serves both: its BLAKE3 is the recorded one (params_blake3, screening's update_pass), and the
    update digest built from it equals the one built from the arrays."""
    from fedmed.models.hashing import params_blake3
    from fedmed.server.passes import update_pass
    from fedmed.server.robust.geometric_median import distance_keys

    args = _update()
    params = args["params"]
    hashed = signing.hash_params(params)
    zero = {k: np.zeros_like(v) for k, v in params.items()}
    assert hashed.blake3 == params_blake3(params) == update_pass(params, zero, distance_keys(zero)).sha
    assert signing.update_digest(**{**args, "params": hashed}) == signing.update_digest(**args)
    assert signing.global_model_digest("j", 1, hashed) == signing.global_model_digest("j", 1, params)
    with pytest.raises(ValueError, match="parameter names must be strings"):
        signing.hash_params({1: np.zeros(2)})


def test_the_signing_module_loads_without_torch():
    """fedmed-signing-keys and the digests need no torch (its import alone takes ~2 s)."""
    code = "import sys, fedmed.security.signing; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stdout + out.stderr

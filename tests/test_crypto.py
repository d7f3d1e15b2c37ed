"""Selective CKKS encryption (real TenSEAL): packing, homomorphic weighted sum, key custody, validation."""

import numpy as np
import pytest
import tenseal as ts

from fedmed.models.network import HEAD_PREFIX, build_densenet121, state_to_numpy
from fedmed.security import ckks

HEAD_SHAPES = {"class_layers.out.weight": (14, 1024), "class_layers.out.bias": (14,)}
NAMES = tuple(HEAD_SHAPES)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """One federation's key files laid out as in startup kits: server/ and two hospitals."""
    root = tmp_path_factory.mktemp("kits")
    key_set = ckks.generate_key_set()
    ckks.write_key_files(key_set, root / "server", [root / "hospital-a", root / "hospital-b"])
    return {
        "root": root,
        "server": ckks.load_server_context(root / "server" / ckks.SERVER_CONTEXT_FILE),
        "client": ckks.load_client_context(root / "hospital-a" / ckks.CLIENT_CONTEXT_FILE),
    }


def _head(rng, scale=1.0):
    return {n: (scale * rng.normal(size=s)).astype(np.float32) for n, s in HEAD_SHAPES.items()}


def test_encrypted_weighted_sum_decrypts_to_the_plaintext_weighted_mean(keys, rng):
    # Sites differ in values and in weight (identical inputs would prove nothing about weighting).
    heads = [_head(rng, scale) for scale in (0.5, 1.0, 3.0)]
    weights = [0.15, 0.6, 0.25]
    blocks = [ckks.encrypt_layers(h, keys["client"]) for h in heads]
    assert len(blocks[0].chunks) == 4  # 14,350 values in 4,096-slot ciphertexts
    combined = ckks.weighted_sum(blocks, weights, keys["server"])  # the server: no secret key
    out = ckks.decrypt_layers(combined, keys["client"])
    for n in NAMES:
        expected = sum(w * h[n].astype(np.float64) for w, h in zip(weights, heads))
        assert out[n].shape == HEAD_SHAPES[n] and out[n].dtype == np.float32
        assert np.max(np.abs(out[n] - expected)) < 1e-3


def test_zero_weight_sites_contribute_nothing(keys, rng):
    heads = [_head(rng), _head(rng, 100.0)]
    combined = ckks.weighted_sum([ckks.encrypt_layers(h, keys["client"]) for h in heads], [1.0, 0.0], keys["server"])
    out = ckks.decrypt_layers(combined, keys["client"])
    assert np.max(np.abs(out[NAMES[0]] - heads[0][NAMES[0]])) < 1e-3
    with pytest.raises(ValueError, match="every weight is zero"):
        ckks.weighted_sum([ckks.encrypt_layers(heads[0], keys["client"])], [0.0], keys["server"])


def test_server_holds_no_secret_key_and_refuses_one(keys):
    server, root = keys["server"], keys["root"]
    assert server.context.is_private() is False
    assert not list((root / "server").rglob(ckks.CLIENT_CONTEXT_FILE))
    with pytest.raises(PermissionError, match="holds a CKKS secret key"):
        ckks.load_server_context(root / "hospital-a" / ckks.CLIENT_CONTEXT_FILE)
    with pytest.raises(PermissionError, match="needs the client context"):
        ckks.decrypt_layers(ckks.encrypt_layers({"b": np.ones(3)}, keys["client"]), server)


def test_client_context_must_hold_the_secret_key(keys, tmp_path):
    with pytest.raises(PermissionError, match="holds no CKKS secret key"):
        ckks.load_client_context(keys["root"] / "server" / ckks.SERVER_CONTEXT_FILE)
    with pytest.raises(FileNotFoundError, match="client_context.tenseal"):
        ckks.load_client_context(tmp_path / ckks.CLIENT_CONTEXT_FILE)
    (tmp_path / "junk.tenseal").write_bytes(b"not a context")
    with pytest.raises(ValueError, match="is not a TenSEAL context"):
        ckks.load_server_context(tmp_path / "junk.tenseal")


def test_key_id_ties_clients_to_the_server_context(keys):
    assert keys["client"].key_id == keys["server"].key_id
    assert len(keys["server"].key_id) == 64


def _other_federation(tmp_path):
    other = ckks.generate_key_set()
    ckks.write_key_files(other, tmp_path / "server", [tmp_path / "x"])
    return ckks.load_client_context(tmp_path / "x" / ckks.CLIENT_CONTEXT_FILE)


def _tampered(block: ckks.EncryptedLayers) -> dict:
    chunk = bytearray(block.chunks[1])
    mid = len(chunk) // 2
    chunk[mid : mid + 64] = bytes(b ^ 0xFF for b in chunk[mid : mid + 64])
    wire = block.to_wire()
    wire["chunks"][1] = bytes(chunk)
    return wire


def _small_params_ciphertext(block: ckks.EncryptedLayers) -> dict:
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=4096, coeff_mod_bit_sizes=[40, 20, 40])
    ctx.global_scale = 2**20
    wire = block.to_wire()
    wire["chunks"][0] = ts.ckks_vector(ctx, [0.0] * 100).serialize()
    return wire


@pytest.mark.parametrize(
    "case, expected",
    [
        ("ok", None),
        # a kit from another provisioning: its key id is not this federation's
        ("foreign_keys", "another key set"),
        # bytes flipped in transit or by a hostile site: the ciphertext no longer parses
        ("tampered", "unreadable"),
        # a ciphertext made with other CKKS parameters
        ("other_parameters", "unreadable"),
        ("missing_chunk", "ciphertext chunk(s), expected 4"),
        ("wrong_shape", "shape (1024, 14), expected (14, 1024)"),
        ("wrong_names", "differ from the job's"),
        ("not_a_mapping", "must be a mapping"),
        ("missing_field", "malformed encrypted block"),
    ],
)
def test_bad_encrypted_blocks_are_rejected_with_a_reason(keys, rng, tmp_path, case, expected):
    block = ckks.encrypt_layers(_head(rng), keys["client"])
    wire = {
        "ok": lambda: block.to_wire(),
        "foreign_keys": lambda: ckks.encrypt_layers(_head(rng), _other_federation(tmp_path)).to_wire(),
        "tampered": lambda: _tampered(block),
        "other_parameters": lambda: _small_params_ciphertext(block),
        "missing_chunk": lambda: {**block.to_wire(), "chunks": list(block.chunks[:3])},
        "wrong_shape": lambda: {**block.to_wire(), "shapes": [[1024, 14], [14]]},
        "wrong_names": lambda: {**block.to_wire(), "names": ["a", "b"]},
        "not_a_mapping": lambda: list(block.chunks),
        "missing_field": lambda: {"names": list(NAMES)},
    }[case]()
    problem = ckks.find_encrypted_problem(wire, NAMES, HEAD_SHAPES, keys["server"])
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and expected in problem


def test_selected_layers_round_trip_through_the_whole_model(keys):
    params = state_to_numpy(build_densenet121(14))
    names = ckks.resolve_encrypted_names(list(params), [HEAD_PREFIX])
    assert names == NAMES
    clear, block = ckks.encrypt_selected(params, names, keys["client"])
    assert not set(names) & set(clear) and len(clear) == len(params) - 2
    full = ckks.merge_decrypted(clear, block.to_wire(), keys["client"])
    assert set(full) == set(params)
    for n in names:
        assert np.max(np.abs(full[n] - params[n])) < 1e-4


def test_a_site_with_other_keys_refuses_the_global_model(keys, rng, tmp_path):
    block = ckks.encrypt_layers(_head(rng), keys["client"])
    with pytest.raises(ckks.EncryptedUpdateError, match="another provisioning"):
        ckks.merge_decrypted({}, block.to_wire(), _other_federation(tmp_path))


@pytest.mark.parametrize(
    "selectors, match",
    [
        (["class_layers.out.weight", "class_layers.out.bias"], None),  # exact names
        (["class_layers.out.bias", "class_layers.out."], None),  # overlapping selectors: model order, no repeats
        (["class_layers.*"], "matches no model parameter"),  # a regex is not a selector (NVFlare's broke export)
        (["class_layers.out"], "matches no model parameter"),  # a prefix must end in '.'
        ([], "no layers selected"),
        ([""], "non-empty strings"),
    ],
)
def test_layer_selectors(selectors, match):
    names = ["features.conv0.weight", "class_layers.out.weight", "class_layers.out.bias"]
    if match is None:
        assert ckks.resolve_encrypted_names(names, selectors) == ("class_layers.out.weight", "class_layers.out.bias")
    else:
        with pytest.raises(ValueError, match=match):
            ckks.resolve_encrypted_names(names, selectors)


def test_non_finite_values_are_not_encrypted(keys):
    with pytest.raises(ValueError, match=r"non-finite values in \['b'\]"):
        ckks.encrypt_layers({"a": np.zeros(3), "b": np.array([1.0, np.nan])}, keys["client"])

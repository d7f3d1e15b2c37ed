import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "custom"))


@pytest.fixture(scope="session")
def tiny_hospitals(tmp_path_factory):
    """Three small synthetic hospitals + global test set, generated once per test session."""
    from dataclasses import replace

    from fedmed.data.synthetic import DEFAULT_HOSPITALS, generate_hospitals

    root = tmp_path_factory.mktemp("hospitals")
    specs = [replace(h, num_images=n) for h, n in zip(DEFAULT_HOSPITALS, (16, 12, 14))]
    generate_hospitals(root, specs, num_test=16, seed=7, size=96)
    return root


@pytest.fixture
def rng():
    return np.random.default_rng(0)

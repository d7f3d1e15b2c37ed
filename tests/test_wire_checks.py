import math

import numpy as np
import pytest

from fedmed.server.wire_checks import find_metrics_problem


def test_the_executors_metrics_pass():
    assert (
        find_metrics_problem(
            {
                "train_loss": 0.3,
                "val_auroc/Pleural_Thickening": np.float32(0.7),
                "epochs": 1,
                "dp_epsilon": 2.5,
                "val_macro_f1": np.float64(0.4),
            }
        )
        is None
    )
    assert find_metrics_problem({}) is None


@pytest.mark.parametrize(
    "metrics, says",
    [
        ({"m" * 65: 1.0}, "65 characters"),
        ({"": 1.0}, "must match"),
        ({"val auroc": 1.0}, "must match"),
        ({"x'; DROP TABLE runs;--": 1.0}, "must match"),
        ({"név": 1.0}, "must match"),
        ({3: 1.0}, "must be a string"),
        ({"loss": math.nan}, "'loss' must be finite"),
        ({"loss": -math.inf}, "must be finite"),
        ({"loss": "0.3"}, "must be a number, got str"),
        ({"loss": True}, "must be a number, got bool"),
        ({"loss": [1.0]}, "must be a number"),
        ({f"m{i}": 1.0 for i in range(300)}, "at most 256"),
        ([("loss", 1.0)], "must be a mapping"),
    ],
)
def test_hostile_metrics_are_named(metrics, says):
    assert says in find_metrics_problem(metrics)

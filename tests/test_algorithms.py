"""fedmed.learning.algorithms: FedOpt (FedAdam / FedYogi) on the robust aggregate, FedProx at the sites (also under DP-SGD), and
SCAFFOLD's control variates, in the pure core, the round engine, a site's round and the in-process federation."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from fedmed.job.tasks import CHEST_XRAY14
from fedmed.learning.algorithms import (
    FedAlgorithm,
    FedOpt,
    LocalCorrection,
    ScaffoldServer,
    ServerOptimizer,
    drift,
    find_control_problem,
    site_control_update,
)
from fedmed.learning.training import LocalTraining, train_epochs
from fedmed.privacy.dp_sgd import SitePrivacy
from fedmed.privacy.policy import PrivacyPolicy
from fedmed.server.rounds import RoundEngine, RoundRules, SiteResult

GLOBAL = {
    "w": np.array([1.0, -2.0, 0.5], np.float32),
    "bn.running_mean": np.zeros(2, np.float32),
    "bn.running_var": np.ones(2, np.float32),
    "bn.num_batches_tracked": np.array(0, np.int64),
}


# -- FedOpt ----------------------------------------------------------------------------------------------------------


def test_fedadam_two_steps_match_the_hand_computed_ones():
    s = ServerOptimizer("fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=0.01)
    opt = FedOpt(s)
    x = GLOBAL["w"].astype(np.float64)
    agg1 = {**GLOBAL, "w": np.array([1.2, -2.0, 0.4], np.float32), "bn.running_mean": np.full(2, 0.3, np.float32)}
    out1 = opt.step(GLOBAL, agg1)
    g1 = x - agg1["w"].astype(np.float64)  # pseudo-gradient: global - aggregate
    m1 = 0.1 * g1
    v1 = 0.99 * 0.01**2 + 0.01 * g1**2
    x1 = x - 0.1 * m1 / (np.sqrt(v1) + 0.01)
    np.testing.assert_allclose(out1["w"], x1, rtol=1e-6)
    assert out1["w"].dtype == np.float32
    # BatchNorm statistics are not gradients: taken as aggregated
    np.testing.assert_array_equal(out1["bn.running_mean"], agg1["bn.running_mean"])
    assert out1["bn.num_batches_tracked"] is agg1["bn.num_batches_tracked"]
    g1_w = {**GLOBAL, "w": out1["w"]}
    agg2 = {**g1_w, "w": out1["w"] + np.float32(0.05)}
    out2 = opt.step(g1_w, agg2)
    g2 = out1["w"].astype(np.float64) - agg2["w"].astype(np.float64)
    m2 = 0.9 * m1 + 0.1 * g2
    v2 = 0.99 * v1 + 0.01 * g2**2
    np.testing.assert_allclose(out2["w"], out1["w"] - 0.1 * m2 / (np.sqrt(v2) + 0.01), rtol=1e-6)
    assert opt.steps == 2


def test_fedyogi_moves_the_second_moment_additively():
    opt = FedOpt(ServerOptimizer("fedyogi", lr=0.1, beta1=0.0, beta2=0.9, tau=0.01))
    agg = {**GLOBAL, "w": GLOBAL["w"] - np.float32(0.5)}
    out = opt.step(GLOBAL, agg)
    g = np.full(3, 0.5)
    v = 0.01**2 - 0.1 * g**2 * np.sign(0.01**2 - g**2)  # Yogi: v - (1 - beta2) g^2 sign(v - g^2)
    np.testing.assert_allclose(out["w"], GLOBAL["w"] - 0.1 * g / (np.sqrt(v) + 0.01), rtol=1e-6)
    assert np.all(out["w"] < GLOBAL["w"])  # towards the aggregate, which moved down


def test_fedavgm_steps_lr_times_the_momentum_of_the_mean_move():
    opt = FedOpt(ServerOptimizer("fedavgm", lr=2.0, beta1=0.5))
    agg1 = {**GLOBAL, "w": GLOBAL["w"] - np.float32(0.1), "bn.running_mean": np.full(2, 0.3, np.float32)}
    out1 = opt.step(GLOBAL, agg1)
    np.testing.assert_allclose(out1["w"], GLOBAL["w"] - 0.2, atol=1e-6)  # x - lr g: twice the sites' mean move
    np.testing.assert_array_equal(out1["bn.running_mean"], agg1["bn.running_mean"])
    g1_w = {**GLOBAL, "w": out1["w"]}
    out2 = opt.step(g1_w, {**g1_w, "w": out1["w"] - np.float32(0.1)})
    np.testing.assert_allclose(out2["w"], out1["w"] - 2.0 * (0.5 * 0.1 + 0.1), atol=1e-6)  # m = beta1 m + g
    plain = FedOpt(ServerOptimizer("fedavgm", lr=1.0, beta1=0.0)).step(GLOBAL, agg1)
    np.testing.assert_allclose(plain["w"], agg1["w"], atol=1e-6)  # lr 1, no momentum: the aggregate itself


@pytest.mark.parametrize(
    "kw, match",
    [({"kind": "adam"}, "must be one of"), ({"lr": 0.0}, "server_lr"), ({"beta2": 1.0}, "server_beta2")],
)
def test_bad_server_optimiser_settings_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        ServerOptimizer(**{"kind": "fedadam", **kw})


def rounds_global(w):
    return {**GLOBAL, "w": np.asarray(w, np.float32)}


def site(name, w, control=None, count=100):
    return SiteResult(name, rounds_global(w), count, {}, control_delta=control)


def test_the_round_engine_steps_fedadam_from_the_robust_aggregate():
    rules = RoundRules("fedavg", min_clients=2, server_optimizer=ServerOptimizer("fedadam", lr=0.1))
    eng = RoundEngine(rules)
    plain = RoundEngine(RoundRules("fedavg", min_clients=2))
    results = [site(f"h{i}", GLOBAL["w"] + 0.1 + 0.001 * i) for i in range(3)]
    rep, ref = eng.step(0, GLOBAL, results, []), plain.step(0, GLOBAL, results, [])
    assert rep.aggregated and rep.diagnostics["server_optimizer"] == {"kind": "fedadam", "step": 1}
    expected = FedOpt(ServerOptimizer("fedadam", lr=0.1)).step(GLOBAL, ref.params)
    np.testing.assert_allclose(rep.params["w"], expected["w"], rtol=1e-6)
    assert not np.allclose(rep.params["w"], ref.params["w"])


def test_the_round_engine_steps_fedavgm_from_the_geometric_median_not_the_mean():
    """gm-fedavgm: FedAvgM's step scales the robust aggregate's move, so a hostile update the geometric median
    discounts is not scaled up with it; BatchNorm statistics stay as aggregated."""
    fedavgm = ServerOptimizer("fedavgm", lr=3.0, beta1=0.0)
    eng = RoundEngine(RoundRules("geometric_median", min_clients=2, server_optimizer=fedavgm))
    plain = RoundEngine(RoundRules("geometric_median", min_clients=2))
    results = [site(f"h{i}", GLOBAL["w"] + 0.01 * (i + 1)) for i in range(3)] + [site("x", GLOBAL["w"] - 50.0)]
    rep, ref = eng.step(0, GLOBAL, results, []), plain.step(0, GLOBAL, results, [])
    assert rep.aggregated and rep.diagnostics["server_optimizer"] == {"kind": "fedavgm", "step": 1}
    moved = ref.params["w"] - GLOBAL["w"]
    assert np.all((0.005 < np.abs(moved)) & (np.abs(moved) < 0.05)), "the geometric median kept the honest move"
    np.testing.assert_allclose(rep.params["w"], GLOBAL["w"] + 3.0 * moved, rtol=1e-6)
    np.testing.assert_array_equal(rep.params["bn.running_var"], ref.params["bn.running_var"])


# -- FedProx ---------------------------------------------------------------------------------------------------------


class Linear(torch.nn.Module):
    def __init__(self, n_in=4, n_out=14):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(n_in, n_out)

    def forward(self, x):
        return self.fc(x.reshape(len(x), -1))


def params_of(model):
    return {k: v.detach().numpy().copy() for k, v in model.named_parameters()}


def test_the_proximal_gradient_is_mu_times_the_distance_to_the_global_model():
    model = Linear()
    anchor = {k: v + 0.5 for k, v in params_of(model).items()}
    corr = LocalCorrection(model, anchor, proximal_mu=0.3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    corr.before_step()
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), 1.0 + 0.3 * (-0.5), rtol=1e-6)


def toy_data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 4, generator=g), (torch.rand(n, 14, generator=g) > 0.7).float())


def test_fedprox_keeps_local_training_closer_to_the_global_model():
    data = toy_data()
    settings = LocalTraining(3, 0.05, 4, seed=0)
    moved = {}
    for mu in (0.0, 10.0):
        model = Linear()
        start = params_of(model)
        train_epochs(model, data, settings, task=CHEST_XRAY14, correction=LocalCorrection(model, start, mu))
        end = params_of(model)
        moved[mu] = sum(float(np.sum((end[k] - start[k]) ** 2)) for k in start)
    assert 0 < moved[10.0] < 0.5 * moved[0.0]


def test_fedprox_under_dp_sgd_is_added_after_the_noise_and_costs_no_epsilon():
    data = toy_data()
    settings = LocalTraining(2, 0.05, 6, total_epochs=4)
    runs = {}
    for mu in (0.0, 1.0):
        model = Linear()
        corr = LocalCorrection(model, params_of(model), mu)
        calls = []
        add = corr.add_proximal
        corr.add_proximal = lambda: (calls.append(1), add())
        privacy = SitePrivacy(PrivacyPolicy(epsilon=50.0, noise_multiplier=1.0))
        _, info = privacy.train_round(model, data, settings, task=CHEST_XRAY14, correction=corr)
        runs[mu] = (info, list(privacy.accountant.history), corr, len(calls))
    (plain, hist0, _, _), (prox, hist1, corr, calls) = runs[0.0], runs[1.0]
    assert hist0 == hist1 and prox.epsilon == pytest.approx(plain.epsilon, rel=1e-12)
    assert prox.steps == plain.steps == 8
    # The proximal gradient came from the DP optimiser's hook (after clipping and noise), once a step.
    assert corr.in_hook and calls == 8 and corr.steps == 8


# -- SCAFFOLD --------------------------------------------------------------------------------------------------------


class Point(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=torch.float32))


def toy_federation(scaffold: bool, rounds=60, steps=10, lr=0.05):
    """Four sites with f_i(w) = a_i/2 ||w - b_i||^2 (different curvatures and optima), local SGD through
    LocalCorrection: FedAvg drifts to a point weighted by the curvatures, SCAFFOLD to the global optimum."""
    a = np.array([1.0, 4.0, 0.5, 8.0])
    b = np.array([[3.0, 0.0], [-1.0, 2.0], [0.0, -4.0], [2.0, 1.0]])
    optimum = (a[:, None] * b).sum(0) / a.sum()
    x = {"w": np.zeros(2, np.float32)}
    server = ScaffoldServer({"w": (2,)})
    controls = {i: {"w": np.zeros(2, np.float32)} for i in range(4)}
    for _ in range(rounds):
        ys, deltas = {}, {}
        for i in range(4):
            model = Point(x["w"].copy())
            d = drift(server.c, controls[i], ["w"]) if scaffold else None
            corr = LocalCorrection(model, x, 0.0, d, lr)
            opt = torch.optim.SGD(model.parameters(), lr=lr)
            for _ in range(steps):
                opt.zero_grad()
                (0.5 * a[i] * ((model.w - torch.tensor(b[i], dtype=torch.float32)) ** 2).sum()).backward()
                corr.before_step()
                opt.step()
                corr.after_step()
            ys[i] = {"w": model.w.detach().numpy().copy()}
            if scaffold:
                controls[i], deltas[i] = site_control_update(controls[i], server.c, x, ys[i], corr.steps, lr)
        if scaffold:
            server.update(deltas, {i: 0.25 for i in range(4)}, 4)
        x = {"w": np.mean([ys[i]["w"] for i in range(4)], axis=0).astype(np.float32)}
    return float(np.linalg.norm(x["w"] - optimum))


def test_scaffold_reaches_the_optimum_of_heterogeneous_sites_where_fedavg_drifts():
    fedavg, scaffold = toy_federation(False), toy_federation(True)
    assert fedavg > 0.3  # client drift: FedAvg's fixed point is not the optimum
    assert scaffold < 1e-4


def test_site_control_update_is_option_ii():
    c_i, c = {"w": np.array([0.1, 0.2], np.float32)}, {"w": np.array([0.3, -0.1], np.float32)}
    x, y = {"w": np.array([1.0, 1.0], np.float32)}, {"w": np.array([0.8, 1.1], np.float32)}
    new, delta = site_control_update(c_i, c, x, y, steps=4, lr=0.5)
    np.testing.assert_allclose(new["w"], c_i["w"] - c["w"] + (x["w"] - y["w"]) / 2.0, rtol=1e-6)
    np.testing.assert_allclose(delta["w"], new["w"] - c_i["w"], rtol=1e-6)


def test_the_server_control_variate_moves_by_the_aggregator_weights_and_clips_a_large_delta():
    server = ScaffoldServer({"w": (2,)})
    deltas = {"a": {"w": np.array([1.0, 0.0])}, "b": {"w": np.array([0.0, 1.0])}, "x": {"w": np.array([100.0, 0])}}
    info = server.update(deltas, {"a": 0.5, "b": 0.5, "x": 0.0, "gone": 0.0}, num_sites=4)
    np.testing.assert_allclose(server.c["w"], [0.25, 0.25])  # (2 kept / 4 sites) x the weighted mean; x weighs 0
    server2 = ScaffoldServer({"w": (2,)})
    info = server2.update(deltas, {"a": 1 / 3, "b": 1 / 3, "x": 1 / 3}, num_sites=3)
    assert info["clipped"] == ["x"] and info["norm_cap"] == pytest.approx(10.0)  # 10 x the median norm
    np.testing.assert_allclose(server2.c["w"], [11 / 3, 1 / 3], rtol=1e-6)  # x counted at the cap


def test_the_round_engine_screens_control_deltas_and_moves_c():
    eng = RoundEngine(RoundRules("fedavg", min_clients=2, scaffold=True))
    c0 = eng.control(GLOBAL)
    assert set(c0) == {"w"} and not c0["w"].any()  # over the clear weights only
    ok = {"w": np.full(3, 0.2, np.float32)}
    results = [
        site("h0", GLOBAL["w"] + 0.1, ok),
        site("h1", GLOBAL["w"] + 0.11, ok),
        site("none", GLOBAL["w"] + 0.12, None),
        site("bad", GLOBAL["w"] + 0.13, {"w": np.full(2, 0.2, np.float32)}),
        site("nan", GLOBAL["w"] + 0.14, {"w": np.full(3, np.nan, np.float32)}),
    ]
    rep = eng.step(0, GLOBAL, results, [r.site for r in results])
    assert rep.aggregated, rep.problem
    reasons = {u.site: u.reason for u in rep.updates if u.status == "rejected"}
    assert "no SCAFFOLD control-variate delta" in reasons["none"]
    assert "shape (2,), expected (3,)" in reasons["bad"] and "not finite" in reasons["nan"]
    np.testing.assert_allclose(eng.control(GLOBAL)["w"], 0.2 * 2 / 5, rtol=1e-6)  # 2 kept of 5 asked
    no_scaffold = RoundEngine(RoundRules("fedavg", min_clients=2)).step(
        0, GLOBAL, results[:2] + [site("h2", GLOBAL["w"] + 0.1)], []
    )
    assert all("runs no SCAFFOLD" in u.reason for u in no_scaffold.updates if u.site in ("h0", "h1"))


def test_find_control_problem_names_what_is_wrong():
    ref = {"w": np.zeros(3)}
    assert "mapping" in find_control_problem([1, 2], ref)
    assert "missing ['w']" in find_control_problem({"v": np.zeros(3)}, ref)
    assert "not numeric" in find_control_problem({"w": "abc"}, ref)
    assert find_control_problem({"w": np.ones(3)}, ref) is None


def test_fed_algorithm_settings_are_checked():
    with pytest.raises(ValueError, match="proximal_mu"):
        FedAlgorithm(proximal_mu=-1.0)
    with pytest.raises(ValueError, match="scaffold"):
        FedAlgorithm(scaffold=1)


# -- through a site's round, the in-process federation and the NVFlare simulator ----------------------------------


def test_the_in_process_federation_runs_each_algorithm(tiny_hospitals):
    from fedmed.data.loading import load_test, load_train_val
    from fedmed.sim.inprocess import FederationPlan, federate
    from fedmed.site.site_config import DataConfig

    sites = ("hospital-a", "hospital-b", "hospital-c")
    train = {
        s: load_train_val(
            DataConfig("dicom", tiny_hospitals / s / "dicom", tiny_hospitals / s / "labels.csv"), 32, 0, CHEST_XRAY14
        )[0]
        for s in sites
    }
    test = load_test(
        tiny_hospitals / "global_test" / "dicom", tiny_hospitals / "global_test" / "labels.csv", 32, CHEST_XRAY14
    )
    algorithm = FedAlgorithm(ServerOptimizer("fedyogi"), proximal_mu=0.1, scaffold=True)
    plan = FederationPlan(CHEST_XRAY14, 2, "geometric_median", batch_size=4, algorithm=algorithm)
    res = federate(train, test, plan)
    assert res.stopped is None and all(r.aggregated for r in res.reports)
    last = res.reports[-1].diagnostics
    assert last["server_optimizer"] == {"kind": "fedyogi", "step": 2} and last["scaffold"]["norm_cap"] > 0
    assert 0.0 <= res.auroc <= 1.0


@pytest.mark.integration
def test_a_simulator_job_runs_fedadam_fedprox_and_scaffold(tiny_hospitals, tmp_path):
    from fedmed.store.repository import Repository
    from test_job import SITES, _run_job, _write_site_configs

    _write_site_configs(tiny_hospitals)
    db = tmp_path / "fedmed.db"
    extra = ("--rounds", "2", "--server-optimizer", "fedadam", "--proximal-mu", "0.1", "--scaffold")
    proc = _run_job(tiny_hospitals, tmp_path / "ws", db, *extra, "--no-cross-site-eval")
    repo = Repository(f"sqlite:///{db}", create_schema=False)
    try:
        run_id = repo.latest_run_id()
        assert repo.get_run(run_id).status == "finished", proc.stdout[-2000:]
        rows = repo.rounds_table(run_id)
        assert [r.round_num for r in rows] == [1, 2]
        assert all(set(r.sites_accepted) == set(SITES) for r in rows)  # every control delta passed screening
    finally:
        repo.close()


def test_a_scaffold_site_refuses_a_model_without_c_and_a_round_its_user_level_filter_would_release(tiny_hospitals):
    from fedmed.data.loading import load_train_val
    from fedmed.models.network import build_densenet121, state_to_numpy
    from fedmed.site.site_config import DataConfig
    from fedmed.site.site_round import GlobalModel, Site, Training, run_round

    root = tiny_hospitals / "hospital-a"
    train, val = load_train_val(DataConfig("dicom", root / "dicom", root / "labels.csv"), 32, 0, CHEST_XRAY14)
    torch.manual_seed(0)
    model = build_densenet121(14)
    params = state_to_numpy(model)
    site = Site("hospital-a", CHEST_XRAY14, train, model, Training(batch_size=4, scaffold=True), val=val)
    no_c = run_round(site, GlobalModel(params, 0, 2))
    assert no_c.refused == "global model rejected: SCAFFOLD: the global model came without the server's control variate"
    wrong = {"features.conv0.weight": np.zeros(3, np.float32)}
    assert "missing" in run_round(site, GlobalModel(params, 1, 3, control=wrong)).refused
    c = RoundEngine(RoundRules("fedavg", min_clients=2, scaffold=True)).control(params)
    filtered = Site(
        "hospital-b", CHEST_XRAY14, train, model, Training(scaffold=True), also_released=lambda: [(1.0, 1.0, 1)]
    )
    refused = run_round(filtered, GlobalModel(params, 0, 2, control=c)).refused
    assert refused.startswith("SCAFFOLD with a user-level noise filter")


def test_job_settings_carry_the_algorithms_to_the_exported_job_and_refuse_a_resume(tmp_path):
    from fedmed.job.jobconfig import JobConfig
    from jobscripts import load_job_script

    c = JobConfig(name="x", task="chest_xray14", server_optimizer="fedyogi", server_lr=0.1, proximal_mu=0.1)
    assert c.algorithm() == FedAlgorithm(ServerOptimizer("fedyogi", lr=0.1), proximal_mu=0.1)
    for bad, match in (
        ({"server_optimizer": "sgd"}, "must be one of"),
        ({"proximal_mu": -1.0}, "proximal_mu"),
        (
            {"scaffold": True, "resume_run": "abc"},
            "resume_run cannot continue a run with a server optimiser or SCAFFOLD",
        ),
    ):
        with pytest.raises(ValueError, match=match):
            JobConfig(name="x", task="chest_xray14", **bad)
    job = load_job_script("cxr_densenet").build_job(server_optimizer="fedadam", proximal_mu=0.05, scaffold=True)
    job.export_job(str(tmp_path))
    server = json.loads(next(tmp_path.rglob("config_fed_server.json")).read_text())
    client = json.loads(next(tmp_path.rglob("config_fed_client.json")).read_text())
    controller = next(w for w in server["workflows"] if "FedMedController" in w["path"])["args"]
    assert controller["job"]["server_optimizer"] == "fedadam" and controller["job"]["scaffold"] is True
    trainer = next(e for e in client["executors"] if "FedMedTrainer" in e["executor"]["path"])["executor"]["args"]
    assert trainer["job"]["proximal_mu"] == 0.05 and trainer["job"]["scaffold"] is True
    assert "server_optimizer" not in trainer["job"]  # the server's setting stays at the server

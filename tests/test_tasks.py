"""Both tasks (multi-label chest X-ray, multi-class brain MRI) through the same code paths: task spec, metrics, label
files, training, evaluation and the Controller's round scoring."""

import numpy as np
import pytest
import torch

from fedmed.data.labels import load_dicom_site, read_site_label_csv
from fedmed.data.loading import load_test, load_train_val
from fedmed.job import constants as C
from fedmed.job.tasks import BRAIN_CLASSES, BRAIN_MRI, CHEST_XRAY14, TaskSpec, get_task
from fedmed.learning.metrics import multiclass_scores
from fedmed.learning.training import LocalTraining, evaluate, train_epochs
from fedmed.models.network import build_densenet121, state_to_numpy
from fedmed.site.site_config import DataConfig


def _one_hot(indices, k):
    return np.eye(k, dtype=np.float32)[indices]


def test_get_task_names_the_choices():
    assert get_task("chest_xray14") is CHEST_XRAY14 and get_task("brain_mri") is BRAIN_MRI
    with pytest.raises(ValueError, match=r"unknown task None"):  # no silent chest default
        get_task(None)
    with pytest.raises(ValueError, match=r"unknown task 'knee_mri'; choose one of \['brain_mri', 'chest_xray14'\]"):
        get_task("knee_mri")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="regression"), "kind must be one of"),  # only the two classification kinds exist
        (dict(classes=("a",)), "needs >= 2 distinct classes"),
        (dict(classes=("a", "a")), "needs >= 2 distinct classes"),  # duplicate names would alias outputs
        (dict(kind="multilabel", score_name="accuracy"), "score_name must be one of"),  # accuracy is multi-class only
    ],
)
def test_task_spec_rejects_bad_definitions(kwargs, match):
    base = dict(name="t", classes=("a", "b"), kind="multiclass", modalities=frozenset({"MR"}), score_name="accuracy")
    with pytest.raises(ValueError, match=match):
        TaskSpec(**{**base, **kwargs})


@pytest.mark.parametrize("task", [CHEST_XRAY14, BRAIN_MRI], ids=lambda t: t.name)
def test_probabilities_loss_and_perfect_scores(task):
    rng = np.random.default_rng(0)
    k = task.num_outputs
    if task.is_multiclass:
        labels = _one_hot(np.arange(40) % k, k)
    else:
        labels = (rng.random((40, k)) < 0.4).astype(np.float32)
        labels[0], labels[1] = 1, 0  # every finding has both classes
    logits = torch.as_tensor(np.where(labels > 0, 4.0, -4.0), dtype=torch.float32)
    probs = task.probabilities(logits).numpy()
    assert probs.shape == labels.shape and np.all((probs >= 0) & (probs <= 1))
    if task.is_multiclass:
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)  # softmax: one class per image
    good = float(task.loss(logits, torch.as_tensor(labels)))
    bad = float(task.loss(-logits, torch.as_tensor(labels)))
    assert good < bad
    assert task.nll(labels, probs) == pytest.approx(good, rel=1e-3)  # evaluation loss = training loss (float32)
    scores = task.scores(labels, probs)
    assert scores.score == pytest.approx(1.0) and scores.mean_auroc == pytest.approx(1.0)
    assert {f"auroc/{c}" for c in task.classes} <= set(scores.metrics)
    if task.is_multiclass:
        assert scores.metrics["accuracy"] == 1.0 and scores.metrics["macro_f1"] == 1.0


def test_multiclass_scores_against_hand_counts():
    # truth 0,0,1,2 ; predicted 0,1,1,1 -> accuracy 2/4; F1: class0 2/3, class1 2/3 (tp1, fp2... see below), class2 0.
    truth = _one_hot(np.array([0, 0, 1, 2]), 3)
    probs = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1], [0.2, 0.5, 0.3]])
    m = multiclass_scores(truth, probs, ("a", "b", "c"))
    assert m["accuracy"] == 0.5
    # class a: tp 1, fn 1, fp 0 -> F1 2/3; class b: tp 1, fp 2 -> precision 1/3, recall 1 -> F1 1/2; class c: 0.
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert m["auroc/a"] == 1.0 and 0 <= m["auroc/c"] <= 1
    assert m["mean_auroc"] == pytest.approx(np.mean([m["auroc/a"], m["auroc/b"], m["auroc/c"]]))
    with pytest.raises(ValueError, match=r"must both be \(N, 3\)"):
        multiclass_scores(truth, probs[:, :2], ("a", "b", "c"))


def test_label_flipping_attack_keeps_multiclass_targets_one_hot():
    labels = torch.as_tensor(_one_hot(np.array([0, 3, 2]), 4))
    flipped = BRAIN_MRI.poisoned_labels(labels)
    assert torch.equal(flipped.sum(1), torch.ones(3)) and not torch.any((flipped * labels).sum(1) > 0)
    chest = torch.tensor([[1.0, 0.0]])
    assert torch.equal(CHEST_XRAY14.poisoned_labels(chest), torch.tensor([[0.0, 1.0]]))


def test_task_labels_load_from_each_tasks_files(task_data):
    task, root = task_data
    site = root / "hospital-a"
    table = read_site_label_csv(site / "labels.csv", task)
    items = load_dicom_site(site / "dicom", site / "labels.csv", task=task)
    assert len(items) == len(table) and all(it.labels.shape == (task.num_outputs,) for it in items)
    if task.is_multiclass:
        assert all(it.labels.sum() == 1 for it in items)  # exactly one class per image
        assert len({int(it.labels.argmax()) for it in items}) >= 2


def test_multiclass_label_csv_errors_name_the_file_line_and_value(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("SOPInstanceUID,label\n1.2,glioma\n1.3,astrocytoma\n")
    with pytest.raises(ValueError, match=r"labels.csv line 3: unknown brain_mri class 'astrocytoma'; expected one of"):
        read_site_label_csv(p, BRAIN_MRI)
    p.write_text("SOPInstanceUID,Atelectasis\n1.2,1\n")  # a chest file given to the brain task
    with pytest.raises(ValueError, match=r"task brain_mri needs a 'label' column naming one of"):
        read_site_label_csv(p, BRAIN_MRI)
    p.write_text("SOPInstanceUID,label\n1.2,glioma\n")  # and a brain file given to the chest task
    with pytest.raises(ValueError, match="missing column 'Atelectasis'"):
        read_site_label_csv(p, CHEST_XRAY14)
    table = read_site_label_csv(p, BRAIN_MRI)
    np.testing.assert_array_equal(table["1.2"][1], [1, 0, 0, 0])
    assert BRAIN_CLASSES[0] == "glioma"


def test_images_of_another_modality_are_refused_by_the_task(tiny_hospitals, tmp_path):
    # Chest radiographs (DX/CR) labelled for the brain task: nothing usable, and the error says why.
    site = tiny_hospitals / "hospital-a"
    rows = [line.split(",", 1)[0] for line in (site / "labels.csv").read_text().splitlines()[1:]]
    (tmp_path / "labels.csv").write_text("SOPInstanceUID,label\n" + "".join(f"{uid},glioma\n" for uid in rows))
    with pytest.raises(ValueError, match=r"have modality \['DX'\], which task brain_mri does not accept \(\['MR'\]\)"):
        load_dicom_site(site / "dicom", tmp_path / "labels.csv", task=BRAIN_MRI)


def test_one_training_step_and_evaluation(task_data):
    task, root = task_data
    site = root / "hospital-b"
    train, val = load_train_val(DataConfig("dicom", site / "dicom", site / "labels.csv"), 32, 0, task)
    torch.manual_seed(0)
    model = build_densenet121(task.num_outputs)
    before = state_to_numpy(model)
    loss = train_epochs(model, train, LocalTraining(1, 1e-3, 4, seed=0), task=task)
    assert np.isfinite(loss) and any(not np.array_equal(before[k], v) for k, v in state_to_numpy(model).items())
    ev = evaluate(model, val, task)
    assert ev.num_samples == len(val) and np.isfinite(ev.loss)
    if task.is_multiclass:
        assert ev.score == ev.metrics["accuracy"] and 0 <= ev.metrics["macro_f1"] <= 1
    else:
        assert ev.score == ev.mean_auroc or np.isnan(ev.score)


def test_controller_scores_rounds_by_the_tasks_metric(task_data):
    from fedmed.flare.round_scoring import RoundScorer

    task, root = task_data
    test_ds = load_test(root / "global_test" / "dicom", root / "global_test" / "labels.csv", 32, task)
    torch.manual_seed(0)
    model = build_densenet121(task.num_outputs)
    from fedmed.server.rounds import RoundReport, SiteResult

    def scored(report, sites, test_ds):
        s = RoundScorer(task, 32, model, test_ds).score(report, sites)
        return s.score, s.source, s.mean_auroc, s.test_loss, s.metrics

    def report(params, used=None):
        used = used or {}
        return RoundReport(0, True, params, None, (), (), {s: 0.5 for s in used}, used, {})

    score, source, mean_auroc, loss, metrics = scored(report(state_to_numpy(model)), [], test_ds)
    assert source == "global_test" and metrics["loss"] == loss and np.isfinite(loss)
    assert mean_auroc == pytest.approx(np.mean([v for k, v in metrics.items() if k.startswith("auroc/")]))
    assert score == (metrics["accuracy"] if task.is_multiclass else mean_auroc)
    # Without a test set: the aggregated sites' validation score for this task, weighted by their used (capped)
    # sample counts.
    key = C.META_VAL_PREFIX + task.score_name
    sites = [
        SiteResult("a", metrics={C.META_VAL_MEAN_AUROC: 0.7, key: 0.9}),
        SiteResult("b", metrics={C.META_VAL_MEAN_AUROC: 0.6, key: 0.5}),
    ]
    score, source, mean_auroc, loss, metrics = scored(report(None, {"a": 30, "b": 10}), sites, None)
    assert score == pytest.approx(0.8) and loss is None and metrics == {} and source == "site_validation"
    # For the chest task the score is the mean AUROC itself (the same key); for brain it is reported beside it.
    assert mean_auroc == pytest.approx(0.675 if task.is_multiclass else 0.8)


def test_controller_refuses_a_task_it_does_not_know():
    from fedmed.flare.controller import FedMedController

    with pytest.raises(ValueError, match="unknown task 'knee_mri'"):
        FedMedController({"name": "j", "task": "knee_mri"})


def test_the_core_has_no_default_task():
    """A brain MRI caller that forgets the task must fail, not silently get the chest task's classes and loss."""
    from fedmed.data.loading import load_test
    from fedmed.flare.controller import FedMedController
    from fedmed.flare.executor import FedMedTrainer
    from fedmed.job.jobconfig import JobConfig

    for component in (FedMedController, FedMedTrainer):
        with pytest.raises(ValueError, match=r"lacks \['task'\]"):
            component({"name": "job"})
    with pytest.raises(TypeError, match="task"):
        JobConfig(name="job")
    with pytest.raises(TypeError, match="task"):
        load_test("dicom", "labels.csv", 32)

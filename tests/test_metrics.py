import warnings

import evaluate
import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from hf_grass.data import GLUE_TASKS
from hf_grass.metrics import GLUE_OFFLINE_PATH, load_glue_metric


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # Test the local module, whatever the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def expected_metrics(task: str, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    if task == "stsb":
        return {"pearson": pearsonr(preds, labels)[0], "spearmanr": spearmanr(preds, labels)[0]}
    if task == "cola":
        return {"matthews_correlation": matthews_corrcoef(labels, preds)}
    if task in ("mrpc", "qqp"):
        return {"accuracy": accuracy_score(labels, preds), "f1": f1_score(labels, preds)}
    return {"accuracy": accuracy_score(labels, preds)}


@pytest.mark.parametrize("task", [*GLUE_TASKS, "accuracy", "mnli_mismatched"])
def test_offline_glue_metric_equals_sklearn_and_scipy(task):
    rng = np.random.default_rng(sum(map(ord, task)))
    metric = load_glue_metric(task)
    for n in (1, 7, 500):
        if task == "stsb":
            # Rounded scores have ties, which Spearman must average; float32 is the metric's dtype.
            labels = np.round(rng.uniform(0, 5, size=n), 1).astype(np.float32)
            preds = np.round(labels + rng.normal(size=n), 1).astype(np.float32)
            if n < 3:
                continue  # a correlation needs several points
        else:
            num_labels = 3 if task in ("mnli", "mnli_mismatched") else 2
            labels = rng.integers(0, num_labels, size=n)
            # Better than chance, so the statistics are far from 0.
            preds = np.where(rng.random(n) < 0.7, labels, rng.integers(0, num_labels, size=n))
        result = metric.compute(predictions=preds, references=labels)
        expected = expected_metrics(task, preds.astype(np.float64), labels.astype(np.float64))
        assert result.keys() == expected.keys()
        for key, value in expected.items():
            assert result[key] == pytest.approx(value, abs=1e-9), (task, n, key)


@pytest.mark.parametrize(
    "preds, labels",
    [([0, 0, 0, 0], [0, 1, 0, 1]), ([1, 1, 1], [1, 1, 1]), ([0, 0], [0, 0]), ([1, 0], [0, 1])],
)
def test_degenerate_f1_and_matthews_match_sklearn(preds, labels):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about the undefined cases it sets to 0
        expected_f1 = f1_score(labels, preds)
        expected_mcc = matthews_corrcoef(labels, preds)
    mrpc = load_glue_metric("mrpc").compute(predictions=preds, references=labels)
    cola = load_glue_metric("cola").compute(predictions=preds, references=labels)
    assert mrpc["f1"] == pytest.approx(expected_f1)
    assert cola["matthews_correlation"] == pytest.approx(expected_mcc)


def test_constant_predictions_give_nan_correlation_as_scipy():
    result = load_glue_metric("stsb").compute(
        predictions=[2.0, 2.0, 2.0], references=[1.0, 2.0, 3.0]
    )
    assert np.isnan(result["pearson"]) and np.isnan(result["spearmanr"])


def test_local_module_loads_by_path_with_config_name():
    metric = evaluate.load(str(GLUE_OFFLINE_PATH), config_name="sst2")
    assert metric.compute(predictions=[1, 0, 1, 1], references=[1, 0, 0, 1]) == {"accuracy": 0.75}


def test_unknown_task_names_the_choices():
    with pytest.raises(ValueError, match=r"'sst-2'.*sst2"):
        load_glue_metric("sst-2")

"""GLUE metrics as a local `evaluate` module, for machines without access to the Hub.

Load it with `evaluate.load("<path>/glue_offline", config_name=task)`; it reports what the Hub's
`glue` metric reports for each task, computed with numpy:
accuracy (sst2, mnli, mnli_matched, mnli_mismatched, qnli, rte, wnli, ax, hans, and the configs
"accuracy"/"default"), accuracy and f1 (mrpc, qqp), matthews_correlation (cola), and pearson and
spearmanr (stsb).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "GLUE benchmark metrics (accuracy, F1, Matthews correlation, Pearson, Spearman)."
_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={ICLR},
  year={2019}
}
"""
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted labels (integers), or scores (floats) for stsb.
    references: gold labels (integers), or scores (floats) for stsb.
Returns: a dict with
    "accuracy" for sst2, mnli, qnli, rte, wnli, ax, hans, "accuracy", "default";
    "accuracy" and "f1" (positive class 1) for mrpc and qqp;
    "matthews_correlation" for cola;
    "pearson" and "spearmanr" for stsb.
Example:
    >>> metric = evaluate.load("hf_grass/metrics/glue_offline", config_name="mrpc")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666, 'f1': 0.6666666666666666}
"""

_ACCURACY = {
    "sst2",
    "mnli",
    "mnli_matched",
    "mnli_mismatched",
    "qnli",
    "rte",
    "wnli",
    "ax",
    "hans",
    "accuracy",
    "default",
}
_ACCURACY_F1 = {"mrpc", "qqp"}
CONFIGS = sorted(_ACCURACY | _ACCURACY_F1 | {"cola", "stsb"})


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float((preds == labels).mean())


def f1(preds: np.ndarray, labels: np.ndarray) -> float:
    # Binary F1 of class 1; 0 when there is no positive prediction nor label (as scikit-learn).
    tp = np.sum((preds == 1) & (labels == 1))
    wrong = np.sum(preds != labels)
    return float(2 * tp / (2 * tp + wrong)) if tp + wrong > 0 else 0.0


def matthews_correlation(preds: np.ndarray, labels: np.ndarray) -> float:
    # The multiclass form (Gorodkin 2004), which is the usual MCC for two classes; 0 when a
    # marginal is constant (as scikit-learn).
    classes = np.union1d(preds, labels)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (np.searchsorted(classes, labels), np.searchsorted(classes, preds)), 1)
    n = confusion.sum()
    true_per_class = confusion.sum(axis=1)
    pred_per_class = confusion.sum(axis=0)
    covariance = np.trace(confusion) * n - true_per_class @ pred_per_class
    denominator = np.sqrt(
        (n**2 - pred_per_class @ pred_per_class) * (n**2 - true_per_class @ true_per_class)
    )
    return float(covariance / denominator) if denominator > 0 else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    # NaN when either input is constant (as scipy).
    x = x - x.mean()
    y = y - y.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denominator) if denominator > 0 else float("nan")


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of their ranks (scipy.stats.rankdata's default)."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # Start of each run of equal values, then each element's run index.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    run = np.cumsum(np.r_[True, sorted_x[1:] != sorted_x[:-1]]) - 1
    ends = np.r_[starts[1:], len(x)]  # exclusive
    mean_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = mean_rank[run]
    return ranks


def spearmanr(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(average_ranks(x), average_ranks(y))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GlueOffline(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in CONFIGS:
            raise ValueError(
                f"Unknown GLUE metric config {self.config_name!r}; use one of {CONFIGS}."
            )
        dtype = "float32" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}
            ),
            format="numpy",
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        preds = np.asarray(predictions)
        labels = np.asarray(references)
        if self.config_name == "stsb":
            preds = preds.astype(np.float64)
            labels = labels.astype(np.float64)
            return {"pearson": pearson(preds, labels), "spearmanr": spearmanr(preds, labels)}
        if self.config_name == "cola":
            return {"matthews_correlation": matthews_correlation(preds, labels)}
        if self.config_name in _ACCURACY_F1:
            return {"accuracy": accuracy(preds, labels), "f1": f1(preds, labels)}
        return {"accuracy": accuracy(preds, labels)}

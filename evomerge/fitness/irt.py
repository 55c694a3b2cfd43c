"""Item response theory fitted on a study's own per-item results, and estimators of a new
candidate's full-split accuracy from its answers on a few items (tinyBenchmarks' p-IRT and
gp-IRT: Polo et al., "tinyBenchmarks: evaluating LLMs with fewer examples", ICML 2024).

Model (2PL): subject i answers item j correctly with probability

    p_ij = sigmoid(a_j * (theta_{i,d(j)} - b_j)),    a_j = exp(alpha_j) > 0

b_j is the item's difficulty, a_j its discrimination, theta the subject's ability. Items may
be split over ability dimensions d(j): one per leaf task of a group, because a merge good at
reversing is not thereby good at sorting (the zoo's experts are exactly that), and the
likelihood then factorises per task. Fit: joint MAP over (theta, alpha, b) by L-BFGS with
priors theta ~ N(0, 1) (fixes the scale), b ~ N(0, 2^2) and log a ~ N(0, 0.5^2) (the
log-normal slope prior of classic IRT software): without them an item every subject got
right has b = -inf, and a subject who got all 10-20 of its items right has theta = +inf and
an estimated accuracy of 100%. A new subject's theta is the MAP with the item parameters
fixed (Newton's method; the log-posterior is strictly concave in theta) under a wider prior,
N(0, 3^2): the fitted subjects spread over sd ~2 on the zoo (broken random merges and good
ones), and the candidates a search scores late are its best, not a draw from that
population, so N(0, 1) pulled them toward the middle (on bench/fitness_cost.py's late-search
neighbours, -18 points at 10 items, -7 with sd 3; sd 2/3/5/10 gave gp-IRT errors of
10.2/8.8/8.3/8.4 points at 10 items and 5.5/4.4/4.0/4.0 at 20). sd 3 still keeps a perfect
score finite and below 100%.

Estimators of an estimand "mean of the metric over the items in E" (one task), given the
seen items S (a fixed subset or anchors) and the fitted item parameters:
- naive: the mean over S (random subsets), or sum_k m_k y_k over anchors with cluster
  masses m_k;
- p-IRT:  (1/|E|) * (sum_{j in S} y_j + sum_{j in E \\ S} p_j(theta_hat));
- gp-IRT: lam * naive + (1 - lam) * p-IRT, lam = bias^2 / (bias^2 + var), where var is the
  naive estimator's variance (mean over the fitted subjects of their per-item variance on E,
  over |S|; over 4|S| for anchors, as tinyBenchmarks does) and bias is p-IRT's error on
  held-out subjects (`irt_bias`): trust the few answers more when the IRT model is off.
Anchors (tinyBenchmarks' "anchor-IRT"): k-means of the items in the IRT embedding
(a_j, a_j b_j) (slope and intercept of the logit); per cluster the item nearest the centroid,
weighted by the cluster's share of the items.

Everything is plain numbers: `to_json`/`from_json` store a fitted model in a study.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from evomerge.fitness.items import ItemResults, item_positions

_NEWTON_STEPS, _NEWTON_MAX_STEP = 100, 2.0


@dataclass(frozen=True)
class Prior:
    """MAP priors: theta_sd, b_sd and log_a_sd in the fit; ability_sd for a new candidate's ability."""

    theta_sd: float = 1.0
    b_sd: float = 2.0
    log_a_sd: float = 0.5
    ability_sd: float = 3.0


@dataclass(frozen=True)
class Irt2PL:
    """Fitted item parameters; `dims[j]` is item j's ability dimension."""

    a: np.ndarray
    b: np.ndarray
    dims: np.ndarray
    prior: Prior = field(default_factory=Prior)

    @property
    def n_dims(self) -> int:
        return int(self.dims.max()) + 1 if len(self.dims) else 0

    def prob(self, theta: np.ndarray) -> np.ndarray:
        """(subjects, items) probabilities of a correct answer for abilities (subjects, dims)."""
        return _sigmoid(self.a * (theta[:, self.dims] - self.b))

    def abilities(self, y: np.ndarray) -> np.ndarray:
        """MAP abilities (subjects, dims) from answers (subjects, items); NaN marks an item not seen."""
        y = np.atleast_2d(y)
        seen = ~np.isnan(y)
        answers = np.where(seen, y, 0.0)
        onehot = np.eye(self.n_dims)[self.dims]
        theta = np.zeros((len(y), self.n_dims))
        precision = 1.0 / self.prior.ability_sd ** 2
        for _ in range(_NEWTON_STEPS):
            p = self.prob(theta)
            grad = (seen * self.a * (p - answers)) @ onehot + precision * theta
            hess = (seen * self.a ** 2 * p * (1 - p)) @ onehot + precision
            step = np.clip(grad / hess, -_NEWTON_MAX_STEP, _NEWTON_MAX_STEP)
            theta -= step
            if np.abs(step).max() < 1e-10:
                break
        return theta

    def completed(self, y: np.ndarray) -> np.ndarray:
        """Answers where seen, each other item's predicted probability at the MAP ability: the
        mean of a task's columns is its p-IRT estimate."""
        y = np.atleast_2d(y)
        return np.where(np.isnan(y), self.prob(self.abilities(y)), y)

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a.tolist(), "b": self.b.tolist(), "dims": self.dims.tolist(), "prior": asdict(self.prior)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Irt2PL":
        return cls(np.array(data["a"], dtype=float), np.array(data["b"], dtype=float),
                   np.array(data["dims"], dtype=int), Prior(**data["prior"]))


def fit_2pl(y: np.ndarray, dims: Sequence[int] | None = None, prior: Prior = Prior()) -> tuple[Irt2PL, np.ndarray]:
    """Joint MAP fit on answers (subjects, items) in {0, 1}, NaN where not evaluated; returns the
    model and the subjects' abilities (subjects, dims). Deterministic (no random start)."""
    from scipy.optimize import minimize

    y = np.asarray(y, dtype=float)
    dims = np.zeros(y.shape[1], dtype=int) if dims is None else np.asarray(dims, dtype=int)
    n_subjects, n_items = y.shape
    n_dims = int(dims.max()) + 1
    seen = ~np.isnan(y)
    answers = np.where(seen, y, 0.0)
    onehot = np.eye(n_dims)[dims]
    rate = np.clip((answers.sum(axis=0) + 0.5) / (seen.sum(axis=0) + 1.0), 0.05, 0.95)  # smoothed: no 0/0
    start = np.concatenate([np.zeros(n_subjects * n_dims), np.zeros(n_items), -np.log(rate / (1 - rate))])

    def loss(x: np.ndarray) -> tuple[float, np.ndarray]:
        theta = x[:n_subjects * n_dims].reshape(n_subjects, n_dims)
        alpha, b = x[n_subjects * n_dims:-n_items], x[-n_items:]
        a = np.exp(alpha)
        gap = theta[:, dims] - b
        z = a * gap
        nll = np.sum(seen * (np.logaddexp(0.0, z) - answers * z))
        r = seen * (_sigmoid(z) - answers)
        value = nll + 0.5 * (np.sum(theta ** 2) / prior.theta_sd ** 2 + np.sum(b ** 2) / prior.b_sd ** 2
                             + np.sum(alpha ** 2) / prior.log_a_sd ** 2)
        grad_theta = (r * a) @ onehot + theta / prior.theta_sd ** 2
        grad_alpha = a * np.sum(r * gap, axis=0) + alpha / prior.log_a_sd ** 2
        grad_b = -a * np.sum(r, axis=0) + b / prior.b_sd ** 2
        return value, np.concatenate([grad_theta.ravel(), grad_alpha, grad_b])

    x = minimize(loss, start, jac=True, method="L-BFGS-B", options={"maxiter": 10000, "maxfun": 20000,
                                                                   "ftol": 1e-12, "gtol": 1e-7}).x
    theta = x[:n_subjects * n_dims].reshape(n_subjects, n_dims)
    model = Irt2PL(np.exp(x[n_subjects * n_dims:-n_items]), x[-n_items:], dims, prior)
    return model, theta


def gp_lambda(bias: float, variance: float) -> float:
    """gp-IRT's weight on the naive estimate: bias^2 / (bias^2 + variance) (0 when both vanish)."""
    total = bias ** 2 + variance
    return bias ** 2 / total if total > 0 else 0.0


def gp_irt(naive: np.ndarray | float, p_irt: np.ndarray | float, lam: float) -> np.ndarray | float:
    return lam * naive + (1 - lam) * p_irt


def naive_variance(y: np.ndarray, items: np.ndarray, n_seen: int, anchored: bool) -> float:
    """Variance of the naive estimate from `n_seen` of `items`: the fitted subjects' mean per-item
    variance over n (random items), or over 4n for anchors (tinyBenchmarks' heuristic: clustering
    removes much of the sampling variance)."""
    per_subject = np.nanvar(y[:, items], axis=1)
    return float(np.mean(per_subject)) / (4 * n_seen if anchored else n_seen)


def irt_bias(y: np.ndarray, dims: np.ndarray, estimands: dict[str, np.ndarray], prior: Prior = Prior(),
             seed: int = 0) -> dict[str, float]:
    """p-IRT's mean absolute error per estimand on held-out subjects (every 5th, as tinyBenchmarks
    does): fitted on the others, each held-out subject shows a random half of the items and p-IRT
    predicts the mean of the other half. Needs at least two subjects."""
    held_out = np.arange(len(y))[::5] if len(y) >= 5 else np.arange(len(y))[-1:]
    model, _ = fit_2pl(np.delete(y, held_out, axis=0), dims, prior)
    rng = np.random.default_rng(seed)
    hidden = rng.random(y.shape[1]) < 0.5
    shown = np.where(hidden, np.nan, y[held_out])
    predicted = model.completed(shown)
    return {name: float(np.mean(np.abs(np.nanmean(np.where(hidden, predicted, np.nan)[:, items], axis=1)
                                       - np.nanmean(np.where(hidden, y[held_out], np.nan)[:, items], axis=1))))
            for name, items in estimands.items()}


def anchors(model: Irt2PL, items: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` anchor items of `items` (sorted) and their weights (summing to 1): k-means clusters of
    the items in the embedding (a_j, a_j b_j); from each cluster the item nearest its centroid,
    weighted by the cluster's share of the items. Items with identical parameters (every fitted
    subject answered them alike) can leave fewer distinct clusters than `n`: the remaining
    anchors are then drawn uniformly inside the clusters, by largest remainder on their
    sizes, and share their cluster's weight, so the item budget is always spent."""
    from scipy.cluster.vq import kmeans2

    from evomerge.fitness.subset import allocate

    items = np.asarray(items)
    n = min(n, len(items))
    rng = np.random.default_rng(seed)
    embedding = np.stack([model.a[items], model.a[items] * model.b[items]], axis=1)
    k = min(n, len(np.unique(embedding, axis=0)))
    with warnings.catch_warnings():  # an empty cluster is handled below
        warnings.simplefilter("ignore")
        centroids, label = kmeans2(embedding, k, minit="++", seed=rng)
    clusters = [np.flatnonzero(label == c) for c in range(k)]
    centres = [centroids[c] for c in range(k) if len(clusters[c])]
    clusters = [members for members in clusters if len(members)]
    extra = allocate(n - len(clusters), [len(m) - 1 for m in clusters])
    chosen, weights = [], []
    for members, centre, more in zip(clusters, centres, extra):
        nearest = members[np.argmin(np.sum((embedding[members] - centre) ** 2, axis=1))]
        picked = [nearest, *rng.choice(members[members != nearest], size=more, replace=False)]
        chosen += [items[p] for p in picked]
        weights += [len(members) / len(items) / len(picked)] * len(picked)
    order = np.argsort(chosen)
    return np.asarray(chosen)[order], np.asarray(weights)[order]


@dataclass(frozen=True)
class IrtEstimator:
    """A fitted model over a fixed item layout (columns: each leaf task's items in doc-id order,
    tasks in `sizes` order), with per task the numbers gp-IRT needs: what a study stores and
    refits as it grows. `anchor_weights` (column -> weight inside its task) is set when the
    items a candidate sees are anchors."""

    model: Irt2PL
    sizes: dict[str, int]
    bias: dict[str, float]
    spread: dict[str, float]
    anchor_weights: dict[int, float] = field(default_factory=dict)

    @property
    def columns(self) -> dict[str, np.ndarray]:
        offsets = np.cumsum([0, *self.sizes.values()])
        return {task: np.arange(offsets[k], offsets[k + 1]) for k, task in enumerate(self.sizes)}

    def estimates(self, y: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """Per task, for each row of answers (NaN: not evaluated): the naive, p-IRT and gp-IRT
        estimates of the task's mean over all its items."""
        y = np.atleast_2d(y)
        completed = self.model.completed(y)
        out = {}
        for task, items in self.columns.items():
            seen = ~np.isnan(y[:, items])
            weights = np.array([self.anchor_weights.get(int(j), 1.0) for j in items]) * seen
            totals = weights.sum(axis=1)
            naive = np.nansum(y[:, items] * weights, axis=1) / np.where(totals > 0, totals, 1.0)
            p_irt = completed[:, items].mean(axis=1)
            n_seen = seen.sum(axis=1)
            variance = self.spread[task] / np.maximum(n_seen, 1) / (4 if self.anchor_weights else 1)
            lam = np.where(n_seen > 0, [gp_lambda(self.bias[task], v) for v in variance], 0.0)
            out[task] = {"naive": naive, "p_irt": p_irt, "gp_irt": gp_irt(naive, p_irt, lam)}
        return out

    def estimate(self, results: ItemResults, metric: str, kind: str = "gp_irt") -> dict[str, dict[str, float]]:
        """{task: {metric: estimate}} from one candidate's results (the form
        `item_results.aggregate_scores` turns into scores, groups included, with `sizes`)."""
        y = answer_matrix([results], self.sizes, metric)
        return {task: {metric: float(e[kind][0])} for task, e in self.estimates(y).items()}

    def with_anchors(self, n: int, seed: int = 0) -> "IrtEstimator":
        """The same model estimating from `n` anchors, split over tasks as subsets are."""
        from evomerge.fitness.subset import allocate

        weights = {}
        for (task, items), k in zip(self.columns.items(), allocate(n, list(self.sizes.values()))):
            chosen, w = anchors(self.model, items, k, seed)
            weights.update({int(j): float(v) for j, v in zip(chosen, w)})
        return replace(self, anchor_weights=weights)

    def anchor_items(self) -> dict[str, list[int]]:
        """{task: doc ids} of the anchors: the items each candidate is evaluated on."""
        return {task: [int(j - items[0]) for j in items if int(j) in self.anchor_weights]
                for task, items in self.columns.items()}

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model.to_json(), "sizes": self.sizes, "bias": self.bias, "spread": self.spread,
                "anchor_weights": {str(j): w for j, w in self.anchor_weights.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "IrtEstimator":
        return cls(Irt2PL.from_json(data["model"]), dict(data["sizes"]), dict(data["bias"]), dict(data["spread"]),
                   {int(j): float(w) for j, w in data["anchor_weights"].items()})


def fit_estimator(y: np.ndarray, sizes: dict[str, int], prior: Prior = Prior(), seed: int = 0,
                  per_task: bool = True) -> IrtEstimator:
    """Fit on fully scored rows (subjects, items), one ability per task (or one in all); bias from
    held-out subjects (`irt_bias`), spread from the rows themselves."""
    dims = np.repeat(np.arange(len(sizes)) if per_task else np.zeros(len(sizes), dtype=int), list(sizes.values()))
    model, _ = fit_2pl(y, dims, prior)
    columns = IrtEstimator(model, sizes, {}, {}).columns
    spread = {task: naive_variance(y, items, 1, anchored=False) for task, items in columns.items()}
    return IrtEstimator(model, dict(sizes), irt_bias(y, dims, columns, prior, seed), spread)


def answer_matrix(rows: Sequence[ItemResults], sizes: dict[str, int], metric: str) -> np.ndarray:
    """(rows, items) of one per-item metric in the columns of `sizes`, NaN where not evaluated."""
    positions = item_positions(sizes)
    y = np.full((len(rows), len(positions)), np.nan)
    for r, results in enumerate(rows):
        for task, ids in results.ids.items():
            y[r, [positions[(task, i)] for i in ids]] = results.values[task][metric]
    return y


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow warning for large |z|

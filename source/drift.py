"""Drift statistics: how far new predictions and features are from the ones the model gave
on its validation split at training, and that reference itself.

`reference_statistics` is stored in the checkpoint at training (checkpoint["reference"]);
`check_drift` compares new predictions with it: Kolmogorov-Smirnov on the prediction
confidence and entropy, chi-square on the predicted-class histogram, an RBF-kernel MMD with a
permutation p-value on the pre-logit features (Bonferroni over the tests), and the population
stability index of each. monitor.py turns the verdicts into a report and an exit code.

    stats = reference_statistics(metrics.evaluate(model, val_loader, device, features=True))
"""

from __future__ import annotations

import numpy as np
import torch

REFERENCE_VERSION = 1
FEATURE_SAMPLE = 256  # reference feature vectors kept for the embedding test
VALUE_SAMPLE = 10_000  # reference confidences/entropies kept (a seeded sample beyond this)
NEW_FEATURE_SAMPLE = 512  # new feature vectors in the MMD test (its cost grows as n^2)
PSI_BANDS = ((0.1, "stable"), (0.25, "moderate shift"), (np.inf, "major shift"))


# ---- the reference (written by train.py into checkpoint["reference"]) --------------------------


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy of each row, in nats."""
    from scipy.stats import entropy as scipy_entropy

    return scipy_entropy(np.asarray(probs, dtype=np.float64), axis=1)


def reference_statistics(result, *, sample_size: int = FEATURE_SAMPLE, seed: int = 0) -> dict:
    """What drift monitoring needs from the validation predictions, as tensors and plain
    values (so the checkpoint stays loadable with weights_only=True).

    `result` comes from `metrics.evaluate(model, val_loader, device, features=True)`; its
    features may be None (a model without pre-logits), and then the embedding test is skipped.
    """
    probs = np.asarray(result.probs, dtype=np.float64)
    n, num_classes = probs.shape
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.permutation(n)[:VALUE_SAMPLE]) if n > VALUE_SAMPLE else np.arange(n)
    stats = {
        "version": REFERENCE_VERSION,
        "num_samples": int(n),
        "seed": int(seed),
        "confidence": torch.from_numpy(probs.max(axis=1)[keep]).float(),
        "entropy": torch.from_numpy(entropy(probs)[keep]).float(),
        "predicted_counts": torch.from_numpy(
            np.bincount(probs.argmax(axis=1), minlength=num_classes)
        ).long(),
        "label_counts": torch.from_numpy(
            np.bincount(np.asarray(result.labels, dtype=np.int64), minlength=num_classes)
        ).long(),
    }
    if result.features is not None and len(result.features):
        features = np.asarray(result.features, dtype=np.float64)  # (N, D)
        rows = np.sort(rng.permutation(n)[:sample_size])
        stats["features"] = torch.from_numpy(features[rows]).float()  # (min(N, k), D)
        stats["feature_mean"] = torch.from_numpy(features.mean(axis=0)).float()  # (D,)
        stats["feature_std"] = torch.from_numpy(features.std(axis=0)).float()  # (D,)
    return stats


# ---- statistics ------------------------------------------------------------------------------


def population_stability_index(reference, new, bins: int = 10) -> float:
    """PSI over the reference's quantile bins: sum (new% - ref%) * ln(new% / ref%).
    Under 0.1 stable, 0.1-0.25 a moderate shift, over 0.25 a major one (the usual reading)."""
    reference, new = np.asarray(reference, np.float64), np.asarray(new, np.float64)
    # Confidences pile up near 1, so quantile edges repeat; unique ones keep the bins valid.
    inner = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    edges = np.concatenate([[-np.inf], inner, [np.inf]])
    ref_counts = np.histogram(reference, edges)[0]
    new_counts = np.histogram(new, edges)[0]
    return categorical_psi(ref_counts, new_counts)


def categorical_psi(ref_counts, new_counts, floor: float = 1e-4) -> float:
    ref = np.maximum(np.asarray(ref_counts, np.float64) / max(np.sum(ref_counts), 1), floor)
    new = np.maximum(np.asarray(new_counts, np.float64) / max(np.sum(new_counts), 1), floor)
    return float(np.sum((new - ref) * np.log(new / ref)))


def psi_band(value: float) -> str:
    return next(label for limit, label in PSI_BANDS if value < limit)


def mmd_permutation_test(x, y, permutations: int, seed: int) -> tuple[float, float, float]:
    """Unbiased squared MMD between samples x (n, D) and y (m, D) with an RBF kernel whose
    bandwidth is the median pairwise distance, and its permutation p-value.
    Returns (mmd2, p_value, bandwidth)."""
    z = torch.cat([torch.as_tensor(x), torch.as_tensor(y)]).double()  # (n + m, D)
    n, total = len(x), len(z)
    d2 = torch.cdist(z, z).pow(2)  # (n + m, n + m)
    off = d2[~torch.eye(total, dtype=torch.bool)]
    bandwidth2 = float(off.median()) if len(off) and float(off.median()) > 0 else 1.0
    kernel = torch.exp(-d2 / bandwidth2)

    def mmd2(in_x: torch.Tensor) -> torch.Tensor:  # in_x: (P, n + m) 0/1 membership of x
        in_y = 1.0 - in_x
        m = total - n
        kxx = ((in_x @ kernel) * in_x).sum(1) - n  # the diagonal of k(x, x) is all ones
        kyy = ((in_y @ kernel) * in_y).sum(1) - m
        kxy = ((in_x @ kernel) * in_y).sum(1)
        return kxx / (n * (n - 1)) + kyy / (m * (m - 1)) - 2 * kxy / (n * m)

    observed = mmd2((torch.arange(total) < n).double()[None])[0]
    generator = torch.Generator().manual_seed(seed)
    exceed = 0
    for start in range(0, permutations, 256):  # chunks keep memory at (256, n + m)
        count = min(256, permutations - start)
        ranks = torch.rand(count, total, generator=generator, dtype=torch.float64).argsort(1)
        exceed += int((mmd2((ranks < n).double()) >= observed).sum())
    return float(observed), (1 + exceed) / (1 + permutations), bandwidth2**0.5


def embedding_test(features, reference: dict, *, permutations: int, seed: int):
    """The MMD test of new pre-logit features against the reference's, both standardised by
    the reference's mean and std: (the test's row, or None and the reason it was skipped)."""
    if "features" not in reference:
        return None, "embedding MMD skipped: the reference holds no pre-logit features"
    if features is None:
        return None, "embedding MMD skipped: this model gives no pre-logit features"
    if len(reference["features"]) < 2:
        return None, "embedding MMD skipped: the reference holds fewer than 2 feature vectors"
    mean, std = reference["feature_mean"].double(), reference["feature_std"].double()
    scale = std.clamp_min(1e-6)  # standardised by the reference, so no dimension dominates
    ref_feats = (reference["features"].double() - mean) / scale
    new_feats = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    if len(new_feats) > NEW_FEATURE_SAMPLE:
        rng = np.random.default_rng(seed)
        new_feats = new_feats[np.sort(rng.permutation(len(new_feats))[:NEW_FEATURE_SAMPLE])]
    new_feats = (new_feats - mean) / scale
    mmd2, p_value, bandwidth = mmd_permutation_test(ref_feats, new_feats, permutations, seed)
    row = {
        "statistic": mmd2,
        "p_value": p_value,
        "bandwidth": bandwidth,
        "permutations": permutations,
        "sizes": [len(ref_feats), len(new_feats)],
    }
    return row, None


def prediction_tests(confidence, ent, new_counts, reference: dict) -> tuple[dict, list[str]]:
    """KS on confidence and entropy, chi-square on the predicted-class counts: (tests, notes)."""
    from scipy import stats

    tests, notes = {}, []
    ref_values = {"confidence_ks": reference["confidence"], "entropy_ks": reference["entropy"]}
    for name, new in (("confidence_ks", confidence), ("entropy_ks", ent)):
        result = stats.ks_2samp(ref_values[name].double().numpy(), new)
        tests[name] = {"statistic": float(result.statistic), "p_value": float(result.pvalue)}
    table = np.stack([reference["predicted_counts"].numpy(), new_counts])  # (2, C)
    table = table[:, table.sum(axis=0) > 0]  # a two-sample homogeneity test
    if table.shape[1] >= 2:
        chi2 = stats.chi2_contingency(table)
        tests["predicted_class_chi2"] = {
            "statistic": float(chi2.statistic),
            "p_value": float(chi2.pvalue),
            "dof": int(chi2.dof),
        }
    else:
        notes.append("predicted-class chi-square skipped: one class predicted in both samples")
    return tests, notes


def check_drift(
    probs,
    features,
    reference: dict,
    *,
    alpha: float,
    permutations: int,
    psi_threshold: float,
    seed: int,
) -> dict:
    """Every drift test of new predictions (and features) against the reference; a test
    flags drift when p < alpha / (number of tests), PSI only when psi_threshold > 0."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence, ent = probs.max(axis=1), entropy(probs)
    ref_conf = reference["confidence"].double().numpy()
    ref_ent = reference["entropy"].double().numpy()
    ref_counts = reference["predicted_counts"].numpy()
    new_counts = np.bincount(probs.argmax(axis=1), minlength=len(ref_counts))
    tests, notes = prediction_tests(confidence, ent, new_counts, reference)
    row, skipped = embedding_test(features, reference, permutations=permutations, seed=seed)
    if row is None:
        notes.append(skipped)
    else:
        tests["embedding_mmd"] = row
    per_test = alpha / max(len(tests), 1)
    if "embedding_mmd" in tests and 1 / (permutations + 1) >= per_test:
        notes.append(
            f"embedding MMD cannot reach p < {per_test:.3g} with {permutations} permutations; "
            f"use --permutations {int(np.ceil(1 / per_test))} or more"
        )
    for test in tests.values():
        test["drifted"] = bool(test["p_value"] < per_test)
    psi = {
        "confidence": population_stability_index(ref_conf, confidence),
        "entropy": population_stability_index(ref_ent, ent),
        "predicted_class": categorical_psi(ref_counts, new_counts),
    }
    psi_rows = {
        name: {
            "value": value,
            "band": psi_band(value),
            "drifted": bool(psi_threshold > 0 and value > psi_threshold),
        }
        for name, value in psi.items()
    }
    return {
        "reference_num_samples": int(reference["num_samples"]),
        "alpha": alpha,
        "alpha_per_test": per_test,
        "tests": tests,
        "psi": psi_rows,
        "psi_threshold": psi_threshold,
        "notes": notes,
        "detected": any(r["drifted"] for r in (*tests.values(), *psi_rows.values())),
        "confidence_hist": {"reference": ref_conf.tolist(), "new": confidence.tolist()},  # plot
    }

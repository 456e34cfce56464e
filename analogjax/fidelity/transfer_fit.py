"""The transfer checks' sufficient statistics and closed-form fits (analogjax.fidelity.transfer): weighted moments
summed by jitted steps, and from them, in float64 NumPy on the host, the ridge maps between residual streams, their
explained variance, the linear discriminant probes and the difference-of-means directions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MAP_RIDGE = 1e-3
PROBE_SHRINKAGE = 0.1


def moments(x_nd, y_ne, w_n) -> dict[str, jax.Array]:
    """Weighted raw moments of paired rows: n, Σx, Σy, XᵀX, YᵀY, XᵀY (what both maps and their scores need)."""
    x, y, w = x_nd.astype(jnp.float32), y_ne.astype(jnp.float32), w_n.astype(jnp.float32)
    xw, yw = x * w[:, None], y * w[:, None]
    return {
        "n": jnp.sum(w),
        "sx": jnp.sum(xw, 0),
        "sy": jnp.sum(yw, 0),
        "sxx": xw.T @ x,
        "syy": yw.T @ y,
        "sxy": xw.T @ y,
    }


def reversed_moments(m: dict) -> dict:
    """The moments with x and y swapped (for the teacher → analog map)."""
    return {
        "n": m["n"],
        "sx": m["sy"],
        "sy": m["sx"],
        "sxx": m["syy"],
        "syy": m["sxx"],
        "sxy": np.swapaxes(m["sxy"], -1, -2),
    }


def fit_affine(m: dict, ridge: float = MAP_RIDGE) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression y ≈ x W + b from moments (centred; λ = ridge × mean input variance; b not penalised)."""
    n = float(m["n"])
    mx, my = m["sx"] / n, m["sy"] / n
    cxx = m["sxx"] / n - np.outer(mx, mx)
    cxy = m["sxy"] / n - np.outer(mx, my)
    lam = ridge * max(np.trace(cxx) / len(cxx), 1e-12)
    weight = np.linalg.solve(cxx + lam * np.eye(len(cxx)), cxy)
    return weight, my - mx @ weight


def explained_variance(m: dict, weight: np.ndarray, bias: np.ndarray) -> float:
    """1 − Σ‖y − (xW + b)‖² / Σ‖y − ȳ‖² over the tokens of `m` (about their mean ȳ), from moments alone."""
    n = float(m["n"])
    b_aug = np.vstack([weight, bias[None]])  # [x, 1] B = x W + b
    sxx_aug = np.block([[m["sxx"], m["sx"][:, None]], [m["sx"][None], np.array([[n]])]])
    sxy_aug = np.vstack([m["sxy"], m["sy"][None]])
    sse = np.trace(m["syy"]) - 2 * np.sum(b_aug * sxy_aug) + np.sum(b_aug * (sxx_aug @ b_aug))
    sst = np.trace(m["syy"]) - m["sy"] @ m["sy"] / n
    return float(1 - sse / sst) if sst > 0 else float("nan")


def concept_moments(x_nd, group_ng, positive_nc) -> dict[str, jax.Array]:
    """Per labelled set g (concepts sharing which tokens are labelled): n, Σx, XᵀX; per concept c: positives, Σx."""
    x = x_nd.astype(jnp.float32)
    return {
        "n": group_ng.sum(0),
        "sx": group_ng.T @ x,
        "sxx": jnp.einsum("ng,nd,ne->gde", group_ng, x, x),
        "npos": positive_nc.sum(0),
        "sxpos": positive_nc.T @ x,
    }


def fit_probe(n, sx, sxx, npos, sxpos, shrinkage: float = PROBE_SHRINKAGE) -> tuple[np.ndarray, np.ndarray]:
    """Linear discriminant analysis as an affine score x·w + b > 0: two Gaussian classes with one covariance and
    their priors, so the threshold is Bayes-optimal however rare the concept (a least-squares ±1 classifier
    calls nearly every token negative when 5% are positive). The within-class covariance (total minus between-
    class, from the same moments) is shrunk towards its diagonal by `shrinkage`."""
    nneg = n - npos
    mu1, mu0 = sxpos / npos, (sx - sxpos) / nneg
    mu = sx / n
    diff = mu1 - mu0
    within = sxx / n - np.outer(mu, mu) - (npos / n) * (nneg / n) * np.outer(diff, diff)
    diag = np.diag(np.diag(within))
    floor = 1e-9 * max(np.trace(within) / len(mu), 1e-30)
    w = np.linalg.solve((1 - shrinkage) * within + shrinkage * diag + floor * np.eye(len(mu)), diff)
    return w, -w @ (mu1 + mu0) / 2 + np.log(npos / nneg)


def difference_of_means(n, sx, npos, sxpos) -> np.ndarray:
    """mean(x | positive) − mean(x | negative)."""
    return sxpos / npos - (sx - sxpos) / (n - npos)

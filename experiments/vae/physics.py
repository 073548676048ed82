"""What the latent space of an Ising VAE says about the phase transition.

Two questions, answered on held-out configurations with fits made on training configurations only:

1. Does a direction of the latent mean track the order parameter? The least-squares direction ``w`` from the
   latent means to the signed magnetisation ``m``; reported as the correlation of ``w . mu(x)`` with ``m`` and of
   ``|w . mu(x)|`` with ``|m|`` (the Z2 symmetry maps ``m -> -m``, so a VAE encodes the signed ``m``), plus the
   multiple correlation of a linear fit straight to ``|m|``.
2. Where does a simple classifier of the latent mean switch from "ordered" to "disordered"? A logistic
   regression on quadratic features of the latent mean (quadratic, so it can call both magnetisation signs
   ordered) is trained only on the clearly ordered (``T <= ordered_below``) and clearly disordered
   (``T >= disordered_above``) training configurations, never told T_c; the temperature at which its mean
   prediction on held-out configurations crosses 1/2 is compared with Onsager's T_c. A classifier trained with
   the labels ``T < T_c`` on all temperatures is also reported (it is told T_c, so it checks consistency only).
"""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import PolynomialFeatures, StandardScaler

from physppl.models.simulators.ising import T_C

__all__ = ["order_parameter_direction", "phase_classifier", "switch_temperature", "phase_analysis"]


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def order_parameter_direction(mu_train: np.ndarray, m_train: np.ndarray, mu_test: np.ndarray,
                              m_test: np.ndarray) -> dict:
    """Least-squares latent direction for the signed magnetisation, scored on the test set."""
    reg = LinearRegression().fit(mu_train, m_train)
    norm = max(float(np.linalg.norm(reg.coef_)), 1e-12)
    # projection on the unit direction w, shifted so that 0 is the latent point predicted to have m = 0:
    # then |projection| measures order
    proj_test = reg.predict(mu_test) / norm
    proj_train = reg.predict(mu_train) / norm
    abs_reg = LinearRegression().fit(mu_train, np.abs(m_train))
    per_coord = [abs(_corr(mu_test[:, j], np.abs(m_test))) for j in range(mu_test.shape[1])]
    return {
        "direction": reg.coef_ / norm,
        "projection_test": proj_test,
        "projection_train": proj_train,
        "corr_latent_m": _corr(proj_test, m_test),
        "corr_abs_latent_abs_m": _corr(np.abs(proj_test), np.abs(m_test)),
        "r_linear_abs_m": max(0.0, _corr(abs_reg.predict(mu_test), np.abs(m_test))),
        "best_coordinate": int(np.argmax(per_coord)),
        "best_coordinate_corr_abs_m": float(max(per_coord)),
    }


def phase_classifier(mu: np.ndarray, ordered: np.ndarray, seed: int = 0):
    """Logistic regression on standardised quadratic features of the latent mean."""
    clf = make_pipeline(StandardScaler(), PolynomialFeatures(2), LogisticRegression(C=1.0, max_iter=2000,
                                                                                    random_state=seed))
    return clf.fit(mu, ordered.astype(int))


def switch_temperature(temperature: np.ndarray, p_ordered: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Temperature where the mean P(ordered) per temperature crosses 1/2 (linear interpolation between grid
    temperatures; the crossing nearest the middle of the grid if there are several). NaN if it never crosses."""
    temps = np.unique(temperature)
    mean_p = np.array([p_ordered[temperature == t].mean() for t in temps])
    s = mean_p - 0.5
    idx = np.nonzero((s[:-1] > 0) & (s[1:] <= 0))[0]
    if idx.size == 0:
        return float("nan"), temps, mean_p
    k = idx[np.argmin(np.abs(temps[idx] - np.median(temps)))]
    t_switch = temps[k] + s[k] * (temps[k + 1] - temps[k]) / (s[k] - s[k + 1])
    return float(t_switch), temps, mean_p


def phase_analysis(mu_train: np.ndarray, labels_train: dict, mu_test: np.ndarray, labels_test: dict,
                   ordered_below: float = 1.8, disordered_above: float = 2.8, t_c: float = T_C,
                   seed: int = 0) -> dict:
    """All figures of the module docstring; arrays for plotting under the ``"curves"`` key."""
    t_tr, t_te = labels_train["temperature"], labels_test["temperature"]
    direction = order_parameter_direction(mu_train, labels_train["magnetization"], mu_test,
                                          labels_test["magnetization"])
    out = {k: v for k, v in direction.items() if not isinstance(v, np.ndarray)}
    out["t_c"] = t_c
    far = (t_tr <= ordered_below) | (t_tr >= disordered_above)
    curves: dict = {"projection_test": direction["projection_test"]}
    if far.sum() >= 4 and len(np.unique(t_tr[far] <= ordered_below)) == 2:
        clf = phase_classifier(mu_train[far], t_tr[far] <= ordered_below, seed)
        p = clf.predict_proba(mu_test)[:, 1]
        t_switch, temps, mean_p = switch_temperature(t_te, p)
        far_te = (t_te <= ordered_below) | (t_te >= disordered_above)
        out.update(switch_temperature=t_switch, switch_minus_tc=t_switch - t_c,
                   switch_relative_error=abs(t_switch - t_c) / t_c,
                   classifier_accuracy_far=float(((p > 0.5) == (t_te <= ordered_below))[far_te].mean()),
                   classifier_window=[ordered_below, disordered_above])
        curves.update(temperatures=temps, p_ordered=mean_p, p_ordered_test=p)
    both = len(np.unique(t_tr < t_c)) == 2
    if both:
        clf = phase_classifier(mu_train, t_tr < t_c, seed)
        p_sup = clf.predict_proba(mu_test)[:, 1]
        t_sup, temps, mean_sup = switch_temperature(t_te, p_sup)
        out.update(switch_temperature_supervised=t_sup,
                   classifier_accuracy_supervised=float(((p_sup > 0.5) == (t_te < t_c)).mean()))
        curves.update(temperatures=temps, p_ordered_supervised=mean_sup)
    out["curves"] = curves
    return out

"""Issue 17, defect 7: a knob that is off is neither checked nor blamed, and the history's loss
columns mean the same in both modes: loss = data_loss + l0_penalty + l2_penalty."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from test_fit import _problem

from calibrate.app.diagnose import check_penalty_scale, divergence_advice
from calibrate.core.errors import CalibrateError
from legacy_cfg import L0Config

from calibrate.fit import fit_l0

HUGE = 1e39  # above float32's max


def test_unused_lambda_l0_is_not_checked_with_a_sparsity_target():
    check_penalty_scale(L0Config(lambda_l0=HUGE, target_active_share=0.2), 1000)  # controller on: unused
    with pytest.raises(CalibrateError, match="fit.lambda_l0"):
        check_penalty_scale(L0Config(lambda_l0=HUGE), 1000)
    with pytest.raises(CalibrateError, match="fit.lambda_l2"):  # lambda_l2 is used in both modes
        check_penalty_scale(L0Config(lambda_l2=HUGE, target_active_share=0.2), 1000)


def test_divergence_advice_does_not_blame_an_unused_lambda_l0():
    X = sp.csr_matrix(np.eye(3, dtype=np.float32))
    targets, init = np.ones(3), np.ones(3)
    assert "fit.lambda_l0" in divergence_advice(L0Config(lambda_l0=1e30), X, targets, init)
    advice = divergence_advice(L0Config(lambda_l0=1e30, target_active_share=0.2, lr=0.3), X, targets, init)
    assert "lambda_l0" not in advice and "fit.lr" in advice and "0.3" in advice


@pytest.mark.parametrize("controlled", [False, True])
def test_history_loss_is_data_plus_named_penalties(controlled):
    X, y, _, _ = _problem(seed=5)
    init = np.random.default_rng(1).uniform(0.5, 2.0, X.shape[1])
    lam0, lam2, keep = 1e-3, 1e-4, 0.999
    cfg = L0Config(epochs=20, lr=0.05, log_every=10, jitter=0.0, lambda_l0=lam0, lambda_l2=lam2, init_keep_prob=keep,
                   target_active_share=0.5 if controlled else None)
    h = fit_l0(X, y, init, cfg, progress=False).history
    assert {"loss", "data_loss", "l0_penalty", "l2_penalty"} <= set(h.columns)
    np.testing.assert_allclose(h.loss, h.data_loss + h.l0_penalty + h.l2_penalty, rtol=1e-5)
    # epoch 0 by hand: every gate at logit(keep); P(open) = sigmoid(log_alpha - beta * log(-gamma / zeta))
    p_open = 1.0 / (1.0 + np.exp(-(np.log(keep / (1 - keep)) - cfg.beta * np.log(-cfg.gamma / cfg.zeta))))
    expected_l0 = 0.0 if controlled else lam0 * X.shape[1] * p_open
    assert h.l0_penalty.iloc[0] == pytest.approx(expected_l0, rel=1e-5)
    assert h.l2_penalty.iloc[0] == pytest.approx(lam2 * np.sum(init.astype(np.float32).astype(np.float64) ** 2), rel=1e-5)
    if controlled:
        assert (h.l0_penalty == 0).all()  # the controller's pressure acts outside the objective
        assert h.lambda_median.iloc[-1] != 0

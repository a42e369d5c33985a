"""Test helper: the fit settings under their pre-FitConfig names (``L0Config(target_active_share=..)``),
so the defect tests read as they were written; maps them onto :class:`calibrate.fit.FitConfig`."""

from __future__ import annotations

from calibrate.fit.config import FitConfig, SparsityConfig


def L0Config(target_active_share=None, sparsity_ramp=0.5, sparsity_gain=20.0, polish_epochs=0, **fields) -> FitConfig:  # noqa: N802
    epochs = fields.get("epochs", FitConfig.epochs)
    cfg = FitConfig(**fields, polish_share=polish_epochs / epochs,
                    sparsity=SparsityConfig(active_share=target_active_share, ramp=sparsity_ramp, gain=sparsity_gain))
    assert cfg.polish_epochs == polish_epochs, "choose polish_epochs so that polish_share * epochs is exact"
    return cfg

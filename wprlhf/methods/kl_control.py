"""KL controllers: the coefficient of the KL penalty, an object with `value` and `update(kl, n_episodes)`.

PPO, RLOO and GRPO read `value` when they build a step's penalty and call `update` with the step's mean KL per
response (nats). Imports nothing.
"""

from __future__ import annotations


class FixedKLController:
    """A constant kl_coef."""

    def __init__(self, value: float):
        self.value = value

    def update(self, kl: float, n_episodes: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019, eq. 2 (their beta is our kl_coef): e = clip(KL / target - 1, -0.2, 0.2);
    kl_coef <- kl_coef (1 + e * n / horizon)."""

    def __init__(self, value: float, target: float, horizon: int):
        super().__init__(value)
        self.target, self.horizon = target, horizon

    def update(self, kl: float, n_episodes: int) -> None:
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_episodes / self.horizon


def kl_controller(config) -> FixedKLController:
    """The controller a run's config asks for: adaptive towards config.kl_target (config.adaptive_kl) or fixed at
    config.kl_coef. `config` is a PPOConfig or any object with kl_coef, adaptive_kl, kl_target and kl_horizon."""
    if config.adaptive_kl:
        return AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
    return FixedKLController(config.kl_coef)

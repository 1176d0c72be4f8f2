"""Server steps (outer optimizers) over the flat meta-parameter vector."""

from __future__ import annotations

import math

import torch

from fedmeta.common.algorithms.base import OuterConfig, OuterStep
from fedmeta.common.codec import abs_max

# The largest |update value| any outer step accepts. Adam squares each meta-gradient
# coordinate: g^2 must stay finite in float32 (|g| < sqrt(3.4e38) ~ 1.8e19), and the
# coordinator's float32 running sum adds up to (clients x tasks) such values; 1e18 leaves
# g^2 ~ 1e36, a factor ~340 under float32's maximum. No honest update comes near it.
MAX_UPDATE_ABS = 1e18


def is_finite(t: torch.Tensor) -> bool:
    return not t.is_floating_point() or math.isfinite(abs_max(t))


def guarded_step(outer: OuterStep, theta: torch.Tensor, update: torch.Tensor, round_index: int) -> float | None:
    """outer.step(theta, update), undone unless theta and the optimiser state are all finite after it.

    Returns the step's learning rate, or None when the step was undone: theta (stepped in
    place) and the optimiser state are then exactly what they were before. Costs one copy of
    theta and of the optimiser state (O(model)) per step.
    """
    theta_before = theta.clone()
    state_before = {k: v.clone() for k, v in outer.state_dict().items()}
    lr = outer.step(theta, update, round_index)
    if is_finite(theta) and all(is_finite(v) for v in outer.state_dict().values()):
        return lr
    theta.copy_(theta_before)
    outer.load_state_dict(state_before)
    return None


class AdamOuter:
    """theta <- Adam(theta, g) with g the weighted mean meta-gradient (Kingma & Ba 2015).

    With config.cosine the learning rate follows lr * (1 + cos(pi * r / R)) / 2 (MAML++).
    """

    def __init__(self, config: OuterConfig, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.lr = config.lr
        self.cosine = config.cosine
        self.rounds = max(1, config.rounds)
        self.betas = betas
        self.eps = eps
        self.step_count = 0
        self.exp_avg: torch.Tensor | None = None
        self.exp_avg_sq: torch.Tensor | None = None

    def step(self, theta: torch.Tensor, update: torch.Tensor, round_index: int) -> float:
        if self.exp_avg is None or self.exp_avg_sq is None:
            self.exp_avg = torch.zeros_like(theta)
            self.exp_avg_sq = torch.zeros_like(theta)
        b1, b2 = self.betas
        self.step_count += 1
        self.exp_avg.mul_(b1).add_(update, alpha=1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(update, update, value=1 - b2)
        bias1 = 1 - b1**self.step_count
        bias2 = 1 - b2**self.step_count
        denom = (self.exp_avg_sq / bias2).sqrt_().add_(self.eps)
        lr = self.lr
        if self.cosine:
            lr = self.lr * 0.5 * (1.0 + math.cos(math.pi * min(round_index, self.rounds) / self.rounds))
        theta.addcdiv_(self.exp_avg, denom, value=-lr / bias1)
        return lr

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"step": torch.tensor(self.step_count, dtype=torch.int64)}
        if self.exp_avg is not None and self.exp_avg_sq is not None:
            state["exp_avg"] = self.exp_avg
            state["exp_avg_sq"] = self.exp_avg_sq
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.step_count = int(state["step"])
        self.exp_avg = state.get("exp_avg")
        self.exp_avg_sq = state.get("exp_avg_sq")


class ReptileOuter:
    """theta <- theta + eps_r * mean(delta), eps_r = lr * (1 - r / R) (Nichol et al. 2018)."""

    def __init__(self, config: OuterConfig) -> None:
        self.lr = config.lr
        self.rounds = max(1, config.rounds)

    def step(self, theta: torch.Tensor, update: torch.Tensor, round_index: int) -> float:
        eps = self.lr * (1.0 - round_index / self.rounds)
        theta.add_(update, alpha=eps)
        return eps

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


class AverageOuter:
    """theta <- theta + lr * mean(delta), lr constant (FedAvg, Per-FedAvg: lr 1 is plain averaging)."""

    def __init__(self, config: OuterConfig) -> None:
        self.lr = config.lr

    def step(self, theta: torch.Tensor, update: torch.Tensor, round_index: int) -> float:
        theta.add_(update, alpha=self.lr)
        return self.lr

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

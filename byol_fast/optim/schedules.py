"""Learning-rate and target-decay schedules: pure functions of the optimizer step.

BYOL (Grill et al. 2020, Appendix B/C): the learning rate warms up linearly for the first
epochs, then follows a cosine decay to zero; the target decay tau rises from tau_base to 1
on a cosine. Both are evaluated per step, never stored in the config.
"""
import math


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule: lr = base_lr * batch_size / 256."""
    return base_lr * batch_size / 256


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warm-up from 0 to ``peak_lr`` over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def tau_at(step: int, total_steps: int, tau_base: float) -> float:
    """tau_k = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2: tau_base at k = 0, 1 at k = K."""
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * progress) + 1.0) / 2.0

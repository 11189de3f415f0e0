"""The slimmable training policy: which sub-networks train at a step (``policy``), how much each one's loss
weighs (``weights``: ``register_loss_weights`` adds a rule), and per-sub-network gradient diagnostics."""

from .weights import LOSS_WEIGHTS, register_loss_weights

__all__ = ["LOSS_WEIGHTS", "register_loss_weights"]

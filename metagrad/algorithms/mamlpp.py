"""MAML++ (Antoniou, Edwards, Storkey, ICLR 2019, "How to train your MAML").

On the core: learned per-layer per-step inner rates (LSLR, ``learn_lr="per-layer-per-step"``)
and the multi-step loss (weighted query losses after every step), plus two schedules over
training that :meth:`MAMLpp.schedule` applies before each meta-iteration:

* the multi-step loss weights are annealed towards the last step over ``msl_epochs``
  epochs, then only the last step's loss counts (:func:`msl_weights`, the reference code's
  ``get_per_step_loss_importance_vector``);
* derivative-order annealing: first order for the first ``first_order_epochs`` epochs,
  second order after.

Per-step BatchNorm (BNRS/BNWB) is the model's: :class:`metagrad.models.StepBatchNorm`, in a
model whose ``forward`` takes the inner step index (:func:`metagrad.models.mamlpp_conv4`).
The cosine annealing of the meta learning rate is a ``torch.optim.lr_scheduler`` in the
training loop (``lr_schedule = "cosine"``). An epoch is ``epoch_iterations`` meta-iterations
(the reference code's 500).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core import MAML
from ..core.functional import LossFn


def msl_weights(steps: int, epoch: int, msl_epochs: int) -> list[float] | None:
    """The multi-step loss weights of ``epoch`` (0-based): ``1/steps`` each at epoch 0; each
    epoch the weights of steps before the last fall by ``1/(steps*msl_epochs)`` down to
    ``0.03/steps`` and the last one's rises by the sum of what they lose, up to
    ``1 - (steps-1)*0.03/steps``. From epoch ``msl_epochs`` on: ``None``, the last step's
    loss alone."""
    if steps < 1 or msl_epochs < 0 or epoch < 0:
        raise ValueError(f"msl_weights needs steps >= 1, msl_epochs >= 0, epoch >= 0; got "
                         f"{steps}, {msl_epochs}, {epoch}")  # fmt: skip
    if epoch >= msl_epochs:
        return None
    start, decay, floor = 1.0 / steps, 1.0 / steps / msl_epochs, 0.03 / steps
    weights = [max(start - epoch * decay, floor) for _ in range(steps - 1)]
    last = min(start + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return [*weights, last]


class MAMLpp(MAML):
    """MAML++: ``MAML`` with LSLR and the annealed multi-step loss, each switchable.

    Args:
        lslr: learned per-layer per-step inner rates, starting at ``inner_lr``.
        multi_step_loss: the annealed multi-step loss for the first ``msl_epochs`` epochs.
        first_order_epochs: epochs of first-order meta-gradients before second order (0:
            second order throughout, the reference code's Omniglot and MiniImagenet setting).
        epoch_iterations: meta-iterations per epoch.

    Call :meth:`schedule` with the iteration before each meta-iteration (``metagrad train``
    does); the learner starts at iteration 0's settings.

    Example:
        >>> import torch.nn.functional as F
        >>> import metagrad as mg
        >>> net = mg.models.mamlpp_conv4(ways=5, steps=3, image=28, in_channels=1, filters=8)
        >>> mpp = mg.MAMLpp(net, F.cross_entropy, inner_lr=0.1, inner_steps=3,
        ...                 msl_epochs=10, epoch_iterations=500)
        >>> mpp.step_weights  # the multi-step loss at epoch 0: every step alike
        tensor([0.3333, 0.3333, 0.3333])
        >>> mpp.schedule(4_999)  # epoch 9: the earlier steps' weights decayed towards 0
        >>> mpp.step_weights
        tensor([0.0333, 0.0333, 0.9333])
        >>> mpp.schedule(5_000)  # from epoch 10 on: the last step's loss alone
        >>> mpp.step_weights is None
        True
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, inner_lr: float = 0.1, inner_steps: int = 5,
        *, lslr: bool = True, multi_step_loss: bool = True, msl_epochs: int = 10,
        first_order_epochs: int = 0, epoch_iterations: int = 500, **kwargs: Any,
    ) -> None:  # fmt: skip
        for key in ("learn_lr", "step_weights"):
            if key in kwargs:
                raise TypeError(f"MAMLpp sets {key}= itself (lslr=, multi_step_loss=)")
        if msl_epochs < 0 or first_order_epochs < 0 or epoch_iterations < 1:
            raise ValueError(f"MAMLpp needs msl_epochs >= 0, first_order_epochs >= 0 and "
                             f"epoch_iterations >= 1, got {msl_epochs}, {first_order_epochs}, "
                             f"{epoch_iterations}")  # fmt: skip
        learn_lr = "per-layer-per-step" if lslr else None
        super().__init__(model, loss_fn, inner_lr, inner_steps, learn_lr=learn_lr, **kwargs)
        self.multi_step_loss, self.msl_epochs = bool(multi_step_loss), int(msl_epochs)
        self.first_order_epochs, self.epoch_iterations = int(first_order_epochs), int(epoch_iterations)  # fmt: skip
        self.always_first_order = self.first_order
        self.schedule(0)

    def schedule(self, iteration: int) -> None:
        """Set the multi-step loss weights and the derivative order of ``iteration``."""
        epoch = iteration // self.epoch_iterations
        weights = msl_weights(self.inner_steps, epoch, self.msl_epochs) if self.multi_step_loss else None  # fmt: skip
        self.step_weights = weights  # type: ignore[assignment]
        self.first_order = self.always_first_order or epoch < self.first_order_epochs

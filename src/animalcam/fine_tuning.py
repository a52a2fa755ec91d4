"""Fine-tuning that keeps what the head warm-up learnt (issue 12).

When the backbone is unfrozen, a freshly built Adam moves every weight by about one
learning rate in its first steps, whatever the size of its gradient: pretrained filters
that were fine get the same jolt as the head. Three small pieces soften that switch:

- :class:`DiscriminativeAdam`: Adam whose backbone variables update at
  ``learning_rate * backbone_lr_factor`` while the head updates at ``learning_rate``
  (fastai's discriminative learning rates). A factor of 1 is plain Adam, bit for bit.
- :class:`LearningRateWarmup`: the phase's learning rate rises linearly from
  ``rate / steps`` to ``rate`` over its first ``steps`` optimizer steps.
- :func:`collapse_check`: after the fact, whether validation accuracy fell by more than
  half in the first epoch after a phase switch, with a message naming cause and fix.

The head's Adam state is NOT carried from the warm-up into the next phase: Keras' Adam
keeps one step count for all variables, so a carried count would apply the bias
correction of step N to the backbone's zero moments and make its first updates about
3x larger (m / sqrt(v) = 0.1 / sqrt(0.001) without the correction), the opposite of what
the switch needs; on the fast path the head's state at the best epoch is not saved
either. The learning-rate warm-up covers the head's fresh moments instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import keras

log = logging.getLogger(__name__)

# A new phase's first epoch below this fraction of the previous phase's best validation
# accuracy counts as a collapse (issue 12: 0.70 -> 0.12 at the unfreezing).
COLLAPSE_FRACTION = 0.5


@keras.saving.register_keras_serializable(package="animalcam")
class DiscriminativeAdam(keras.optimizers.Adam):
    """Adam that scales the learning rate of the variables of ``backbone_layers``.

    ``backbone_layers``: names of the layers whose variables update at ``learning_rate x
    backbone_lr_factor`` (a variable belongs to a layer when the layer's name is a
    component of the variable's path, e.g. "animalcam_vgg16/block1_conv1/kernel").
    Every other variable (the head) updates at ``learning_rate``. The state (moments,
    step count, learning rate) is Adam's, so weights saved with ``save_weights`` load
    into either.
    """

    def __init__(
        self,
        learning_rate=0.001,
        *,
        backbone_layers: Sequence[str] = (),
        backbone_lr_factor: float = 1.0,
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, **kwargs)
        if not 0 < backbone_lr_factor <= 1:
            raise ValueError(f"backbone_lr_factor must be in (0, 1], got {backbone_lr_factor}")
        self.backbone_layers = tuple(backbone_layers)
        self.backbone_lr_factor = float(backbone_lr_factor)
        self._backbone_names = frozenset(self.backbone_layers)

        self._scaled: frozenset[int] = frozenset()  # indices of the backbone's variables

    def is_backbone(self, variable: keras.Variable) -> bool:
        """Whether the Keras ``variable`` updates at the backbone's (scaled) rate."""
        return not self._backbone_names.isdisjoint(variable.path.split("/")[:-1])

    def build(self, variables):
        super().build(variables)
        # update_step receives the backend's variable (no Keras path): look it up by index.
        self._scaled = frozenset(i for i, v in enumerate(variables) if self.is_backbone(v))

    def update_step(self, gradient, variable, learning_rate):
        # Decided per variable while the train step is traced: no cost per step. A
        # factor of 1 leaves the rate untouched, so the updates are plain Adam's.
        scaled = self._get_variable_index(variable) in self._scaled
        if self.backbone_lr_factor != 1.0 and scaled:
            learning_rate = learning_rate * self.backbone_lr_factor
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        config = super().get_config()
        config["backbone_layers"] = list(self.backbone_layers)
        config["backbone_lr_factor"] = self.backbone_lr_factor
        return config


class LearningRateWarmup(keras.callbacks.Callback):
    """Raise the learning rate linearly over a phase's first ``steps`` optimizer steps.

    Step s (1-based, counted by the optimizer, which a new phase builds fresh and a
    resumed phase restores) trains at ``base * s / steps``; from step ``steps`` on the
    callback no longer touches the rate. ``base`` is read back from the optimizer before
    every step (the rate it holds divided by the ramp fraction last applied), so a
    ReduceLROnPlateau cut made at an epoch end during the ramp carries through it, and a
    phase resumed part-way through its ramp continues it from the restored rate. The ramp
    may span several epochs: on a small dataset one epoch is a handful of steps, too few
    to ease the pretrained weights into training. Put it before callbacks that read the
    rate at the start of an epoch, so they see the rate of that epoch's first step.
    """

    def __init__(self, learning_rate: float, steps: int):
        super().__init__()
        self.learning_rate = float(learning_rate)  # the phase's rate, before any cut
        self.steps = int(steps)
        self._step = 0  # steps taken in this phase so far

    def rate(self, step: int, base: float | None = None) -> float:
        """The learning rate of optimizer step ``step`` (1-based) of the phase."""
        base = self.learning_rate if base is None else base
        if self.steps <= 0 or step >= self.steps:
            return base
        return base * max(step, 1) / self.steps

    def on_train_begin(self, logs=None):
        # Read once: the optimizer's count of steps already taken in this phase.
        self._step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self._base = self.learning_rate
        self._last: float | None = None  # the rate this callback last set
        if 0 < self._step < self.steps:  # resumed mid-ramp: the restored rate is step's
            self._base = self._held() / self.rate(self._step, 1.0)
        self._set_next()

    def on_epoch_begin(self, epoch, logs=None):
        # Also here, so that what reads the rate as an epoch starts (the resume state's
        # history) sees the rate of its first step, resumed or not.
        self._set_next()

    def on_train_batch_begin(self, batch, logs=None):
        self._set_next()

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1

    def _held(self) -> float:
        return float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def _set_next(self) -> None:
        if self._step >= self.steps:  # past the warm-up: hands off
            return
        if self._last is not None:  # another callback's cut since: keep it
            self._base *= self._held() / self._last
        self.model.optimizer.learning_rate = self.rate(self._step + 1, self._base)
        self._last = self._held()  # as stored (float32), so an untouched rate gives 1.0


@dataclass(frozen=True)
class Collapse:
    """Validation accuracy across a phase switch that lost more than half of it."""

    switch_epoch: int  # 1-based: the first epoch of the new phase
    before: float  # best val_accuracy of the phases before
    after: float  # val_accuracy of the new phase's first epoch

    def message(self, trainable: int | str) -> str:
        what = "the backbone was unfrozen" if trainable != "head" else "the phase changed"
        return (
            f"validation accuracy fell from {self.before:.2f} to {self.after:.2f} in epoch "
            f"{self.switch_epoch}, the first after {what}: the fine-tuning steps are too "
            "large for the pretrained weights; lower train.learning_rate or "
            "train.backbone_lr_factor, or raise train.lr_warmup_steps."
        )


def collapse_check(history: Iterable[Mapping[str, float]]) -> Collapse | None:
    """The first phase switch in ``history`` after which val_accuracy fell below
    COLLAPSE_FRACTION of the best val_accuracy before it; None when there is none.

    ``history``: per-epoch rows with "epoch", "val_accuracy" and "phase_epoch" (1-based
    epoch within its phase; a row with phase_epoch 1 after epoch 1 starts a new phase).
    """
    best: float | None = None
    for row in sorted(history, key=lambda r: r["epoch"]):
        accuracy = row.get("val_accuracy")
        if accuracy is None:
            continue
        if row.get("phase_epoch") == 1 and best is not None and accuracy < COLLAPSE_FRACTION * best:
            return Collapse(int(row["epoch"]), float(best), float(accuracy))
        best = accuracy if best is None else max(best, accuracy)
    return None

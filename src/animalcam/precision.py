"""Which floating-point type the network computes in on this machine: its Keras dtype policy.

Three policies, chosen per process by :func:`resolve_policy` from a setting in
``params.yaml`` (``train.mixed_precision``, ``evaluate.mixed_precision``,
``explain.mixed_precision``):

- ``float32``: everything in float32 (what every machine computes the same way);
- ``mixed_bfloat16``: convolutions and matrix products in bfloat16 on a CPU that has
  bfloat16 instructions (AVX512_BF16: AMD Zen 4, Intel Cooper Lake and later; AMX: Intel
  Sapphire Rapids and later), about twice as fast as float32 there (docs/benchmarks.md);
- ``mixed_float16``: float16 on a GPU (tensor cores, half the memory traffic).

Under either mixed policy the variables (so the optimizer's updates and the saved
weights), the softmax (``animalcam.layers.ClassProbabilities``) and the losses stay
float32. bfloat16 keeps float32's exponent range, so it needs no loss scaling (Keras
scales the loss for float16 only).

The settings: ``auto`` picks float16 on a GPU, bfloat16 on a CPU with bfloat16
instructions (while TensorFlow runs its oneDNN kernels, as it does by default on such
CPUs: with ``TF_ENABLE_ONEDNN_OPTS=0`` bfloat16 is no faster) and float32 elsewhere;
``on`` forces the machine's 16-bit type (float16 on
a GPU, bfloat16 on any CPU: emulated, and slower than float32, on a CPU without the
instructions, with a warning); ``off`` forces float32; ``bfloat16`` and ``float16``
force that type wherever the process runs (``float16`` on a CPU is slow, with a warning).

The saved model is always float32 (:func:`inference_model` with ``"float32"``, which
``animalcam.modeling.save_model`` applies), so it loads and predicts the same whatever
machine loads it. Whoever runs a loaded model (evaluate, explain, serving, prediction,
anything that computes backbone features from it) calls::

    model = inference_model(load_model(path), resolve_policy(setting))

to compute under this machine's policy with the same weights.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from animalcam.errors import ParamsError
from animalcam.params import PRECISION_SETTINGS

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

FLOAT32 = "float32"
MIXED_BFLOAT16 = "mixed_bfloat16"
MIXED_FLOAT16 = "mixed_float16"
POLICIES = (FLOAT32, MIXED_BFLOAT16, MIXED_FLOAT16)

CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The processor's feature flags, from the text of ``/proc/cpuinfo`` (read when
    ``cpuinfo`` is None). Empty on other systems or when it cannot be read."""
    if cpuinfo is None:
        if not sys.platform.startswith("linux"):
            return frozenset()
        try:
            cpuinfo = CPUINFO.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        # x86's "flags" line (every core lists the same); "vmx flags" is another list.
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_computes_bfloat16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has bfloat16 instructions (AVX512_BF16, or AMX with its bfloat16
    unit). ``cpuinfo``: the text of ``/proc/cpuinfo`` (read when None); False on systems
    without it (macOS, Windows), where float32 is the safe choice."""
    flags = cpu_flags(cpuinfo)
    # Linux's spelling of the flags; AMX's bfloat16 unit works on its tiles (amx_tile).
    return "avx512_bf16" in flags or {"amx_bf16", "amx_tile"} <= flags


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN CPU kernels in this process, which is where
    bfloat16 is fast (on by default on CPUs with AVX-512; ``TF_ENABLE_ONEDNN_OPTS=0``
    turns them off)."""
    try:  # TensorFlow's own answer; a private module, so fall back to the variable.
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip().lower() not in ("0", "false")


def gpu_visible() -> bool:
    """Whether TensorFlow sees a GPU."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def resolve_policy(setting: str, key: str = "train.mixed_precision") -> str:
    """The Keras dtype policy for ``setting`` (one of params.PRECISION_SETTINGS) on this
    machine; ``key`` names the setting in messages. See the module docstring."""
    if setting not in PRECISION_SETTINGS:
        allowed = ", ".join(f"'{s}'" for s in PRECISION_SETTINGS)
        raise ParamsError(f"{key} = {setting!r} is not allowed; expected one of {allowed}.")
    if setting == "off":
        return FLOAT32
    gpu = gpu_visible()
    if setting == "float16" or (setting in ("auto", "on") and gpu):
        if not gpu:
            log.warning("%s is 'float16' without a GPU: float16 on a CPU is slow", key)
        return MIXED_FLOAT16
    instructions = cpu_computes_bfloat16()
    fast = instructions and onednn_enabled()
    if setting == "bfloat16" or setting == "on" or fast:
        if not gpu and not fast:
            why = (
                "TensorFlow's oneDNN kernels are off (TF_ENABLE_ONEDNN_OPTS=0): bfloat16 is "
                "no faster than float32"
                if instructions
                else "this CPU has no bfloat16 instructions (AVX512_BF16 or AMX): bfloat16 "
                "runs emulated, slower than float32"
            )
            log.warning("%s is %r but %s; 'auto' chooses float32 here", key, setting, why)
        return MIXED_BFLOAT16
    return FLOAT32


def describe(policy: str) -> str:
    """One phrase for logs: what ``policy`` computes in."""
    return {
        FLOAT32: "float32",
        MIXED_BFLOAT16: "bfloat16 compute, float32 weights and softmax",
        MIXED_FLOAT16: "float16 compute, float32 weights and softmax",
    }.get(policy, policy)


def model_policy(model: keras.Model) -> str:
    """The policy ``model``'s layers compute under (layers that always stay float32, such
    as the softmax, aside): one of POLICIES, or "mixed" when its layers disagree."""
    import keras

    names = {
        model_policy(layer) if isinstance(layer, keras.Model) else layer.dtype_policy.name
        for layer in model.layers
        if not _stays_float32(layer)
    }
    return names.pop() if len(names) == 1 else "mixed"


def inference_model(model: keras.Model, policy: str) -> keras.Model:
    """``model`` computing under the Keras dtype ``policy``, with the same weights.

    A model already under ``policy`` is returned as it is; otherwise a copy is built
    from its config, every layer (the float32 softmax aside) under ``policy``, and each
    layer's weights copied over: the same graph, layer names and class names, as if
    ``animalcam.modeling.build_model`` had built it under ``policy``. ``"float32"``
    gives the portable model the train stage saves; a loaded model under
    :func:`resolve_policy`'s choice is the fast one for this machine. The copy is
    uncompiled and holds its own variables (training one does not train the other).
    """
    import keras

    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r} is not one of {', '.join(POLICIES)}")
    if model_policy(model) == policy:
        return model

    def rebuild(layer):
        if isinstance(layer, keras.Model):  # a nested model: its own layers, recursively
            return inference_model(layer, policy)
        config = layer.get_config()
        if not _stays_float32(layer):
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=rebuild)
    for old, new in zip(model.layers, copy.layers, strict=True):
        new.set_weights(old.get_weights())
    return copy


def _stays_float32(layer) -> bool:
    """Layers that compute in float32 under any policy: inputs, and the softmax."""
    import keras

    from animalcam.layers import ClassProbabilities

    return isinstance(layer, (keras.layers.InputLayer, ClassProbabilities))

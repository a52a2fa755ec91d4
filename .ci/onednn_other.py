"""Print the TF_ENABLE_ONEDNN_OPTS value (0 or 1) this machine does NOT use by default."""

import os

os.environ.pop("TF_ENABLE_ONEDNN_OPTS", None)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
try:
    # TensorFlow's own answer; a private module, so fall back to the processor's flags.
    from tensorflow.python.util import _pywrap_util_port

    default_on = bool(_pywrap_util_port.IsMklEnabled())
except (ImportError, AttributeError):
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        default_on = " avx512" in cpuinfo.read()
print(0 if default_on else 1)

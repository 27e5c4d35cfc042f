"""Every test process runs JAX on the CPU.

With the TPU compiler installed (the ``tpu`` extra, which CI installs for
tests/test_tpu_compile.py) a JAX process on a machine with no TPU would try
libtpu first and print its start-up warnings; the tests that compile for a
TPU ask for it explicitly (examples/bert/train_compile.py). Subprocesses
inherit the setting. A value already set is kept.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

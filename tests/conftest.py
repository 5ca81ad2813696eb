import os

import torch

# Triton kernels run under the interpreter on a machine without a GPU. The variable is read when a
# kernel module is imported, so it is set here, before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

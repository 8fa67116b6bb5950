"""Kernel tests run on CPU under the Triton interpreter.

TRITON_INTERPRET is read when a kernel is decorated with @triton.jit, i.e. when
trainer.kd_loss_triton is first imported, so it is set here, before any test module loads.
With a CUDA device the kernels are compiled instead and the same tests run on the GPU (an
interpreted kernel would make the real-shape @pytest.mark.gpu tests take hours).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

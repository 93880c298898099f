"""Without a GPU, generated Triton kernels run on the Triton interpreter. Triton reads
TRITON_INTERPRET when it is first imported, so it is set here, before anything imports it."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

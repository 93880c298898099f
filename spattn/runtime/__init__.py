"""Runtime: dispatch by device and dtype, the PyTorch backend, autograd."""

from spattn.runtime.dispatch import BACKENDS, BackendError, InputError, attention

__all__ = ["BACKENDS", "BackendError", "InputError", "attention"]

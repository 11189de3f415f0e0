"""What a public call (``pretrain``, an evaluation) keeps apart from its caller, entered by :func:`apart_from_caller`.

- The caller's torch modes, which the call must not inherit: a notebook cell or a test left under
  ``torch.no_grad()`` or ``torch.inference_mode()``, a ``torch.set_default_dtype(torch.float64)``, an outer
  ``torch.autocast``. Each made these calls fail with torch's own errors (a loss without a gradient, float64
  layers fed float32 images, a kNN vote in bfloat16). Inside, grad mode is on, inference mode off, the default
  dtype float32 and autocast off (a run's own precision turns it on where it trains); the caller's modes come
  back after it.
- The warnings said once (:func:`first_time`): once per call, so that each run of a sweep in one process says
  what concerns it (outside a call, as on the command line, once per process).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Hashable, Iterator

_SAID: contextvars.ContextVar[set | None] = contextvars.ContextVar("slimssl_said", default=None)
_SAID_OUTSIDE_CALLS: set = set()


def first_time(key: Hashable) -> bool:
    """Whether ``key`` (what a warning says) comes for the first time in this call, or in this process outside
    one; it is then remembered."""
    said = _SAID.get()
    if said is None:
        said = _SAID_OUTSIDE_CALLS
    if key in said:
        return False
    said.add(key)
    return True


@contextlib.contextmanager
def apart_from_caller() -> Iterator[None]:
    import torch  # late: first_time alone needs none

    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    token = _SAID.set(set())
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False), \
                torch.autocast("cuda", enabled=False):
            yield
    finally:
        _SAID.reset(token)
        torch.set_default_dtype(dtype)

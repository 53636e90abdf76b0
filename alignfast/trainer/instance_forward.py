"""A module's instance-level `forward` attribute that pickles and deep-copies with its module.

The fast backend gives some modules their own `forward` (trainer/lora_fast.py, trainer/embedding_grad.py). A bound
method of a function under another name would not unpickle (pickle looks a method up on its object by the
function's name), so the attribute is a small callable object holding its module.
"""

from __future__ import annotations


class InstanceForward:
    __slots__ = ("module",)

    def __init__(self, module):
        self.module = module

    def __getstate__(self):
        return self.module

    def __setstate__(self, module):
        self.module = module

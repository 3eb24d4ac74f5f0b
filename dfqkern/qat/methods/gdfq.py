"""GDFQ (Xu et al., ECCV 2020): conditional generator trained on the teacher's target cross-entropy plus
its BN-statistics loss; student trained with cross-entropy to the generator's labels plus KL distillation.

Everything GDFQ does is the default behaviour of :class:`~dfqkern.qat.methods.base.Method`; this
module only names it. GDFQ's generator-only warm-up is ``QATConfig.warmup_epochs``.
"""
from __future__ import annotations

from .base import Method


class GDFQ(Method):
    name = "gdfq"
    summary = "generator: target CE + BN statistics; student: CE + KL distillation"

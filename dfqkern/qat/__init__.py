"""Data-free quantization-aware training: a generator and a fake-quant student distilled from the float model.

``finetune(student, teacher, QATConfig(method="gdfq", epochs=4, iters=200))`` is the one entry
point; the methods (``METHODS``: gdfq, qimera, ait, hast, texq, akt, acq) are listed in
:mod:`dfqkern.qat.methods`. ``FinetuneJob`` / ``run_finetune`` (:mod:`dfqkern.qat.job`) are what
``dfqkern finetune`` runs: build, PTQ start, QAT, pack, save.
"""
from .config import SCHEDULES, QATConfig
from .engine import finetune
from .generator import ConditionalGenerator
from .job import FinetuneJob, run_finetune
from .methods import METHODS, method_options
from .samples import save_generated_set

__all__ = ["METHODS", "SCHEDULES", "ConditionalGenerator", "FinetuneJob", "QATConfig", "finetune", "method_options",
           "run_finetune", "save_generated_set"]

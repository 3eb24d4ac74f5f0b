"""``dfqkern report``: a self-contained report of a quantization run.

From a packed checkpoint (or a directory of them), and optionally the float model, a few
calibration images and the synthetic set: accuracy, per-layer weight and output SQNR, activation
ranges, the bit policy and config, and a grid of synthetic samples with their (mixup) labels, as
markdown + PNGs and / or one HTML page with the PNGs embedded. matplotlib is the optional extra
``dfqkern[report]``; it is imported only here, when a report is made.

One job per module: :mod:`.job` (inputs, checked before work), :mod:`.sources` (which checkpoints),
:mod:`.sqnr` / :mod:`.probe` / :mod:`.ranges` (the measurements), :mod:`.samples` (synthetic set),
:mod:`.facts` (one checkpoint's facts), :mod:`.plots` (figures), :mod:`.content` / :mod:`.render`
(markdown and HTML), :mod:`.write` (build and atomic write).
"""
from .deps import INSTALL_HINT, require_matplotlib
from .job import FORMATS, ReportJob
from .write import build_report, write_report

__all__ = ["INSTALL_HINT", "FORMATS", "ReportJob", "build_report", "require_matplotlib", "write_report"]

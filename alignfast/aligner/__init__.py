"""Aligner (Ji et al. 2024, arXiv 2402.02416): a small corrector trained by SFT to rewrite an upstream
model's answer, then stacked after any upstream model (open weights or an API).

    config.py    AlignerConfig (TrainingArguments / TRL SFT names; the paper's template and settings)
    data.py      rows {question, answer, correction} -> [prompt | correction + EOS], identity rows, truncation
    loss.py      token-mean NLL of the correction: fused from the last hidden states, or full-logits reference
    trainer.py   AlignerTrainer: the SFT loop, checkpoints, exact resume, metrics.jsonl
    pipeline.py  Corrector and AlignerPipeline(upstream TargetEngine, corrector)

The PPO-trained corrector (the same stacking, trained by reward instead of SFT) is
alignfast.trainer.AlignerEnvironment on the shared PPO engine.
"""

from alignfast.aligner.config import PAPER_TEMPLATE, REPO_TEMPLATE, AlignerConfig
from alignfast.aligner.data import CorrectionEncoder, check_rows, with_identity_rows
from alignfast.aligner.loss import CorrectionLoss
from alignfast.aligner.pipeline import AlignerPipeline, Correction, Corrector
from alignfast.aligner.trainer import AlignerTrainer

__all__ = ["PAPER_TEMPLATE", "REPO_TEMPLATE", "AlignerConfig", "AlignerPipeline", "AlignerTrainer", "Correction",
           "CorrectionEncoder", "CorrectionLoss", "Corrector", "check_rows", "with_identity_rows"]

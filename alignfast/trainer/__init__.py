"""Trainers: Align-Pro (PPO on a prompter in front of a frozen target), the Oracle arm (PPO on the
target itself) and PPOTrainer (any Environment, e.g. AlignerEnvironment), on one PPO engine whose numerics run on alignfast.ops (backend="fast") or on the
plain-PyTorch spec alignfast.reference (backend="reference").

    from alignfast.trainer import AlignProConfig, AlignProTrainer
    trainer = AlignProTrainer(AlignProConfig(output_dir="out"), prompter, prompter_tok, target_engine,
                              reward_funcs=[my_reward], train_dataset=["prompt 1", ...])
    trainer.train()
"""

from alignfast.trainer.align_pro import AlignProTrainer
from alignfast.trainer.base import PPOEngineTrainer
from alignfast.trainer.config import AlignProConfig
from alignfast.trainer.environments import (AlignerEnvironment, AlignProEnvironment, DirectEnvironment, Environment,
                                            EnvOutput)
from alignfast.trainer.oracle import OracleTrainer
from alignfast.trainer.ppo_trainer import PPOTrainer
from alignfast.trainer.proxy_model import ProxyModel
from alignfast.trainer.proxy_rlhf import ProxyRLHFConfig, ProxyRLHFTrainer
from alignfast.trainer.results import RolloutResult, TrainingDivergedError, TrainOutput
from alignfast.trainer.stop_signals import TrainingInterrupted

__all__ = [
    "AlignProConfig",
    "AlignProEnvironment",
    "AlignProTrainer",
    "AlignerEnvironment",
    "DirectEnvironment",
    "EnvOutput",
    "Environment",
    "OracleTrainer",
    "PPOEngineTrainer",
    "PPOTrainer",
    "ProxyModel",
    "ProxyRLHFConfig",
    "ProxyRLHFTrainer",
    "RolloutResult",
    "TrainOutput",
    "TrainingDivergedError",
    "TrainingInterrupted",
]

"""The embedded default world behind `alignfast demo`: tiny Llama models trained on digit-list tasks.

A user types a terse command ("sort 4 1 3"); the frozen target often misreads terse commands but answers
explicit phrasings ("sort these numbers from smallest to largest : 4 1 3") right; the SFT prompter mostly
copies the command and sometimes spells it out, rightly or wrongly. The reward checks the target's
answer against what the original command meant. See alignfast/toy/README.md.

    from alignfast.toy import load_world
    world = load_world()      # paths of the shipped models, reward, prompts, demo hyperparameters

Importing this package does not import torch or transformers.
"""

from alignfast.toy.reward import answer_accuracy, position_accuracy
from alignfast.toy.world import DEMO_CONFIG, ORACLE_OVERRIDES, ToyWorld, load_world

__all__ = ["DEMO_CONFIG", "ORACLE_OVERRIDES", "ToyWorld", "answer_accuracy", "load_world", "position_accuracy"]

"""Healing a pruned language model: knowledge distillation from its dense base (`depthprune
finetune` on a language model). See `depthprune.heal.distill`."""
from __future__ import annotations

from .distill import (LOSSES, HealConfig, distill_loss, evaluate_heldout, heal, load_training_text, make_accelerator,
                      parse_train, split_windows, trainable_names)

__all__ = ["LOSSES", "HealConfig", "distill_loss", "evaluate_heldout", "heal", "load_training_text",
           "make_accelerator", "parse_train", "split_windows", "trainable_names"]

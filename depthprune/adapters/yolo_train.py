"""Recovery fine-tuning of a (pruned) ultralytics detector with ultralytics' own trainer.

The trainer gets the model object itself (identity stand-ins and all), so nothing is rebuilt
from a YAML that no longer describes the model. Two of the trainer's habits are replaced:
it pickles checkpoints (``last.pt``/``best.pt``) every epoch and loads ``best.pt`` back for
its final validation. Here the exponential moving average of the weights (what ultralytics
would ship) is kept in memory at the best validation fitness instead, and nothing is pickled
or unpickled."""
from __future__ import annotations

import copy
import os
import time

import torch

from ..errors import SpecError
from .yolo_build import ultralytics_env

#: recovery recipe: AdamW at this lr0, no warm-up (a trained model needs no ramp-up), the EMA
#: after the last epoch (no validation selects anything)
RECOVERY_LR0 = 5e-4
RECOVERY = dict(optimizer="AdamW", warmup_epochs=0)


def _trainer_class():
    ultralytics_env()
    from ultralytics.models.yolo.detect import DetectionTrainer

    class InMemoryTrainer(DetectionTrainer):
        """`DetectionTrainer` that trains a given model object and keeps the best EMA in memory."""

        best_state: dict | None = None
        best_epoch: int = -1

        def setup_model(self):
            return None  # self.model is the module to train

        def save_model(self):
            # validate() has raised best_fitness to this epoch's fitness when it is the best so far
            if self.best_state is None or self.fitness is None or self.fitness == self.best_fitness:
                self.best_state = {k: v.detach().clone() for k, v in self.ema.ema.state_dict().items()}
                self.best_epoch = self.epoch
            return False  # nothing was written: no "on_model_save" callbacks

        def final_eval(self):
            return None  # ultralytics would reload best.pt (a pickle); the caller validates

    return InMemoryTrainer


def finetune_detector(model: torch.nn.Module, data: str, imgsz: int, epochs: int, workdir: str,
                      batch: int = 16, workers: int = 2, seed: int = 0, lr0: float = RECOVERY_LR0,
                      val: bool = False, **overrides) -> tuple[torch.nn.Module, dict]:
    """Train a copy of ``model`` (an ultralytics ``DetectionModel``, pruned or not) on the ``train``
    split of dataset YAML ``data`` for ``epochs`` epochs with ultralytics' ``DetectionTrainer``
    (its augmentation, loss, schedule and EMA) at ``imgsz`` pixels, on CPU, with the recovery
    recipe (`RECOVERY`, ``lr0``); ``overrides`` are further ultralytics training arguments.

    Returns the trained copy (the EMA weights at the epoch with the best validation fitness when
    ``val``, else after the last epoch, in float32 and eval mode) and a summary: epochs, seconds,
    best epoch and the final validation metrics. ``workdir`` receives the trainer's logs and
    results.csv (no checkpoints). ``model`` is not changed."""
    if epochs < 1:
        raise SpecError(f"fine-tuning needs at least 1 epoch, got {epochs}")
    if not os.path.isfile(data):
        raise SpecError(f"no such dataset YAML: {data}")
    ultralytics_env()  # offline, private settings: before the trainer is imported
    net = copy.deepcopy(model).float().train()
    # model: a name only (setup_model keeps the object)
    args = dict(data=data, imgsz=imgsz, epochs=epochs, batch=batch, workers=workers, device="cpu", seed=seed,
                deterministic=True, project=os.path.abspath(workdir), name="finetune", exist_ok=True, plots=False,
                verbose=False, val=val, save=False, amp=False, pretrained=False, model="depthprune.yaml",
                lr0=lr0, **RECOVERY)
    args.update(overrides)
    trainer = _trainer_class()(overrides=args)
    trainer.model = net
    t0 = time.perf_counter()
    try:
        trainer.train()
    except (FileNotFoundError, RuntimeError) as e:
        if "Dataset" in str(e) or isinstance(e, FileNotFoundError):
            raise SpecError(f"cannot train on {data}: {e}") from None
        raise
    seconds = time.perf_counter() - t0
    out = trainer.ema.ema
    if trainer.best_state is not None:
        out.load_state_dict(trainer.best_state)
    out = out.float().eval()
    for p in out.parameters():
        p.requires_grad_(False)
    if hasattr(out, "criterion"):
        out.criterion = None  # the loss built for training; rebuilt on demand
    metrics = {k: float(v) for k, v in (trainer.metrics or {}).items() if isinstance(v, (int, float))}
    return out, {"epochs": epochs, "seconds": round(seconds, 1), "best_epoch": trainer.best_epoch + 1,
                 "optimizer": str(trainer.args.optimizer), "imgsz": imgsz, "batch": batch, "data": data,
                 "val_metrics": metrics}

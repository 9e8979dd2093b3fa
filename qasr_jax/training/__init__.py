"""Training and fine-tuning (``qasr-jax finetune`` and ``evaluate``; the ``train`` extra).

``trainer`` holds the loss (cross-entropy on the transcript, optional CTC on the encoder), frozen parts, LoRA and
the optimizer and the ``Trainer`` step; ``data`` reads manifests and batches audio with Grain; ``finetune`` runs
the loop with evaluation and checkpoints and exports the result; ``evaluation`` scores a model by WER and CER.
"""

from qasr_jax.training.trainer import FREEZABLE, LORA_MODULES, TrainConfig, Trainer, TrainState, loss_and_grads

__all__ = ["FREEZABLE", "LORA_MODULES", "TrainConfig", "TrainState", "Trainer", "loss_and_grads"]

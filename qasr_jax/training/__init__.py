"""Training and fine-tuning (``qasr-jax finetune`` and ``evaluate``; the ``train`` extra).

``trainer`` holds the loss (cross-entropy on the transcript, optional CTC on the encoder), the optimizer and the
``Trainer`` step; ``parts`` says what trains (frozen parts, LoRA adapters, base weights trained beside them);
``data`` reads manifests and batches audio with Grain; ``finetune`` runs the loop with evaluation and checkpoints
and exports the result; ``evaluation`` scores a model by WER and CER.
"""

from qasr_jax.training.parts import FREEZABLE, LORA_ALSO, LORA_MODULES
from qasr_jax.training.trainer import TrainConfig, Trainer, TrainState, loss_and_grads

__all__ = ["FREEZABLE", "LORA_ALSO", "LORA_MODULES", "TrainConfig", "TrainState", "Trainer", "loss_and_grads"]

"""Train students from a logitstore store."""

from trainer.kd_loss import kd_loss, teacher_logprobs_at_temperature
from trainer.kd_loss_from_hidden import kd_loss_from_hidden

__all__ = ["kd_loss", "kd_loss_from_hidden", "teacher_logprobs_at_temperature"]

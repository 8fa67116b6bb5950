"""Train students from a logitstore store."""

from trainer.kd_loss import kd_loss, teacher_logprobs_at_temperature

__all__ = ["kd_loss", "teacher_logprobs_at_temperature"]

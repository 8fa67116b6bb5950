"""LossConfig: the loss settings, checked once at construction, and what every entry point takes."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest
import torch
from test_kd_loss import DEVICE, make_case

from logitstore.errors import LogitStoreError
from trainer import LossConfig, SparseTarget, kd_loss, kd_loss_from_hidden
from trainer.config import TrainConfig
from trainer.losses.reference import kd_loss_reference

# The interpreter evaluates both sides of tl.where in numpy (see test_kd_loss.py).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def test_defaults_are_the_loss_functions_former_defaults():
    assert dataclasses.astuple(LossConfig()) == (1.0, "fkl", 0.5, 0.0, -100, "auto")


def test_numbers_are_stored_as_floats_and_the_config_is_frozen():
    loss = LossConfig(temperature=2, beta=1, alpha=0)
    assert (type(loss.temperature), type(loss.beta), type(loss.alpha)) == (float, float, float)
    assert loss == LossConfig(temperature=2.0, beta=1.0, alpha=0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        loss.temperature = 3.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 0.0),
        ("temperature", -1.0),
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("temperature", "2"),
        ("temperature", True),
        ("divergence", "kl"),
        ("divergence", None),
        ("beta", -0.1),
        ("beta", 1.5),
        ("beta", math.nan),
        ("alpha", -0.1),
        ("alpha", 1.01),
        ("alpha", math.nan),
        ("alpha", None),
        ("ignore_index", 1.5),
        ("ignore_index", True),
        ("backend", "cuda"),
    ],
)
def test_each_invalid_field_is_refused_with_its_name(field, value):
    with pytest.raises(ValueError, match=rf"^LossConfig\.{field} must be .*, got {value!r}$"):
        LossConfig(**{field: value})


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_needs_beta_strictly_inside(beta):
    LossConfig(divergence="fkl", beta=beta)  # the other divergences do not use beta
    with pytest.raises(ValueError, match=r"LossConfig\.beta must be in \(0, 1\) for jsd"):
        LossConfig(divergence="jsd", beta=beta)


def test_importing_it_does_not_import_torch():
    script = "import sys, trainer.losses.config, trainer.config; assert 'torch' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_train_config_builds_it_and_names_the_flag_when_invalid():
    cfg = TrainConfig(store="s", student="m", out="o", temperature=2.0, divergence="jsd", alpha=0.1,
                      loss_backend="torch")  # fmt: skip
    assert cfg.loss_config() == LossConfig(temperature=2.0, divergence="jsd", alpha=0.1, backend="torch")
    with pytest.raises(LogitStoreError, match=r"^--loss-backend must be one of auto, triton, torch, got 'cuda'$"):
        dataclasses.replace(cfg, loss_backend="cuda").check()
    with pytest.raises(LogitStoreError, match=r"^--temperature must be a finite number > 0, got -1\.0$"):
        dataclasses.replace(cfg, temperature=-1.0).check()


# Every setting away from its default, so that a setting an entry point dropped would show.
NON_DEFAULT = dict(temperature=2.0, divergence="jsd", beta=0.3, alpha=0.4, ignore_index=-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_entry_point_equals_the_reference_with_the_same_config(backend):
    z, ids, logp, labels = make_case(seed=21, temperature=2.0)
    labels[3] = -7  # the ignored row, under this ignore_index
    loss = LossConfig(backend=backend, **NON_DEFAULT)
    ref = kd_loss_reference(z.cpu(), SparseTarget(ids.cpu(), logp.cpu()), loss, labels=labels.cpu())

    zz = z.clone().requires_grad_()
    value, kd, ce = kd_loss(zz, SparseTarget(ids, logp), loss, labels=labels, return_parts=True)
    torch.testing.assert_close(value.detach().cpu(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(value.detach(), (1 - 0.4) * kd + 0.4 * ce, rtol=1e-5, atol=1e-6)

    # The same config through the from-hidden entry point: hidden @ W.T are the logits.
    g = torch.Generator().manual_seed(22)
    hidden = torch.randn(z.shape[0], 8, generator=g).to(DEVICE)
    weight = torch.randn(z.shape[1], 8, generator=g).to(DEVICE)
    logits = hidden @ weight.T
    ref_hidden = kd_loss_reference(logits.cpu(), SparseTarget(ids.cpu(), logp.cpu()), loss, labels=labels.cpu())
    got = kd_loss_from_hidden(hidden, weight, SparseTarget(ids, logp), loss, labels=labels, chunk_size=3)
    torch.testing.assert_close(got.detach().cpu(), ref_hidden, rtol=1e-5, atol=1e-6)

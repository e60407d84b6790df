"""The API's table of losses agrees with what the trainer implements."""

import pytest

from cluster.loss_specs import LOSS_SPECS, TARGET_TOKENS, supported_loss_spec


def test_supported_losses_are_exactly_the_trainers():
    losses = pytest.importorskip("actors.trainer.losses")
    assert set(LOSS_SPECS) == set(losses.LOSSES)


def test_every_loss_takes_target_tokens_first():
    for spec in LOSS_SPECS.values():
        assert spec.inputs[0].name == TARGET_TOKENS and spec.inputs[0].dtype == "int64"


def test_unknown_and_unsupported_losses_name_the_supported_ones():
    with pytest.raises(ValueError, match="not a loss this server knows.*cross_entropy"):
        supported_loss_spec("nope")
    with pytest.raises(ValueError, match="forward_backward_custom.*supported: .*stable_reinforce"):
        supported_loss_spec("custom")

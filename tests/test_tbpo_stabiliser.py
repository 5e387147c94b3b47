"""The TBPO stabiliser `log_ratio_floor`: a lower bound on log R_t (BPO's R ≥ R_min), off by default.

Hand-computed values and gradients of `tbpo_loss` with the floor (float64), the default left exactly as it was, the
config's validation, and the trainer passing the option to the loss.
"""

import math

import pytest
import torch

from trl_tokenpref import TBPOConfig, TBPOTrainer
from trl_tokenpref.losses import bregman_loss, tbpo_loss


def _sba0(log_r: float) -> float:
    """SBA(λ = 0, s = 4): ℓ = (R + log R)/4."""
    return (math.exp(log_r) + log_r) / 4


def _sba0_slope(log_r: float) -> float:
    """∂ℓ/∂log R of SBA(0, 4): (1 + R)/4."""
    return (1 + math.exp(log_r)) / 4


class TestLossWithFloor:
    # One pair of three aligned tokens plus a padded position; β = 0.5. log R_t = β(ρ^l_t − ρ^w_t):
    # token 0: 0.5·(−2 − 8) = −5 (below a floor of −3), token 1: 0.5·(−1 − 1) = −1, token 2: 0.5·(1 − 0) = 0.5
    CHOSEN = [[8.0, 1.0, 0.0, float("nan")]]
    REJECTED = [[-2.0, -1.0, 1.0, float("inf")]]
    MASK = [[True, True, True, False]]
    BETA = 0.5

    def inputs(self):
        chosen = torch.tensor(self.CHOSEN, dtype=torch.float64, requires_grad=True)
        rejected = torch.tensor(self.REJECTED, dtype=torch.float64, requires_grad=True)
        return chosen, rejected, torch.tensor(self.MASK)

    def test_value_and_gradient_by_hand(self):
        chosen, rejected, mask = self.inputs()
        out = tbpo_loss(chosen, rejected, mask, beta=self.BETA, log_ratio_floor=-3.0)
        clamped = [-3.0, -1.0, 0.5]
        expected = sum(_sba0(v) for v in clamped) / 3
        assert out.losses.item() == pytest.approx(expected, rel=1e-12)
        assert out.log_ratio[0, :3].tolist() == pytest.approx(clamped, rel=1e-12)
        out.losses.sum().backward()
        # ∂L/∂ρ^w_t = −β ℓ'(log R_t)/T, ∂L/∂ρ^l_t = +β ℓ'(log R_t)/T, and 0 where the floor (or the mask) holds
        slopes = [0.0, _sba0_slope(-1.0), _sba0_slope(0.5)]
        assert chosen.grad[0, :3].tolist() == pytest.approx([-self.BETA * s / 3 for s in slopes], rel=1e-12)
        assert rejected.grad[0, :3].tolist() == pytest.approx([self.BETA * s / 3 for s in slopes], rel=1e-12)
        assert chosen.grad[0, 3].item() == 0.0 and rejected.grad[0, 3].item() == 0.0

    def test_without_floor_the_token_keeps_pushing(self):
        """The hazard the floor removes: SBA(0)'s slope at log R = −5 is (1 + e^−5)/4 > 1/4, not ~0."""
        chosen, rejected, mask = self.inputs()
        out = tbpo_loss(chosen, rejected, mask, beta=self.BETA)
        out.losses.sum().backward()
        assert chosen.grad[0, 0].item() == pytest.approx(-self.BETA * _sba0_slope(-5.0) / 3, rel=1e-12)
        assert out.losses.item() == pytest.approx(sum(_sba0(v) for v in [-5.0, -1.0, 0.5]) / 3, rel=1e-12)

    def test_default_is_bit_for_bit_unchanged(self):
        """`log_ratio_floor=None` is the official loss: ±c clamp only, same bits and no new metric."""
        generator = torch.Generator().manual_seed(0)
        chosen = torch.randn(4, 7, generator=generator) * 40
        rejected = torch.randn(4, 7, generator=generator) * 40
        log_w = torch.randn(4, 7, generator=generator)
        mask = torch.rand(4, 7, generator=generator) > 0.2
        kwargs = dict(beta=0.1, log_weights=log_w, label_smoothing=0.1)
        default = tbpo_loss(chosen, rejected, mask, **kwargs)
        explicit = tbpo_loss(chosen, rejected, mask, log_ratio_floor=None, **kwargs)
        # The formula written out: clamp(β[(ρ^l − ρ^w) + log w], −30, 30), smoothed SBA(0), mean over the mask
        log_r = torch.clamp(0.1 * (rejected - chosen + log_w), -30.0, 30.0)
        per_token = 0.9 * bregman_loss(log_r) + 0.1 * bregman_loss(-log_r)
        manual = torch.where(mask, per_token, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)
        assert torch.equal(default.losses, explicit.losses)
        assert torch.equal(default.losses, manual)
        assert set(default.metrics) == {"log_R/mean", "log_R/frac_below_zero"}

    def test_floor_below_the_clamp_changes_nothing_within_it(self):
        """A floor only acts below itself: where every log R is above it, the loss equals the default's exactly."""
        chosen = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
        rejected = torch.tensor([[-0.1, 0.4]], dtype=torch.float64)
        mask = torch.ones(1, 2, dtype=torch.bool)
        floored = tbpo_loss(chosen, rejected, mask, beta=1.0, log_ratio_floor=-2.0)
        default = tbpo_loss(chosen, rejected, mask, beta=1.0)
        assert torch.equal(floored.losses, default.losses)
        assert floored.metrics["log_R/frac_at_floor"].values.sum().item() == 0

    def test_frac_at_floor_metric(self):
        chosen, rejected, mask = self.inputs()
        out = tbpo_loss(chosen, rejected, mask, beta=self.BETA, log_ratio_floor=-3.0)
        metric = out.metrics["log_R/frac_at_floor"]
        assert torch.equal(metric.mask, mask)
        assert metric.values[mask].tolist() == [1.0, 0.0, 0.0]

    def test_label_smoothing_sees_the_floored_value(self):
        """ε-smoothing flips the clamped log R: ℓ = (1−ε)ℓ(max(log R, f)) + ε ℓ(−max(log R, f))."""
        chosen, rejected, mask = self.inputs()
        out = tbpo_loss(chosen, rejected, mask, beta=self.BETA, log_ratio_floor=-3.0, label_smoothing=0.2)
        expected = sum(0.8 * _sba0(v) + 0.2 * _sba0(-v) for v in [-3.0, -1.0, 0.5]) / 3
        assert out.losses.item() == pytest.approx(expected, rel=1e-12)

    def test_clamp_tighter_than_floor_wins(self):
        """With a floor below −c, the ±c clamp still bounds log R: the lower bound is max(f, −c)."""
        chosen, rejected, mask = self.inputs()
        out = tbpo_loss(chosen, rejected, mask, beta=self.BETA, log_ratio_clamp=2.0, log_ratio_floor=-3.0)
        assert out.log_ratio[0, :3].tolist() == pytest.approx([-2.0, -1.0, 0.5], rel=1e-12)

    def test_with_a_lambda_generator(self):
        """The floor composes with any generator: SBA(λ = −0.5) gives ℓ = √R (docs/algorithms.md §4.2)."""
        chosen, rejected, mask = self.inputs()
        out = tbpo_loss(chosen, rejected, mask, beta=self.BETA, generator_lambda=-0.5, log_ratio_floor=-3.0)
        expected = sum(math.exp(v / 2) for v in [-3.0, -1.0, 0.5]) / 3
        assert out.losses.item() == pytest.approx(expected, rel=1e-12)

    @pytest.mark.parametrize("floor", [0.0, 1.0, math.nan, -math.inf, math.inf])
    def test_invalid_floor(self, floor):
        chosen, rejected, mask = self.inputs()
        with pytest.raises(ValueError, match="log_ratio_floor"):
            tbpo_loss(chosen, rejected, mask, beta=self.BETA, log_ratio_floor=floor)


def _config(tmp_path, **kwargs) -> TBPOConfig:
    return TBPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, **kwargs)


class TestConfig:
    def test_default_is_off(self, tmp_path):
        assert _config(tmp_path).log_ratio_floor is None

    def test_valid_floor(self, tmp_path):
        args = _config(tmp_path, log_ratio_floor=math.log(0.05))
        assert args.log_ratio_floor == pytest.approx(-2.9957, abs=1e-4)

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"log_ratio_floor": 0.0}, "finite number < 0"),
            ({"log_ratio_floor": 2.0}, "finite number < 0"),
            ({"log_ratio_floor": math.nan}, "finite number < 0"),
            ({"log_ratio_floor": -30.0}, "no effect"),
            ({"log_ratio_floor": -5.0, "log_ratio_clamp": 4.0}, "no effect"),
        ],
    )
    def test_invalid(self, kwargs, message, tmp_path):
        with pytest.raises(ValueError, match=message):
            _config(tmp_path, **kwargs)

    def test_help(self):
        from dataclasses import fields

        help_text = {f.name: f.metadata.get("help", "") for f in fields(TBPOConfig)}["log_ratio_floor"]
        assert "Lower bound" in help_text and "None" in help_text
        assert "log_ratio_floor (`float` or `None`" in TBPOConfig.__doc__


@pytest.mark.parametrize("variant", ["tbpo_a", "tbpo_q"])
def test_trainer_applies_the_floor(variant, tiny_model_path, tiny_tokenizer, default_dataset, tmp_path):
    """The trainer hands `log_ratio_floor` to the loss: at β = 1 on a perturbed policy a floor of −0.01 stops some
    tokens (logged as `log_R/frac_at_floor`) and lowers no token's log R below it."""
    args = _config(
        tmp_path,
        per_device_train_batch_size=6,
        gradient_checkpointing=False,
        variant=variant,
        beta=1.0,
        log_ratio_floor=-0.01,
    )
    trainer = TBPOTrainer(
        model=tiny_model_path,
        args=args,
        train_dataset=default_dataset["train"].select(range(6)),
        processing_class=tiny_tokenizer,
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    trainer.model.train()  # metrics are logged under the "train" mode
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(6)]))
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    assert 0 < metrics["log_R/frac_at_floor"] < 1
    assert metrics["log_R/mean"] >= -0.01 - 1e-6

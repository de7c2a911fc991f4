"""The preference losses of `llmctl align` on fixed log-probabilities: each equals a hand-written formula and TRL's own
loss code on the same tensors (DPOTrainer's, KTOTrainer's, CPO's SimPO, ORPO's odds ratio); with the reference
equal to the policy, DPO is log 2."""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from llmctl.backends.torch.preference import kto_kl, kto_loss, pair_loss
from llmctl.preference import PreferenceSettings

# Four pairs: summed response log-probabilities of policy and reference, and response lengths.
CHOSEN = torch.tensor([-12.0, -30.5, -7.25, -20.0], dtype=torch.float64)
REJECTED = torch.tensor([-15.0, -28.0, -9.5, -20.0], dtype=torch.float64)
REF_CHOSEN = torch.tensor([-13.0, -29.0, -8.0, -21.5], dtype=torch.float64)
REF_REJECTED = torch.tensor([-14.0, -29.5, -8.75, -19.0], dtype=torch.float64)
LEN_C = torch.tensor([6.0, 15.0, 3.0, 9.0], dtype=torch.float64)
LEN_R = torch.tensor([7.0, 12.0, 4.0, 9.0], dtype=torch.float64)


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _hand(method: str, beta: float, i: int) -> float:
    c, r, rc, rr = float(CHOSEN[i]), float(REJECTED[i]), float(REF_CHOSEN[i]), float(REF_REJECTED[i])
    lc, lr = float(LEN_C[i]), float(LEN_R[i])
    d = (c - rc) - (r - rr)
    if method == "dpo":
        return -math.log(_sig(beta * d))
    if method == "ipo":
        return ((c - rc) / lc - (r - rr) / lr - 1 / (2 * beta)) ** 2
    if method == "hinge":
        return max(0.0, 1 - beta * d)
    if method == "robust":
        e = 0.1
        return (-(1 - e) * math.log(_sig(beta * d)) + e * math.log(_sig(-beta * d))) / (1 - 2 * e)
    if method == "simpo":
        return -math.log(_sig(beta * (c / lc - r / lr) - 0.5))
    if method == "orpo":
        ac, ar = c / lc, r / lr
        odds = (ac - math.log(1 - math.exp(ac))) - (ar - math.log(1 - math.exp(ar)))
        return -ac - beta * math.log(_sig(odds))
    raise AssertionError(method)


def _ours(method: str, beta: float) -> torch.Tensor:
    s = PreferenceSettings(method=method, beta=beta)
    return pair_loss(s, CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, LEN_C, LEN_R)[0]


@pytest.mark.parametrize("method", ["dpo", "ipo", "hinge", "robust", "simpo", "orpo"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_pair_losses_equal_their_formulas(method, beta):
    ours = _ours(method, beta)
    for i in range(len(CHOSEN)):
        assert float(ours[i]) == pytest.approx(_hand(method, beta, i), rel=1e-12, abs=1e-12), i


def test_kto_equals_its_formula():
    s = PreferenceSettings(method="kto", beta=0.2, desirable_weight=1.5, undesirable_weight=0.7)
    logps, ref = torch.tensor([-5.0, -8.0, -3.0]), torch.tensor([-6.0, -7.0, -3.5])
    labels = torch.tensor([1.0, 0.0, 1.0])
    kl = kto_kl(torch.tensor([-9.0, -10.0]), torch.tensor([-9.5, -10.2]))
    assert float(kl) == pytest.approx(0.35)
    assert float(kto_kl(torch.tensor([-9.0]), torch.tensor([-8.0]))) == 0.0  # clamped at zero
    loss, _ = kto_loss(s, logps, ref, labels, kl)
    want = [1.5 * (1 - _sig(0.2 * (1.0 - 0.35))), 0.7 * (1 - _sig(0.2 * (0.35 + 1.0))), 1.5 * (1 - _sig(0.2 * (0.5 - 0.35)))]
    assert loss.tolist() == pytest.approx(want, rel=1e-6)


# --- TRL's own loss code on the same tensors ---------------------------------------------------------------------


class _Outputs:
    def __init__(self, log_probs: torch.Tensor) -> None:
        self.log_probs = log_probs
        self.entropy = torch.zeros_like(log_probs)
        self.mean_logits = torch.zeros_like(log_probs)
        self.is_top1 = torch.zeros_like(log_probs, dtype=torch.bool)


def _fake_model(values: dict[int, float]):
    """A stand-in for a causal LM: row i's first token names it, and its per-token log-probabilities sum to values[i]."""

    def model(input_ids, labels=None, **kwargs):
        lp = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, dtype=torch.float64)
        lp[:, 0] = torch.tensor([values[int(k)] for k in input_ids[:, 0]], dtype=torch.float64)
        return _Outputs(lp)

    return model


def _trainer_self(**attrs):
    acc = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x,
                                unwrap_model=lambda m: m)
    base = dict(model=types.SimpleNamespace(training=True), accelerator=acc, aux_loss_enabled=False, ld_alpha=None,
                precompute_ref_logps=True, f_divergence_type="reverse_kl", label_smoothing=0.1, use_weighting=False,
                _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
                args=types.SimpleNamespace(gradient_checkpointing_kwargs=None))
    return types.SimpleNamespace(**(base | attrs))


@pytest.mark.parametrize("method, trl_name", [("dpo", "sigmoid"), ("ipo", "ipo"), ("hinge", "hinge"), ("robust", "robust")])
def test_dpo_family_equals_trl(method, trl_name):
    from trl.trainer.dpo_trainer import DPOTrainer

    beta, P = 0.3, len(CHOSEN)
    T = int(max(LEN_C.max(), LEN_R.max())) + 2
    lengths = torch.cat([LEN_C, LEN_R]).long()
    mask = (torch.arange(T)[None] < lengths[:, None] + 1).long()
    mask[:, 0] = 0  # the prompt's one token; the completion mask counts |c| and |r| tokens
    ids = torch.arange(2 * P)[:, None].repeat(1, T)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
              "ref_chosen_logps": REF_CHOSEN, "ref_rejected_logps": REF_REJECTED}
    values = dict(enumerate(torch.cat([CHOSEN, REJECTED]).tolist()))
    trainer = _trainer_self(beta=beta, loss_types=[trl_name], loss_weights=[1.0])
    theirs = DPOTrainer._compute_loss(trainer, _fake_model(values), inputs, False)
    assert float(_ours(method, beta).mean()) == pytest.approx(float(theirs), rel=1e-10)


def test_simpo_equals_trl_cpo():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    trainer = _trainer_self(beta=2.0, alpha=0.0, simpo_gamma=0.5, label_smoothing=0.0, loss_type="simpo")
    theirs, tc, tr = CPOTrainer.cpo_loss(trainer, CHOSEN / LEN_C, REJECTED / LEN_R)  # TRL averages per token for SimPO
    ours, oc, orr = pair_loss(PreferenceSettings(method="simpo", beta=2.0), CHOSEN, REJECTED, None, None, LEN_C, LEN_R)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((oc, orr), (tc, tr))


def test_orpo_equals_trl():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    trainer = _trainer_self(beta=0.1)
    avg_c, avg_r = CHOSEN / LEN_C, REJECTED / LEN_R
    odds_term, *_ = ORPOTrainer.odds_ratio_loss(trainer, avg_c, avg_r)
    theirs = -avg_c - odds_term  # ORPO's loss: the chosen NLL per token minus the odds-ratio term
    ours, _, _ = pair_loss(PreferenceSettings(method="orpo", beta=0.1), CHOSEN, REJECTED, None, None, LEN_C, LEN_R)
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-6, atol=1e-6)


def test_kto_equals_trl():
    from trl.trainer.kto_trainer import KTOTrainer

    logps = torch.tensor([-5.0, -8.0, -3.0, -11.0], dtype=torch.float64)
    ref = torch.tensor([-6.0, -7.0, -3.5, -10.0], dtype=torch.float64)
    kl_logps = torch.tensor([-9.0, -10.0, -12.0, -7.0], dtype=torch.float64)
    ref_kl = torch.tensor([-9.5, -10.2, -11.9, -7.6], dtype=torch.float64)
    labels = torch.tensor([True, False, True, False])
    n, T = len(logps), 4
    ids = torch.arange(n)[:, None].repeat(1, T)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.ones_like(ids),
              "KL_input_ids": ids + n, "KL_attention_mask": torch.ones_like(ids), "KL_completion_mask": torch.ones_like(ids),
              "label": labels, "ref_logps": ref, "ref_KL_logps": ref_kl}
    values = dict(enumerate(torch.cat([logps, kl_logps]).tolist()))
    trainer = _trainer_self(beta=0.2, calculate_KL=True, loss_type="kto", desirable_weight=1.3, undesirable_weight=0.8)
    trainer._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, trainer)
    theirs = KTOTrainer._compute_loss(trainer, _fake_model(values), inputs, False)
    s = PreferenceSettings(method="kto", beta=0.2, desirable_weight=1.3, undesirable_weight=0.8)
    ours, _ = kto_loss(s, logps, ref, labels.double(), kto_kl(kl_logps, ref_kl))
    assert float(ours.mean()) == pytest.approx(float(theirs), rel=1e-10)


@pytest.mark.skipif("mlx" not in __import__("conftest").BACKENDS, reason="MLX is not installed")
@pytest.mark.parametrize("method", ["dpo", "ipo", "hinge", "robust", "simpo", "orpo"])
def test_mlx_pair_losses_equal_torch(method):
    import mlx.core as mx

    from llmctl.backends.mlx.preference import pair_loss as mlx_pair_loss

    s = PreferenceSettings(method=method, beta=0.3)
    arrays = [mx.array(t.float().numpy()) for t in (CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, LEN_C, LEN_R)]
    theirs = pair_loss(s, *(t.float() for t in (CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, LEN_C, LEN_R)))
    ours = mlx_pair_loss(s, *arrays)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(torch.from_numpy(__import__("numpy").array(a)), b, rtol=1e-5, atol=1e-5)

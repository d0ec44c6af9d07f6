"""``app.learning.masking``: the Fisher estimate, the masks, masked training, EWC, and a run's
protection that holds them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from app.learning.masking import (
    ForgettingProtection,
    apply_masks,
    estimate_fisher,
    ewc_penalty,
    fisher_masks,
    fisher_source,
    mask_summary,
    register_mask_hooks,
    snapshot_parameters,
    trainable_parameters,
)
from app.learning.training import ForgettingConfig


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _data(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.stack([x[:, 0] - x[:, 1], x[:, 2] * 0.5], dim=1)
    return [(x[i : i + 1], y[i : i + 1]) for i in range(n)]


def _mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def test_fisher_is_the_mean_squared_gradient_and_leaves_the_model_as_found() -> None:
    model = _model()
    model.train()
    batches = _data(5, seed=1)
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for batch in batches:
        model.zero_grad()
        _mse(model, batch).backward()
        for name, p in model.named_parameters():
            expected[name] += p.grad**2 / len(batches)
    model.zero_grad(set_to_none=True)

    fisher = estimate_fisher(model, batches, _mse)
    assert fisher.keys() == expected.keys()
    for name in fisher:
        torch.testing.assert_close(fisher[name], expected[name])
    assert model.training  # the mode is restored
    assert all(p.grad is None for p in model.parameters())  # no gradients left behind

    assert estimate_fisher(model, batches, _mse, max_batches=1)["0.weight"].shape == (8, 4)


def test_fisher_covers_only_trainable_parameters() -> None:
    model = _model()
    model[0].requires_grad_(False)
    fisher = estimate_fisher(model, _data(3, seed=2), _mse)
    assert set(fisher) == {"2.weight", "2.bias"} == set(trainable_parameters(model))
    with pytest.raises(ValueError, match="no batches"):
        estimate_fisher(model, [], _mse)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        estimate_fisher(model, _data(1, seed=2), _mse)


def test_masks_keep_the_fraction_in_the_chosen_direction() -> None:
    fisher = {"w": torch.tensor([0.1, 5.0, 0.2, 3.0]), "m": torch.tensor([[1.0, 1.0, 1.0], [9.0, 0.0, 9.0]])}
    protect = fisher_masks(fisher, 0.5)  # default: update the least important, protect the top
    assert protect["w"].tolist() == [True, False, True, False]
    select = fisher_masks(fisher, 0.5, "most_important")
    assert select["w"].tolist() == [False, True, False, True]
    assert protect["m"].dtype == torch.bool and protect["m"].shape == (2, 3)
    assert int(protect["m"].sum()) == 3  # round(0.5 * 6)

    rows = fisher_masks(fisher, 0.5, "least_important", granularity="row")
    assert rows["m"].tolist() == [[True, True, True], [False, False, False]]  # row means 1 < 6
    assert rows["w"].tolist() == protect["w"].tolist()  # 1-D tensors: rows are entries

    assert fisher_masks(fisher, 1.0)["w"].all()
    assert int(fisher_masks(fisher, 0.01)["w"].sum()) == 1  # at least one entry per tensor
    assert mask_summary(protect) == {"entries": 10, "updated": 5, "updated_fraction": 0.5}
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            fisher_masks(fisher, bad)
    with pytest.raises(ValueError, match="mode"):
        fisher_masks(fisher, 0.5, "top")  # type: ignore[arg-type]


def _train(model: nn.Module, steps: int, masks=None, hooks: bool = False, ewc=None) -> list[float]:
    data = _data(32, seed=3)
    x = torch.cat([b[0] for b in data])
    y = -torch.cat([b[1] for b in data])  # a new task: the opposite mapping
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0)
    if hooks:
        register_mask_hooks(model, masks)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(float(loss.detach()))
        if ewc is not None:
            loss = loss + ewc_penalty(model, *ewc)
        optimizer.zero_grad()
        loss.backward()
        if masks is not None and not hooks:
            apply_masks(model, masks)
        optimizer.step()
    return losses


@pytest.mark.parametrize("hooks", [False, True], ids=["apply_masks", "hooks"])
def test_masked_parameters_do_not_move(hooks: bool) -> None:
    model = _model()
    fisher = estimate_fisher(model, _data(16, seed=4), _mse)
    masks = fisher_masks(fisher, 0.3)
    before = snapshot_parameters(model)

    losses = _train(model, 30, masks, hooks=hooks)

    assert losses[-1] < losses[0]  # the free 30 % still learn
    for name, p in model.named_parameters():
        frozen = ~masks[name]
        assert torch.equal(p.detach()[frozen], before[name][frozen]), name
        assert not torch.equal(p.detach()[masks[name]], before[name][masks[name]]), name
    assert all(m.any() and not m.all() for m in masks.values())


def test_apply_masks_refuses_names_the_model_lacks() -> None:
    model = _model()
    with pytest.raises(KeyError, match="named_parameters"):
        apply_masks(model, {"module.0.weight": torch.ones(8, 4, dtype=torch.bool)})


def test_ewc_penalty_is_the_weighted_distance_and_pulls_toward_the_anchor() -> None:
    model = _model()
    anchor = snapshot_parameters(model)
    fisher = {name: torch.rand_like(p) for name, p in anchor.items()}
    assert float(ewc_penalty(model, fisher, anchor, lam=10.0)) == 0.0

    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    penalty = ewc_penalty(model, fisher, anchor, lam=10.0)
    expected = 0.5 * 10.0 * sum(float((f * 0.25).sum()) for f in fisher.values())
    assert float(penalty) == pytest.approx(expected, rel=1e-5)
    penalty.backward()
    for name, p in model.named_parameters():  # d/dw = lam * F * (w - w0)
        torch.testing.assert_close(p.grad, 10.0 * fisher[name] * 0.5)

    # Minimising the penalty alone walks every important entry back to its anchor.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    start = _drift(model, anchor)
    for _ in range(50):
        optimizer.zero_grad()
        ewc_penalty(model, fisher, anchor, lam=10.0).backward()
        optimizer.step()
    assert _drift(model, anchor) < 0.05 * start


def _drift(model: nn.Module, anchor: dict[str, torch.Tensor]) -> float:
    return sum(float(((p - anchor[n]) ** 2).sum()) for n, p in model.named_parameters())


def test_ewc_keeps_a_model_closer_to_its_anchor_than_plain_training() -> None:
    plain, protected = _model(), _model()
    anchor = snapshot_parameters(protected)
    fisher = estimate_fisher(protected, _data(16, seed=4), _mse)
    fisher = {n: f / max(float(f.max()), 1e-12) for n, f in fisher.items()}  # scale to [0, 1]
    _train(plain, 30)
    _train(protected, 30, ewc=(fisher, anchor, 50.0))
    assert _drift(protected, anchor) < 0.5 * _drift(plain, anchor)
    with pytest.raises(KeyError, match="anchor_params"):
        ewc_penalty(protected, fisher, {}, lam=1.0)


def test_a_runs_protection_is_one_interface_for_fggm_and_ewc() -> None:
    fggm, ewc = ForgettingConfig(masking="fggm", mask_fraction=0.5), ForgettingConfig(masking="ewc", ewc_lambda=10.0)
    model = _model()
    masked = ForgettingProtection.estimate(fggm, model, _data(8, seed=5), _mse, samples=8)
    assert masked.masks is not None and masked.summary()["updated_fraction"] == pytest.approx(0.5, abs=0.05)
    assert masked.penalty(model) is None  # FGGM acts on the gradients, not the loss
    _mse(model, _data(1, seed=6)[0]).backward()
    masked.mask_gradients(model)
    assert all(torch.all(p.grad[~masked.masks[n]] == 0) for n, p in model.named_parameters())

    anchored = ForgettingProtection.estimate(ewc, model, _data(8, seed=5), _mse, samples=8)
    assert anchored.masks is None and anchored.summary() is None
    assert float(anchored.penalty(model)) == 0.0  # at its anchor
    with torch.no_grad():
        next(model.parameters()).add_(0.1)
    assert float(anchored.penalty(model)) > 0.0

    # A checkpoint's copy is the same protection.
    restored = ForgettingProtection.from_state_dict(masked.state_dict(), fggm, torch.device("cpu"))
    assert restored.masks.keys() == masked.masks.keys()
    assert all(torch.equal(restored.masks[n], masked.masks[n]) for n in masked.masks)
    with pytest.raises(ValueError, match="masking: none"):
        ForgettingProtection.estimate(ForgettingConfig(), model, _data(2, seed=5), _mse, samples=2)


def test_the_fisher_rows_are_the_earlier_tasks_unless_fggm_selects_for_the_new_one() -> None:
    fggm = ForgettingConfig(masking="fggm")
    assert fisher_source(fggm, {"train", "rehearsal", "fisher"}) == "fisher"
    assert fisher_source(fggm, {"train", "rehearsal"}) == "rehearsal"
    assert fisher_source(fggm, {"train"}) is None
    assert fisher_source(ForgettingConfig(masking="fggm", mask_mode="most_important"), {"train"}) == "train"

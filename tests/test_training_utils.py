"""The optimiser helpers of examples/train.py and bench/mner_real.py (modeling_mqspn/tools/training.py)."""

import pytest
import torch

from modeling_mqspn.tools.training import ADAMW_IMPLEMENTATIONS, ema_decay_at, make_adamw, make_weight_average, parameter_groups


class TwoPartModel(torch.nn.Module):
    """A stand-in with an 'encoder' (embedding + linear) and a new head, as MQSPN and the BIO baseline."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 8))
        self.head = torch.nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(self.encoder(ids)).sum(dim=1)


def train_steps(implementation, steps=5):
    torch.manual_seed(0)
    model = TwoPartModel()
    groups = parameter_groups(model, 1e-2, 5e-2, 0.1, encoder=model.encoder)
    optimizer = make_adamw(groups, implementation)
    ids, target = torch.randint(0, 50, (4, 6)), torch.randint(0, 3, (4,))
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(ids), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_the_three_adamw_kernels_give_the_same_update():
    reference, _ = train_steps("for-loop")
    for implementation in ("fused", "foreach"):
        model, optimizer = train_steps(implementation)
        assert optimizer.defaults["fused" if implementation == "fused" else "foreach"] is True
        for (name, expected), actual in zip(reference.named_parameters(), model.parameters()):
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=f"{implementation}: {name}")


def test_parameter_groups_split_the_given_encoder_from_the_new_layers():
    model = TwoPartModel()
    groups = parameter_groups(model, 1e-5, 1e-3, 0.01, encoder=model.encoder)
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    for group in groups:
        assert group["role"] == ("text_encoder" if id(group["params"][0]) in encoder_ids else "new_layers")
        assert all((id(p) in encoder_ids) == (group["role"] == "text_encoder") for p in group["params"])
        assert group["lr"] == (1e-5 if group["role"] == "text_encoder" else 1e-3)
        assert group["weight_decay"] == (0.01 if group["params"][0].ndim >= 2 else 0.0)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_an_unknown_adamw_kernel_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        make_adamw(TwoPartModel().parameters(), "apex")
    assert ADAMW_IMPLEMENTATIONS == ("fused", "foreach", "for-loop")


def test_the_weight_average_copies_first_then_blends_with_the_warmed_up_decay():
    model = torch.nn.Linear(1, 1, bias=False)
    average = make_weight_average(model, decay=0.5)
    seen = []
    for value in (1.0, 2.0, 4.0):
        with torch.no_grad():
            model.weight.fill_(value)
        average.update_parameters(model)
        seen.append(average.module.weight.item())
    # 1st update: a copy. 2nd: decay min(0.5, 2/11) -> 2/11 * 1 + 9/11 * 2 = 20/11.
    # 3rd: decay min(0.5, 3/12) = 1/4 -> 1/4 * 20/11 + 3/4 * 4 = 38/11.
    assert seen == pytest.approx([1.0, 20 / 11, 38 / 11], abs=1e-6)
    assert model.weight.item() == 4.0  # the trained model is left alone
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1) and ema_decay_at(0.999, 100_000) == 0.999
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        make_weight_average(model, decay=1.0)

"""course_lib.models.linearized: f(x; theta_0) + J(x) (theta - theta_0), checked against
models whose expansion is known by hand, and on the mini-CLIP encoder through the zoo."""

import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig

from course_lib.models import hub
from course_lib.models.linearized import Linearized


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _shift(model: nn.Module, scale: float, seed: int = 1) -> dict[str, torch.Tensor]:
    """A fixed random direction d (one tensor per parameter); adds scale * d to the model."""
    g = torch.Generator().manual_seed(seed)
    d = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(scale * d[n])
    return d


def test_at_theta0_it_is_the_model():
    model = _mlp()
    x = torch.randn(4, 5, dtype=torch.float64)
    want = model(x)
    assert torch.equal(Linearized(model)(x), want)


def test_a_model_linear_in_its_weights_is_its_own_linearization():
    """f(x; W, b) = W x + b is linear in (W, b): the expansion is exact at any distance."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    lin = Linearized(model)
    _shift(model, 3.0)
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(lin(x), model(x), rtol=0, atol=1e-12)


def test_the_change_is_the_jacobian_times_the_shift_by_hand():
    """f(x; w) = tanh(w . x): f_lin = tanh(w0 . x) + (1 - tanh^2(w0 . x)) (w - w0) . x."""
    model = nn.Linear(5, 1, bias=False).double()
    act = nn.Sequential(model, nn.Tanh())
    w0 = model.weight.detach().clone()
    lin = Linearized(act)
    _shift(act, 0.7)
    x = torch.randn(6, 5, dtype=torch.float64)
    z0 = x @ w0.T
    by_hand = torch.tanh(z0) + (1 - torch.tanh(z0) ** 2) * (x @ (model.weight.detach() - w0).T)
    torch.testing.assert_close(lin(x), by_hand, rtol=0, atol=1e-12)
    assert not torch.allclose(lin(x), act(x))  # tanh is not linear: the two differ


def test_the_error_shrinks_with_the_square_of_the_step():
    model = _mlp()
    lin = Linearized(model)
    x = torch.randn(8, 5, dtype=torch.float64)
    errors = []
    for eps in (1e-1, 1e-2):
        with torch.no_grad():
            for p, p0 in zip(model.parameters(), lin.theta0().values(), strict=True):
                p.copy_(p0)
        _shift(model, eps)
        with torch.no_grad():
            errors.append(float((lin(x) - model(x)).abs().max()))
    assert 50 < errors[0] / errors[1] < 200  # second order: 10x smaller step, ~100x smaller error


def test_task_vectors_add_up_exactly():
    """theta_0 + tau_1 + tau_2 changes the output by the sum of what each one changes."""
    model = _mlp()
    lin = Linearized(model)
    theta0 = {n: p.clone() for n, p in lin.theta0().items()}
    x = torch.randn(8, 5, dtype=torch.float64)
    base = lin(x)
    g = torch.Generator().manual_seed(3)
    taus = [{n: 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in theta0.items()}
            for _ in range(2)]  # fmt: skip

    def at(*vectors):
        lin.load_state_dict({n: theta0[n] + sum(v[n] for v in vectors) for n in theta0})
        return lin(x)

    torch.testing.assert_close(at(*taus) - base, (at(taus[0]) - base) + (at(taus[1]) - base))


def test_gradients_are_the_jacobian_at_theta0_wherever_theta_is():
    model = _mlp()
    lin = Linearized(model)
    x = torch.randn(8, 5, dtype=torch.float64)

    def grads():
        lin.zero_grad()
        lin(x).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    at_theta0 = grads()
    model.zero_grad()
    model(x).sum().backward()  # the plain model's gradient at theta_0
    for g, p in zip(at_theta0, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)
    _shift(model, 0.5)
    for g0, g in zip(
        at_theta0, grads(), strict=True
    ):  # f_lin is linear: its gradient does not move
        torch.testing.assert_close(g, g0)


def test_its_state_is_the_wrapped_models_and_theta0_stays():
    model = _mlp()
    lin = Linearized(model)
    assert list(lin.state_dict()) == list(model.state_dict())
    assert [n for n, _ in lin.named_parameters()] == ["model." + n for n in model.state_dict()]
    wrapped = nn.ModuleDict({"encoder": lin}).state_dict()
    assert list(wrapped) == ["encoder." + k for k in model.state_dict()]
    before = {n: t.clone() for n, t in lin.theta0().items()}
    moved = {k: v + 1 for k, v in model.state_dict().items()}
    lin.load_state_dict(moved)
    for k, v in model.state_dict().items():
        assert torch.equal(v, moved[k])
    for n, t in lin.theta0().items():
        assert torch.equal(t, before[n]), "loading theta must not move theta_0"
    with pytest.raises(RuntimeError, match="Missing key"):
        lin.load_state_dict({k: v for k, v in moved.items() if k != "0.weight"})


def test_a_model_without_parameters_is_refused():
    with pytest.raises(ValueError, match="Tanh has no parameters"):
        Linearized(nn.Tanh())


def test_integer_outputs_pass_through():
    class WithCounts(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x), torch.tensor([len(x)])

    model = WithCounts()
    out, count = Linearized(model)(torch.randn(4, 3))
    assert count.dtype == torch.int64 and count.item() == 4 and out.shape == (4, 2)


def test_the_clip_image_encoder_linearized():
    """The mini-CLIP encoder (transformers) through the wrapper: at theta_0 it gives the
    model's embeddings (eager attention: the fused kernel has no forward-mode derivative)."""
    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, image_size=16, patch_size=8,
                           projection_dim=8)  # fmt: skip
    torch.manual_seed(0)
    encoder = hub.build_image_encoder(cfg)
    x = torch.randn(3, 3, 16, 16)
    want = encoder(pixel_values=x).image_embeds
    lin = Linearized(encoder)
    assert lin.model.config._attn_implementation == "eager"
    got = lin(pixel_values=x)
    torch.testing.assert_close(got.image_embeds, want, rtol=1e-5, atol=1e-6)
    _shift(encoder, 1e-3)
    with torch.no_grad():
        moved, exact = lin(pixel_values=x).image_embeds, encoder(pixel_values=x).image_embeds
    change, error = (exact - want).abs().max(), (moved - exact).abs().max()
    assert change > 1e-3 and 0 < error < 0.05 * change  # a small step: first order is most of it

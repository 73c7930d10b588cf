"""A network replaced by its first-order Taylor expansion in the weights.

Ortiz-Jimenez, Favero and Frossard, "Task Arithmetic in the Tangent Space: Improved Editing of
Pre-Trained Models" (NeurIPS 2023), Sec. 5. Around the pretrained weights theta_0,

    f_lin(x; theta) = f(x; theta_0) + J(x) (theta - theta_0),   J(x) = d f(x; theta) / d theta at theta_0,

is *linear in theta*: the output of theta_0 + sum_t a_t tau_t is f(x; theta_0) + sum_t a_t J(x) tau_t,
so task vectors add up exactly. Fine-tuning f_lin instead of f (same loss, same optimizer, only
the forward pass changes) is what the paper calls linearized fine-tuning; they find that it
makes CLIP's task vectors more weight-disentangled (Sec. 3's error xi) and task arithmetic
better. J(x) (theta - theta_0) is one Jacobian-vector product, computed by forward-mode automatic
differentiation (``torch.func.jvp``) in about the cost of two forward passes, without ever
forming J.

:class:`Linearized` wraps a model. Its weights are the wrapped model's own parameters (theta),
with the same names: it is trained, saved, loaded and merged exactly like the model it wraps,
only its outputs differ. theta_0 is the copy taken when it is built.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

from torch import Tensor, nn
from torch.func import functional_call, jvp
from torch.utils._pytree import tree_map


class Linearized(nn.Module):
    """``f_lin(x; theta) = f(x; theta_0) + J(x) (theta - theta_0)`` for a wrapped model ``f``.

    ``theta_0`` is a copy of ``model``'s parameters at construction; ``theta`` are the model's
    parameters as they are now (trainable as usual). The output has the wrapped model's type
    (a tensor, a tuple, a ``transformers`` model output): every floating tensor in it is
    linearized. A ``transformers`` model is switched to eager attention: PyTorch's fused CPU
    attention has no forward-mode derivative.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        self.model = model
        self._names = [name for name, _ in model.named_parameters()]
        if not self._names:
            raise ValueError(f"{type(model).__name__} has no parameters to linearize around")
        for i, (_, p) in enumerate(model.named_parameters()):
            self.register_buffer(f"_theta0_{i}", p.detach().clone(), persistent=False)

    def theta0(self) -> dict[str, Tensor]:
        """The weights the model is linearized around, by parameter name."""
        return {n: getattr(self, f"_theta0_{i}") for i, n in enumerate(self._names)}

    def forward(self, *args, **kwargs):
        theta = dict(self.model.named_parameters())
        theta0 = self.theta0()
        delta = tuple(theta[n] - theta0[n] for n in self._names)

        def f(*weights: Tensor):
            return functional_call(
                self.model, dict(zip(self._names, weights, strict=True)), args, kwargs
            )

        with warnings.catch_warnings():
            # PyTorch's first forward-mode call scripts its own decompositions with the
            # deprecated torch.jit.script and warns about it: nothing the caller can act on
            warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
            out, change = jvp(f, tuple(theta0.values()), delta)
        return tree_map(_add_float, out, change)

    # The state is the wrapped model's (theta, same keys), so that a linearized expert is stored
    # and merged as any other encoder state; theta_0 is not part of it.
    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True, assign=False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)


def _add_float(out, change):
    """One leaf of the output: value + first-order change (integer leaves have no change)."""
    if isinstance(out, Tensor) and out.is_floating_point():
        return out + change
    return out

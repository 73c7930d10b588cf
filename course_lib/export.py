"""Run the course's merges at LLM scale with mergekit: export a mergekit YAML configuration.

mergekit (Goddard et al., 2024, https://github.com/arcee-ai/mergekit) merges full checkpoints
tensor by tensor on disk, so it scales to models that do not fit in memory. Its methods and our
functions correspond as follows (parameters in mergekit's names):

=================  ==================  ==============================================
ours               mergekit            parameters
=================  ==================  ==============================================
weight_average     ``linear``          ``weight`` 1 per model (normalized)
task_arithmetic    ``task_arithmetic`` ``weight`` = lambda per model
ties_merging       ``ties``            ``density``, ``weight`` 1, ``normalize: true``
                                       (the disjoint mean), ``lambda`` = our scaling
dare (then TA)     ``dare_linear``     ``density`` = 1 - drop_rate, ``weight`` = lambda
=================  ==================  ==============================================

Differences to keep in mind: mergekit's TIES trims *per tensor* (our ``scope="tensor"``, not the
paper's global ranking) and elects signs on the weighted deltas; its DARE draws its own random
masks and, with its default ``rescale: true``, scales each kept delta tensor back to its original
L1 norm (``mergekit.sparsify.rescaled_masked_tensor``, read in mergekit 0.1.5) where DARE's paper
and our :func:`~course_lib.merging.dare` divide by ``1 - p``: the two agree in expectation on
large tensors, not bit for bit, and least on small ones. PCB-Merging and
Twin-Merging have no mergekit method: :func:`mergekit_config` says so instead of guessing.
"""

from __future__ import annotations

from collections.abc import Sequence

from course_lib.state import check_number

UNSUPPORTED = {
    "pcb": "PCB-Merging (intra/inter-balancing) has no mergekit method; use "
    "course_lib.merging.pcb_merging on the state dicts",
    "twin": "Twin-Merging routes every input at inference time; a static mergekit "
    "checkpoint cannot express it (merge the shared expert with `task_arithmetic` and keep "
    "the compressed twin vectors and the router next to it)",
}
SUPPORTED = ("average", "task_arithmetic", "ties", "dare")
DTYPES = ("float32", "float16", "bfloat16")


def _check_name(what: str, name: object) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} must be a hub id or a local directory, got {name!r}")


def mergekit_config(
    method: str,
    base_model: str,
    models: Sequence[str],
    *,
    scaling: float = 1.0,
    density: float = 0.2,
    drop_rate: float = 0.9,
    dtype: str = "float32",
) -> dict:
    """The mergekit configuration (a dict ready for ``yaml.safe_dump``) of one of our merges.

    ``base_model`` and ``models`` are hub ids or local directories of full checkpoints (for
    LoRA experts: the base with ``B @ A`` merged in, e.g. ``peft``'s ``merge_and_unload``).
    """
    if method in UNSUPPORTED:
        raise ValueError(f"method {method!r}: {UNSUPPORTED[method]}")
    if method not in SUPPORTED:
        raise ValueError(f"unknown method {method!r}; mergekit export supports {SUPPORTED}")
    _check_name("base_model", base_model)
    if isinstance(models, (str, bytes)) or not isinstance(models, Sequence):
        raise ValueError(f"models must be a list of checkpoint names, got {models!r}")
    if not models:
        raise ValueError("models must name at least one fine-tuned checkpoint")
    for i, m in enumerate(models):
        _check_name(f"models[{i}]", m)
    scaling = check_number("scaling", scaling)  # one lambda: per-task lambdas are not exported
    if not 0.0 < check_number("density", density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if not 0.0 <= check_number("drop_rate", drop_rate) < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
    if method == "dare" and round(1.0 - float(drop_rate), 6) <= 0.0:  # the density written below
        raise ValueError(
            f"drop_rate {drop_rate!r} leaves a density of 0 at the 6 decimals exported: mergekit "
            "would drop every delta and return the base model"
        )
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if method == "average":
        return {
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models],
            "dtype": dtype,
        }
    if method == "task_arithmetic":
        params, name, shared = {"weight": float(scaling)}, "task_arithmetic", {"normalize": False}
    elif method == "ties":
        params, name = {"weight": 1.0, "density": float(density)}, "ties"
        shared = {"normalize": True, "lambda": float(scaling)}
    else:
        params = {"weight": float(scaling), "density": round(1.0 - float(drop_rate), 6)}
        name, shared = "dare_linear", {"normalize": False}
    return {
        "merge_method": name,
        "base_model": base_model,
        "models": [{"model": m, "parameters": dict(params)} for m in models],
        "parameters": shared,
        "dtype": dtype,
    }


def mergekit_yaml(method: str, base_model: str, models: Sequence[str], **kwargs) -> str:
    """:func:`mergekit_config` as YAML text, for ``mergekit-yaml config.yml ./merged``."""
    import yaml

    return yaml.safe_dump(mergekit_config(method, base_model, models, **kwargs), sort_keys=False)

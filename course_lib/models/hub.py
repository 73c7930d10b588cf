"""Hub loaders for the full profile: real CLIP ViT-B/32 and the FusionBench task experts.

The full profile merges the image encoder of ``openai/clip-vit-base-patch32``. Its eight experts,
``tanganke/clip-vit-base-patch32_<task>``, are ``CLIPVisionModel`` checkpoints: FusionBench
fine-tuned the vision tower only, so they hold no ``visual_projection``. Both profiles share one
representation of an image encoder: the ``state_dict()`` of a
``transformers.CLIPVisionModelWithProjection`` (vision tower under ``vision_model.`` plus
``visual_projection.weight``). This module turns hub checkpoints into that representation:

* :func:`load_clip` loads the whole CLIP (the text tower builds the zero-shot heads);
* :func:`image_encoder_state` cuts the image encoder out of it (the pretrained ``θ₀``);
* :func:`load_expert` loads one expert and completes it with the pretrained projection;
* :func:`build_image_encoder` turns any such state (``θ₀``, an expert, a merge) back into a model.

Key layouts in transformers 5 (checked on a tiny model): ``CLIPModel`` keys are
``vision_model.*``, ``visual_projection.weight``, ``text_model.*``, ``text_projection.weight`` and
``logit_scale``; ``CLIPVisionModel`` has no ``.vision_model`` attribute and its keys carry no
prefix (``embeddings.*``, ``pre_layrnorm.*``, ``encoder.*``, ``post_layernorm.*``);
``CLIPVisionModelWithProjection`` keys are ``vision_model.*`` and ``visual_projection.weight``.
Checkpoints written by transformers 4 store ``vision_model.``-prefixed keys for a
``CLIPVisionModel``; transformers 5 strips the prefix when loading them.

Everything accepts a local directory instead of a hub id, which is how the tests run offline.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor
from transformers import (
    AutoTokenizer,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    PreTrainedTokenizerBase,
)

FULL_MODEL = "openai/clip-vit-base-patch32"
EXPERT_TEMPLATE = "tanganke/clip-vit-base-patch32_{task}"
# Expert suffixes as FusionBench names them (``EXPERT_TEMPLATE.format(task=suffix)``).
EXPERT_SUFFIXES = (
    "sun397",
    "stanford-cars",
    "resisc45",
    "eurosat",
    "svhn",
    "gtsrb",
    "mnist",
    "dtd",
)

# Pinned hub revisions. FULL_MODEL: a commit of openai/clip-vit-base-patch32 pinned by several
# independent public projects, one of which records ``model.safetensors`` (with its sha256) at
# that commit; it could not be re-checked against the hub from the offline build machine. The
# experts: no published commit hash could be found, so they follow "main" — replace these with
# commit hashes (``huggingface_hub.model_info(repo).sha``) once checked online.
REVISIONS: dict[str, str] = {
    FULL_MODEL: "c7244be81152024ce0e99ac8d2e373a8953d9f9a",
    **{EXPERT_TEMPLATE.format(task=suffix): "main" for suffix in EXPERT_SUFFIXES},
}

VISION_PREFIX = "vision_model."
PROJECTION_KEY = "visual_projection.weight"


def _revision(model_id: str, revision: str | None) -> str | None:
    """The revision to ask for: explicit, else the pinned one; none for a local directory."""
    if revision is not None:
        return revision
    if os.path.isdir(model_id):
        return None
    return REVISIONS.get(model_id, "main")


def _names(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_clip(
    model_id: str = FULL_MODEL,
    revision: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[CLIPModel, PreTrainedTokenizerBase]:
    """Load a whole CLIP (both towers, safetensors only) and its tokenizer, in eval mode.

    ``model_id`` is a hub id or a local directory written by ``save_pretrained``; a hub id uses
    the revision pinned in :data:`REVISIONS` unless ``revision`` is given.
    """
    rev = _revision(model_id, revision)
    model, info = CLIPModel.from_pretrained(
        model_id, revision=rev, dtype=dtype, use_safetensors=True, output_loading_info=True
    )
    if info["missing_keys"]:
        raise ValueError(
            f"{model_id} lacks weights the CLIP model needs (they would be random): "
            f"{_names(info['missing_keys'])}"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_id, revision=rev, trust_remote_code=False)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def encoder_config(clip: CLIPModel) -> CLIPVisionConfig:
    """The config of the CLIP's image encoder, with the projection size the CLIP really uses.

    ``CLIPModel`` sizes ``visual_projection`` with the top-level ``projection_dim``, while
    ``CLIPVisionModelWithProjection`` reads ``vision_config.projection_dim``; they can differ.
    """
    config = copy.deepcopy(clip.config.vision_config)
    config.projection_dim = clip.config.projection_dim
    return config


def _expected_keys(vision_config: CLIPVisionConfig) -> dict[str, torch.Size]:
    """Key -> shape of a ``CLIPVisionModelWithProjection``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(vision_config)
    return {k: v.shape for k, v in model.state_dict().items()}


def image_encoder_state(clip: CLIPModel) -> dict[str, Tensor]:
    """The image encoder of ``clip`` as a ``CLIPVisionModelWithProjection`` state dict (copies)."""
    state = {VISION_PREFIX + k: v for k, v in clip.vision_model.state_dict().items()}
    state[PROJECTION_KEY] = clip.visual_projection.weight
    _check_layout(state, _expected_keys(encoder_config(clip)), what="the CLIP's image encoder")
    return {k: v.detach().clone() for k, v in state.items()}


def _check_layout(
    state: Mapping[str, Tensor], expected: Mapping[str, torch.Size], *, what: str
) -> None:
    """Raise a ValueError naming missing/unexpected keys and wrong shapes."""
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise ValueError(
            f"{what} does not have the image-encoder layout: "
            f"missing [{_names(missing)}]; unexpected [{_names(unexpected)}]"
        )
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(expected[k])]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"{what}: {len(wrong)} tensors have the wrong shape, e.g. {k}: "
            f"{tuple(state[k].shape)} instead of {tuple(expected[k])}"
        )


def build_image_encoder(
    vision_config: CLIPVisionConfig, state: Mapping[str, Tensor] | None = None
) -> CLIPVisionModelWithProjection:
    """A ``CLIPVisionModelWithProjection`` in eval mode, loaded from ``state`` when given.

    Pass :func:`encoder_config` of the CLIP (not ``clip.config.vision_config``) so that the
    projection has the right size. The model takes the floating dtype of ``state``.
    """
    model = CLIPVisionModelWithProjection(vision_config)
    if state is not None:
        _check_layout(state, _expected_keys(vision_config), what="the state")
        model.to(dtype=state[PROJECTION_KEY].dtype)
        model.load_state_dict(dict(state), strict=True)
    return model.eval()


def expert_id(task: str) -> str:
    """Hub id of the expert for ``task``: a course task name (``"Cars"``) or a FusionBench suffix."""
    from course_lib.data.vision_hub import FULL_TASKS  # lazy: data does not depend on models

    if task in FULL_TASKS:
        return EXPERT_TEMPLATE.format(task=FULL_TASKS[task].expert)
    if task in EXPERT_SUFFIXES:
        return EXPERT_TEMPLATE.format(task=task)
    raise ValueError(
        f"unknown task {task!r}: use one of {sorted(FULL_TASKS)} or {list(EXPERT_SUFFIXES)}"
    )


def load_expert(
    task: str,
    base_state: Mapping[str, Tensor],
    revision: str | None = None,
    model_id: str | None = None,
) -> dict[str, Tensor]:
    """One expert's image encoder as a state dict with exactly the layout of ``base_state``.

    The expert is a ``CLIPVisionModel`` checkpoint (safetensors only) of the hub id of ``task``
    or ``model_id`` (a hub id or a local directory). Its vision tower is moved under
    ``vision_model.``; ``visual_projection.weight`` is copied from ``base_state`` (the experts
    were fine-tuned without it). Missing or unexpected keys, other shapes or other dtypes than
    ``base_state`` raise a ValueError that names them. Tensors land on ``base_state``'s device.
    """
    repo = model_id or expert_id(task)
    if PROJECTION_KEY not in base_state:
        raise ValueError(f"base_state has no {PROJECTION_KEY!r}; pass image_encoder_state(clip)")
    dtype, device = base_state[PROJECTION_KEY].dtype, base_state[PROJECTION_KEY].device
    model, info = CLIPVisionModel.from_pretrained(
        repo,
        revision=_revision(repo, revision),
        dtype=dtype,
        use_safetensors=True,
        output_loading_info=True,
    )
    problems = {name: info[name] for name in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        details = "; ".join(f"{n} [{_names(map(str, v))}]" for n, v in problems.items() if v)
        raise ValueError(f"expert {repo} is not a complete CLIP vision tower: {details}")
    state = {_encoder_key(k): v.detach().to(device) for k, v in model.state_dict().items()}
    state[PROJECTION_KEY] = base_state[PROJECTION_KEY].detach().clone()
    _match_base(state, base_state, repo)
    return state


def _encoder_key(key: str) -> str:
    """``CLIPVisionModel`` key (with or without ``vision_model.``) -> encoder key."""
    return VISION_PREFIX + key.removeprefix(VISION_PREFIX)


def _match_base(state: Mapping[str, Tensor], base: Mapping[str, Tensor], repo: str) -> None:
    _check_layout(
        state, {k: v.shape for k, v in base.items()}, what=f"expert {repo} (vs base_state)"
    )
    wrong = [k for k in base if state[k].dtype != base[k].dtype]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"expert {repo}: {len(wrong)} tensors differ in dtype from base_state, e.g. {k}: "
            f"{state[k].dtype} vs {base[k].dtype}"
        )

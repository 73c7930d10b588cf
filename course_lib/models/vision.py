"""The mini-CLIP: a tiny ``transformers.CLIPModel`` pretrained contrastively, and zero-shot heads.

CLIP (Radford et al., 2021) trains an image tower and a text tower so that an image and its
caption land close together: for a batch of N pairs, logits = s * norm(img) @ norm(txt)^T and
the loss is the mean of the two cross-entropies (image->text and text->image) against the
diagonal. The mini profile does exactly this on :func:`course_lib.data.vision.caption_corpus`,
with a word-level tokenizer over the corpus vocabulary, in a couple of minutes on a CPU.

A *zero-shot head* for a task is built the CLIP way (Sec. 3.1.4 of the paper): embed every
class name inside every prompt template with the text tower, average over templates,
L2-normalize -> a ``[C, E]`` matrix. An image is classified by the class whose row has the
largest cosine with the image embedding. The heads stay frozen; only the image encoder
(``CLIPVisionModelWithProjection``: vision tower + projection) is fine-tuned and merged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

from course_lib.config import progress_bar

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)  # EOS must not be 2: CLIP treats eos id 2 as "legacy"


@dataclass(frozen=True)
class MiniClipConfig:
    """Architecture and pretraining recipe of the mini-CLIP (every field enters the zoo hash)."""

    image_size: int = 32
    patch_size: int = 4  # 64 patches: small glyphs need the resolution (patch 8 learnt colour only)
    width: int = 64
    layers: int = 4
    heads: int = 4
    text_width: int = 64
    text_layers: int = 2
    embed_dim: int = 64
    max_text_len: int = 24
    corpus_size: int = 30_000
    epochs: int = 5
    batch_size: int = 128  # more, smaller steps learn more than fewer large ones here
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def build_tokenizer(vocabulary: Sequence[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: lowercase, split on whitespace and punctuation, wrap in BOS/EOS."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    words = sorted({w.lower() for w in vocabulary} - set(SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({w: i + len(SPECIAL_TOKENS) for i, w in enumerate(words)})
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", BOS_ID), ("[EOS]", EOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
    )


def build_clip(cfg: MiniClipConfig, vocab_size: int) -> CLIPModel:
    """A randomly initialized tiny CLIP with the mini-world's shapes (seeded by ``cfg.seed``)."""
    torch.manual_seed(cfg.seed)
    config = CLIPConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": cfg.text_width,
            "intermediate_size": 2 * cfg.text_width,
            "num_hidden_layers": cfg.text_layers,
            "num_attention_heads": cfg.heads,
            "max_position_embeddings": cfg.max_text_len,
            "pad_token_id": PAD_ID,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
        },
        vision_config={
            "hidden_size": cfg.width,
            "intermediate_size": 2 * cfg.width,
            "num_hidden_layers": cfg.layers,
            "num_attention_heads": cfg.heads,
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
        },
        projection_dim=cfg.embed_dim,
    )
    return CLIPModel(config)


def tokenize(tokenizer, texts: Sequence[str], max_len: int) -> dict[str, Tensor]:
    """Padded ``input_ids``/``attention_mask``; an over-long text is an error, never truncated."""
    enc = tokenizer(list(texts), padding=True, return_tensors="pt")
    if enc["input_ids"].shape[1] > max_len:
        longest = max(texts, key=lambda t: len(tokenizer(t)["input_ids"]))
        raise ValueError(f"text longer than max_text_len={max_len} tokens: {longest!r}")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE: mean of CE(image->text) and CE(text->image) on the diagonal."""
    img = F.normalize(image_emb, dim=-1)
    txt = F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp().clamp(max=100.0) * img @ txt.T
    target = torch.arange(len(img))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def to_pixels(images: np.ndarray) -> Tensor:
    """uint8 ``[N, 3, H, W]`` -> float32 in [-1, 1], the mini-world's normalization."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0)


def pretrain_clip(
    cfg: MiniClipConfig,
    images: np.ndarray,
    captions: Sequence[str],
    tokenizer,
    *,
    progress: bool = True,
) -> tuple[CLIPModel, list[float]]:
    """Contrastive pretraining of a fresh mini-CLIP on (image, caption) pairs; returns losses."""
    model = build_clip(cfg, len(tokenizer))
    tokens = tokenize(tokenizer, captions, cfg.max_text_len)
    n = len(captions)
    steps_per_epoch = n // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_schedule(s, total, cfg.warmup_steps)
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    model.train()
    bar = progress_bar(total=total, desc="pretrain mini-CLIP", progress=progress, leave=False)
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            out = model(
                input_ids=tokens["input_ids"][idx],
                attention_mask=tokens["attention_mask"][idx],
                pixel_values=to_pixels(images[idx.numpy()]),
            )
            loss = clip_loss(out.image_embeds, out.text_embeds, model.logit_scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)  # shown at the next tick
    bar.close()
    model.eval()
    return model, losses


@torch.no_grad()
def zeroshot_head(
    clip: CLIPModel,
    tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    device: torch.device | str = "cpu",
    max_len: int | None = None,
) -> Tensor:
    """``[C, E]``: per class, the normalized mean of the normalized prompt embeddings."""
    clip = clip.to(device).eval()
    rows = []
    for name in classnames:
        prompts = [t.format(name) for t in templates]
        if max_len is None:
            enc = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
            enc = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        else:
            enc = tokenize(tokenizer, prompts, max_len)
        emb = clip.get_text_features(**{k: v.to(device) for k, v in enc.items()})
        emb = getattr(emb, "pooler_output", emb)  # transformers 5 may return a model output
        emb = F.normalize(emb, dim=-1).mean(dim=0)
        rows.append(F.normalize(emb, dim=0))
    return torch.stack(rows).cpu()


class ZeroShotClassifier(nn.Module):
    """Image encoder + frozen zero-shot head: logits = s * norm(encoder(x)) @ head^T."""

    def __init__(self, encoder: nn.Module, head: Tensor, logit_scale: float = 100.0):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("head", head.clone())
        self.logit_scale = float(logit_scale)

    def embed(self, pixel_values: Tensor) -> Tensor:
        return F.normalize(self.encoder(pixel_values=pixel_values).image_embeds, dim=-1)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.logit_scale * self.embed(pixel_values) @ self.head.T

"""Fine-tuning an expert: the image encoder on one task, with the zero-shot head frozen.

This is the recipe of the task-vectors paper (Ilharco et al., ICLR 2023, Sec. 2 and App. B):
start from the pretrained encoder theta_0, keep the task's zero-shot text head fixed, train
all encoder weights with AdamW, weight decay 0.1, a cosine learning-rate schedule with warm-up
and a small learning rate, so that theta_t stays close to theta_0 and tau_t = theta_t - theta_0
is a meaningful "task vector". We add one thing the mini world needs: the validation accuracy
is measured after every epoch and the best epoch's weights are kept (val-based stopping).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from course_lib.config import progress_bar, torch_threads
from course_lib.data.base import VisionTask
from course_lib.eval import accuracy
from course_lib.models.vision import ZeroShotClassifier, cosine_schedule


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of expert fine-tuning (every field enters the zoo's config hash)."""

    epochs: int = 5
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    label_smoothing: float = 0.0
    seed: int = 0
    threads: int | None = 1  # PyTorch CPU threads while training: 1 gives the same bits on any
    # machine (None: whatever the process uses); the zoo trains several experts side by side

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FinetuneHistory:
    """What happened during fine-tuning: loss per step, val accuracy per epoch, best epoch."""

    losses: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    best_epoch: int = -1


def finetune(
    model: ZeroShotClassifier,
    task: VisionTask,
    cfg: FinetuneConfig = FinetuneConfig(),
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[dict[str, Tensor], FinetuneHistory]:
    """Fine-tune ``model.encoder`` on ``task`` (head frozen); return the best encoder state."""
    with torch_threads(cfg.threads):
        return _finetune(model, task, cfg, device, progress)


def _finetune(
    model: ZeroShotClassifier,
    task: VisionTask,
    cfg: FinetuneConfig,
    device: torch.device | str,
    progress: bool,
) -> tuple[dict[str, Tensor], FinetuneHistory]:
    torch.manual_seed(cfg.seed)
    model = model.to(device)
    params = [p for p in model.encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-task.num_examples("train") // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_schedule(s, total, cfg.warmup_steps)
    )
    history = FinetuneHistory()
    best_state, best_acc = None, -1.0
    bar = progress_bar(total=total, desc=f"fine-tune {task.name}", progress=progress, leave=False)
    for epoch in range(cfg.epochs):
        model.train()
        for x, y in task.batches("train", cfg.batch_size, shuffle=True, seed=cfg.seed + epoch):
            logits = model(x.to(device))
            loss = F.cross_entropy(logits, y.to(device), label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            history.losses.append(loss.item())
            bar.update()
        acc = accuracy(model, task, "val", device=device)
        history.val_accuracy.append(acc)
        bar.set_postfix(val=f"{acc:.1f}")
        if acc > best_acc:
            best_acc, history.best_epoch = acc, epoch
            best_state = {
                k: v.detach().cpu().clone() for k, v in model.encoder.state_dict().items()
            }
    bar.close()
    model.eval()
    return best_state, history

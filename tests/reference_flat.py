"""Straightforward flat-matrix versions of TIES and PCB, written the way the papers' official
code works: flatten every merged tensor (sorted by name) into one row per task, a [T, D] matrix,
and use row-wise sort/kthvalue. Slow and memory-hungry, but obviously right; the streaming
implementations in course_lib must agree with them exactly.
"""

import torch


def flatten(sd, keys):
    return torch.cat([sd[k].reshape(-1).float() for k in keys])


def unflatten(vec, like, keys):
    out, i = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = vec[i : i + n].reshape(like[k].shape)
        i += n
    return out


def task_matrix(pre, fts, keys):
    base = flatten(pre, keys)
    return torch.stack([flatten(ft, keys) - base for ft in fts])


def ties_flat(pre, fts, density, scaling=1.0, aggregate="mean"):
    keys = sorted(pre)
    tau = task_matrix(pre, fts, keys)
    d = tau.shape[1]
    k = max(1, int(density * d + 1e-9))
    thr = tau.abs().kthvalue(d - k + 1, dim=1, keepdim=True).values
    tau = tau * (tau.abs() >= thr)
    sign = tau.sum(0).sign()
    sign[sign == 0] = sign.sum().sign()
    agree = ((sign > 0) & (tau > 0)) | ((sign < 0) & (tau < 0))
    kept = tau * agree
    if aggregate == "mean":
        merged = kept.sum(0) / agree.sum(0).clamp(min=1)
    elif aggregate == "sum":
        merged = kept.sum(0)
    else:
        merged = kept.abs().max(0).values * sign
    out = flatten(pre, keys) + scaling * merged
    return unflatten(out, pre, keys)


def _row_value(x, index):
    return x.sort(dim=1).values[:, index : index + 1]


def pcb_flat(pre, fts, ratio, scaling=1.0, clip_quantile=0.01):
    keys = sorted(pre)
    tau = task_matrix(pre, fts, keys)
    n, d = tau.shape
    a = tau.abs()
    lo = _row_value(a, int(d * clip_quantile))
    hi = _row_value(a, max(int(d * clip_quantile), int(d * (1 - clip_quantile)) - 1))
    a = torch.minimum(torch.maximum(a, lo), hi)
    m = (a - lo) / (hi - lo).clamp(min=1e-12)
    tau_c = tau.sign() * a
    u = tau.sign() * m
    intra = torch.exp(n * m**2)
    inter = torch.stack([torch.tanh(u[i] * u).sum(0) for i in range(n)])
    beta = intra * inter
    thr = _row_value(beta, min(d - 1, int(d * (1 - ratio))))
    bmax = beta.max(dim=1, keepdim=True).values
    w = (torch.maximum(beta, thr) - thr) / (bmax - thr).clamp(min=1e-12)
    lam = torch.tensor([scaling] * n if isinstance(scaling, float) else scaling).reshape(-1, 1)
    merged = (lam * w * tau_c).sum(0) / w.sum(0).clamp(min=1e-12)
    return unflatten(flatten(pre, keys) + merged, pre, keys)

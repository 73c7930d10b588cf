"""Merging methods: pure functions over state dicts, one module per paper.

All methods take ``pretrained`` (except :func:`weight_average`) and a list of ``finetuned``
state dicts and return a new state dict; none mutates its inputs. ``keys``/``exclude`` are
regular expressions that choose which tensors are merged (the rest are copied from the
pretrained model). :data:`METHODS` maps each registered name to its function.
"""

from course_lib.merging._base import METHODS, register
from course_lib.merging.average import weight_average
from course_lib.merging.dare import dare, dare_experts
from course_lib.merging.pcb import pcb_merging
from course_lib.merging.search import SearchResult, grid_values, search_scaling
from course_lib.merging.task_arithmetic import task_arithmetic
from course_lib.merging.ties import ties_merging
from course_lib.merging.twin import (
    CompressedVector,
    LowRank,
    Router,
    compress,
    merge_with_weights,
    shared_expert,
    train_router,
    twin_vectors,
)
from course_lib.state import TaskVector, task_vector, task_vectors

__all__ = [
    "METHODS",
    "CompressedVector",
    "LowRank",
    "Router",
    "SearchResult",
    "TaskVector",
    "compress",
    "dare",
    "dare_experts",
    "grid_values",
    "merge_with_weights",
    "pcb_merging",
    "register",
    "search_scaling",
    "shared_expert",
    "task_arithmetic",
    "task_vector",
    "task_vectors",
    "ties_merging",
    "train_router",
    "twin_vectors",
    "weight_average",
]

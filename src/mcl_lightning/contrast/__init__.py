"""What MCL-OKD's contrastive term needs: memory banks, class-aware negatives, binary NCE."""

from mcl_lightning.contrast.fused import Workspace, fused_multi_view_nce
from mcl_lightning.contrast.memory_bank import MemoryBank
from mcl_lightning.contrast.negatives import POSITIVE_MODES, NegativeSampler
from mcl_lightning.contrast.nce import (
    dense_pairwise_logits,
    float32_region,
    multi_view_nce,
    multi_view_nce_from_logits,
    nce_loss,
    pairwise_logits,
    pairwise_scores,
)

__all__ = [
    "MemoryBank", "NegativeSampler", "POSITIVE_MODES", "Workspace", "dense_pairwise_logits", "float32_region",
    "fused_multi_view_nce", "multi_view_nce", "multi_view_nce_from_logits", "nce_loss", "pairwise_logits",
    "pairwise_scores",
]

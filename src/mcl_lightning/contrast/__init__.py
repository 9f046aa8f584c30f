"""What MCL-OKD's contrastive term needs: memory banks, class-aware negatives, binary NCE."""

from mcl_lightning.contrast.memory_bank import MemoryBank
from mcl_lightning.contrast.negatives import POSITIVE_MODES, NegativeSampler
from mcl_lightning.contrast.nce import float32_region, multi_view_nce, nce_loss, pairwise_scores

__all__ = ["MemoryBank", "float32_region", "NegativeSampler", "POSITIVE_MODES", "multi_view_nce", "nce_loss", "pairwise_scores"]

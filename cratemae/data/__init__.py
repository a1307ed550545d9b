"""Data: shards and image folders -> per-rank, resumable, seeded batches; shard writing.

Data flows one way (recipe -> data -> model -> training loop): this package reads the
recipe's `DataSection` and knows nothing of models or training. `build_data` resolves and
counts a split once and hands out each epoch's loader; see `cratemae.data.loader` for the
loader contract and `cratemae.data.plan` for how an epoch is split over ranks and workers.

DataLoader workers ignore the runtime's stop signals (`cratemae.distributed.preemption`).

May import: errors, recipe, distributed.
"""

from cratemae.data.batch import Batch, EncodedBatch
from cratemae.data.gpu import gpu_decode_batch
from cratemae.data.loader import Loader, SplitData, build_data, build_loader
from cratemae.data.transforms import eval_transform, finetune_transform, pretrain_transform
from cratemae.data.writer import ShardSummary, write_shards

__all__ = [
    "Batch",
    "EncodedBatch",
    "Loader",
    "ShardSummary",
    "SplitData",
    "build_data",
    "build_loader",
    "eval_transform",
    "finetune_transform",
    "gpu_decode_batch",
    "pretrain_transform",
    "write_shards",
]

"""The runtime: launch by torchrun or srun, the process group and its collectives, the
device, numeric precision, and the preemption signals.

May import: errors.
"""

from cratemae.distributed import dist
from cratemae.distributed.precision import Precision, resolve_precision
from cratemae.distributed.preemption import PreemptionFlag

__all__ = ["Precision", "PreemptionFlag", "dist", "resolve_precision"]

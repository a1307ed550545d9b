"""White-box diagnostics: what each encoder layer does to the coding rate and the sparsity
of the tokens, where the CLS token attends, and how the patch features are organised.
For CRATE against each layer's MSSA subspaces; for MAE's ViT, which has none, against each
head's value projection (`heads` says which, per family, in one place).

Pure computation here (`heads`, `measures`, `record`, `summary`, `run`); `plots` draws
with matplotlib, imported only when a picture is drawn.

May import: errors, recipe, data, model, checkpoints, weights.
"""

from cratemae.analysis.heads import LayerHeads, layer_heads
from cratemae.analysis.measures import EPS2, coding_rate, sparsity
from cratemae.analysis.record import LayerRecord, record_layers
from cratemae.analysis.run import Analysis, Picture, analyze, attention_layers
from cratemae.analysis.summary import LayerSummary, PatchPCA

__all__ = [
    "EPS2",
    "Analysis",
    "LayerHeads",
    "LayerRecord",
    "LayerSummary",
    "PatchPCA",
    "Picture",
    "analyze",
    "attention_layers",
    "coding_rate",
    "layer_heads",
    "record_layers",
    "sparsity",
]

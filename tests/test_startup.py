"""What a command's start-up imports: building a CRATE-MAE, its optimizer groups, and loading
weights (whose configuration is checked on the `meta` device first) import neither timm nor
torch's compiler, 1.7 s and 2.4 s of a process's start on this 2-core machine. (MAE's ViT is
built of timm's blocks, and torch's optimizers import the compiler when given their groups.)"""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys, torch
from cratemae.checkpoints import write_model_weights
from cratemae.model import create_model
from cratemae.train.optim import param_groups
from cratemae.weights.load import load_model
model = create_model("crate_mae_tiny", img_size=32, patch_size=8, depth=1)
param_groups(model, 0.05, skip=model.no_weight_decay())
model(torch.randn(1, 3, 32, 32))
file = write_model_weights(sys.argv[1], model.state_dict(), model.config.to_dict())
assert torch.equal(load_model(file).model.mask_token, model.mask_token)
print(sorted({"timm", "torch._dynamo"} & set(sys.modules)))
"""


def test_building_training_groups_and_loading_import_neither_timm_nor_the_compiler(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "m.safetensors")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

"""The optimizer builder and the learning-rate schedule, as pure functions (milliseconds, no
training run): exact schedule values at its edges, the peak-lr rule, which parameters
decay, fused AdamW for every caller, LARS against MAE's formula and timm's `Lars`, SGD."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from cratemae.errors import BadInputError
from cratemae.model import CrateMAE, CrateMAEConfig
from cratemae.recipe import OptimSection
from cratemae.train.optim import LARS, configure_optimizers, lr_at, param_groups, peak_lr

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo.toml"
TINY = CrateMAEConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                      decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4)


@pytest.fixture(scope="module")
def tiny() -> CrateMAE:
    torch.manual_seed(0)
    return CrateMAE(TINY)


def names_of(model: nn.Module, group: dict) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in group["params"]}


# --- the schedule ---------------------------------------------------------------------------
# warmup 4, total 10, peak 1, minimum 0.1: the cosine spans 6 steps, so its middle is step 7.
SCHEDULE = dict(total=10, warmup=4, peak=1.0, minimum=0.1)
ROOT3 = math.sqrt(3) / 2  # cos(pi/6)


@pytest.mark.parametrize("step, expected", [
    (0, 0.0),  # warm-up starts at 0
    (1, 0.25),
    (3, 0.75),  # warmup - 1
    (4, 1.0),  # warmup: the peak
    (5, 0.1 + 0.9 * (1 + ROOT3) / 2),  # cos(pi/6)
    (7, 0.55),  # the middle of the cosine: halfway from peak to minimum
    (8, 0.1 + 0.9 * 0.25),  # cos(2pi/3) = -1/2
    (9, 0.1 + 0.9 * (1 - ROOT3) / 2),  # total - 1: cos(5pi/6)
    (10, 0.1),  # total: the minimum
    (12, 0.1),  # past the end it stays there
])
def test_lr_at_exact_values(step: int, expected: float) -> None:
    assert lr_at(step, **SCHEDULE) == pytest.approx(expected, abs=1e-12)


def test_lr_at_without_warmup_starts_at_the_peak() -> None:
    assert lr_at(0, total=10, warmup=0, peak=2.0, minimum=0.0) == 2.0
    assert lr_at(5, total=10, warmup=0, peak=2.0, minimum=0.0) == pytest.approx(1.0)


# --- the peak learning rate ------------------------------------------------------------------
def test_peak_lr_scales_base_lr_by_batch_over_256() -> None:
    lr, note = peak_lr(OptimSection(base_lr=1.5e-4), effective_batch=4096)
    assert lr == pytest.approx(1.5e-4 * 16)
    assert "effective batch 4096 / 256" in note
    assert peak_lr(OptimSection(base_lr=1e-3), effective_batch=256)[0] == pytest.approx(1e-3)


def test_peak_lr_absolute_lr_wins_over_base_lr() -> None:
    lr, note = peak_lr(OptimSection(base_lr=1.5e-4, lr=0.01), effective_batch=4096)
    assert lr == 0.01 and "absolute" in note


def test_a_base_lr_whose_scaled_peak_overflows_is_bad_input() -> None:
    """1e308 passes the schema (finite, > 0), but x 4096 / 256 is inf: refused where the
    peak is computed, which the dry run and every training command go through."""
    with pytest.raises(BadInputError, match=r"^optim.base_lr 1e\+308 x effective batch 4096 / "
                                            r"256 is not a finite learning rate$"):
        peak_lr(OptimSection(base_lr=1e308), effective_batch=4096)
    assert peak_lr(OptimSection(base_lr=1e300), effective_batch=4096)[0] == pytest.approx(1.6e301)


# --- the groups ------------------------------------------------------------------------------
def test_groups_follow_maes_pretraining_rule(tiny: CrateMAE) -> None:
    """MAE's pre-training calls timm's `add_weight_decay(model, wd)` with no skip list: only
    1-D tensors and biases go undecayed, so the (1, 1, d) CLS and mask tokens decay."""
    decay, no_decay = param_groups(tiny, 0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    d, nd = names_of(tiny, decay), names_of(tiny, no_decay)
    assert d.isdisjoint(nd) and d | nd == {n for n, _ in tiny.named_parameters()}
    assert {"mask_token", "encoder.cls_token"} <= d
    assert {"encoder.patch_embed.proj.bias", "encoder.norm.weight", "encoder.norm.bias",
            "decoder_pred.bias", "encoder.blocks.0.norm1.weight"} <= nd
    assert {"encoder.patch_embed.proj.weight", "encoder.blocks.0.mssa.u_proj.weight",
            "encoder.blocks.0.ista.dictionary", "decoder_pred.weight"} <= d
    params = dict(tiny.named_parameters())
    assert d == {n for n, p in params.items() if p.ndim >= 2 and not n.endswith(".bias")}


def test_groups_skip_adds_names_to_no_decay(tiny: CrateMAE) -> None:
    """`skip` gives the rule timm applies with a `no_weight_decay()` list (MAE's fine-tuning)."""
    decay, no_decay = param_groups(tiny, 0.05, skip=tiny.no_weight_decay())
    assert {"mask_token", "encoder.cls_token"} <= names_of(tiny, no_decay)
    assert names_of(tiny, decay) == names_of(tiny, param_groups(tiny, 0.05)[0]) - {
        "mask_token", "encoder.cls_token"}


@pytest.mark.parametrize("skip", [(), ("encoder.cls_token", "mask_token"), ("*.mssa.u_proj.*",)])
def test_groups_are_timms_split_in_timms_order_within_each(tiny: CrateMAE, skip) -> None:
    """The rule is timm's `param_groups_weight_decay`, written out (importing timm costs
    every command's start-up): the same parameters decayed, in the same order; a frozen
    parameter is in neither group."""
    from timm.optim import param_groups_weight_decay

    model = copy.deepcopy(tiny)
    model.encoder.blocks[1].norm2.weight.requires_grad_(False)
    ours = param_groups(model, 0.05, skip=skip)
    theirs = param_groups_weight_decay(model, 0.05, no_weight_decay_list=skip)
    by_wd = {g["weight_decay"]: [id(p) for p in g["params"]] for g in theirs}
    assert [[id(p) for p in g["params"]] for g in ours] == [by_wd[0.05], by_wd[0.0]]


def test_pretraining_task_uses_maes_groups(tiny: CrateMAE) -> None:
    from cratemae.recipe import load_recipe
    from cratemae.tasks.pretrain import MAETask

    recipe = load_recipe(DEMO, ["optim.weight_decay=0.07"])
    groups = MAETask(recipe, tiny).param_groups()
    assert [g["weight_decay"] for g in groups] == [0.07, 0.0]
    assert [names_of(tiny, g) for g in groups] == [names_of(tiny, g)
                                                   for g in param_groups(tiny, 0.07)]
    assert {"mask_token", "encoder.cls_token"} <= names_of(tiny, groups[0])


def test_resuming_a_checkpoint_saved_with_the_old_groups_is_one_line(tiny: CrateMAE,
                                                                     tmp_path) -> None:
    """Before pre-training decayed the tokens, its groups held them in no-decay: torch
    refuses that optimizer state (the groups differ in size by the 2 tokens), and the run
    must stop with one line naming the checkpoint, not a traceback."""
    from cratemae.errors import BadInputError
    from cratemae.recipe import load_recipe
    from cratemae.tasks.pretrain import MAETask
    from cratemae.train.state import TrainState, restore_run, save_run

    recipe = load_recipe(DEMO)
    model = copy.deepcopy(tiny)
    old = torch.optim.AdamW(param_groups(model, 0.05, skip=model.no_weight_decay()), lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).loss.backward()
    old.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    path = save_run(tmp_path, model=model, config={}, optimizer=old, scaler=scaler,
                    state=TrainState(step=1, batch=1), recipe=recipe, end_of_epoch=False)
    new = torch.optim.AdamW(MAETask(recipe, model).param_groups(), lr=1e-3)
    with pytest.raises(BadInputError) as err:
        restore_run(path, model=model, optimizer=new, scaler=scaler, recipe=recipe)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "optimizer state" in message
    # a checkpoint saved with the groups of today resumes
    path = save_run(tmp_path, model=model, config={}, optimizer=new, scaler=scaler,
                    state=TrainState(step=2, batch=2), recipe=recipe, end_of_epoch=False)
    assert restore_run(path, model=model, optimizer=new, scaler=scaler, recipe=recipe).step == 2


def test_groups_keep_their_layout_at_weight_decay_zero(tiny: CrateMAE) -> None:
    """Two groups, decay first, in named_parameters order, as checkpoints saved before
    hold them (torch loads an optimizer state by group position and size)."""
    groups = param_groups(tiny, 0.0)
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0]
    assert names_of(tiny, groups[0]) == names_of(tiny, param_groups(tiny, 0.05)[0])
    order = [n for n, _ in tiny.named_parameters()]
    decay_names = [n for n in order if n in names_of(tiny, groups[0])]
    by_id = {id(p): n for n, p in tiny.named_parameters()}
    assert [by_id[id(p)] for p in groups[0]["params"]] == decay_names


def test_groups_skip_frozen_and_need_no_no_weight_decay() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    decay, no_decay = param_groups(model, 0.1)
    assert names_of(model, decay) == {"2.weight"}
    assert names_of(model, no_decay) == {"1.weight", "1.bias", "2.bias"}


# --- AdamW -----------------------------------------------------------------------------------
def test_adamw_is_fused_on_cpu_with_default_groups(tiny: CrateMAE) -> None:
    opt = configure_optimizers(tiny, OptimSection(), lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    assert opt.defaults["betas"] == OptimSection().betas
    assert [g["weight_decay"] for g in opt.param_groups] == [OptimSection().weight_decay, 0.0]


def test_adamw_is_fused_on_cpu_with_given_groups(tiny: CrateMAE) -> None:
    """Fine-tuning's layer-decay groups (timm's, as FinetuneTask.param_groups makes them)."""
    from timm.optim import param_groups_layer_decay

    enc = tiny.encoder
    groups = param_groups_layer_decay(enc, weight_decay=0.05, layer_decay=0.75,
                                      no_weight_decay_list=enc.no_weight_decay())
    opt = configure_optimizers(enc, OptimSection(), lr=1e-3, groups=groups)
    assert opt.defaults["fused"] is True
    assert all("lr_scale" in g for g in opt.param_groups)  # kept for the trainer


@pytest.mark.parametrize("with_groups", [False, True])
def test_trainer_builds_fused_adamw_on_cpu(tiny: CrateMAE, with_groups: bool) -> None:
    """Both of the trainer's paths (`configure_optimizers(model, recipe.optim, peak,
    task.param_groups())`): a task whose `param_groups()` gives None (pre-training: the
    builder's groups) and one that gives its own (fine-tuning)."""
    groups = param_groups(tiny, 0.01) if with_groups else None
    opt = configure_optimizers(tiny, OptimSection(), 1e-3, groups)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    assert opt.param_groups[0]["weight_decay"] == (0.01 if with_groups else 0.05)


# --- SGD and LARS ----------------------------------------------------------------------------
def test_sgd_momentum_by_hand() -> None:
    w = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = configure_optimizers(nn.Module(), OptimSection(name="sgd", momentum=0.5), lr=0.1,
                               groups=[{"params": [w], "weight_decay": 0.0}])
    assert isinstance(opt, torch.optim.SGD)
    for _ in range(2):
        w.grad = torch.ones_like(w)
        opt.step()
    # buf 1 then 0.5 * 1 + 1 = 1.5: w = 1 - 0.1 * 1 - 0.1 * 1.5
    assert w.item() == pytest.approx(0.75, abs=1e-12)


def test_lars_is_built_with_the_recipe_momentum() -> None:
    w = nn.Parameter(torch.ones(2, 2))
    opt = configure_optimizers(nn.Module(), OptimSection(name="lars", momentum=0.8), lr=0.1,
                               groups=[{"params": [w], "weight_decay": 0.0}])
    assert isinstance(opt, LARS) and opt.defaults["momentum"] == 0.8


def test_lars_one_step_of_maes_formula_by_hand() -> None:
    """MAE's util/lars.py: dp = g + wd * w; q = trust * ||w|| / ||dp|| (2-D+ only);
    mu = momentum * mu + q * dp; w -= lr * mu. 1-D tensors: no decay, no ratio."""
    w = nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64))  # ||w|| 5
    b = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    zero = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))  # ||w|| 0: ratio 1
    opt = LARS([{"params": [w, b, zero], "weight_decay": 0.1}], lr=1.0, momentum=0.9,
               trust_coefficient=0.001)
    w.grad = torch.tensor([[0.2, 0.0], [0.0, -0.4]], dtype=torch.float64)
    b.grad = torch.tensor([0.5, -0.5], dtype=torch.float64)
    zero.grad = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    opt.step()
    # dp = g + 0.1 w = [[0.5, 0], [0, 0]], ||dp|| = 0.5, q = 0.001 * 5 / 0.5 = 0.01
    torch.testing.assert_close(w.detach(), torch.tensor([[2.995, 0.0], [0.0, 4.0]],
                                                        dtype=torch.float64))
    torch.testing.assert_close(b.detach(), torch.tensor([0.5, 2.5], dtype=torch.float64))
    torch.testing.assert_close(zero.detach(), -zero.grad)
    # second step, bias only: mu = 0.9 * [0.5, -0.5] + 0
    w.grad = zero.grad = None
    b.grad = torch.zeros_like(b)
    opt.step()
    torch.testing.assert_close(b.detach(), torch.tensor([0.05, 2.95], dtype=torch.float64))


def test_lars_agrees_with_timm_where_both_compute_the_same() -> None:
    """2-D tensors, weight decay 0, timm's `always_adapt` (else timm does not adapt at
    weight decay 0) and eps 0 (timm adds it to ||g||): the same update, step after step."""
    from timm.optim import Lars

    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(4, 3, generator=gen, dtype=torch.float64),
             torch.randn(2, 5, generator=gen, dtype=torch.float64)]
    ours = [nn.Parameter(t.clone()) for t in start]
    theirs = [nn.Parameter(t.clone()) for t in start]
    a = LARS(ours, lr=0.5, momentum=0.9, weight_decay=0.0, trust_coefficient=0.02)
    b = Lars(theirs, lr=0.5, momentum=0.9, weight_decay=0.0, trust_coeff=0.02, eps=0.0,
             always_adapt=True)
    for _ in range(3):
        grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in start]
        for p, q, g in zip(ours, theirs, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
        for p, q in zip(ours, theirs, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-12)
    assert not torch.equal(ours[0].detach(), start[0])  # it moved


"""The probe and fine-tuning recipes: they parse, name the right class counts and protocols,
and the new recipe sections refuse unknown keys and bad values with one line each."""

from __future__ import annotations

import pytest
from support import REPO

from cratemae.errors import BadInputError
from cratemae.recipe import load_recipe, unsafe_changes

CLASSES = {"cifar10": 10, "cifar100": 100, "flowers102": 102, "pets": 37, "in1k": 1000}


@pytest.mark.parametrize("kind", ["probe", "finetune"])
@pytest.mark.parametrize("name", [*CLASSES, "demo"])
def test_every_dataset_has_a_recipe_that_parses(kind, name):
    recipe = load_recipe(REPO / "recipes" / kind / f"{name}.toml")
    section = getattr(recipe, kind)
    assert section.num_classes == CLASSES.get(name)  # demo: from the data's class names
    # the checkpoint names the run directory (runs/<run>-<recipe>-<kind>) and gives the
    # image size, mean and std: a shipped recipe that set them would override it for all
    assert not {"out_dir"} & recipe.run.model_fields_set
    assert not {"img_size"} & recipe.model.model_fields_set
    assert not {"mean", "std"} & recipe.data.model_fields_set


def test_imagenet_recipes_follow_mae_and_the_small_ones_the_authors():
    lin = load_recipe(REPO / "recipes" / "probe" / "in1k.toml")
    assert (lin.probe.protocol, lin.optim.name, lin.optim.base_lr) == ("mae", "lars", 0.1)
    assert (lin.schedule.epochs, lin.schedule.warmup_epochs, lin.optim.weight_decay) == (90, 10, 0)
    ft = load_recipe(REPO / "recipes" / "finetune" / "in1k.toml")
    assert (ft.finetune.layer_decay, ft.finetune.mixup, ft.finetune.cutmix) == (0.65, 0.8, 1.0)
    assert (ft.optim.base_lr, ft.schedule.epochs) == (5e-4, 100)
    for name, (lr, epochs) in {"cifar10": (5e-5, 200), "pets": (1e-4, 400)}.items():
        r = load_recipe(REPO / "recipes" / "finetune" / f"{name}.toml")
        assert (r.optim.lr, r.schedule.epochs, r.data.batch_size) == (lr, epochs, 256)
        assert load_recipe(REPO / "recipes" / "probe" / f"{name}.toml").probe.protocol == \
            "features"


@pytest.mark.parametrize(("sets", "message"), [
    (["probe.bogus=1"], "probe.bogus: unknown key"),
    (["probe.protocol=\"svm\""], "probe.protocol: Input should be 'features' or 'mae'"),
    (["probe.weight_decays=[]"], "probe.weight_decays: Value error, give at least one"),
    (["finetune.layer_decay=0"], "finetune.layer_decay: Input should be greater than 0"),
    (["optim.name=\"adam\""], "optim.name: Input should be 'adamw', 'sgd' or 'lars'"),
])
def test_new_sections_reject_bad_values(sets, message):
    with pytest.raises(BadInputError, match=message.replace("[", r"\[")):
        load_recipe(REPO / "recipes" / "probe" / "demo.toml", sets)


def test_evaluation_cadence_may_change_on_resume_but_the_head_may_not():
    base = load_recipe(REPO / "recipes" / "finetune" / "demo.toml")
    safe = load_recipe(REPO / "recipes" / "finetune" / "demo.toml",
                       ["finetune.eval_every_epochs=2", "probe.cache_dir=\"/tmp/x\""])
    assert unsafe_changes(base, safe) == []
    changed = load_recipe(REPO / "recipes" / "finetune" / "demo.toml", ["finetune.pool=\"avg\""])
    assert unsafe_changes(base, changed) == ["finetune.pool"]

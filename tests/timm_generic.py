"""timm's generic model tests, the ones timm runs on its own ViTs, as functions of a model
name and the keyword arguments it is built with (so that a preset and a tiny model run the
same code). Transcribed from timm's tests/test_models.py (huggingface/pytorch-image-models,
commit aa4b585, timm 1.0.29.dev0), with its sizes and tolerances; ViTs are in timm's
NON_STD_FILTERS, so they run `test_model_default_cfgs_non_std`, not `test_model_default_cfgs`
or `test_model_forward_features`, and no pretrained-weights tests (no download here).

Imported by tests/test_timm_generic.py and tests/test_timm_contract.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from timm import create_model, set_scriptable
from timm.layers import get_channel_dim
from timm.models import FeatureInfo, get_notrace_functions, get_notrace_modules

TARGET_FWD_SIZE = MAX_FWD_SIZE = 384
TARGET_BWD_SIZE = 128
TARGET_JIT_SIZE = 128
TARGET_FFEAT_SIZE = 96
TARGET_FWD_FX_SIZE = 128


def input_size(model: torch.nn.Module, target: int | None = None) -> tuple[int, ...]:
    """timm's `_get_input_size`: the configured size, each side cut to `target`."""
    cfg = model.pretrained_cfg
    size = tuple(cfg["input_size"])
    if cfg.get("fixed_input_size"):
        return size
    if target and max(size) > target:
        size = tuple(min(x, target) for x in size)
    return size


def fx_model(model: torch.nn.Module, train: bool = False) -> torch.nn.Module:
    """timm's `_create_fx_model`: torchvision's feature extractor with timm's tracer
    arguments, returning the graph's last node (the output) by name."""
    from torchvision.models.feature_extraction import (
        NodePathTracer,
        create_feature_extractor,
        get_graph_node_names,
    )

    tracer_kwargs = dict(leaf_modules=get_notrace_modules(),
                         autowrap_functions=get_notrace_functions(), param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    eval_return_nodes, train_return_nodes = [eval_nodes[-1]], [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**tracer_kwargs).trace(model)
        graph_nodes = list(reversed(graph.nodes))
        output_node_names = [n.name for n in graph_nodes[0]._input_nodes]
        graph_node_names = [n.name for n in graph_nodes]
        indices = [-graph_node_names.index(name) for name in output_node_names]
        train_return_nodes = [train_nodes[ix] for ix in indices]
    return create_feature_extractor(model, train_return_nodes=train_return_nodes,
                                    eval_return_nodes=eval_return_nodes,
                                    tracer_kwargs=tracer_kwargs)


def _no_nan(x: torch.Tensor) -> None:
    assert not torch.isnan(x).any(), "Output included NaNs"


def test_model_forward(name: str, **kw: Any) -> None:
    model = create_model(name, pretrained=False, **kw).eval()
    inputs = torch.randn((1, *input_size(model, TARGET_FWD_SIZE)))
    outputs = model(inputs)
    assert outputs.shape[0] == 1
    _no_nan(outputs)
    model.set_grad_checkpointing()
    assert torch.allclose(outputs, model(inputs), rtol=1e-4, atol=1e-5), "Output does not match"


def test_model_backward(name: str, **kw: Any) -> None:
    model = create_model(name, pretrained=False, num_classes=42, **kw).train()
    num_params = sum(x.numel() for x in model.parameters())
    outputs = model(torch.randn((2, *input_size(model, TARGET_BWD_SIZE))))
    outputs.mean().backward()
    for n, x in model.named_parameters():
        assert x.grad is not None, f"No gradient for {n}"
    assert num_params == sum(x.grad.numel() for x in model.parameters())
    assert outputs.shape[-1] == 42
    _no_nan(outputs)


def test_model_default_cfgs_non_std(name: str, **kw: Any) -> None:
    model = create_model(name, pretrained=False, **kw).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    state_dict, cfg = model.state_dict(), model.pretrained_cfg
    size = input_size(model)
    assert max(size) <= 320  # timm skips larger fixed sizes
    x = torch.randn((1, *size))
    outputs = model.forward_features(x)
    outputs_pre = model.forward_head(outputs, pre_logits=True)
    feat_dim = -1 if outputs.ndim == 3 else 1
    assert outputs.shape[feat_dim] == model.num_features
    assert outputs_pre.shape[1] == model.head_hidden_size
    model.reset_classifier(0)
    assert model.num_classes == 0
    outputs = model(x)
    assert outputs.shape[-1 if outputs.ndim == 3 else 1] == model.head_hidden_size
    assert outputs.shape == outputs_pre.shape
    model = create_model(name, pretrained=False, num_classes=0, **kw).eval()
    outputs = model(x)
    assert outputs.shape[-1 if outputs.ndim == 3 else 1] == model.num_features
    if cfg.get("num_classes", None):
        assert cfg["classifier"] + ".weight" in state_dict
    assert cfg["first_conv"] + ".weight" in state_dict


def test_model_forward_torchscript(name: str, **kw: Any) -> None:
    with set_scriptable(True):
        model = create_model(name, pretrained=False, **kw)
    size = input_size(model, TARGET_JIT_SIZE)
    model = torch.jit.script(model.eval())
    outputs = model(torch.randn((1, *size)))
    assert outputs.shape[0] == 1
    _no_nan(outputs)


def _check_feature_maps(outputs: list[torch.Tensor], info: FeatureInfo,
                        size: tuple[int, ...]) -> None:
    assert len(info.channels()) == len(outputs)
    axis = get_channel_dim("NCHW")
    for e, r, o in zip(info.channels(), info.reduction(), outputs, strict=True):
        assert e == o.shape[axis]
        assert o.shape[2] <= math.ceil(size[-2] / r) + 1
        assert o.shape[3] <= math.ceil(size[-1] / r) + 1
        assert o.shape[0] == 1
        _no_nan(o)


def test_model_forward_intermediates_features(name: str, **kw: Any) -> None:
    model = create_model(name, pretrained=False, features_only=True, feature_cls="getter",
                         **kw).eval()
    size = input_size(model, TARGET_FFEAT_SIZE)
    _check_feature_maps(model(torch.randn((1, *size))), model.feature_info, size)


def test_model_forward_intermediates(name: str, **kw: Any) -> None:
    model = create_model(name, pretrained=False, **kw).eval()
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(info.channels()) >= 3
    size = input_size(model, TARGET_FFEAT_SIZE)
    x = torch.randn((1, *size))
    output, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
    _check_feature_maps(intermediates, info, size)
    assert torch.allclose(output, model.forward_features(x))
    model.set_grad_checkpointing()
    output3, _ = model.forward_intermediates(x, output_fmt="NCHW")
    assert torch.allclose(output, output3, rtol=1e-4, atol=1e-5), "Output does not match"


def test_model_forward_fx(name: str, **kw: Any) -> None:
    model = create_model(name, pretrained=False, **kw).eval()
    size = input_size(model, TARGET_FWD_FX_SIZE)
    with torch.inference_mode():
        inputs = torch.randn((1, *size))
        outputs = model(inputs)
        fx_outputs = torch.cat(tuple(fx_model(model)(inputs).values()))
    assert torch.all(fx_outputs == outputs)
    assert outputs.shape[0] == 1
    _no_nan(outputs)


def test_model_backward_fx(name: str, **kw: Any) -> None:
    model = create_model(name, pretrained=False, num_classes=42, **kw).train()
    size = input_size(model, TARGET_BWD_SIZE)
    num_params = sum(x.numel() for x in model.parameters())
    model = fx_model(model, train=True)
    outputs = torch.cat(tuple(model(torch.randn((2, *size))).values()))
    outputs.mean().backward()
    for n, x in model.named_parameters():
        assert x.grad is not None, f"No gradient for {n}"
    assert num_params == sum(x.grad.numel() for x in model.parameters())
    assert outputs.shape[-1] == 42
    _no_nan(outputs)


def test_model_forward_fx_torchscript(name: str, **kw: Any) -> None:
    with set_scriptable(True):
        model = create_model(name, pretrained=False, **kw)
    size = input_size(model, TARGET_JIT_SIZE)
    model = torch.jit.script(fx_model(model.eval()))
    with torch.inference_mode():
        outputs = torch.cat(tuple(model(torch.randn((1, *size))).values()))
    assert outputs.shape[0] == 1
    _no_nan(outputs)


# Every test above, by timm's name.
TESTS: dict[str, Callable[..., None]] = {
    f.__name__: f for f in (
        test_model_forward, test_model_backward, test_model_default_cfgs_non_std,
        test_model_forward_torchscript, test_model_forward_intermediates_features,
        test_model_forward_intermediates, test_model_forward_fx, test_model_backward_fx,
        test_model_forward_fx_torchscript,
    )
}

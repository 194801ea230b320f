"""The torch side of swappable adapters: peft LoRA -> graph tensors, and the base graph with LoRA inputs.

See ``swappable.py`` for the contract. The export wrapper takes the task wrapper's own inputs followed by
every LoRA A/B matrix and every replaceable whole tensor, so they become graph inputs with their own names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ExporterError, MismatchError, UnsupportedError
from .onnx_export import OnnxArtifact, dynamo_export
from .swappable import LORA_KINDS, Interface, lora_input

# Rank of the example tensors traced at export: >= 2, because torch.export specialises a dimension seen at 1.
_EXAMPLE_RANK = 3


@dataclass(frozen=True)
class GraphAdapter:
    """One peft adapter as graph tensors: LoRA pairs (scaling folded into B) and whole tensors."""

    tensors: dict[str, np.ndarray]
    scaling: dict[str, float]  # module -> alpha/r (or alpha/sqrt(r)) that was folded into lora_B
    lora_modules: dict[str, tuple[int, int]]  # module -> (in_features, out_features)
    full_shapes: dict[str, tuple[int, ...]]


def convert_peft(peft_model, adapter, full: dict[str, Any]) -> GraphAdapter:
    """Read LoRA pairs from a loaded peft model (peft resolved names, rank/alpha patterns and rsLoRA).

    ``full`` maps base parameter names to the whole tensors the adapter replaces (modules_to_save).
    """
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer

    if adapter.peft_type != "LORA":
        raise UnsupportedError(
            f"adapter {adapter.name}: {adapter.peft_type} adapters cannot stay swappable (only LoRA's A/B pairs "
            "map onto onnxruntime adapters); drop --keep-adapters to merge it"
        )
    inner = peft_model.base_model.model
    tensors: dict[str, np.ndarray] = {}
    scaling: dict[str, float] = {}
    modules: dict[str, tuple[int, int]] = {}
    for path, mod in inner.named_modules():
        if not isinstance(mod, LoraLayer) or "default" not in mod.scaling:
            continue
        if mod.use_dora.get("default"):
            raise UnsupportedError(f"adapter {adapter.name}: DoRA cannot stay swappable (its magnitude vector "
                                   "rescales the merged weight); drop --keep-adapters to merge it")
        if "default" in mod.lora_variant:
            variant = type(mod.lora_variant["default"]).__name__
            raise UnsupportedError(f"adapter {adapter.name}: the LoRA variant {variant} cannot stay swappable (only "
                                   "plain LoRA A/B pairs can); drop --keep-adapters to merge it")
        if mod.lora_bias.get("default"):
            raise UnsupportedError(f"adapter {adapter.name}: LoRA with lora_bias cannot stay swappable; drop "
                                   "--keep-adapters to merge it")
        if not isinstance(mod, LoraLinear) or "default" not in mod.lora_A:
            raise UnsupportedError(f"adapter {adapter.name}: LoRA on {path} ({type(mod.get_base_layer()).__name__}) "
                                   "cannot stay swappable (only linear layers); drop --keep-adapters to merge it")
        a = mod.lora_A["default"].weight.detach().float().numpy()  # (r, in)
        b = mod.lora_B["default"].weight.detach().float().numpy()  # (out, r)
        s = float(mod.scaling["default"])
        tensors[lora_input(path, "lora_A")] = np.ascontiguousarray(a.T)
        tensors[lora_input(path, "lora_B")] = np.ascontiguousarray((b * s).T)
        scaling[path] = s
        modules[path] = (int(a.shape[1]), int(b.shape[0]))
    full_shapes = {}
    for name, t in full.items():
        arr = t.detach().float().numpy() if hasattr(t, "detach") else np.asarray(t, dtype=np.float32)
        tensors[name] = np.ascontiguousarray(arr)
        full_shapes[name] = tuple(arr.shape)
    if not modules and not full_shapes:
        raise MismatchError(f"adapter {adapter.name}: no LoRA layer was found in the model; nothing to swap")
    return GraphAdapter(tensors, scaling, modules, full_shapes)


class _Linear:
    """Factory for the LoRA-capable linear: ``linear(x) + (x @ A) @ B`` with A, B set per call."""

    @staticmethod
    def make(linear):
        import torch

        class LoraInput(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.linear = linear
                self.lora_a: Any = None
                self.lora_b: Any = None

            def forward(self, x):
                out = self.linear(x)
                if self.lora_a is None:
                    return out
                return out + (x @ self.lora_a) @ self.lora_b

        return LoraInput()


def inject(model, interface: Interface) -> None:
    """Replace each exposed module by a LoRA-capable one (in place)."""
    import torch

    for path, (fan_in, fan_out) in interface.lora_modules.items():
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child, None)
        if not isinstance(linear, torch.nn.Linear):
            raise UnsupportedError(f"{path}: not a linear layer in the base model ({type(linear).__name__}); "
                                   "it cannot take a swappable LoRA input")
        if (linear.in_features, linear.out_features) != (fan_in, fan_out):
            raise MismatchError(f"{path}: the base layer is {linear.in_features}x{linear.out_features}, the adapter "
                                f"expects {fan_in}x{fan_out}; the adapter belongs to another base")
        setattr(parent, child, _Linear.make(linear))


def injected_name(name: str, interface: Interface) -> str:
    """A base parameter's name after ``inject``: a LoRA-capable layer holds the original as ``.linear``."""
    module, _, leaf = name.rpartition(".")
    return f"{module}.linear.{leaf}" if module in interface.lora_modules else name


def set_lora(model, interface: Interface, tensors: dict[str, Any]) -> None:
    """Point every injected layer at its A/B (torch tensors); None switches a layer back to the plain base."""
    for path in interface.lora_modules:
        mod = model.get_submodule(path)
        mod.lora_a = tensors.get(lora_input(path, "lora_A"))
        mod.lora_b = tensors.get(lora_input(path, "lora_B"))


def make_swappable(inner, n_inputs: int, interface: Interface):
    """An nn.Module taking ``inner``'s inputs, then every LoRA A/B, then every whole tensor, as positional args.

    ``inner`` is the task wrapper (it holds the model as ``.model``, already passed through ``inject``).
    """
    import torch

    lora_names = [lora_input(m, k) for m in interface.lora_modules for k in LORA_KINDS]
    full_names = list(interface.full_parameters)
    # functional_call ignores names it does not know (strict=False): an unknown one would silently keep the base.
    known = {n for n, _ in inner.named_parameters()}
    unknown = [n for n in full_names if f"model.{injected_name(n, interface)}" not in known]
    if unknown:
        raise ExporterError(f"internal: {unknown[0]} is not a parameter of the model being exported")

    class SwappableWrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            base_args = args[:n_inputs]
            lora = dict(zip(lora_names, args[n_inputs:n_inputs + len(lora_names)]))
            full = args[n_inputs + len(lora_names):]
            set_lora(self.inner.model, interface, lora)
            try:
                if not full:
                    return self.inner(*base_args)
                params = {f"model.{injected_name(n, interface)}": t for n, t in zip(full_names, full)}
                return torch.func.functional_call(self.inner, params, base_args, strict=False)
            finally:
                set_lora(self.inner.model, interface, {})

    return SwappableWrapper().eval()


def example_tensors(model, interface: Interface) -> tuple[list, list]:
    """Example LoRA/whole inputs for tracing and their dynamic shapes (one rank axis per module)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    args, shapes = [], []
    for i, (fan_in, fan_out) in enumerate(interface.lora_modules.values()):
        rank = torch.export.Dim(f"rank_{i}")
        args += [torch.randn(fan_in, _EXAMPLE_RANK, generator=gen) * 0.01,
                 torch.randn(_EXAMPLE_RANK, fan_out, generator=gen) * 0.01]
        shapes += [{1: rank}, {0: rank}]
    params = dict(model.named_parameters())
    for name in interface.full_parameters:
        args.append(params[injected_name(name, interface)].detach().clone())
        shapes.append(None)
    return args, shapes


def export_swappable(wrapper, model, interface: Interface, base_args: list, base_shapes: list,
                     input_names: tuple[str, ...], output_names: tuple[str, ...], path: Path, opset: int) -> OnnxArtifact:
    """Trace and export; the LoRA/whole inputs have no defaults yet (quantize first, then ``add_defaults``)."""
    import onnx

    extra, extra_shapes = example_tensors(model, interface)
    names = [*input_names, *interface.input_names]
    art = dynamo_export(wrapper, (*base_args, *extra), path, tuple(names), tuple(output_names), opset,
                        [*base_shapes, *extra_shapes])
    graph_inputs = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
    lost = [n for n in names if n not in graph_inputs]
    if lost:
        # An input the tracer found unused is dropped: that module does not reach the outputs.
        raise UnsupportedError(f"{lost[0]}: the exported graph does not use it (the module does not affect the "
                               "task's outputs); remove it from the adapter's targets")
    return art


def base_defaults(model, interface: Interface) -> dict[str, np.ndarray]:
    """Default values of the adapter inputs: zero LoRA pairs (rank 1) and the base's own whole tensors."""
    params = dict(model.named_parameters())
    out: dict[str, np.ndarray] = {}
    for m, (fan_in, fan_out) in interface.lora_modules.items():
        out[lora_input(m, "lora_A")] = np.zeros((fan_in, 1), np.float32)
        out[lora_input(m, "lora_B")] = np.zeros((1, fan_out), np.float32)
    for name in interface.full_parameters:
        out[name] = params[injected_name(name, interface)].detach().float().numpy().copy()
    return out


def add_defaults(art: OnnxArtifact, defaults: dict[str, np.ndarray]) -> None:
    """Give every adapter input an initializer of the same name: with no adapter active, the base runs."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(art.path))
    have = {i.name for i in model.graph.initializer}
    for name, value in defaults.items():
        if name not in have:
            model.graph.initializer.append(numpy_helper.from_array(value, name))
    if art.data_files:
        for f in art.data_files:
            f.unlink()
        onnx.save(model, str(art.path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=art.path.name + ".data")
    else:
        onnx.save(model, str(art.path))

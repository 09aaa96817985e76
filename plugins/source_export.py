"""``PATH.pt2``: a ``torch.export`` program (saved with ``torch.export.save``).

The program's ``.module()`` is a GraphModule whose linear and convolution layers are calls to
``aten.linear``/``aten.conv2d`` on plain parameters, not ``nn.Linear``/``nn.Conv2d`` submodules,
so techniques that swap submodules (int8, int4) would find nothing to work on. The loader
therefore turns each such call whose weight (and bias) nothing else reads back into an
``nn.Linear``/``nn.Conv2d`` submodule holding the same parameters, under the same name: the
numbers and the state-dict keys are unchanged, and ``inferopt.load`` rebuilds the same structure.

``torch.export.load`` unpickles some parts of an archive (weights marked ``use_pickle``, custom
and opaque objects, legacy-format payloads, sample inputs that need more than tensors). The
archive is inspected first and such an archive is refused unless the user trusts it
(``--trust-model``).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from inferopt import UsageError, hookimpl
from inferopt.plugins.model_file import ModelFileSource

SUFFIX = ".pt2"



def pickled_parts(path: Path) -> list[str]:
    """Entries of a ``.pt2`` archive that ``torch.export.load`` would unpickle beyond tensors."""
    import io
    import pickle

    import torch

    found: list[str] = []
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        bases = {n.rsplit("/", 1)[-1] for n in names}
        if "version" in bases and "archive_format" not in bases:
            # the torch <= 2.7 layout: torch.export.load falls back to torch.load with
            # weights_only=False on its payloads when the safe load fails
            found.append("the archive uses the old (torch <= 2.7) layout, whose loader "
                         "unpickles its payloads")
        for name in names:
            base = name.rsplit("/", 1)[-1]
            head = archive.read(name)[:4]
            if base.endswith(("_weights_config.json", "_constants_config.json")):
                config = json.loads(archive.read(name)).get("config", {})
                for fqn, meta in config.items():
                    path_name = str(meta.get("path_name", ""))
                    if meta.get("use_pickle") or path_name.startswith(
                            ("custom_obj", "opaque_obj")):
                        found.append(f"{name}: {fqn}")
            elif name.endswith(".pt") or _looks_pickled(name, head):
                try:  # sample inputs and legacy payloads: fine if they hold only tensors
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError,
                        EOFError):
                    found.append(name)
    return found


def _looks_pickled(name: str, head: bytes) -> bool:
    """A pickle or a ``torch.save`` archive, whatever the entry's name says; raw tensor
    storages (under ``data/weights`` and ``data/constants``) are bytes of numbers, not this."""
    if "/data/weights/" in f"/{name}" or "/data/constants/" in f"/{name}":
        return False
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head == b"PK\x03\x04"


def lift_layers(graph_module: Any) -> dict[str, str]:
    """Turn ``aten.linear``/``aten.conv2d`` calls on parameters into ``nn.Linear``/``nn.Conv2d``
    submodules in place; returns {layer name: kind} for the layers lifted."""
    import torch

    graph = graph_module.graph
    aten = torch.ops.aten
    lifted: dict[str, str] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (aten.linear.default,
                                                              aten.conv2d.default):
            continue
        params = [a for a in node.args[1:3] if a is not None]
        if not all(getattr(p, "op", None) == "get_attr" and len(p.users) == 1 for p in params):
            continue  # a weight read elsewhere too (tied, or summed): keep the op as it is
        owner_names = {p.target.rpartition(".")[0] for p in params}
        attr_names = [p.target.rpartition(".")[2] for p in params]
        if len(owner_names) != 1 or attr_names != ["weight", "bias"][: len(params)]:
            continue
        owner = owner_names.pop()
        if not owner:
            continue
        container = graph_module.get_submodule(owner)
        if type(container) is not torch.nn.Module or list(container.children()) or list(
                container.buffers(recurse=False)) or {n for n, _ in container.named_parameters(
                recurse=False)} != set(attr_names):
            continue
        weight = container.weight
        bias = getattr(container, "bias", None) if len(params) == 2 else None
        if node.target is aten.linear.default:
            if weight.dim() != 2:
                continue
            layer: Any = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                                         device="meta")
            kind = "Linear"
        else:
            if weight.dim() != 4:
                continue
            stride, padding, dilation, groups = (list(node.args[3:7])
                                                 + [1, 0, 1, 1][len(node.args[3:7]):])
            layer = torch.nn.Conv2d(weight.shape[1] * groups, weight.shape[0],
                                    tuple(weight.shape[2:]), stride=stride, padding=padding,
                                    dilation=dilation, groups=groups, bias=bias is not None,
                                    device="meta")
            kind = "Conv2d"
        layer.weight = weight
        if bias is not None:
            layer.bias = bias
        graph_module.set_submodule(owner, layer)
        with graph.inserting_before(node):
            call = graph.call_module(owner, (node.args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        for p in params:
            graph.erase_node(p)
        lifted[owner] = kind
    graph.lint()
    graph_module.recompile()
    return lifted


class ExportedProgramModels(ModelFileSource):
    """A ``torch.export`` program file (``PATH.pt2``), its layers made swappable."""

    scheme = "export"
    summary = "a torch.export program: PATH.pt2 (or export:PATH)"

    def claims(self, spec: str) -> bool:
        return spec.endswith(SUFFIX)

    def load(self, spec: str, ctx: Any) -> Any:
        import torch

        path = self.existing_path(spec)
        if not zipfile.is_zipfile(path):
            raise UsageError(f"--model {spec!r}: {str(path)!r} is not a torch.export archive "
                             "(save one with torch.export.save(program, 'model.pt2'))")
        pickled = pickled_parts(path)
        if pickled and not ctx.trust_model:
            raise UsageError(
                f"--model {spec!r}: this archive holds pickled objects "
                f"({', '.join(pickled[:3])}), and unpickling runs code from the file. "
                "Pass --trust-model only if you trust where it came from"
            )
        try:
            program = torch.export.load(str(path))
        except Exception as exc:
            raise UsageError(f"--model {spec!r}: torch.export.load failed: "
                             f"{type(exc).__name__}: {exc}") from exc
        module = program.module()
        # .module() forbids train()/eval(), which every optimizer and backend calls; the graph
        # runs as it was exported whatever the flag says, so the plain nn.Module ones are safe
        for method in ("train", "eval"):
            vars(module).pop(method, None)
        lifted = lift_layers(module)
        ctx.log.info("loaded torch.export program", path=str(path),
                     layers_made_swappable=len(lifted))
        return module


@hookimpl
def inferopt_register_models(register: Any) -> None:
    register(ExportedProgramModels)

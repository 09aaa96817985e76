"""``PATH.pt2``: a ``torch.export`` program (saved with ``torch.export.save``).

The program's ``.module()`` is a GraphModule whose linear and convolution layers are calls to
``aten.linear``/``aten.conv2d`` on plain parameters, not ``nn.Linear``/``nn.Conv2d`` submodules,
so techniques that swap submodules (int8, int4) would find nothing to work on. The loader
therefore turns each such call whose weight (and bias) nothing else reads back into an
``nn.Linear``/``nn.Conv2d`` submodule holding the same parameters, under the same name: the
numbers and the state-dict keys are unchanged, and ``inferopt.load`` rebuilds the same structure.

``torch.export.load`` runs code from the file in several ways (unpickling, AOTInductor libraries,
shape expressions evaluated as Python, the torch <= 2.7 fallback loader). Unless the user trusts
the file (``--trust-model``), the archive is checked and read without any of them
(:mod:`inferopt.plugins.sources.export_archive`); an archive that needs one is refused with the
reason.
"""

from __future__ import annotations

import zipfile
from typing import Any

from inferopt import UsageError, hookimpl
from inferopt.plugins.sources.model_file import ModelFileSource

SUFFIX = ".pt2"


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
    # data-only: without --trust-model the archive is read by a loader that cannot run its code
    runs_code = False
    summary = "a torch.export program: PATH.pt2 (or export:PATH)"

    def claims(self, spec: str) -> bool:
        return spec.endswith(SUFFIX)

    def load(self, spec: str, ctx: Any) -> Any:
        import torch

        path = self.existing_path(spec)
        if not zipfile.is_zipfile(path):
            raise UsageError(f"--model {spec!r}: {str(path)!r} is not a torch.export archive "
                             "(save one with torch.export.save(program, 'model.pt2'))")
        if ctx.trust_model:
            try:
                program = torch.export.load(str(path))
            except Exception as exc:
                raise UsageError(f"--model {spec!r}: torch.export.load failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
        else:
            program = self._load_untrusted(spec, path.read_bytes())
        module = program.module()
        # .module() forbids train()/eval(), which every optimizer and backend calls; the graph
        # runs as it was exported whatever the flag says, so the plain nn.Module ones are safe
        for method in ("train", "eval"):
            vars(module).pop(method, None)
        lifted = lift_layers(module)
        ctx.log.info("loaded torch.export program", path=str(path),
                     layers_made_swappable=len(lifted))
        return module


    @staticmethod
    def _load_untrusted(spec: str, data: bytes) -> Any:
        # imported here: its checks compile many regular expressions, which listing plugins
        # (inferopt plugins, --help) should not pay for
        from inferopt.plugins.sources import export_archive

        refusals = export_archive.refusals(data)
        if refusals:
            raise UsageError(
                f"--model {spec!r}: loading this archive would run code from the file: "
                f"{'; '.join(refusals)}. Pass --trust-model only if you trust where it came "
                "from, or re-save the program with torch.export.save from torch >= 2.8"
            )
        try:
            return export_archive.load_untrusted(data)
        except ValueError as exc:
            raise UsageError(
                f"--model {spec!r}: the archive could not be read without running code from "
                f"it ({exc}). Pass --trust-model only if you trust where it came from"
            ) from None


@hookimpl
def inferopt_register_models(register: Any) -> None:
    register(ExportedProgramModels)

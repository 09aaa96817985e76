"""``prune-l1`` and ``prune-activations``: L1 pruning of weights and of activations.

* ``prune-l1`` (unstructured, the default): zeroes exactly ``sparsity`` of the weights of every
  Linear/Conv layer, by magnitude (``score=l1``) or by ``|W| * ||X||`` (``score=wanda``), per
  layer or globally. Dense kernels multiply zeros as fast as anything else, so this saves nothing
  at run time by itself; the report says so.
* ``prune-l1`` with ``structured=true``: ranks the output neurons/channels of each layer by the L1
  norm of their weights and removes the weakest, together with everything coupled to them (the
  next layer's inputs, BatchNorm, residual additions, transformer feed-forward blocks). The
  result is a smaller ordinary module that runs faster on any hardware.
* ``prune-activations``: the same physical removal, choosing channels by what they do on the
  run's data. By default (``criterion=reconstruct``) where one Linear reads the channels, the
  channels and that Linear's new weights are chosen together, by least squares on the observed
  activations (Optimal Brain Surgeon on its input columns); elsewhere, and with
  ``criterion=variance``, by how much their activation varies times the weight that carries it
  on, the mean activation of each removed channel folded into the next layer's bias
  (``compensate``); or by mean |activation| (``mean``) or the share of zeros after ReLU
  (``apoz``).

All three can fine-tune afterwards (``finetune_steps``) and prune in several rounds
(``iterations``). The torch side is in :mod:`inferopt.plugins.pruning.channels`,
:mod:`~inferopt.plugins.pruning.weights` and :mod:`~inferopt.plugins.pruning.finetune`.
"""

from __future__ import annotations

import abc
import fnmatch
from typing import Any

import attrs

from inferopt import Optimizer, UsageError, hookimpl, option
from inferopt.utils import move_to

NO_SPEEDUP = ("dense kernels multiply zeros like any other number, and zeros take as many bytes "
              "in the saved file; structured=true removes whole neurons instead")


@attrs.frozen
class _Pruner(Optimizer):
    """Options and the flow shared by the pruning optimizers."""

    kind = "pruning"

    sparsity: float = option(0.5, min=0.0, max=0.99, searchable=(0.25, 0.5),
                             help="share of weights (unstructured) or of channels per layer "
                                  "(structured) to remove")
    skip: tuple[str, ...] = option((), help="layer name patterns (fnmatch) to leave unpruned")
    finetune_steps: int = option(0, min=0, help="training steps after each pruning round "
                                                "(on the run's training split)")
    lr: float = option(1e-3, min=0.0, help="fine-tuning learning rate (AdamW)")
    iterations: int = option(1, min=1, max=100, help="prune in this many rounds, reaching "
                                                     "the target sparsity in the last one")
    calibration_batches: int = option(32, min=1, help="batches used to observe activations")

    # --- shared flow ---------------------------------------------------------------------

    def apply(self, model: Any, ctx: Any) -> Any:

        from inferopt.utils import device_of, macs_per_sample, parameter_count

        if ctx.restoring:
            return self._restore_structure(model, ctx)
        self._check_options()
        data = ctx.data
        needs_data = self.finetune_steps > 0 or self._needs_activations()
        if needs_data and (data is None or not data.calibration):
            raise UsageError(f"step '{self.name}' with these options needs data (activations "
                             "or fine-tuning); give --data")
        device = ctx.backend.device if ctx.backend is not None else device_of(model)
        probe = data.eval[0].inputs if data is not None and data.eval else None
        before = {"parameters": parameter_count(model),
                  "macs_per_sample": macs_per_sample(model, probe, device) if probe is not None
                  else None}
        targets = None
        if self.finetune_steps and data is not None and not all(
                b.labels is not None for b in data.train):
            from inferopt.plugins.pruning.finetune import dense_targets

            targets = dense_targets(model, list(data.train), device, ctx.output)
        model = self._prune(model, ctx, device, targets)
        after = {"parameters": parameter_count(model),
                 "macs_per_sample": macs_per_sample(model, probe, device) if probe is not None
                 else None}
        ctx.details["cost"] = {"before": before, "after": after}
        if data is not None and self.finetune_steps and data.train_is_eval:
            ctx.warn(f"{self.name}: the data has no separate training split, so fine-tuning "
                     "used the data it is measured on; accuracy will be optimistic")
        return model.eval()

    def _check_options(self) -> None:
        return None

    def _needs_activations(self) -> bool:
        return False

    @abc.abstractmethod
    def _prune(self, model: Any, ctx: Any, device: Any, targets: Any) -> Any:
        """Prune ``model`` (the structured or unstructured way of the subclass)."""

    def _finetune(self, model: Any, ctx: Any, device: Any, targets: Any, round_no: int,
                  after_step: Any = None) -> dict[str, Any] | None:
        if not self.finetune_steps:
            return None
        from inferopt.plugins.pruning.finetune import finetune

        return finetune(model, list(ctx.data.train), self.finetune_steps, self.lr,
                        ctx.seed + round_no, device, ctx.log, targets, after_step, ctx.output)

    def _restore_structure(self, model: Any, ctx: Any) -> Any:
        if "structure" in ctx.state:
            from inferopt.plugins.pruning.channels import resize

            resize(model, ctx.state["structure"])
        return model

    # --- structured ----------------------------------------------------------------------

    def _prune_channels(self, model: Any, ctx: Any, device: Any, targets: Any,
                        criterion: str) -> Any:
        import torch

        from inferopt.plugins.pruning import channels as pc

        data = ctx.data
        probe = data.eval[0].inputs if data is not None and data.eval else None
        example = move_to(probe, device) if probe is not None else None
        groups, gm, trace_error = pc.find_groups(model, example)
        chosen, skipped = [], {}
        if trace_error:
            skipped["(rest of the model)"] = trace_error
        for group in groups:
            # a skipped layer keeps its shape, so neither its outputs nor its inputs may change
            pattern = next((p for p in self.skip
                            for n in group.producers + [c for c, _ in group.consumers]
                            if fnmatch.fnmatchcase(n, p)), None)
            if group.blocked is not None:
                skipped[group.name] = group.blocked
            elif pattern is not None:
                skipped[group.name] = f"matches skip pattern {pattern!r}"
            else:
                chosen.append(group)
        if not chosen:
            reasons = "; ".join(f"{n}: {why}" for n, why in skipped.items()) or "no Linear or " \
                "convolution layer found"
            raise UsageError(f"step '{self.name}' found no layer whose output channels can be "
                             f"removed ({reasons})")
        before = _output_signature(model, example)
        original = {g.name: g.channels for g in chosen}
        # criterion=reconstruct: groups it cannot refit fall back to variance + folded means
        plan = pc.refit_plan(model, chosen) if criterion == "reconstruct" else {}
        not_refit = {name: why for name, why in plan.items() if why is not None}
        outer = [g.probes[0] for g in chosen if plan.get(g.name, "no") is None]
        refit: set[str] = set()
        rounds: list[dict[str, Any]] = []
        for round_no in range(1, self.iterations + 1):
            target = self._target(round_no)
            stats = None
            if criterion != "l1":
                batches = list(ctx.data.calibration)[: self.calibration_batches]
                stats = pc.activation_stats(model, gm, chosen, batches, device, outer)
            for group in chosen:
                keep_n = pc.channels_to_keep(original[group.name], target, self._round_to())
                if keep_n >= group.channels:
                    continue
                if stats is None:
                    keep = torch.topk(pc.weight_scores(model, group), keep_n,
                                      sorted=False).indices
                elif group.probes[0] in outer and group.probes[0] in stats and (
                        refit_keep := pc.reconstruct(model, group, stats, keep_n)) is not None:
                    keep = refit_keep
                    refit.add(group.name)
                    not_refit.pop(group.name, None)  # refused in an earlier round
                else:
                    if group.probes[0] in outer and group.probes[0] in stats:
                        not_refit[group.name] = (
                            f"{stats[group.probes[0]].count} rows observed, fewer than its "
                            f"{group.channels} channels (give more calibration data)")
                    score = pc.activation_scores(
                        model, group, stats,
                        "variance" if criterion == "reconstruct" else criterion)
                    keep = torch.topk(score, keep_n, sorted=False).indices
                    if self._compensate():
                        pc.fold_means(model, group, keep, stats)
                pc.prune_group(model, group, keep)
                group.channels = keep_n
            rounds.append({"round": round_no, "sparsity": round(target, 4),
                           "finetune": self._finetune(model, ctx, device, targets, round_no)})
        after = _output_signature(model, example)
        if before != after:
            raise UsageError(
                f"step '{self.name}': the pruned model's outputs changed from {before} to "
                f"{after}; a coupling between layers was missed (a bug; please report it). "
                f"Leave the affected layers out with skip=... ({', '.join(original)})")
        touched = sorted({n for g in chosen for n in g.producers + g.norms
                          + [c for c, _ in g.consumers]})
        ctx.state["structure"] = pc.structure_of(model, touched)
        pruned = {g.name: {"channels": original[g.name], "kept": g.channels,
                           "consumers": [c for c, _ in g.consumers], "norms": g.norms}
                  for g in chosen}
        removed = sum(original[g.name] - g.channels for g in chosen)
        total = sum(original.values())
        how = self._criterion_text(criterion)
        if criterion == "reconstruct":
            how = (f"{how} in {len(refit)} of {len(chosen)} group(s)"
                   + (f", by {self._criterion_text('variance')} in the others"
                      if not_refit else ""))
        summary = (f"removed {removed:,} of {total:,} channels/neurons ({removed / total:.1%}) "
                   f"in {len(chosen)} group(s) by {how}")
        if skipped:
            summary += "; not pruned: " + "; ".join(
                f"{n} ({why})" for n, why in list(skipped.items())[:4])
        if self._compensate() and (criterion != "reconstruct" or not_refit):
            summary += "; mean activations of removed channels folded into the next biases"
        ctx.details.update({"summary": summary, "mode": "structured", "criterion": criterion,
                            "groups": pruned, "not_pruned": skipped, "rounds": rounds})
        if criterion == "reconstruct":
            ctx.details["not_refit"] = not_refit
        return model

    def _target(self, round_no: int) -> float:
        """Sparsity to reach in round ``round_no``; the last round's is the option itself."""
        if round_no >= self.iterations:
            return self.sparsity
        return self.sparsity * round_no / self.iterations

    def _round_to(self) -> int:
        return 1

    def _compensate(self) -> bool:
        return False

    @staticmethod
    def _criterion_text(criterion: str) -> str:
        return {"l1": "weight L1 norm", "mean": "mean |activation|",
                "variance": "activation variance x weight reaching the next layer",
                "apoz": "share of zero activations (APoZ)",
                "reconstruct": "least-squares reconstruction of the next layer's output "
                               "(Optimal Brain Surgeon on its input columns)"}[criterion]


@attrs.frozen
class L1Pruner(_Pruner):
    """L1 magnitude pruning: unstructured (zeroed weights) or structured (removed neurons)."""

    name = "prune-l1"
    summary = ("L1 weight pruning: unstructured zeros (exact sparsity) or structured=true to "
               "remove whole neurons/channels")

    structured: bool = option(False, searchable=(True,),
                              help="remove whole output channels/neurons (smaller, faster) "
                                   "instead of zeroing single weights")
    scope: str = option("layer", choices=("layer", "global"),
                        help="unstructured: sparsity per layer, or over all layers together")
    score: str = option("l1", choices=("l1", "wanda"),
                        help="unstructured: |W|, or |W| x input norm on the run's data (Wanda)")
    round_to: int = option(1, min=1, help="structured: keep a multiple of this many channels")

    def _check_options(self) -> None:
        if self.structured and self.score == "wanda":
            raise UsageError("prune-l1: score=wanda scores single weights (unstructured); for "
                             "structured pruning by activations use prune-activations")
        if self.structured and self.scope == "global":
            raise UsageError("prune-l1: scope=global is for unstructured pruning; structured "
                             "pruning removes the same share of channels from every layer")
        if not self.structured and self.round_to != 1:
            raise UsageError("prune-l1: round_to applies to structured=true only")

    def _needs_activations(self) -> bool:
        return self.score == "wanda"

    def _round_to(self) -> int:
        return self.round_to

    def _prune(self, model: Any, ctx: Any, device: Any, targets: Any) -> Any:
        if self.structured:
            return self._prune_channels(model, ctx, device, targets, "l1")
        return self._prune_weights(model, ctx, device, targets)

    def _prune_weights(self, model: Any, ctx: Any, device: Any, targets: Any) -> Any:
        from inferopt.plugins.pruning import weights as pw

        layers, skipped = pw.select_layers(model, self.skip)
        if not layers:
            raise UsageError(f"prune-l1 found no Linear or convolution layer to prune; "
                             f"skipped: {skipped or 'none'}")
        scope = "row" if self.score == "wanda" and self.scope == "layer" else self.scope
        rounds: list[dict[str, Any]] = []
        masks: dict[str, Any] = {}
        for round_no in range(1, self.iterations + 1):
            target = self._target(round_no)
            norms = None
            if self.score == "wanda":
                batches = list(ctx.data.calibration)[: self.calibration_batches]
                norms = pw.input_norms(model, layers, batches, device)
                unseen = sorted(set(layers) - set(norms))
                if unseen and round_no == 1:
                    ctx.warn(f"prune-l1: score=wanda saw no input of {', '.join(unseen)} "
                             "(called without their forward, e.g. attention projections); "
                             "those layers were scored by |W| alone")
            masks = pw.masks_for(pw.scores(layers, norms), target, scope)
            pw.apply_masks(layers, masks)

            def keep_zeros(masks: dict[str, Any] = masks) -> None:
                pw.apply_masks(layers, masks)

            rounds.append({"round": round_no, "sparsity": round(target, 4),
                           "finetune": self._finetune(model, ctx, device, targets, round_no,
                                                      keep_zeros)})
        per_layer, overall = pw.sparsity_of(layers)
        zeros = sum(int((~m).sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        how = {"l1": "|W|", "wanda": "|W| x input norm (Wanda)"}[self.score]
        where = {"layer": "per layer", "global": "over all layers", "row": "per output row"}
        summary = (f"zeroed {zeros:,} of {total:,} weights ({overall:.2%}) in {len(layers)} "
                   f"layers by {how}, counted {where[scope]}; no speedup expected: "
                   f"{NO_SPEEDUP}")
        ctx.details.update({
            "summary": summary, "mode": "unstructured", "score": self.score,
            "scope": scope, "sparsity": overall,
            "layer_sparsity": {k: round(v, 6) for k, v in per_layer.items()},
            "not_pruned": skipped, "rounds": rounds, "speedup_expected": False,
        })
        return model


@attrs.frozen
class ActivationPruner(_Pruner):
    """Structured pruning that ranks channels by their activations on the run's data."""

    name = "prune-activations"
    summary = ("remove the neurons/channels that matter least on the run's data and refit the "
               "next layer by least squares (or rank by activation variance, mean or APoZ)")

    criterion: str = option(
        "reconstruct", choices=("reconstruct", "variance", "mean", "apoz"),
        searchable=("reconstruct", "variance", "mean"),
        help="reconstruct: remove the channels the next Linear can best make up for and refit "
             "it by least squares on the run's activations (groups read by one Linear; others "
             "by variance); variance: activation variance x squared norm of the weights "
             "reading it (the error removal causes once the mean is folded into the next "
             "bias); mean: mean |activation|; apoz: share of zeros after ReLU")
    compensate: bool = option(True, help="fold the mean activation of removed channels into "
                                         "the next layer's bias (reconstruct refits the bias "
                                         "anyway)")
    round_to: int = option(1, min=1, help="keep a multiple of this many channels")

    def _needs_activations(self) -> bool:
        return True

    def _compensate(self) -> bool:
        return self.compensate

    def _round_to(self) -> int:
        return self.round_to

    def _prune(self, model: Any, ctx: Any, device: Any, targets: Any) -> Any:
        return self._prune_channels(model, ctx, device, targets, self.criterion)


def _output_signature(model: Any, inputs: Any) -> Any:
    """Output shapes and dtypes on ``inputs`` (None without inputs); a model that fails gives
    the error, so that a broken model never passes as unchanged."""
    if inputs is None:
        return None
    import torch

    from inferopt.utils import call_model, output_signature

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return output_signature(call_model(model, inputs))
    except Exception as exc:  # the check must report, not crash
        return f"an error ({type(exc).__name__}: {exc})"
    finally:
        model.train(was_training)


@hookimpl
def inferopt_register_optimizers(register: Any) -> None:
    register(L1Pruner)
    register(ActivationPruner)

"""LibraGrad (Mehri, Baghshah & Pilehvar, "LibraGrad: Balancing Gradient Flow for Universally
Better Vision Transformer Attributions", CVPR 2025, arXiv 2411.16760).

LibraGrad changes no forward value; it re-routes the backward pass of a ViT
(:func:`captum_gradmask.rules.libragrad`: attention weights, LayerNorm variances and activation
gates act as constants, gated-MLP products have their gradient halved) so that the model is
linear in its tokens and additive parameters. Gradient methods are then read at token level, as
the authors do, on the token sequence ``h_0`` that enters the first block (patch embeddings,
class and register tokens, position embeddings added) and the inputs ``h_i`` of the other
blocks:

- **Input x Gradient**: ``sum_c h_0 * dS/dh_0`` per patch token;
- **Integrated Gradients**: ``sum_c h_0 * mean_k dS/dh_0 (k/n h_0)`` from the all-zero token
  sequence, ``n`` right Riemann steps;
- **FullGrad+**: ``sum_i sum_c h_i * dS/dh_i`` over every block input, plus every bias's
  contribution at its token, ``sum_c b * dS/dy`` for each linear or LayerNorm output ``y``
  after ``h_0`` (FullGrad's bias maps).

``S`` is the target's softmax probability (the authors' preset) or its logit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from captum.attr import GradientAttribution
from torch import Tensor, nn

from .._utils import (
    TargetType,
    check_no_args,
    check_positive_int,
    check_token_count,
    extract_logits,
    recorded,
    resolve_targets,
)
from ..adapters import Tap, ViTAdapter
from ..base import PatchAttribution
from ..rules import (
    BackwardRule,
    backward_rules,
    detached_projections,
    libragrad_rules,
    rules_scope,
)

__all__ = ["LibraGrad", "TokenContributions"]

Readout = Literal["fullgrad+", "input-x-gradient", "integrated-gradients"]
TargetOutput = Literal["probability", "logit"]
READOUTS = ("fullgrad+", "input-x-gradient", "integrated-gradients")


@dataclass(frozen=True)
class TokenContributions:
    """The token-level terms of LibraGrad's readouts for a batch of images.

    Attributes:
        block_inputs: ``(B, L, T)``, each block input's Input x Gradient summed over channels
            (block 0's input is the embedded token sequence ``h_0``).
        biases: ``(B, T)``, every bias after ``h_0`` times the gradient of its output, summed
            over channels, at the token it is added to.
        pooled_biases: ``(B,)``, the same for outputs with no token axis (classifier, pooled
            norms): a score no token owns.
        scores: ``(B,)``, the differentiated score ``S`` (target logit or probability).
        targets: ``(B,)``, the class explained for each image.

    Under LibraGrad with the logit as ``S``, FullGrad completeness holds:
    ``block_inputs[:, 0].sum(-1) + biases.sum(-1) + pooled_biases == scores``.
    """

    block_inputs: Tensor
    biases: Tensor
    pooled_biases: Tensor
    scores: Tensor
    targets: Tensor


class LibraGrad(PatchAttribution, GradientAttribution):
    r"""LibraGrad attributions for Vision Transformers: token-level gradient methods under
    LibraGrad's backward rules.

    Needs the adapter's token interface (``embed``, ``blocks``, ``head``), which the built-in
    adapters provide except where positions are tied to the whole grid (timm EVA-02 with
    rotary embeddings, BEiT with relative position bias: refused by name). Cost per image:
    one forward and one backward pass (FullGrad+, Input x Gradient), ``n_steps`` of each
    (Integrated Gradients).
    The model's forward values are unchanged; hooks are removed after every call.

    Args:
        model: a Hugging Face ViT/DeiT, a timm ``VisionTransformer``, or any callable returning
            logits when ``adapter`` is given.
        adapter: the model's adapter with the token interface; by default found with
            :func:`captum_gradmask.adapters.get_adapter`.

    Example::

        >>> import torch
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from captum_gradmask.methods import LibraGrad
        >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
        ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...     intermediate_size=64, num_labels=5)).eval()
        >>> libragrad = LibraGrad(model)
        >>> libragrad.attribute(torch.randn(2, 3, 32, 32), target=[1, 4]).shape
        torch.Size([2, 3, 32, 32])
        >>> libragrad.attribute_grid(torch.randn(2, 3, 32, 32),
        ...                          readout="input-x-gradient").shape
        torch.Size([2, 4, 4])
    """

    method_name = "LibraGrad"

    def __init__(
        self, model: nn.Module | Callable[..., Any], adapter: ViTAdapter | None = None
    ) -> None:
        super().__init__(model, adapter)
        self.adapter.require_tokens(self.method_name)

    def attribute_grid(  # type: ignore[override]
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        readout: Readout = "fullgrad+",
        target_output: TargetOutput = "probability",
        n_steps: int = 50,
        internal_batch_size: int | None = None,
        show_progress: bool = False,
    ) -> Tensor:
        r"""The ``(B, h, w)`` LibraGrad map of each image (signed; larger = more evidence).

        Args:
            inputs: normalised images ``(B, C, H, W)`` (or a one-element tuple of them); ``H``
                and ``W`` must be multiples of the patch size.
            target: class per image: an int for all, a list or 1-D tensor with one per image;
                ``None`` (default) uses each image's predicted class.
            additional_forward_args: must be ``None`` (the model runs from its tokens).
            readout: ``"fullgrad+"`` (default: every block input's Input x Gradient plus the
                bias maps), ``"input-x-gradient"`` (at the embedded tokens) or
                ``"integrated-gradients"`` (at the embedded tokens, zero-token baseline).
            target_output: the differentiated score: ``"probability"`` (default, the authors'
                preset: the target's softmax probability) or ``"logit"``.
            n_steps: right Riemann steps of Integrated Gradients (the authors use 50); ignored
                by the other readouts.
            internal_batch_size: images per forward/backward pass (``None``: all at once).
            show_progress: show a progress bar over the batches.

        Returns:
            The patch tokens' scores on the patch grid, ``(B, h, w)``.

        Example::

            >>> import torch
            >>> from transformers import ViTConfig, ViTForImageClassification
            >>> from captum_gradmask.methods import LibraGrad
            >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
            ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            ...     intermediate_size=64, num_labels=5)).eval()
            >>> LibraGrad(model).attribute_grid(torch.randn(1, 3, 32, 32), target=3,
            ...     readout="integrated-gradients", n_steps=4).shape
            torch.Size([1, 4, 4])
        """
        if readout not in READOUTS:
            raise ValueError(f"`readout` must be one of {READOUTS}, got {readout!r}")
        _check_target_output(target_output)
        check_positive_int(n_steps, "n_steps")
        check_no_args(additional_forward_args, "LibraGrad")
        images, grid = self._prepare(inputs, target)
        rules = self._rules()
        prefix = self.adapter.prefix_tokens

        def compute(batch: Tensor, batch_target: TargetType, args: tuple[Any, ...]) -> Tensor:
            if readout == "integrated-gradients":
                scores = self._integrated_gradients(
                    batch, batch_target, target_output, n_steps, rules
                )
            else:
                terms = self._contributions(batch, batch_target, target_output, rules)
                scores = terms.block_inputs[:, 0]
                if readout == "fullgrad+":
                    scores = terms.block_inputs.sum(1) + terms.biases
            check_token_count(scores.shape[1], prefix, grid)
            return scores[:, prefix:].reshape(-1, *grid)

        return self._batched(
            images, target, None, internal_batch_size, compute, show_progress
        ).detach()

    def token_contributions(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        *,
        target_output: TargetOutput = "logit",
        internal_batch_size: int | None = None,
    ) -> TokenContributions:
        """Every token-level term of the readouts (:class:`TokenContributions`), prefix tokens
        included; with the default logit score, FullGrad's completeness can be checked on it.

        Example::

            >>> import torch
            >>> from transformers import ViTConfig, ViTForImageClassification
            >>> from captum_gradmask.methods import LibraGrad
            >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
            ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            ...     intermediate_size=64, num_labels=5)).eval().double()
            >>> terms = LibraGrad(model).token_contributions(
            ...     torch.randn(1, 3, 32, 32, dtype=torch.float64), target=2)
            >>> total = terms.block_inputs[:, 0].sum(-1) + terms.biases.sum(-1)
            >>> torch.allclose(total + terms.pooled_biases, terms.scores)
            True
        """
        _check_target_output(target_output)
        images, _ = self._prepare(inputs, target)
        rules = self._rules()

        def compute(batch: Tensor, batch_target: TargetType, args: tuple[Any, ...]) -> Any:
            terms = self._contributions(batch, batch_target, target_output, rules)
            return tuple(getattr(terms, field.name) for field in fields(terms))

        parts = self._batched(images, target, None, internal_batch_size, compute)
        return TokenContributions(*(part.detach() for part in parts))

    # --- passes ---------------------------------------------------------------------------

    def _rules(self) -> list[BackwardRule]:
        return libragrad_rules(self.model, self.adapter)

    def _taps(self) -> contextlib.AbstractContextManager[Any]:
        """The adapter's own attention with its taps (timm EVA/BEiT, nn.MultiheadAttention),
        which the attention rule hooks; nothing for models with Q/K/V modules."""
        context = self.adapter.attention_context
        return context() if context is not None else contextlib.nullcontext()

    def _bias_modules(self) -> list[nn.Module]:
        """Linear and LayerNorm modules with a bias, and the taps of functional projections
        whose bias the adapter knows (``nn.MultiheadAttention.in_proj_bias``, EVA's q/v
        biases)."""
        module = rules_scope(self.adapter, self.model) if self.model is not None else None
        found = [
            m
            for m in (module.modules() if module is not None else ())
            if isinstance(m, (nn.Linear, nn.LayerNorm)) and isinstance(m.bias, Tensor)
        ]
        taps = {
            id(p.module): p.module
            for layer in self.adapter.layers
            for p in (layer.query, layer.key, layer.value)
            if isinstance(p.module, Tap) and p.module.bias is not None
        }
        return found + list(taps.values())

    def _contributions(
        self,
        images: Tensor,
        target: TargetType,
        target_output: TargetOutput,
        rules: list[BackwardRule],
    ) -> TokenContributions:
        interface = self.adapter.require_tokens(self.method_name)
        module = self.model
        bias_modules = self._bias_modules()
        detached = (
            detached_projections(self.adapter, rules_scope(self.adapter, module))
            if module is not None
            else {}
        )
        with torch.no_grad():
            embedded = interface.embed(images)
        with (
            self._taps(),
            backward_rules(rules),
            recorded(bias_modules) as outputs,
            torch.enable_grad(),
        ):
            # A fresh leaf: the embedding's own parameters are outside the explained graph.
            tokens = embedded.detach().requires_grad_(True)
            states = [tokens]
            for block in interface.blocks:
                states.append(block(states[-1]))
            logits = extract_logits(interface.head(states[-1]))
            targets = resolve_targets(target, logits)
            score = _score(logits, targets, target_output)
            ran = [m for m in bias_modules if id(m) in outputs and outputs[id(m)].requires_grad]
            gradients = torch.autograd.grad(
                score.sum(), states[:-1] + [outputs[id(m)] for m in ran], allow_unused=True
            )
        block_gradients, output_gradients = (
            gradients[: len(states) - 1],
            gradients[len(states) - 1 :],
        )
        block_inputs = torch.stack(
            [(h * g).sum(-1) for h, g in zip(states[:-1], block_gradients, strict=True)], dim=1
        )
        count, token_count = tokens.shape[:2]
        biases = tokens.new_zeros(count, token_count)
        pooled = tokens.new_zeros(count)
        for m, gradient in zip(ran, output_gradients, strict=True):
            if gradient is None:
                continue
            bias = _live_bias(m, detached)
            term = gradient * bias
            if term.dim() == 3 and term.shape[1] == token_count:
                biases = biases + term.sum(-1)
            else:
                pooled = pooled + term.reshape(count, -1).sum(-1)
        return TokenContributions(block_inputs, biases, pooled, score.detach(), targets.detach())

    def _integrated_gradients(
        self,
        images: Tensor,
        target: TargetType,
        target_output: TargetOutput,
        n_steps: int,
        rules: list[BackwardRule],
    ) -> Tensor:
        interface = self.adapter.require_tokens(self.method_name)
        with torch.no_grad():
            embedded = interface.embed(images)
            targets = resolve_targets(target, extract_logits(interface.run(embedded)))
        total = torch.zeros_like(embedded)
        for step in range(1, n_steps + 1):
            with self._taps(), backward_rules(rules), torch.enable_grad():
                tokens = (embedded * (step / n_steps)).requires_grad_(True)
                logits = extract_logits(interface.run(tokens))
                score = _score(logits, targets, target_output)
                (gradient,) = torch.autograd.grad(score.sum(), tokens)
            total += gradient
        return (embedded * total / n_steps).sum(-1)


def _check_target_output(target_output: Any) -> None:
    if target_output not in ("probability", "logit"):
        raise ValueError(f"`target_output` must be 'probability' or 'logit', got {target_output!r}")


def _score(logits: Tensor, targets: Tensor, target_output: TargetOutput) -> Tensor:
    """``(B,)`` the differentiated score of each image's target."""
    if target_output == "probability":
        logits = torch.softmax(logits, dim=-1)
    return logits.gather(1, targets[:, None]).squeeze(1)


def _live_bias(module: nn.Module, detached: dict[int, Any]) -> Tensor:
    """The module's bias, with the chunks the attention rule detaches (query and key) zeroed:
    under the rule they change no score."""
    bias = module.bias.detach()
    if id(module) not in detached:
        return bias
    _, chunks, indices = detached[id(module)]
    parts = [torch.zeros_like(p) if i in indices else p for i, p in enumerate(bias.chunk(chunks))]
    return torch.cat(parts)

"""Vision DiffMask (Nalmpantis et al., CVPR-W XAI4CV 2023, arXiv 2304.06391) as a Captum
attribution, with the code that trains its gate.

The package has a room per concern: :mod:`.gate` (the gate network), :mod:`.hard_concrete`
(its distribution), :mod:`.attribution` (:class:`VisionDiffMask`), :mod:`.trainer` (the
Lagrangian training loop) and :mod:`.checkpoint` (the files).

A small gate network reads the hidden states of the frozen ViT on the unmasked image and, for
every patch, predicts whether the patch can be replaced by a baseline without changing the
model's output distribution. It is trained once per model (not per image) to keep as few patches
as possible subject to ``KL(p(y | x) || p(y | masked x)) <= eps``; afterwards one forward pass of
the ViT plus the gate gives a map: the probability that the patch is kept.

How this implementation follows the paper and the authors' code (AngelosNal/Vision-DiffMask,
``code/models/gates.py`` and ``code/models/interpretation.py``), and where it departs:

* **Hidden states.** ``S = L + 1`` states: the token embeddings (the adapter's ``embed``,
  positions added) and the output of each of the ``L`` blocks, obtained by running ``embed``
  and the ``blocks`` one by one. The authors' code keeps one more state, the patch projection
  before positions are added (its gate reads that state twice); the adapter interface does not
  expose it, so here the first gate reads the embeddings with positions.
* **Gates.** One probe per state ``l`` reads ``[h_0 ; h_l]`` for each token (the embeddings
  next to the layer's state): weight-normalised ``Linear(2D, D/4)``, ``tanh``, weight-normalised
  ``Linear(D/4, 1)``, ``tanh``, times 15 plus a learnable offset initialised at 8 (the authors'
  ``MLPMaxGate`` with their command-line defaults ``mul_activation=15``, ``add_activation=8``).
  The probe's output is the location ``log alpha`` of a hard-concrete gate (temperature 0.2,
  stretch ``(-0.2, 1.0)``, as in the authors' code).
* **Combining layers.** A patch is kept only if the gates of every state ``0..l`` keep it: the
  sampled gates are multiplied, and the log probabilities that each gate is open are summed
  (authors: ``cumprod`` of samples, ``cumsum`` of log expected L0). The map is the product over
  all ``S`` states of ``P(gate open)`` (authors' ``get_mask`` with ``idx=-1``).
* **Masking.** Patch tokens of the embedding are replaced, prefix tokens (CLS, distillation,
  registers) never are: ``z * e + (1 - z) * (b + p)`` with ``e`` the embedded patch, ``b`` the
  embedding of a zero (grey, for mean = std = 0.5 models) image at that position and ``p`` a
  learned vector shared by all positions, initialised at 0. For a linear patch projection with
  additive positions (HF ViT/DeiT, timm ViT) this is exactly the authors' learned placeholder
  inserted *before* positions are added (``b`` carries the position and the projection's bias);
  the zero initialisation starts from the same grey-patch baseline GradMask and the perturbation
  metrics use (the authors initialise with Xavier noise).
* **Objective.** Per training step one state ``l`` is drawn uniformly; the mask is the product
  of the gates ``0..l``; the loss is ``lambda_l * (KL - eps) + mean over patches of
  log P(patch kept)``, averaged over the batch; ``KL = KL(p_original || p_masked)`` over the
  whole distribution. The gates (and ``p``) minimise it, each multiplier ``lambda_l`` maximises
  it (gradient ascent, clipped to ``[0, 200]``), so ``lambda_l`` grows while the constraint is
  violated and shrinks to 0 when it holds. The sparsity term is the log of the expected number
  of kept patches per patch, as in the authors' code (the paper writes the expected L0 norm:
  ``sparsity="l0"``).
* **Optimisers.** Adam for the gates (lr ``2e-5`` with 1200 warmup steps), the placeholder
  (``1e-3``) and the multipliers (``0.3``, initial value 20), the authors' command-line
  defaults. The authors wrap both in Lookahead (k = 6, alpha = 0.5): here an option
  (``lookahead_k=6``, :mod:`.lookahead`), off by default so that a step is one Adam step.

The target class does not enter: the gate is conditioned on the hidden states of the unmasked
forward pass and trained to keep the whole output distribution, so the map is the same for every
``target`` (it explains the prediction, dominated by the predicted class). ``target`` is accepted
and validated for the Captum contract.
"""

from .attribution import VisionDiffMask, baseline_tokens
from .checkpoint import read_gate, write_gate
from .gate import DiffMaskGate, GateConfig
from .lookahead import Lookahead
from .trainer import DiffMaskTrainingConfig, VisionDiffMaskTrainer, fit, kl_divergence

__all__ = [
    "DiffMaskGate",
    "DiffMaskTrainingConfig",
    "GateConfig",
    "Lookahead",
    "VisionDiffMask",
    "VisionDiffMaskTrainer",
    "baseline_tokens",
    "fit",
    "kl_divergence",
    "read_gate",
    "write_gate",
]

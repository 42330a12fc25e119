"""GradMask's precision options: masked passes under autocast (``amp_dtype``) and a compiled
masked forward (``compile``)."""

from __future__ import annotations

import shutil

import pytest
import torch
from scipy.stats import spearmanr

from captum_gradmask import GradMaskAttribution, ViTAdapter
from captum_gradmask import gradmask as gradmask_module

from .conftest import needs_shared
from .models import tiny_hf_vit, tiny_timm_vit
from .test_gradmask import load_real_images
from .test_gradmask_safety import _assert_same, _snapshot

AMP = [torch.bfloat16, torch.float16]


def _images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


class AutocastSpy:
    """Records, for every forward of ``model``, whether grad and autocast were on and the
    autocast dtype: tells the gradient pass (grad on) from the masked passes."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[tuple[bool, bool, torch.dtype]] = []
        self.handle = model.register_forward_hook(self._record)

    def _record(self, module: torch.nn.Module, args: object, output: object) -> None:
        self.calls.append(
            (
                torch.is_grad_enabled(),
                torch.is_autocast_enabled("cpu"),
                torch.get_autocast_dtype("cpu"),
            )
        )

    def masked(self) -> list[tuple[bool, torch.dtype]]:
        return [(on, dtype) for grad, on, dtype in self.calls if not grad]

    def gradient(self) -> list[bool]:
        return [on for grad, on, _ in self.calls if grad]


# --- amp_dtype -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_default_is_bit_for_bit_the_map_without_the_option(mode: str) -> None:
    model = tiny_hf_vit()
    gradmask = GradMaskAttribution(model)
    images = _images()
    without = gradmask.attribute_grid(images, target=[1, 4], mode=mode)
    spy = AutocastSpy(model)
    with_none = gradmask.attribute_grid(images, target=[1, 4], mode=mode, amp_dtype=None)
    assert torch.equal(with_none, without)
    assert all(not on for on, _ in spy.masked())  # no autocast anywhere
    assert not any(spy.gradient())


@pytest.mark.parametrize("amp_dtype", AMP)
def test_amp_runs_only_the_masked_passes_under_autocast(amp_dtype: torch.dtype) -> None:
    model = tiny_hf_vit()
    spy = AutocastSpy(model)
    out = GradMaskAttribution(model).attribute_grid(_images(), amp_dtype=amp_dtype)
    assert spy.gradient() == [False]  # the gradient pass (and so the masks): model dtype
    assert spy.masked() and all(m == (True, amp_dtype) for m in spy.masked())
    assert out.dtype == torch.float32  # confidences in float32
    assert not torch.is_autocast_enabled("cpu")  # the caller's state is left as it was


@pytest.mark.parametrize("amp_dtype", AMP)
def test_amp_keeps_the_masks_and_moves_the_map_only_slightly(amp_dtype: torch.dtype) -> None:
    model = tiny_hf_vit()
    gradmask = GradMaskAttribution(model)
    images = _images()
    found = gradmask.binary_masks(images, target=[1, 4])
    exact = gradmask.mask_confidences(images, found.masks, found.targets)
    amp = gradmask.mask_confidences(images, found.masks, found.targets, amp_dtype=amp_dtype)
    assert amp.dtype == torch.float32
    torch.testing.assert_close(amp, exact, atol=2e-2, rtol=0)  # bf16 has 8 mantissa bits
    grid = gradmask.attribute_grid(images, target=[1, 4], amp_dtype=amp_dtype)
    # the map is the same masks weighed by the amp confidences
    expected = torch.einsum("bm,bmhw->bhw", amp, found.masks.float())
    torch.testing.assert_close(grid, expected, atol=1e-6, rtol=0)


def test_attribute_takes_the_options_too() -> None:
    gradmask = GradMaskAttribution(tiny_hf_vit())
    images = _images()
    grid = gradmask.attribute_grid(images, amp_dtype=torch.bfloat16)
    pixels = gradmask.attribute(images, amp_dtype=torch.bfloat16)
    assert pixels.shape == images.shape
    assert torch.equal(pixels[:, 0, ::8, ::8], grid)
    with pytest.raises(ValueError, match="amp_dtype"):
        gradmask.attribute(images, amp_dtype="fp16")


@pytest.mark.parametrize("amp_dtype", AMP)
@pytest.mark.parametrize("model_fn", [tiny_hf_vit, tiny_timm_vit])
def test_fast_mode_with_amp(model_fn, amp_dtype: torch.dtype) -> None:
    model = model_fn()
    # fast mode runs the blocks and head from tokens, not model.forward: spy on the head
    spy = AutocastSpy(model.classifier if hasattr(model, "classifier") else model.head)
    gradmask = GradMaskAttribution(model)
    images = _images()
    fast = gradmask.attribute_grid(images, mode="fast", amp_dtype=amp_dtype)
    reference = gradmask.attribute_grid(images, mode="fast")
    assert fast.dtype == torch.float32 and torch.isfinite(fast).all()
    torch.testing.assert_close(fast, reference, atol=0.05 * float(reference.max()), rtol=0)
    calls = len(spy.masked()) // 2  # the first call's passes ran under autocast, not the second's
    assert spy.gradient() == [False, False]
    assert spy.masked()[:calls] == [(True, amp_dtype)] * calls
    assert all(not on for on, _ in spy.masked()[calls:])


@pytest.mark.parametrize("bad", ["bf16", torch.float32, torch.float64, 16, True])
def test_bad_amp_dtype_is_named(bad: object) -> None:
    gradmask = GradMaskAttribution(tiny_hf_vit())
    with pytest.raises(ValueError, match=r"`amp_dtype` must be None, torch.bfloat16 or torch"):
        gradmask.attribute_grid(_images(), amp_dtype=bad)
    with pytest.raises(ValueError, match="amp_dtype"):
        gradmask.mask_confidences(
            _images(), torch.ones(2, 3, 4, 4, dtype=torch.bool), torch.zeros(2), amp_dtype=bad
        )


@pytest.mark.parametrize("amp_dtype", AMP)
def test_amp_leaves_the_model_as_it_was(amp_dtype: torch.dtype) -> None:
    model = tiny_hf_vit()
    model.train()
    model.classifier.weight.grad = torch.full_like(model.classifier.weight, 3.0)
    before = _snapshot(model)
    dtypes = [p.dtype for p in model.parameters()]
    GradMaskAttribution(model).attribute_grid(_images(), amp_dtype=amp_dtype)
    _assert_same(model, before)
    assert [p.dtype for p in model.parameters()] == dtypes
    assert all(p.grad is None for n, p in model.named_parameters() if n != "classifier.weight")


@needs_shared
@pytest.mark.slow
def test_bf16_maps_rank_like_fp32_on_real_images(shared_dir) -> None:
    """One real image (bf16 autocast is several times slower than fp32 on CPUs without bf16
    units); the 500-image table is benchmarks/precision_fidelity.py's."""
    from transformers import ViTForImageClassification

    from .conftest import HF_VIT_TINY

    model = ViTForImageClassification.from_pretrained(HF_VIT_TINY).eval()
    gradmask = GradMaskAttribution(model)
    images = load_real_images(files=(2,))
    exact = gradmask.attribute_grid(images)
    bf16 = gradmask.attribute_grid(images, amp_dtype=torch.bfloat16)
    for i in range(images.shape[0]):
        rho = spearmanr(exact[i].flatten().numpy(), bf16[i].flatten().numpy()).statistic
        assert rho >= 0.99, (i, rho)


# --- compile ---------------------------------------------------------------------------------


class CountingBackend:
    """A torch.compile backend that runs the captured graphs eagerly and counts compilations
    (fast: no code generation)."""

    def __init__(self) -> None:
        self.compiled = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.compiled += 1
        return graph.forward


@pytest.fixture
def counting_backend(monkeypatch: pytest.MonkeyPatch) -> CountingBackend:
    backend = CountingBackend()
    torch._dynamo.reset()
    monkeypatch.setitem(gradmask_module.COMPILE_OPTIONS, "backend", backend)
    yield backend
    torch._dynamo.reset()


def test_compile_pads_to_one_shape_and_does_not_recompile(counting_backend) -> None:
    model = tiny_hf_vit()  # 3 (L-1) m = 24 masks per image at m = 4
    gradmask = GradMaskAttribution(model)
    one, three = _images(1), _images(3, seed=2)
    plain = gradmask.attribute_grid(three, perturbations_per_eval=32)
    compiled = gradmask.attribute_grid(three, perturbations_per_eval=32, compile=True)
    torch.testing.assert_close(compiled, plain, atol=1e-5, rtol=0)
    after_first = counting_backend.compiled
    assert after_first >= 1
    # 72 masks: batches of 32, 32 and 8 (padded to 32); then 24 (padded): no new graph
    gradmask.attribute_grid(one, perturbations_per_eval=32, compile=True)
    gradmask.attribute_grid(three, perturbations_per_eval=32, compile=True)
    assert counting_backend.compiled == after_first


def test_compile_pads_batch_first_forward_arguments(counting_backend) -> None:
    inner = tiny_timm_vit()

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = inner

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.net(x * scale[:, None, None, None])

    scaled = Scaled().eval()
    adapter = ViTAdapter.from_modules(
        scaled,
        num_heads=3,
        patch_size=8,
        prefix_tokens=1,
        fused_qkv=[block.attn.qkv for block in inner.blocks],
        model=scaled,
    )
    gradmask = GradMaskAttribution(scaled, adapter=adapter)
    images, scale = _images(2), torch.tensor([0.5, 2.0])
    plain = gradmask.attribute_grid(images, additional_forward_args=(scale,))
    compiled = gradmask.attribute_grid(
        images, additional_forward_args=(scale,), perturbations_per_eval=20, compile=True
    )
    torch.testing.assert_close(compiled, plain, atol=1e-5, rtol=0)


def test_compile_is_exact_mode_only_and_a_bool() -> None:
    gradmask = GradMaskAttribution(tiny_hf_vit())
    with pytest.raises(ValueError, match="mode='exact' only"):
        gradmask.attribute_grid(_images(), mode="fast", compile=True)
    with pytest.raises(ValueError, match="`compile` must be True or False"):
        gradmask.attribute_grid(_images(), compile="yes")


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="torch.compile's default backend (inductor) needs a C compiler on the CPU",
)
def test_compiled_map_equals_the_eager_map_with_inductor() -> None:
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    model = tiny_hf_vit()
    before = _snapshot(model)
    gradmask = GradMaskAttribution(model)
    images = _images(2)
    plain = gradmask.attribute_grid(images, perturbations_per_eval=32)
    compiled = gradmask.attribute_grid(images, perturbations_per_eval=32, compile=True)
    torch.testing.assert_close(compiled, plain, atol=1e-5, rtol=0)
    graphs = counters["stats"]["unique_graphs"]
    again = gradmask.attribute_grid(_images(2, seed=3), perturbations_per_eval=32, compile=True)
    assert counters["stats"]["unique_graphs"] == graphs  # same shapes: no recompilation
    assert again.shape == plain.shape
    _assert_same(model, before)
    torch._dynamo.reset()

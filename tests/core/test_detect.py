"""Tests of lightning_smd.core.detect on real models and real forward passes."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_smd.core.detect import (
    Candidate,
    radial_cosines,
    DataflowRecorder,
    RadialCosineCheck,
    clean_name,
    find_scale_invariant,
    select,
    structural_candidates,
)

torchvision = pytest.importorskip("torchvision")
from torchvision.ops import FrozenBatchNorm2d  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _image_batch(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size)


def _weights_of(model: nn.Module, types: tuple[type, ...]) -> set[str]:
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, types)}


# --------------------------------------------------------------------------------------------
# Small models with known answers
# --------------------------------------------------------------------------------------------


class ConvNormNet(nn.Module):
    """conv → norm → relu → pool → linear head, with the conv's bias and norm configurable."""

    def __init__(self, norm: nn.Module, bias: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.norm = norm
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.norm(self.conv(x)))
        return self.head(x.mean(dim=(2, 3)))


class ResidualTrap(nn.Module):
    """conv2's output feeds its BN *and* a residual add: not invariant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        y = self.conv2(x)
        x = F.relu(self.bn2(y) + y)
        return self.head(x.mean(dim=(2, 3)))


class ReluBeforeBN(nn.Module):
    """conv → ReLU → BN: the ReLU sits in between, so the structural rule must not fire."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.bn(F.relu(self.conv(x))).mean(dim=(2, 3)))


class StdConv2d(nn.Conv2d):
    """Weight-standardized conv, as in timm (small eps so invariance is exact to float)."""

    def forward(self, x):
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None,
            training=True, momentum=0.0, eps=1e-10,
        ).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = StdConv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(F.relu(self.conv(x)).mean(dim=(2, 3)))


class WeightNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.utils.parametrizations.weight_norm(nn.Linear(16, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(F.relu(self.fc(x)))


class NormalizedLinear(nn.Module):
    """A leaf module normalizing its weight in forward; ``spare`` is never used."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 16))
        self.spare = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return x @ (self.weight / self.weight.norm()).t()


class FunctionalNormNet(nn.Module):
    """Rows of ``direction`` are normalized in the top-level forward: only numbers can tell."""

    def __init__(self) -> None:
        super().__init__()
        self.direction = nn.Parameter(torch.randn(8, 16))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        w = self.direction / self.direction.norm(dim=1, keepdim=True)
        return self.head(F.relu(x @ w.t()))


# --------------------------------------------------------------------------------------------
# torchvision classifiers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ctor", ["resnet18", "resnet50"])
def test_resnet_all_convs_and_nothing_else(ctor):
    model = getattr(torchvision.models, ctor)(weights=None)
    found = structural_candidates(model, _image_batch())
    assert set(found) == _weights_of(model, (nn.Conv2d,))
    assert "layer2.0.downsample.0.weight" in found
    assert found["layer1.0.conv1.weight"] == Candidate(
        "layer1.0.conv1.weight", "Conv2d → BatchNorm2d (layer1.0.bn1)", "structural", norms=("layer1.0.bn1",),
        kind="Conv2d → BatchNorm2d",  # the evidence without this tensor's names: the grouped report's key
    )


def test_mobilenet_v2_depthwise_and_pointwise_not_classifier():
    model = torchvision.models.mobilenet_v2(weights=None)
    found = structural_candidates(model, _image_batch())
    convs = _weights_of(model, (nn.Conv2d,))
    # plus the γ of the two linear bottlenecks that feed a 1×1 conv → BN and nothing else (the
    # blocks after them have no residual connection)
    assert set(found) == convs | {"features.1.conv.2.weight", "features.17.conv.3.weight"}
    depthwise = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(f"{n}.weight" in found for n in depthwise)
    assert "classifier.1.weight" not in found


def test_groupnorm_resnet():
    model = torchvision.models.resnet18(norm_layer=lambda c: nn.GroupNorm(8, c))
    found = structural_candidates(model, _image_batch())
    assert set(found) == _weights_of(model, (nn.Conv2d,))
    assert "GroupNorm (layer1.0.bn1)" in found["layer1.0.conv1.weight"].reason


# --------------------------------------------------------------------------------------------
# Mask R-CNN (not traceable by torch.fx)
# --------------------------------------------------------------------------------------------


# Few proposals and sampled RoIs keep the heads cheap on CPU.
SMALL_DETECTOR = dict(
    min_size=128, max_size=128, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=50,
    box_batch_size_per_image=16,
)


def _detection_batch(size: int = 128):
    images = [torch.rand(3, size, size) for _ in range(2)]
    targets = []
    for _ in images:
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        masks[0, 10:50, 20:60] = 1
        masks[1, 60:120, 30:100] = 1
        boxes = torch.tensor([[20.0, 10.0, 60.0, 50.0], [30.0, 60.0, 100.0, 120.0]])
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks})
    return images, targets


def test_maskrcnn_v2_norm_fed_convs_only():
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    model = maskrcnn_resnet50_fpn_v2(
        weights=None, weights_backbone=None, num_classes=3, **SMALL_DETECTOR
    )
    images, targets = _detection_batch()
    found = structural_candidates(model, images, targets)

    expected = {
        f"{n}.weight"
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
        and n.startswith(("backbone.", "roi_heads.box_head.", "roi_heads.mask_head."))
    }
    assert len(expected) > 60
    assert set(found) == expected
    # RPN head convs have no norm; predictors feed losses; box head fc feeds a ReLU.
    for name in ("rpn.head.conv.0.0.weight", "rpn.head.cls_logits.weight",
                 "roi_heads.box_predictor.cls_score.weight", "roi_heads.box_head.5.weight",
                 "roi_heads.mask_predictor.conv5_mask.weight"):
        assert name not in found
    assert found["roi_heads.mask_head.0.0.weight"].reason == (
        "Conv2d → BatchNorm2d (roi_heads.mask_head.0.1)"
    )


def test_maskrcnn_v1_frozen_bn_backbone_not_invariant():
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    resnet = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    model = MaskRCNN(
        _resnet_fpn_extractor(resnet, trainable_layers=5), num_classes=3, **SMALL_DETECTOR
    )
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    images, targets = _detection_batch()
    assert structural_candidates(model, images, targets) == {}


# --------------------------------------------------------------------------------------------
# Rules and traps
# --------------------------------------------------------------------------------------------


def test_eval_mode_batchnorm_is_not_normalization():
    model = ConvNormNet(nn.BatchNorm2d(8)).eval()
    with torch.no_grad(), DataflowRecorder(model) as recorder:
        model(_image_batch())
    assert recorder.candidates == {}

    model.train()
    with torch.no_grad(), DataflowRecorder(model) as recorder:
        model(_image_batch())
    assert set(recorder.candidates) == {"conv.weight"}


def test_recorder_inside_a_training_step_keeps_autograd_intact():
    """stop() re-runs the weight-standardized conv; the pending backward must still work."""
    model = nn.Sequential(StdConvNet().conv, nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1, bias=False),
                          nn.BatchNorm2d(4))
    with DataflowRecorder(model) as recorder:
        loss = model(_image_batch(size=8)).square().mean()
    # 1.weight: BN γ → 1×1 conv → BN, the linear-bottleneck rule (its β is dead)
    assert set(recorder.candidates) == {"0.weight", "1.weight", "2.weight"}
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_recorder_stop_is_idempotent_and_cleans_up_after_exceptions():
    model = ConvNormNet(nn.BatchNorm2d(8))
    recorder = DataflowRecorder(model)
    recorder.start()
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5, 8, 8))  # wrong channel count
    assert recorder.stop() == recorder.stop() == {}
    assert not model.conv._forward_hooks and not model.conv._forward_pre_hooks
    assert not torch.overrides._is_torch_function_mode_enabled()


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (ResidualTrap(), {"conv1.weight"}),
        (ReluBeforeBN(), set()),
        (ConvNormNet(nn.GroupNorm(2, 8), bias=True), set()),
        (ConvNormNet(nn.GroupNorm(2, 8), bias=False), {"conv.weight"}),
        (ConvNormNet(nn.GroupNorm(8, 8), bias=True), {"conv.weight"}),  # one channel a group
        (ConvNormNet(nn.BatchNorm2d(8), bias=True), {"conv.weight"}),
        (ConvNormNet(nn.InstanceNorm2d(8), bias=True), {"conv.weight"}),
        (ConvNormNet(FrozenBatchNorm2d(8)), set()),
    ],
    ids=["residual", "relu-bn", "bias-gn", "nobias-gn", "bias-gn-c", "bias-bn", "bias-in",
         "frozen-bn"],
)
def test_structural_rules(model, expected):
    assert set(structural_candidates(model, _image_batch(size=16))) == expected


@pytest.mark.parametrize("bias", [False, True])
def test_linear_layernorm_needs_no_bias(bias):
    model = nn.Sequential(nn.Linear(16, 32, bias=bias), nn.LayerNorm(32), nn.Linear(32, 4))
    found = structural_candidates(model, torch.randn(2, 5, 16))
    assert set(found) == (set() if bias else {"0.weight"})


def test_structural_rules_agree_with_numbers():
    """The radial cosine confirms each verdict of the trap models."""
    for model, invariant in [
        (ResidualTrap(), {"conv1.weight"}),
        (ConvNormNet(nn.GroupNorm(2, 8), bias=True), set()),
        (ConvNormNet(nn.BatchNorm2d(8), bias=True), {"conv.weight"}),
    ]:
        found = find_scale_invariant(model, _image_batch(size=16), detect="numerical")
        convs = {c.name for c in found if "conv" in c.name}
        assert convs == invariant


def test_weight_standardization_is_self_normalizing():
    found = structural_candidates(StdConvNet(), _image_batch(size=16))
    assert set(found) == {"conv.weight"}
    assert found["conv.weight"].reason.startswith("self-normalizing: output unchanged")


def test_functional_normalization_inside_leaf_module():
    model = nn.Sequential(NormalizedLinear(), nn.ReLU(), nn.Linear(8, 4))
    found = structural_candidates(model, torch.randn(4, 16))
    # An unused parameter leaves the output unchanged too, but is not "invariant".
    assert set(found) == {"0.weight"}
    assert found["0.weight"].reason == (
        "self-normalizing: output unchanged when scaled (NormalizedLinear 0)"
    )


def test_weight_norm_direction_not_magnitude():
    model = WeightNormNet()
    found = structural_candidates(model, torch.randn(4, 16))
    assert set(found) == {"fc.parametrizations.weight.original1"}
    assert found["fc.parametrizations.weight.original1"].reason == "weight_norm direction"
    # Restored exactly after the re-runs.
    before = {n: p.clone() for n, p in model.named_parameters()}
    structural_candidates(model, torch.randn(4, 16))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_weight_norm_conv_into_batchnorm_magnitude_too():
    """Scaling g scales the conv output uniformly, which the BatchNorm after it removes."""
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 8, 3, bias=False))
    model = nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    found = structural_candidates(model, _image_batch(size=8))
    direction, magnitude = "0.parametrizations.weight.original1", "0.parametrizations.weight.original0"
    assert set(found) == {direction, magnitude}
    assert found[magnitude].reason == (
        "ParametrizedConv2d output scales uniformly → BatchNorm2d (1)"
    )
    # Numbers confirm the direction. Each g_i is invariant on its own (BN is per channel), so
    # its only gradient comes from BN's eps and is radial: the numerical check rejects it.
    numbers = find_scale_invariant(model, _image_batch(size=8), detect="numerical")
    assert direction in {c.name for c in numbers}
    assert magnitude not in {c.name for c in numbers}


def test_functional_normalization_found_by_numbers_only():
    x = torch.randn(4, 16)
    assert find_scale_invariant(FunctionalNormNet(), x, detect="structural") == []
    for detect in ("numerical", "auto"):
        found = find_scale_invariant(FunctionalNormNet(), x, detect=detect)
        assert [c.name for c in found] == ["direction"]
        assert found[0].source == "numerical" and found[0].reason.startswith("numerical:")


def test_find_scale_invariant_auto_confirms_and_filters():
    model = torchvision.models.resnet18(weights=None)
    found = find_scale_invariant(model, _image_batch(size=32), exclude=r"^layer4\.")
    names = [c.name for c in found]
    assert names[0] == "conv1.weight"  # parameter order
    structural = {c.name for c in found if c.source == "structural"}
    convs = _weights_of(model, (nn.Conv2d,))
    assert structural == {n for n in convs if not n.startswith("layer4.")}
    # bn1's γ with β = 0 feeds a ReLU and then conv2 → bn2, so at initialisation its radial
    # cosine is as small as a conv's; norm layers' own parameters are never discovered numerically.
    assert {c.name for c in found if c.source == "numerical"} == set()
    cosines = radial_cosines(model, (_image_batch(size=32),), {})
    assert all(cosines[f"layer{i}.{j}.bn1.weight"] < 1e-4 for i in (1, 2, 3) for j in (0, 1))


def test_find_scale_invariant_auto_drops_unconfirmed_with_warning():
    """Eps dominates a tiny-variance weight: structure says invariant, numbers disagree."""
    model = ConvNormNet(nn.BatchNorm2d(8, eps=10.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = find_scale_invariant(model, _image_batch(size=16))
    assert found == []
    assert any("conv.weight" in str(w.message) for w in caught)


def test_find_scale_invariant_rejects_unknown_detect():
    with pytest.raises(ValueError, match="'auto', 'structural', 'numerical'"):
        find_scale_invariant(ConvNormNet(nn.BatchNorm2d(8)), _image_batch(), detect="both")


def test_structural_candidates_has_no_side_effects():
    model = torchvision.models.resnet18(weights=None)
    model.eval()
    model.layer1.train()
    modes = {n: m.training for n, m in model.named_modules()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    batch = _image_batch(size=32)
    rng = torch.get_rng_state()
    assert structural_candidates(model, batch)
    assert modes == {n: m.training for n, m in model.named_modules()}
    assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers())
    assert torch.equal(rng, torch.get_rng_state())
    # The check can fail: a forward pass in train mode does change the running stats.
    model.train()
    with torch.no_grad():
        model(_image_batch(size=32))
    assert not torch.equal(buffers["bn1.running_mean"], model.bn1.running_mean)


def test_compiled_module_names_are_clean():
    model = torch.compile(ConvNormNet(nn.BatchNorm2d(8)))
    assert set(structural_candidates(model, _image_batch(size=16))) == {"conv.weight"}


def test_clean_name():
    assert clean_name("_orig_mod.layer1._fsdp_wrapped_module.conv.weight") == "layer1.conv.weight"
    assert clean_name("model._checkpoint_wrapped_module.fc.weight") == "model.fc.weight"
    assert clean_name("module.fc.weight") == "module.fc.weight"


# --------------------------------------------------------------------------------------------
# RadialCosineCheck
# --------------------------------------------------------------------------------------------


class SmallBNCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _train_step(model, opt):
    opt.zero_grad()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    F.cross_entropy(model(x), y).backward()


def _cosines_after_first_update(reduce_fn=None, steps=2):
    torch.manual_seed(0)
    model = SmallBNCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    _train_step(model, opt)
    opt.step()
    check = RadialCosineCheck(list(model.named_parameters()), reduce_fn=reduce_fn)
    for _ in range(steps):
        _train_step(model, opt)
        check.update()
        opt.step()
    return check


def test_radial_cosine_separates_invariant_from_classifier():
    check = _cosines_after_first_update()
    cos = check.result()
    assert check.steps == 2
    assert cos["conv1.weight"] < 1e-4 and cos["conv2.weight"] < 1e-4
    assert cos["fc.weight"] > 1e-3


def test_radial_cosine_reduce_fn_applied_once_per_update():
    calls = []

    def doubling(sums):
        calls.append(sums.shape)
        return 2 * sums

    plain = _cosines_after_first_update().result()
    doubled = _cosines_after_first_update(reduce_fn=doubling).result()
    assert calls == [torch.Size([3, 8])] * 2  # 8 tensors, one call per update
    assert plain.keys() == doubled.keys()
    for name in plain:  # doubling every sum leaves |w·g| / (|w||g|) unchanged
        assert doubled[name] == pytest.approx(plain[name], rel=1e-5)

    # A reduce_fn that breaks the sums does change the result, so it really is applied.
    def only_dot(sums):
        return torch.stack([sums[0] + 1.0, sums[1], sums[2]])

    skewed = _cosines_after_first_update(reduce_fn=only_dot).result()
    assert skewed["conv1.weight"] > 1e-3


def test_radial_cosine_skips_zero_norm_and_missing_grads():
    w = nn.Parameter(torch.zeros(3))
    v = nn.Parameter(torch.ones(3))
    no_grad = nn.Parameter(torch.ones(3))
    zero_grad = nn.Parameter(torch.ones(2))
    (w * torch.arange(3.0)).sum().backward()
    (v * torch.tensor([1.0, -1.0, 0.5])).sum().backward()
    zero_grad.grad = torch.zeros(2)
    check = RadialCosineCheck([("w", w), ("v", v), ("none", no_grad), ("zero", zero_grad)])
    check.update()
    result = check.result()
    assert math.isnan(result["w"]) and math.isnan(result["none"]) and math.isnan(result["zero"])
    assert result["v"] == pytest.approx(0.5 / (math.sqrt(3) * math.sqrt(2.25)), rel=1e-6)
    # Later measurements keep the maximum; NaN updates do not erase it.
    v.grad = torch.tensor([1.0, -1.0, 0.0])
    check.update()
    assert check.result()["v"] == pytest.approx(result["v"], rel=1e-6)
    assert check.steps == 2


# --------------------------------------------------------------------------------------------
# select()
# --------------------------------------------------------------------------------------------

NAMES = ["model.conv1.weight", "model.layer1.0.conv1.weight", "model.fc.weight"]


def test_select_forms():
    assert select(NAMES) == NAMES
    assert select(NAMES, include=r"conv") == NAMES[:2]
    assert select(NAMES, exclude=[r"layer1", r"\.fc\."]) == NAMES[:1]
    assert select(NAMES, include=lambda n: n.endswith("fc.weight")) == NAMES[2:]
    assert select(iter(NAMES), include=["conv1"], exclude="layer") == NAMES[:1]


@pytest.mark.parametrize("argument", ["include", "exclude"])
@pytest.mark.parametrize("bad", ["conv[", ["ok", "("], 3, [1, 2]])
def test_select_rejects_bad_patterns(argument, bad):
    with pytest.raises(ValueError, match=argument):
        select(NAMES, **{argument: bad})


# --------------------------------------------------------------------------------------------
# Issue 12: rules checked against the brute-force oracle
# --------------------------------------------------------------------------------------------

from lightning_smd.core.detect import decide, detection_notes, discovery_threshold  # noqa: E402
from lightning_smd.report.summary import format_detection_report  # noqa: E402
from tests.oracle import oracle  # noqa: E402


def _oracle_invariant(model: nn.Module, x: torch.Tensor) -> set[str]:
    return oracle(model, lambda m: m(x.to(next(m.parameters()).dtype))).invariant


class InplaceSiLUBeforeBN(nn.Module):
    """conv → SiLU(inplace=True) → BN: the in-place activation returns its input tensor, modified."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.relu = nn.SiLU(inplace=True)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.bn(self.relu(self.conv(x))).mean(dim=(2, 3)))


def test_inplace_activation_is_not_a_pass_through():
    x = _image_batch(size=8)
    assert "conv.weight" not in _oracle_invariant(InplaceSiLUBeforeBN(), x)
    assert "conv.weight" not in structural_candidates(InplaceSiLUBeforeBN(), x)


class Bottleneck(nn.Module):
    """conv → BN(γ, β) → [link] → BN → head: γ is invariant iff the link is a linear map without
    padding, used by nothing else, into a per-channel normalization."""

    def __init__(self, link: str) -> None:
        super().__init__()
        self.link = link
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        padding = 1 if link == "padded" else 0
        kernel = 3 if link == "padded" else 1
        self.proj = nn.Conv2d(8, 8, kernel, padding=padding)
        self.out = nn.LayerNorm([8, 8, 8]) if link == "layernorm" else nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.link == "relu":
            y = F.relu(y)
        z = self.head(F.relu(self.out(self.proj(y))).mean(dim=(2, 3)))
        if self.link == "residual":  # y also reaches the output around the normalization
            z = z + y.mean(dim=(2, 3))[:, :4]
        return z


@pytest.mark.parametrize("link, invariant", [
    ("1x1", True), ("padded", False), ("relu", False), ("residual", False), ("layernorm", False),
])
def test_gamma_through_linear_map_into_per_channel_norm(link, invariant):
    x = _image_batch(n=4, size=8)
    torch.manual_seed(0)
    found = structural_candidates(Bottleneck(link), x)
    torch.manual_seed(0)
    truth = _oracle_invariant(Bottleneck(link), x)
    assert ("bn.weight" in truth) is invariant  # the rule is what the oracle says
    assert ("bn.weight" in found) is invariant
    if invariant:
        assert "β is dead" in found["bn.weight"].reason
        assert "Conv2d (proj)" in found["bn.weight"].reason
        notes = detection_notes(Bottleneck(link), x)
        assert {"bn.bias", "proj.bias"} <= set(notes.dead)


def test_norm_with_its_own_activation_is_judged_by_rerun():
    """timm's BatchNormAct2d: with an identity activation it is a plain norm (γ counts), with a
    ReLU inside its output is not affine in β (γ does not)."""
    from timm.layers import BatchNormAct2d

    class Net(nn.Module):
        def __init__(self, act: bool) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.bn = BatchNormAct2d(8, apply_act=act, act_layer=nn.ReLU)
            self.proj = nn.Conv2d(8, 8, 1, bias=False)
            self.out = nn.BatchNorm2d(8)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.out(self.proj(self.bn(self.conv(x)))).mean(dim=(2, 3)))

    x = _image_batch(n=4, size=8)
    for act in (False, True):
        torch.manual_seed(0)
        found = structural_candidates(Net(act), x)
        torch.manual_seed(0)
        assert ("bn.weight" in found) is (not act) is ("bn.weight" in _oracle_invariant(Net(act), x))


def test_squeeze_excitation_conv_counts_fc_never():
    """conv → BN → SiLU → squeeze-and-excitation multiply → 1×1 conv → BN (torchvision's SE)."""
    from torchvision.ops import SqueezeExcitation

    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.SiLU(),
        SqueezeExcitation(16, 4), nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    x = _image_batch(n=4, size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = {c.name for c in find_scale_invariant(model, x)}
    assert {"0.weight", "4.weight"} <= found
    assert not found & {"3.fc1.weight", "3.fc2.weight", "3.fc1.bias", "3.fc2.bias"}
    assert found - {"5.weight"} <= _oracle_invariant(model, x)


class ZeroBiasIntoLayerNorm(nn.Module):
    """conv (bias zero at init) → channels-last LayerNorm, as ConvNeXt's stem: invariant at init
    only, until the bias moves."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 2, stride=2)
        nn.init.zeros_(self.conv.bias)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        y = self.norm(self.conv(x).permute(0, 2, 3, 1))
        return self.head(F.gelu(y).mean(dim=(1, 2)))


def test_numerical_discovery_is_not_fooled_by_init_values():
    x = _image_batch(n=4, size=8)
    model = ZeroBiasIntoLayerNorm()
    assert radial_cosines(model, (x,), {})["conv.weight"] < 1e-5  # looks invariant at init...
    assert "conv.weight" not in _oracle_invariant(model, x)  # ...but is not
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert "conv.weight" not in {c.name for c in find_scale_invariant(model, x)}


def test_numerical_discovery_threshold_scales_with_size():
    """|cos| ~ 1/√n by chance: 5e-5 is evidence for 1 000 entries, not for 4 million."""
    assert discovery_threshold(1e-4, 1_000) == 1e-4
    assert discovery_threshold(1e-4, 4_000_000) == pytest.approx(5e-6)
    assert discovery_threshold(1e-4, 10**12, torch.float32) == pytest.approx(10 * torch.finfo(torch.float32).eps)
    cosines = {"small": 5e-5, "big": 5e-5}
    numels = {"small": 1_000, "big": 4_000_000}
    chosen, _ = decide({}, cosines, "auto", 1e-4, numels=numels)
    assert set(chosen) == {"small"}
    refuted, rejected = decide({}, cosines, "auto", 1e-4, numels=numels, confirm=lambda names: dict.fromkeys(names, "no"))
    assert not refuted and "small" in rejected
    kept, _ = decide({}, cosines, "auto", 1e-4, numels=numels, confirm=lambda names: dict.fromkeys(names))
    assert "confirmed" in kept["small"].reason


def test_eps_dominated_layer_is_named():
    """Tiny conv weights into BatchNorm(eps=1e-3): the input variance is far below eps."""
    model = ConvNormNet(nn.BatchNorm2d(8, eps=1e-3))
    with torch.no_grad():
        model.conv.weight.mul_(1e-3)
    notes = detection_notes(model, _image_batch(n=4, size=8))
    assert "conv.weight" in notes.eps_dominated
    assert "eps 0.001" in notes.eps_dominated["conv.weight"]
    assert not detection_notes(ConvNormNet(nn.BatchNorm2d(8)), _image_batch(n=4, size=8)).eps_dominated


def test_report_names_dead_and_eps_dominated_tensors():
    report = format_detection_report(
        [], dead={"conv.bias": "bias of Conv2d → BatchNorm2d (bn)"},
        eps_dominated={"conv.weight": "BatchNorm2d (bn): input variance 1e-09 vs eps 0.001"},
    )
    assert "Dead tensors (1): no gradient ever reaches them; weight decay only shrinks them: " \
           "exclude them from the optimizer or remove the bias." in report
    assert "  conv.bias: bias of Conv2d" in report
    assert "Eps-dominated (1)" in report and "  conv.weight: BatchNorm2d (bn)" in report
    assert "Dead tensors" not in format_detection_report([])  # old call, old output

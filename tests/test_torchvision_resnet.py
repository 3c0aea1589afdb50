"""A torchvision-format ResNet checkpoint (the official SPP-SCL code's ``resnet50-19c8e357.pth``) loads into
the project's ResNet: the key mapping, checked on a state dict the test builds, against a forward pass the
test writes from torchvision's architecture (no torchvision needed)."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F

from umaf.models.image_encoder import FrozenResNet, is_torchvision_checkpoint, resolve_image_encoder

# A small bottleneck ResNet in torchvision's layout: stem width 8, stage widths (planes) 4/8/16/32
# (outputs x4), blocks 1/2/1/1.
STEM, PLANES, BLOCKS, EXPANSION = 8, (4, 8, 16, 32), (1, 2, 1, 1), 4


def _bn(state: dict, name: str, channels: int, generator: torch.Generator) -> None:
    state[f"{name}.weight"] = 1 + 0.1 * torch.randn(channels, generator=generator)
    state[f"{name}.bias"] = 0.1 * torch.randn(channels, generator=generator)
    state[f"{name}.running_mean"] = 0.1 * torch.randn(channels, generator=generator)
    state[f"{name}.running_var"] = 1 + 0.1 * torch.rand(channels, generator=generator)


def torchvision_state_dict() -> dict[str, torch.Tensor]:
    """Keys as torchvision.models.ResNet with Bottleneck blocks names them (conv1/bn1, layerS.B.convK/bnK,
    layerS.B.downsample.0/1, fc); no num_batches_tracked, as in torchvision's older files."""
    g = torch.Generator().manual_seed(0)
    state = {"conv1.weight": 0.1 * torch.randn(STEM, 3, 7, 7, generator=g)}
    _bn(state, "bn1", STEM, g)
    inplanes = STEM
    for s, (planes, blocks) in enumerate(zip(PLANES, BLOCKS), 1):
        for b in range(blocks):
            p = f"layer{s}.{b}"
            state[f"{p}.conv1.weight"] = 0.1 * torch.randn(planes, inplanes, 1, 1, generator=g)
            state[f"{p}.conv2.weight"] = 0.1 * torch.randn(planes, planes, 3, 3, generator=g)
            state[f"{p}.conv3.weight"] = 0.1 * torch.randn(planes * EXPANSION, planes, 1, 1, generator=g)
            for k, c in ((1, planes), (2, planes), (3, planes * EXPANSION)):
                _bn(state, f"{p}.bn{k}", c, g)
            if b == 0:
                state[f"{p}.downsample.0.weight"] = 0.1 * torch.randn(planes * EXPANSION, inplanes, 1, 1, generator=g)
                _bn(state, f"{p}.downsample.1", planes * EXPANSION, g)
            inplanes = planes * EXPANSION
    state["fc.weight"] = torch.randn(10, inplanes, generator=g)
    state["fc.bias"] = torch.randn(10, generator=g)
    return state


def torchvision_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """torchvision's ResNet.forward up to layer4 (as the official model/ResNet.py runs it), eval mode."""
    def bn(x, name):
        return F.batch_norm(x, state[f"{name}.running_mean"], state[f"{name}.running_var"], state[f"{name}.weight"],
                            state[f"{name}.bias"], training=False, eps=1e-5)

    x = F.relu(bn(F.conv2d(x, state["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    for s, blocks in enumerate(BLOCKS, 1):
        for b in range(blocks):
            p = f"layer{s}.{b}"
            stride = 2 if s > 1 and b == 0 else 1  # torchvision: stride on conv2 (the 3x3), layer1 keeps the size
            out = F.relu(bn(F.conv2d(x, state[f"{p}.conv1.weight"]), f"{p}.bn1"))
            out = F.relu(bn(F.conv2d(out, state[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn2"))
            out = bn(F.conv2d(out, state[f"{p}.conv3.weight"]), f"{p}.bn3")
            identity = (bn(F.conv2d(x, state[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
                        if f"{p}.downsample.0.weight" in state else x)
            x = F.relu(out + identity)
    return x


class NotATensor:
    pass


def test_torchvision_checkpoint_loads_into_the_projects_resnet(tmp_path):
    state = torchvision_state_dict()
    checkpoint = tmp_path / "resnet-tiny-tv.pth"
    torch.save(state, checkpoint)
    assert is_torchvision_checkpoint(str(checkpoint)) and not is_torchvision_checkpoint("microsoft/resnet-50")

    folder = resolve_image_encoder(str(checkpoint), tmp_path / "cache")
    assert resolve_image_encoder(str(checkpoint), tmp_path / "cache") == folder  # converted once
    encoder = FrozenResNet(folder).eval()
    assert encoder.out_channels == PLANES[-1] * EXPANSION
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = encoder(x)
    expected = torchvision_forward(state, x)
    assert ours.shape == expected.shape == (2, 128, 2, 2)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()

    # Its preprocessing is the official loader's: short side 256, centre crop 224, ImageNet statistics.
    from umaf.models.image_encoder import load_image_processor

    processor = load_image_processor(str(checkpoint))
    assert processor.size["shortest_edge"] == 224 and processor.crop_pct == 0.875 and processor.resample == 2

    # weights_only=True: a checkpoint that pickles an object (code to run) is refused, not unpickled.
    unsafe = tmp_path / "unsafe.pth"
    torch.save({**state, "extra": NotATensor()}, unsafe)
    with pytest.raises(pickle.UnpicklingError):
        resolve_image_encoder(str(unsafe), tmp_path / "cache")
    # A state dict of another architecture is refused with the keys that do not fit.
    broken = tmp_path / "broken.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("layer2.1.conv2")}, broken)
    with pytest.raises(ValueError, match="do not fit"):
        resolve_image_encoder(str(broken), tmp_path / "cache")

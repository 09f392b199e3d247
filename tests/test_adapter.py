"""DIY-SC's adapter (core/features/adapter.py): the shipped weights load strictly, the module's
forward equals one written here from the state-dict tensors with torch.nn.functional, the
.pth -> safetensors conversion is checked and refuses what is not plain tensors, the CLI.

(Checked once by hand against the authors' own AggregationNetwork on the real checkpoint:
identical outputs; see fiftyone_sdcorr/weights/README.md.)"""

import os
import resource
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fiftyone_sdcorr.core.features.adapter import (
    ADAPTER_PROVENANCE,
    DEFAULT_ADAPTER,
    AggregationNetwork,
    adapter_digest,
    convert_checkpoint,
    load_adapter,
)
from fiftyone_sdcorr.core.features.tiny import save_tiny_adapter

B = "bottleneck_layers.0.0."
SHIPPED_SHAPES = {
    "logit_scale": (),
    "self_logit_scale": (),
    "mixing_weights": (1,),
    B + "conv1.weight": (192, 768, 1, 1),
    B + "conv1.norm.weight": (192,),
    B + "conv1.norm.bias": (192,),
    B + "conv2.weight": (192, 192, 3, 3),
    B + "conv2.norm.weight": (192,),
    B + "conv2.norm.bias": (192,),
    B + "conv3.weight": (768, 192, 1, 1),
    B + "conv3.norm.weight": (768,),
    B + "conv3.norm.bias": (768,),
}


class NotATensor:
    """Something a weights-only unpickler must refuse."""


def reference_forward(sd, feature_dims, groups, x):
    """The adapter written out from its tensors: per slice conv1 (1x1) + GN + relu, conv2
    (3x3, pad 1) + GN + relu, conv3 (1x1) + GN, plus the shortcut (1x1 + GN, or the slice
    itself), relu; summed with softmax(mixing_weights)."""
    def conv_norm(prefix, inp, pad):
        y = F.conv2d(inp, sd[prefix + ".weight"], padding=pad)
        return F.group_norm(y, groups, sd[prefix + ".norm.weight"], sd[prefix + ".norm.bias"], eps=1e-5)

    mix = torch.softmax(sd["mixing_weights"], dim=0)
    out, start = 0, 0
    for i, d in enumerate(feature_dims):
        part, start, p = x[:, start:start + d], start + d, f"bottleneck_layers.{i}.0."
        y = F.relu(conv_norm(p + "conv1", part, 0))
        y = F.relu(conv_norm(p + "conv2", y, 1))
        y = conv_norm(p + "conv3", y, 0)
        shortcut = conv_norm(p + "shortcut", part, 0) if p + "shortcut.weight" in sd else part
        out = out + mix[i] * F.relu(y + shortcut)
    return out


def randomize(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            t.copy_(torch.randn(t.shape, generator=gen) * (0.3 if t.ndim == 4 else 1.0) + (1.0 if "norm.weight" in name else 0.0))
    return module.eval()


def file_tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# ------------------------------------------------------------------ the shipped weights


def test_shipped_file_loads_strictly_and_every_tensor_is_used():
    tensors, meta = file_tensors(DEFAULT_ADAPTER)
    assert len(tensors) == 12
    assert {k: tuple(v.shape) for k, v in tensors.items()} == SHIPPED_SHAPES
    module = load_adapter()
    assert not module.training
    assert (module.feature_dims, module.projection_dim, module.bottleneck_channels, module.num_norm_groups) == \
        ((768,), 768, 192, 32)
    sd = module.state_dict()
    assert set(sd) == set(tensors)
    assert all(torch.equal(sd[k], tensors[k]) for k in tensors)
    assert adapter_digest(module) == adapter_digest(DEFAULT_ADAPTER)
    assert meta["format"] == "sdcorr.adapter" and meta["licence"] == "CC0-1.0"
    assert ADAPTER_PROVENANCE["commit"] in meta["source"] and ADAPTER_PROVENANCE["sha256"] in meta["source"]
    assert ADAPTER_PROVENANCE["repository"] == "odunkel/DIY-SC" and ADAPTER_PROVENANCE["licence"] == "CC0-1.0"
    assert ADAPTER_PROVENANCE["file"] == "ckpts/0300_dino_spair/best.pth"


def test_shipped_forward_equals_the_hand_written_one():
    module = load_adapter()
    x = torch.randn(2, 768, 5, 7, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        got, unit = module(x), module.unit_descriptors(x)
        want = reference_forward(module.state_dict(), (768,), 32, x)
    assert got.shape == (2, 768, 5, 7)
    assert (got - want).abs().max().item() < 1e-5
    want_unit = want / (want.norm(dim=1, keepdim=True) + 1e-8)
    assert (unit - want_unit).abs().max().item() < 1e-5
    assert torch.allclose(unit.norm(dim=1), torch.ones(2, 5, 7), atol=1e-5)


def test_two_slices_mix_and_shortcut_equal_the_hand_written_forward():
    module = randomize(AggregationNetwork(feature_dims=(8, 16), projection_dim=16, num_norm_groups=4), seed=3)
    sd = module.state_dict()
    assert "bottleneck_layers.0.0.shortcut.weight" in sd and "bottleneck_layers.0.0.shortcut.norm.bias" in sd
    assert not [k for k in sd if k.startswith("bottleneck_layers.1.0.shortcut")]  # 16 -> 16: identity
    assert sd["bottleneck_layers.0.0.conv1.weight"].shape == (4, 8, 1, 1)
    assert sd["mixing_weights"].shape == (2,) and sd["mixing_weights"][0] != sd["mixing_weights"][1]
    x = torch.randn(2, 24, 5, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (module(x) - reference_forward(sd, (8, 16), 4, x)).abs().max().item()
    assert diff < 1e-5
    with pytest.raises(ValueError, match=r"expected \(B, 24, H, W\)"):
        module(x[:, :20])


def test_tiny_adapter_is_seeded_random_and_loads(tmp_path):
    path = save_tiny_adapter(tmp_path, 32, seed=0)
    assert path == str(tmp_path / "adapter.safetensors")
    module = load_adapter(path)
    assert (module.feature_dims, module.projection_dim, module.bottleneck_channels, module.num_norm_groups) == \
        ((32,), 32, 8, 8)
    sd = module.state_dict()
    assert not torch.allclose(sd[B + "conv3.norm.weight"], torch.ones(32))
    assert not torch.allclose(sd[B + "conv3.norm.bias"], torch.zeros(32))
    x = torch.randn(2, 32, 5, 7, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (module(x) - reference_forward(sd, (32,), 8, x)).abs().max().item() < 1e-5
    _, meta = file_tensors(path)
    assert meta["format"] == "sdcorr.adapter" and "source" in meta and "licence" in meta
    again = save_tiny_adapter(tmp_path / "again.safetensors", 32, seed=0)
    other = save_tiny_adapter(tmp_path / "other.safetensors", 32, seed=1)
    assert adapter_digest(again) == adapter_digest(path) != adapter_digest(other)


# ------------------------------------------------------------------ conversion


def tiny_pth(tmp_path, wrap=None):
    module = load_adapter(save_tiny_adapter(tmp_path / "tiny.safetensors", 16, seed=5))
    sd = module.state_dict()
    pth = tmp_path / "tiny.pth"
    torch.save({wrap: sd} if wrap else sd, pth)
    return module, pth


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_conversion_round_trip(tmp_path, wrap):
    module, pth = tiny_pth(tmp_path, wrap)
    out = convert_checkpoint(pth, tmp_path / "out.safetensors")
    back = load_adapter(out)
    x = torch.randn(1, 16, 6, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(x), module(x))
    assert adapter_digest(back) == adapter_digest(module)
    _, meta = file_tensors(out)
    assert meta["format"] == "sdcorr.adapter" and meta["licence"] == "unknown" and "tiny.pth" in meta["source"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "tiny.pth", "tiny.safetensors"]


def test_a_pth_holding_an_object_is_refused_by_the_weights_only_unpickler(tmp_path):
    _, pth = tiny_pth(tmp_path)
    bad = tmp_path / "bad.pth"
    torch.save({**torch.load(pth, weights_only=True), "extra": NotATensor()}, bad)
    with pytest.raises(ValueError, match=r"weights_only=True.*NotATensor"):
        convert_checkpoint(bad, tmp_path / "out.safetensors")
    plain = tmp_path / "plain.pth"
    torch.save({**torch.load(pth, weights_only=True), "epoch": 3}, plain)
    with pytest.raises(ValueError, match=r"not tensors.*epoch"):
        convert_checkpoint(plain, tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth", "plain.pth", "tiny.pth", "tiny.safetensors"]


def test_a_state_dict_that_is_not_the_adapter_is_refused_before_writing(tmp_path):
    _, pth = tiny_pth(tmp_path)
    sd = torch.load(pth, weights_only=True)
    sd.pop(B + "conv2.weight")
    torch.save(sd, tmp_path / "short.pth")
    with pytest.raises(ValueError, match=rf"missing {B}conv2\.weight"):
        convert_checkpoint(tmp_path / "short.pth", tmp_path / "out.safetensors")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        convert_checkpoint(pth, tmp_path / "out.pt")
    assert not (tmp_path / "out.safetensors").exists() and not list(tmp_path.glob(".*"))


def test_load_adapter_refuses_a_pth_and_names_the_convert_command(tmp_path):
    _, pth = tiny_pth(tmp_path)
    with pytest.raises(ValueError, match="convert-adapter"):
        load_adapter(pth)
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(pth.read_bytes())  # a pickle under a safetensors name
    with pytest.raises(ValueError, match="convert-adapter"):
        load_adapter(fake)


@pytest.mark.parametrize("change, named", [
    ("missing", f"missing {B}conv2.norm.bias"),
    ("shape", f"shape of {B}conv2.weight"),
    ("extra", "unexpected extra.weight"),
])
def test_a_file_that_does_not_fit_is_refused_naming_the_key(tmp_path, change, named):
    tensors = load_file(save_tiny_adapter(tmp_path / "tiny.safetensors", 16))
    if change == "missing":
        tensors.pop(B + "conv2.norm.bias")
    elif change == "shape":
        tensors[B + "conv2.weight"] = torch.zeros(4, 4, 1, 1)
    else:
        tensors["extra.weight"] = torch.zeros(3)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError) as err:
        load_adapter(tmp_path / "bad.safetensors")
    assert named in str(err.value)


def test_every_problem_is_named_at_once(tmp_path):
    tensors = load_file(save_tiny_adapter(tmp_path / "tiny.safetensors", 16))
    tensors.pop("logit_scale")
    tensors["mixing_weights"] = torch.zeros(3)
    tensors["bottleneck_layers.0.1.conv1.weight"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError) as err:
        load_adapter(tmp_path / "bad.safetensors")
    for named in ("missing logit_scale", "shape of mixing_weights", "unexpected bottleneck_layers.0.1.conv1.weight"):
        assert named in str(err.value)


# ------------------------------------------------------------------ the command


def cli(*args, file_size_limit=None):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run([sys.executable, "-m", "fiftyone_sdcorr", "convert-adapter", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                          preexec_fn=limit if file_size_limit else None)


def test_cli_converts_a_good_file_and_refuses_a_bad_one_in_one_line(tmp_path):
    module, pth = tiny_pth(tmp_path)
    proc = cli(pth, tmp_path / "out.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert adapter_digest(module) in proc.stdout
    assert adapter_digest(tmp_path / "out.safetensors") == adapter_digest(module)

    bad = tmp_path / "bad.pth"
    torch.save({"w": NotATensor()}, bad)
    proc = cli(bad, tmp_path / "bad.safetensors")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert-adapter: error: ") and "weights_only" in lines[0]
    assert not (tmp_path / "bad.safetensors").exists()


def test_cli_on_a_full_disk_fails_in_one_line_and_leaves_nothing(tmp_path):
    _, pth = tiny_pth(tmp_path)
    proc = cli(pth, tmp_path / "out" / "out.safetensors", file_size_limit=2000)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert-adapter: error: ")
    assert list((tmp_path / "out").iterdir()) == []

"""The model tools on a file of every algorithm (LoRA, DoRA, LoHa, LoKr, iA3, GLoRA, norm layers): merge into a
model checked against each algorithm's formula written out here (from the file's tensors, not through the
library), LoRA + LoRA and resize refused with the reason, inspect reporting every module, extract recovering the
merged change. DoRA files also against ComfyUI's weight_decompose, written out here (comfy/weight_adapter/base.py)."""

import pytest
import torch
from safetensors.torch import load_file

from lora_diffusion import create_network, load_network
from lora_diffusion.models import load_models, save_tiny_diffusers_folder
from lora_diffusion.tools.extract import extract_lora
from lora_diffusion.tools.inspect import format_report, inspect_lora
from lora_diffusion.tools.merge import merge_into_model, merge_loras
from lora_diffusion.tools.model_files import ModelToolError
from lora_diffusion.tools.resize import resize_lora

FEW = [r"attn1\.to_q", r"resnets\.0\.conv1", r"proj_in"]  # a Linear, a 3x3 conv, a 1x1 conv (or a Linear)
ALGOS = {"lora": dict(algo="lora"), "dora": dict(algo="lora", dora_wd=True), "loha": dict(algo="loha"),
         "lokr": dict(algo="lokr", factor=4), "ia3": dict(algo="ia3"), "glora": dict(algo="glora"),
         "norm": dict(algo="lora", train_norm=True, include=FEW + [r"norm1"])}
RATIO = 0.7


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_diffusers_folder(tmp_path_factory.mktemp("tiny") / "tiny")


def random_file(tiny, path, options, seed=0):
    base = load_models(tiny)
    network = create_network(base.unet, None, rank=4, alpha=2, **{"include": FEW, **options})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (p if "dora_scale" in name else 0))
    network.save_weights(path, dtype=torch.float32)
    network.remove()
    return base


def expected_update(t, weight):
    """The merged weight of one module at RATIO, each algorithm's formula from its file tensors."""
    w = weight.float()
    flat = w.reshape(w.shape[0], -1)
    rank_scale = lambda r: float(t["alpha"]) / r  # noqa: E731
    if "on_input" in t:  # iA3: W * (1 + m * w) along the output rows
        return w * (1 + RATIO * t["weight"].reshape(-1, *[1] * (w.dim() - 1)))
    if "a1.weight" in t:  # GLoRA: W + m * (W a1 a2 + b1 b2) * alpha / r
        r = t["a2.weight"].shape[0]
        a = t["a1.weight"].reshape(w.shape[1], r) @ t["a2.weight"].reshape(r, w.shape[1])
        inner = torch.einsum("oi...,ij->oj...", w, a)
        b = t["b1.weight"].reshape(w.shape[0], r) @ t["b2.weight"].reshape(r, -1)
        return w + RATIO * (inner + b.reshape(w.shape)) * rank_scale(r)
    if "hada_w1_a" in t:
        d = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * rank_scale(t["hada_w1_b"].shape[0])
        return w + RATIO * d.reshape(w.shape)
    if "lokr_w1" in t:
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        scale = 1.0 if "lokr_w2" in t else rank_scale(t["lokr_w2_b"].shape[0])
        w1 = t["lokr_w1"].reshape(*t["lokr_w1"].shape, *[1] * (w2.dim() - 2))
        return w + RATIO * (torch.kron(w1, w2) * scale).reshape(w.shape)
    r = t["lora_down.weight"].shape[0]
    d = (t["lora_up.weight"].reshape(w.shape[0], r) @ t["lora_down.weight"].reshape(r, -1)) * rank_scale(r)
    if "dora_scale" not in t:
        return w + RATIO * d.reshape(w.shape)
    # LyCORIS' DoRA (wd_on_out=True): norm per output row of W + dW, blended at the multiplier
    merged = flat + d
    scale = t["dora_scale"].reshape(-1, 1) / (merged.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps)
    return (merged * (RATIO * (scale - 1) + 1)).reshape(w.shape)


def module_key(name, state):
    path = name.removeprefix("lora_unet_")
    return next(k for k in state if k.endswith(".weight") and k[:-len(".weight")].replace(".", "_") == path)


@pytest.mark.parametrize("algo", list(ALGOS))
def test_every_tool_on_a_file_of_each_algorithm(tiny, tmp_path, algo):
    path = tmp_path / f"{algo}.safetensors"
    base = random_file(tiny, path, ALGOS[algo])
    tensors = load_file(str(path))
    modules = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        modules.setdefault(name, {})[suffix] = value
    if algo == "norm":
        modules = {n: t for n, t in modules.items() if "w_norm" in t}
        assert modules

    # merge into a model: every weight (and a norm layer's bias) as the formula says
    out = tmp_path / "merged.safetensors"
    merge_into_model(tiny, [f"{path}:{RATIO}"], out)
    merged, before = load_models(out, config_dir=tiny).unet.state_dict(), base.unet.state_dict()
    for name, t in modules.items():
        key = module_key(name, before)
        if "w_norm" in t:
            expected = before[key] + RATIO * t["w_norm"]
            bias = key.removesuffix(".weight") + ".bias"
            torch.testing.assert_close(merged[bias], before[bias] + RATIO * t["b_norm"], rtol=0, atol=1e-6)
        else:
            expected = expected_update(t, before[key])
        assert (expected - before[key]).abs().max() > 1e-4, key  # the module changes something
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=3e-6, msg=key)
    # ... and what our own loader computes from the file (layer merge) is the same model
    reloaded = load_models(tiny)
    network = load_network(path, reloaded.unet, None, multiplier=RATIO)
    network.merge()
    for key, value in reloaded.unet.state_dict().items():
        if ".lora" not in key:
            torch.testing.assert_close(value, merged[key], rtol=0, atol=3e-6, msg=key)
    network.remove()

    # inspect: every module, its algorithm; a norm where the file alone determines the update
    info = inspect_lora(path)
    assert len(info["modules"]) == len({k.partition(".")[0] for k in tensors})
    assert format_report(info, show_modules=True)
    norms = [r["norm"] for r in info["modules"].values()]
    assert all(n is None for n in norms) if algo in ("ia3", "glora") else all(n > 0 for n in norms)

    # LoRA + LoRA and resize: only for up @ down pairs; the others are refused, naming the file
    if algo == "lora":
        merge_loras([str(path), str(path)], tmp_path / "ab.safetensors")
        resize_lora(str(path), tmp_path / "r2.safetensors", rank=2)
    else:
        for call in (lambda: merge_loras([str(path), str(path)], tmp_path / "ab.safetensors"),
                     lambda: resize_lora(str(path), tmp_path / "r2.safetensors", rank=2)):
            with pytest.raises(ModelToolError, match=rf"{path.name} holds .*no up @ down pair"):
                call()

    # extract from the merged model: the change back, as a LoRA, at full rank
    if algo in ("ia3", "glora"):
        report = extract_lora(tiny, out, tmp_path / "x.safetensors", rank=4096, conv_rank=4096, config_dir=tiny)
        assert report and max(e for _, e in report.values()) < 1e-2


def comfyui_weight_decompose(dora_scale, weight, lora_diff, alpha, strength):
    """ComfyUI's comfy/weight_adapter/base.py weight_decompose (commit 14c2085), as it computes it: the norm of
    W + alpha * dW taken per INPUT column (weight.transpose(0, 1)), whatever dora_scale's shape."""
    weight = weight.clone()
    calc = weight + lora_diff * alpha
    norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
    calc = calc * (dora_scale / norm)
    return weight + strength * (calc - weight) if strength != 1.0 else calc


@pytest.mark.parametrize("wd_on_output", [True, False])
def test_dora_files_in_comfyui(tiny, tmp_path, wd_on_output):
    """Our per-output DoRA files (LyCORIS' default) mean something else in ComfyUI, which normalises per input
    column; files made with wd_on_output=False ([1, in, ...] dora_scale) mean the same in ComfyUI and here."""
    path = tmp_path / "dora.safetensors"
    base = random_file(tiny, path, dict(algo="lora", dora_wd=True, wd_on_output=wd_on_output,
                                        include=["in_layers", "to_q"]))
    tensors = load_file(str(path))
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    network = load_network(path, base.unet, None)
    network.merge()
    ours = base.unet.state_dict()
    worst = 0.0
    for name in {k.partition(".")[0] for k in tensors}:
        t = {s: tensors[f"{name}.{s}"] for s in ("lora_up.weight", "lora_down.weight", "alpha", "dora_scale")}
        key = module_key(name, before)
        w = before[key]
        r = t["lora_down.weight"].shape[0]
        diff = (t["lora_up.weight"].flatten(1) @ t["lora_down.weight"].flatten(1)).reshape(w.shape)
        assert t["dora_scale"].shape[0 if wd_on_output else 1] == w.shape[0 if wd_on_output else 1]
        comfy = comfyui_weight_decompose(t["dora_scale"], w, diff, float(t["alpha"]) / r, 1.0)
        change = (ours[key] - w).abs().max()
        assert change > 1e-3
        if wd_on_output:
            worst = max(worst, float((comfy - ours[key]).abs().max() / change))
        else:
            torch.testing.assert_close(ours[key], comfy, rtol=0, atol=1e-5, msg=key)
    if wd_on_output:
        assert worst > 0.05  # the documented difference (docs/format.md): ComfyUI reads the other axis
    network.remove()

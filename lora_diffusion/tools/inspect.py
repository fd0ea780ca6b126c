"""Show what a LoRA file holds: training metadata, dataset tags, each module's rank/alpha/algorithm, the size of
its update per block, and which loaders read it.

    lora-diffusion inspect my_lora.safetensors [--modules] [--json]

The per-block numbers are Frobenius norms of the updates alpha/rank * up @ down (computed from the factors,
without forming full matrices), summed in quadrature over the modules of the block; iA3 and GLoRA modules, whose
update is a function of the base weight (not in the file), have no norm here (None in --json).
"""

import json
import re
from collections import Counter
from dataclasses import replace

from lora_diffusion.core.adapters import ALGORITHMS
from lora_diffusion.core.kohya import read_lora_file

from .model_files import factored_svd, is_sdxl_lora, module_delta, read_loras

TRAINING_KEYS = ("ss_output_name", "ss_sd_model_name", "ss_base_model_version", "ss_v2", "ss_network_module",
                 "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_resolution", "ss_num_train_images",
                 "ss_num_reg_images", "ss_num_epochs", "ss_max_train_steps", "ss_steps", "ss_learning_rate",
                 "ss_unet_lr", "ss_text_encoder_lr", "ss_lr_scheduler", "ss_optimizer", "ss_mixed_precision",
                 "ss_clip_skip", "ss_noise_offset", "ss_seed", "ss_training_started_at", "ss_training_comment",
                 "modelspec.architecture", "modelspec.title")


def block_of(name):
    """lora_unet_down_blocks_1_attentions_0_... -> unet down_blocks.1 (SDXL's lora_unet_input_blocks_4_1_... ->
    unet input_blocks.4); lora_te_..._layers_5_... -> text_encoder layer 5 (lora_te2_...: text_encoder_2)."""
    if m := re.match(r"lora_unet_(down_blocks|up_blocks|input_blocks|output_blocks)_(\d+)_", name):
        return f"unet {m[1]}.{m[2]}"
    if m := re.match(r"lora_unet_(mid_block|middle_block)_", name):
        return f"unet {m[1]}"
    if m := re.search(r"_layers_(\d+)_", name):
        return f"{'text_encoder_2' if name.startswith('lora_te2_') else 'text_encoder'} layer {int(m[1]):2d}"
    return name.split("_")[1]


def algorithm_of(weights):
    return weights.label


def loaders(modules, metadata, embeddings):
    """Which clients load this file, by what is in it (read_lora_file has refused formats nobody here reads)."""
    lycoris = sorted({w.label for w in modules.values()} - {"LoRA", "LoCon"})
    if lycoris:
        kinds = ", ".join(lycoris)
        dora_only = all(k.startswith("DoRA Lo") and k[5:] in ("RA", "Con") for k in lycoris)
        return {
            "kohya sd-scripts": f"with the lycoris-lora package (--network_module lycoris.kohya): {kinds}",
            "ComfyUI": f"yes: LoraLoader reads LyCORIS keys ({kinds})",
            "AUTOMATIC1111 / Forge": f"yes: the built-in Lora extension reads LyCORIS keys ({kinds})",
            "diffusers": ("loads, but its DoRA (peft's) gives other outputs than LyCORIS'" if dora_only else
                          "no: load_lora_weights (0.42) refuses hada_*/lokr_* keys"),
            "lora_diffusion": "yes: load_network / generate --lora / merge --model",
        }
    has_conv = any(algorithm_of(w) == "LoCon" for w in modules.values())
    has_te = any(n.startswith("lora_te") for n in modules)
    what = "LoCon (3x3 convs)" if has_conv else "plain LoRA"
    notes = {
        "kohya sd-scripts": f"yes: {what} in kohya's own key format (networks/lora.py)",
        "ComfyUI": f"yes: LoraLoader reads kohya keys, {what} included",
        "AUTOMATIC1111 / Forge": f"yes: the built-in Lora extension (A1111 >= 1.5) reads {what}",
        "diffusers": f"yes: pipe.load_lora_weights converts kohya keys ({what}"
                     + (", text encoder included" if has_te else "") + ")",
        "lora_diffusion": "yes: load_network / generate --lora",
    }
    if has_te and not any(n.startswith("lora_te") and n.endswith("out_proj") for n in modules):
        notes["diffusers"] = ("no: load_lora_weights (0.42) raises 'Could not automatically infer state dict type' "
                              "for a text-encoder LoRA without any out_proj module")
    if embeddings:
        notes["AUTOMATIC1111 / Forge"] += f"; also the bundled embedding(s) {', '.join(sorted(embeddings))}"
        notes["diffusers"] += "; the bundled embeddings are not loaded by load_lora_weights"
    if is_sdxl_lora(modules, metadata):
        notes["note"] = "made for an SDXL base: it loads only with an SDXL model (diffusers: StableDiffusionXLPipeline)"
    elif metadata.get("ss_v2") == "True" or "v2" in metadata.get("ss_base_model_version", ""):
        notes["note"] = "made for an SD2.x base: it loads only with an SD2.x model"
    return notes


def inspect_lora(path):
    """A dict: metadata, training settings, tag frequencies, modules, blocks, loaders."""
    (path, _, modules, metadata), = read_loras([path])
    rows, blocks = {}, {}
    for name, w in sorted(modules.items()):
        if w.algo == "lora":
            _, s, _ = factored_svd(w.up.flatten(1), w.down.flatten(1))
            norm = float(s.square().sum().sqrt()) * w.alpha / w.rank
            shape = [w.up.shape[0], *w.down.shape[1:]]
        elif not ALGORITHMS[w.algo].delta_depends_on_base:
            # LoHa/LoKr/norm: the norm of the full update (DoRA: of its direction update, without the base weight)
            delta = module_delta(replace(w, dora_scale=None))
            norm, shape = float(delta.norm()), list(delta.shape)
        else:  # iA3, GLoRA: the update is a function of the base weight, which a LoRA file does not hold
            norm, shape = None, None
        rows[name] = {"rank": w.rank, "alpha": w.alpha, "algorithm": algorithm_of(w), "norm": norm, "shape": shape}
        if norm is not None:
            blocks[block_of(name)] = blocks.get(block_of(name), 0.0) + norm ** 2
    try:
        tags = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except json.JSONDecodeError:
        tags = {}
    embeddings = read_lora_file(path, warn_embeddings=False)[0].embeddings
    return {
        "file": str(path),
        "training": {k: metadata[k] for k in TRAINING_KEYS if k in metadata},
        "tags": {folder: dict(Counter(counts).most_common()) for folder, counts in tags.items()
                 if isinstance(counts, dict)},
        "modules": rows,
        "blocks": {block: total ** 0.5 for block, total in sorted(blocks.items())},
        "algorithms": dict(Counter(r["algorithm"] for r in rows.values())),
        "ranks": dict(Counter(r["rank"] for r in rows.values())),
        "alphas": dict(Counter(r["alpha"] for r in rows.values())),
        "embeddings": sorted(embeddings),
        "loaders": loaders(modules, metadata, embeddings),
    }


def format_report(info, show_modules=False, top_tags=20):
    lines = [f"{info['file']}"]
    counts = ", ".join(f"{n} {a}" for a, n in info["algorithms"].items())
    lines.append(f"  {len(info['modules'])} modules ({counts}); ranks {info['ranks']}; alphas {info['alphas']}")
    if info["training"]:
        lines.append("training:")
        lines += [f"  {k}: {v}" for k, v in info["training"].items()]
    for folder, tags in info["tags"].items():
        shown = ", ".join(f"{t} ({n})" for t, n in list(tags.items())[:top_tags])
        lines.append(f"tags in {folder}: {shown}{' ...' if len(tags) > top_tags else ''}")
    lines.append("update norm per block:")
    lines += [f"  {block:24s} {norm:10.4f}" for block, norm in info["blocks"].items()]
    if show_modules:
        lines.append("modules:")
        lines += [f"  {n:80s} {r['algorithm']:5s} rank {r['rank']:3d} alpha {r['alpha']:g} norm "
                  + ("(depends on the base weight)" if r["norm"] is None else f"{r['norm']:.4f}")
                  for n, r in info["modules"].items()]
    if info["embeddings"]:
        lines.append(f"bundled embeddings: {', '.join(info['embeddings'])}")
    lines.append("loaders:")
    lines += [f"  {k}: {v}" for k, v in info["loaders"].items()]
    return "\n".join(lines)


def add_arguments(parser):
    parser.add_argument("lora", help="a kohya-format LoRA/LoCon .safetensors")
    parser.add_argument("--modules", action="store_true", help="list every module")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args):
    info = inspect_lora(args.lora)
    print(json.dumps(info, indent=2) if args.json else format_report(info, args.modules))
    return 0


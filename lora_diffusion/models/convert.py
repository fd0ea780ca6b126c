"""The original (CompVis / Stability) single-file layout of SD1.x/2.x (and SDXL's, which sdxl.py recognises):
recognising it, and renaming its keys to diffusers' names and back.

    names = unet_names(reader.names, layers_per_block=2)   # {original key: [(diffusers key, chunk or None)] or None}
"""

import re

from .checkpoint import ModelLoadError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD1.x: OpenAI CLIP ViT-L/14 in transformers' layout
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD2.x: OpenCLIP ViT-H/14 in open_clip's layout
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."  # SDXL: CLIP ViT-L in transformers' layout
SDXL_OPEN_CLIP_G_PREFIX = "conditioner.embedders.1.model."  # SDXL: OpenCLIP bigG in open_clip's layout
# stored as used, x @ P: the transpose of CLIPTextModelWithProjection's text_projection.weight
TRANSPOSED_KEYS = frozenset({SDXL_OPEN_CLIP_G_PREFIX + "text_projection"})
SD2_CROSS_ATTENTION_KEY = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def check_is_sd_checkpoint(path, names):
    has = lambda prefix: any(n.startswith(prefix) for n in names)  # noqa: E731
    parts = {"U-Net": has(UNET_PREFIX), "VAE": has(VAE_PREFIX),
             "text encoder": has(CLIP_PREFIX) or has(OPEN_CLIP_PREFIX)}
    if all(parts.values()):
        return
    if any(n.startswith(("lora_unet_", "lora_te_")) for n in names):
        found = "it looks like a LoRA file, not a base model"
    elif has("conditioner.embedders."):
        found = "it looks like an SDXL checkpoint, which is not supported"
    elif any(parts.values()):
        found = "missing: " + ", ".join(p for p, ok in parts.items() if not ok)
    else:
        found = "found keys such as " + ", ".join(sorted(names)[:3]) if names else "it holds no tensors"
    raise ModelLoadError(
        f"{path} is not a recognised SD1.x/2.x checkpoint ({found}); expected keys starting with {UNET_PREFIX} "
        f"(U-Net), {VAE_PREFIX} (VAE) and {CLIP_PREFIX} (SD1.x CLIP) or {OPEN_CLIP_PREFIX} (SD2.x OpenCLIP)"
    )


def detect_v2(reader):
    if any(n.startswith(OPEN_CLIP_PREFIX) for n in reader.names):
        return True
    if SD2_CROSS_ATTENTION_KEY in reader.names:
        return reader.get(SD2_CROSS_ATTENTION_KEY).shape[1] == 1024
    return False


# Key names: original layout -> diffusers layout. Each maps the keys under one prefix; a key that has no place
# maps to None (reported as unexpected); keys known to carry nothing we need are left out.

UNET_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
               ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut")]


def replace_all(text, pairs):
    for old, new in pairs:
        text = text.replace(old, new)
    return text


UNET_FIXED = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
              "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}  # SDXL's
UNET_MIDDLE = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}


def unet_name(key, layers_per_block):
    """One U-Net key (without prefix) in diffusers' naming, or None. Input/output blocks are numbered flat in the
    original: per resolution `layers_per_block` res(+attn) blocks then one down/up-sampler."""
    per_level = layers_per_block + 1
    head, _, leaf = key.rpartition(".")
    if head in UNET_FIXED:
        return f"{UNET_FIXED[head]}.{leaf}"
    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d)\.(.+)", key):
        i, j, rest = int(m[1]) - 1, m[2], m[3]
        level, layer = divmod(i, per_level)
        if i < 0:
            return None
        if layer == layers_per_block:
            if j == "0" and rest.startswith("op."):
                return f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}"
            return None
        if j == "0":
            return f"down_blocks.{level}.resnets.{layer}.{replace_all(rest, UNET_RESNET)}"
        return f"down_blocks.{level}.attentions.{layer}.{rest}" if j == "1" else None
    if m := re.fullmatch(r"middle_block\.(\d)\.(.+)", key):
        j, rest = m[1], m[2]
        mid = UNET_MIDDLE.get(j)
        return mid and f"mid_block.{mid}.{replace_all(rest, UNET_RESNET) if j != '1' else rest}"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.(\d)\.(.+)", key):
        level, layer = divmod(int(m[1]), per_level)
        j, rest = m[2], m[3]
        if j == "0":
            return f"up_blocks.{level}.resnets.{layer}.{replace_all(rest, UNET_RESNET)}"
        if rest.startswith("conv."):  # the upsampler: slot 1 in blocks without attention, else slot 2
            return f"up_blocks.{level}.upsamplers.0.conv.{rest[5:]}"
        return f"up_blocks.{level}.attentions.{layer}.{rest}" if j == "1" else None
    return None


def unet_names(names, layers_per_block):
    return {n: wrap(unet_name(n[len(UNET_PREFIX):], layers_per_block)) for n in names if n.startswith(UNET_PREFIX)}


VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def vae_name(key, num_levels):
    """One VAE key (without prefix) in diffusers' naming, or None. The original decoder counts its levels from
    the lowest resolution up (up.3 runs first), diffusers in running order."""
    key = key.replace("nin_shortcut", "conv_shortcut")
    if m := re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)", key):
        return f"{m[1]}.{'conv_norm_out' if m[2] == 'norm_out' else m[2]}.{m[3]}"
    if re.fullmatch(r"(post_)?quant_conv\.(weight|bias)", key):
        return key
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)", key):
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(.+)", key):
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)", key):
        return f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.resnets.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(.+)", key):
        return f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.+)", key):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{m[3]}"
    if (m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)", key)) and m[2] in VAE_ATTENTION:
        return f"{m[1]}.mid_block.attentions.0.{VAE_ATTENTION[m[2]]}.{m[3]}"
    return None


def vae_names(names, num_levels):
    return {
        n: wrap(vae_name(n[len(VAE_PREFIX):], num_levels))
        for n in names
        if n.startswith(VAE_PREFIX) and not n.startswith(VAE_PREFIX + "loss.")  # training-loss weights, unused
    }


OPEN_CLIP_LAYER = [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                   ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]
OPEN_CLIP_FIXED = {"token_embedding.weight": "embeddings.token_embedding.weight",
                   "positional_embedding": "embeddings.position_embedding.weight",
                   "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
OPEN_CLIP_UNUSED = {"text_projection", "logit_scale", "attn_mask"}  # not part of a CLIPTextModel


def clip_names(names, nested, num_layers, *, clip_prefix=CLIP_PREFIX, open_clip_prefix=OPEN_CLIP_PREFIX,
               projection=False):
    """Text-encoder keys. SD1.x stores transformers' CLIPTextModel (with or without the `text_model.` level);
    SD2.x stores open_clip's text tower, whose fused q/k/v is split in three, and whose last block SD2 skips
    (it uses the penultimate layer), so diffusers' config has one layer fewer. SDXL stores both, under other
    prefixes (sdxl.py passes them; None skips a kind); with `projection`, open_clip's `text_projection` [width,
    proj] goes to CLIPTextModelWithProjection's `text_projection.weight` (the caller transposes it)."""
    level = "text_model." if nested else ""
    result = {}
    for n in names:
        if clip_prefix and n.startswith(clip_prefix):
            key = n[len(clip_prefix):].removeprefix("text_model.")
            if key != "embeddings.position_ids":  # a buffer, rebuilt by the model
                result[n] = wrap(level + key)
        elif open_clip_prefix and n.startswith(open_clip_prefix):
            key = n[len(open_clip_prefix):]
            if projection and key == "text_projection":
                result[n] = wrap("text_projection.weight")
                continue
            if key in OPEN_CLIP_UNUSED or key.startswith("visual."):
                continue
            if m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key):
                index, rest = int(m[1]), m[2]
                if index == num_layers:
                    continue
                layer = f"{level}encoder.layers.{index}."
                if m := re.fullmatch(r"attn\.in_proj_(weight|bias)", rest):
                    result[n] = [(f"{layer}self_attn.{q}_proj.{m[1]}", chunk) for chunk, q in enumerate("qkv")]
                else:
                    result[n] = wrap(layer + replace_all(rest, OPEN_CLIP_LAYER))
                continue
            result[n] = wrap(OPEN_CLIP_FIXED.get(key) and level + OPEN_CLIP_FIXED[key])
    return result


def wrap(target):
    return None if target is None else [(target, None)]


# Key names: diffusers layout -> original layout, for writing single files. Each inverse is built from the tables
# above and checked against the forward mapping: original_names() refuses any key the forward map would not send
# back to where it came from, so the two directions cannot drift apart.


def inverse(pairs):
    return [(new, old) for old, new in pairs]


def unet_original_name(key, layers_per_block, up_has_attention):
    """One diffusers U-Net key -> its original key (without prefix), or None."""
    per_level = layers_per_block + 1
    head, _, leaf = key.rpartition(".")
    fixed = {new: old for old, new in UNET_FIXED.items()}
    if head in fixed:
        return f"{fixed[head]}.{leaf}"
    resnet = lambda rest: replace_all(rest, inverse(UNET_RESNET))  # noqa: E731
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, layer = int(m[2]), int(m[4])
        index = 1 + level * per_level + layer if m[1] == "down" else level * per_level + layer
        block = "input_blocks" if m[1] == "down" else "output_blocks"
        return f"{block}.{index}.0.{resnet(m[5])}" if m[3] == "resnets" else f"{block}.{index}.1.{m[5]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * per_level + layers_per_block}.0.op.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        level = int(m[1])
        return f"output_blocks.{level * per_level + layers_per_block}.{2 if up_has_attention[level] else 1}.conv.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets\.\d|attentions\.0)\.(.+)", key):
        slot = {new: old for old, new in UNET_MIDDLE.items()}.get(m[1])
        return slot and f"middle_block.{slot}.{m[2] if slot == '1' else resnet(m[2])}"
    return None


def vae_original_name(key, num_levels):
    """One diffusers VAE key -> its original key (without prefix), or None."""
    key = key.replace("conv_shortcut", "nin_shortcut")
    if m := re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(weight|bias)", key):
        return f"{m[1]}.{'norm_out' if m[2] == 'conv_norm_out' else m[2]}.{m[3]}"
    if re.fullmatch(r"(post_)?quant_conv\.(weight|bias)", key):
        return key
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    attention = {new: old for old, new in VAE_ATTENTION.items()}
    if (m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+(?:\.0)?)\.(weight|bias)", key)) \
            and m[2] in attention:
        return f"{m[1]}.mid.attn_1.{attention[m[2]]}.{m[3]}"
    return None


def clip_original_names(keys, open_clip, *, prefix=None):
    """{original key: [(diffusers key, chunk)]} for text-encoder keys (with or without `text_model.`). SD2's
    open_clip fuses q/k/v into one in_proj: its three diffusers keys are its chunks 0, 1, 2. `prefix` defaults to
    SD1's / SD2's; SDXL's second encoder's `text_projection.weight` becomes open_clip's (transposed) projection."""
    prefix = prefix or (OPEN_CLIP_PREFIX if open_clip else CLIP_PREFIX)
    result = {}
    for key in keys:
        short = key.removeprefix("text_model.")
        if short == "embeddings.position_ids":
            continue
        if not open_clip:
            result[prefix + "text_model." + short] = [(key, None)]
            continue
        fixed = {new: old for old, new in OPEN_CLIP_FIXED.items()}
        if short in fixed:
            result[prefix + fixed[short]] = [(key, None)]
        elif short == "text_projection.weight":
            result[prefix + "text_projection"] = [(key, None)]
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", short):
            targets = result.setdefault(f"{prefix}transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", [])
            targets.append((key, "qkv".index(m[2])))
            targets.sort(key=lambda target: target[1])
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", short):
            result[f"{prefix}transformer.resblocks.{m[1]}.{replace_all(m[2], inverse(OPEN_CLIP_LAYER))}"] = \
                [(key, None)]
        else:
            result[key] = None
    return result


def original_names(unet_keys, vae_keys, text_encoder_keys, *, layers_per_block, up_has_attention, vae_levels,
                   open_clip, text_encoder_2_keys=None):
    """{original key: [(part, diffusers key, chunk or None)]} for a whole model, the inverse of unet_names,
    vae_names and clip_names. With `text_encoder_2_keys`, an SDXL model: CLIP ViT-L and OpenCLIP bigG under
    SDXL's prefixes. Raises ModelLoadError for a diffusers key with no original place."""
    result, unplaced = {}, []
    for part, keys, name in (
            ("unet", unet_keys, lambda k: unet_original_name(k, layers_per_block, up_has_attention)),
            ("vae", vae_keys, lambda k: vae_original_name(k, vae_levels))):
        prefix = UNET_PREFIX if part == "unet" else VAE_PREFIX
        forward = unet_names if part == "unet" else vae_names
        reverse = {}
        for key in keys:
            original = name(key)
            if original is None:
                unplaced.append(f"{part}.{key}")
            else:
                reverse[prefix + original] = [(key, None)]
        arg = layers_per_block if part == "unet" else vae_levels
        for original, targets in forward(list(reverse), arg).items():  # the forward map must send each key back
            if targets != reverse[original]:
                unplaced.append(f"{part}.{reverse[original][0][0]}")
        result.update({o: [(part, k, c) for k, c in targets] for o, targets in reverse.items()})
    encoders = [("text_encoder", text_encoder_keys, open_clip, {})] if text_encoder_2_keys is None else [
        ("text_encoder", text_encoder_keys, False, {"clip_prefix": SDXL_CLIP_L_PREFIX, "open_clip_prefix": None}),
        ("text_encoder_2", text_encoder_2_keys, True,
         {"clip_prefix": None, "open_clip_prefix": SDXL_OPEN_CLIP_G_PREFIX, "projection": True})]
    for part, keys, is_open_clip, prefixes in encoders:
        te = clip_original_names(keys, is_open_clip,
                                 prefix=prefixes.get("open_clip_prefix" if is_open_clip else "clip_prefix"))
        nested = any(k.startswith("text_model.") for k in keys)
        layers = 1 + max([int(m[1]) for k in keys if (m := re.search(r"layers\.(\d+)\.", k))], default=-1)
        back = clip_names([o for o, t in te.items() if t is not None], nested, layers, **prefixes)
        for original, targets in te.items():
            if targets is None or back.get(original) != targets:
                unplaced.extend(f"{part}.{k}" for k, _ in targets or [(original, None)])
            else:
                result[original] = [(part, k, c) for k, c in targets]
    if unplaced:
        raise ModelLoadError(f"{len(unplaced)} diffusers key(s) have no place in the original SD layout "
                             f"(e.g. {', '.join(unplaced[:3])}); is this an SD1.x/2.x or SDXL model?")
    return result


def original_shape(key, shape):
    """The original VAE attention is made of 1x1 convolutions where diffusers has linear layers; SDXL's OpenCLIP
    projection is stored transposed."""
    if key in TRANSPOSED_KEYS:
        return tuple(reversed(shape))
    if key.startswith(VAE_PREFIX + "encoder.mid.attn_1.") or key.startswith(VAE_PREFIX + "decoder.mid.attn_1."):
        if key.endswith(".weight") and len(shape) == 2:
            return tuple(shape) + (1, 1)
    return tuple(shape)


def original_tensor(key, tensor):
    """A diffusers tensor as the original key `key` stores it (see original_shape)."""
    return tensor.T if key in TRANSPOSED_KEYS else tensor.reshape(original_shape(key, tensor.shape))

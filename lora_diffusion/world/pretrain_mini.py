"""Pretrain `builtin:mini` from scratch on the shapes world (lora_diffusion/world/scenes.py): VAE, CLIP text encoder and
an SD1.x-topology U-Net, written as a diffusers folder.

    lora-diffusion pretrain-mini                        # 87 min measured on 2 CPU cores; minutes on a GPU
    lora-diffusion pretrain-mini --vae_steps 2000 --steps 9000 --decoder_steps 3500  # the shipped schedule, ~2 h 15

Three stages, each resumable from its last checkpoint in --work_dir (run the same command again):
1. the VAE, on every shape of the world (the star too: like SD's VAE it is a general image codec);
2. the text encoder and U-Net together on the VAE's latents, never shown a star or a held-out colour pair,
   with an EMA of their weights. Captions are the world's sentences and tags, and empty for a share (which is
   also what classifier-free guidance needs);
3. the VAE decoder alone, the encoder frozen (as SD's ft-MSE decoder): sharper images from the same latents, so
   the U-Net stays valid. It can run beside stage 2 (`--stage decoder`).
Checkpoints are one safetensors file per stage with its step as JSON in the metadata (nothing pickled); loss curves
go to --work_dir/loss_*.csv.
`--init_from lora_diffusion/assets/mini --work_dir runs/more` continues training the shipped model (a new session,
a GPU). The folder (--out, default <work_dir>/model) is written in fp16 at the end, atomically, and judged on
held-out colour pairs (--work_dir/eval.json).
"""

import copy
import csv
import json
import math
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from lora_diffusion.cli import set_cpu_threads
from lora_diffusion.formats.io import atomic_write, build_folder_atomically
from lora_diffusion.models import declare_fp32_load, load_models, make_noise_scheduler, write_model_index
from lora_diffusion.models.tokenizer import load_clip_tokenizer, save_tokenizer

from . import quality
from . import scenes as world

RESOLUTION = 64
# The VAE sees every shape and colour pair, as SD's VAE saw every kind of image; only the denoiser has a held-out set.
ALL_PAIRS = world.color_pairs() + world.color_pairs(held_out=True)

TEXT_ENCODER_CONFIG = dict(
    hidden_size=64, intermediate_size=256, num_hidden_layers=12, num_attention_heads=4, max_position_embeddings=77,
    vocab_size=49408, projection_dim=64, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
    pad_token_id=49407,
)
VAE_CONFIG = dict(
    block_out_channels=[16, 32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=1, norm_num_groups=16,
    sample_size=RESOLUTION, in_channels=3, out_channels=3, act_fn="silu",
)
UNET_CONFIG = dict(  # SD1.x's blocks and module names at 1/10 of its width: kohya's targets give 192 + 72 modules
    block_out_channels=[32, 64, 128, 128], attention_head_dim=8, cross_attention_dim=64,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, layers_per_block=2, norm_num_groups=16,
    in_channels=4, out_channels=4, sample_size=RESOLUTION // 8, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
    downsample_padding=1, mid_block_scale_factor=1, norm_eps=1e-5, center_input_sample=False,
)
SCHEDULER_CONFIG = dict(  # SD's training schedule; DPM-Solver++ samples well in 20-30 steps
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
    prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="leading",
)


@dataclass
class PretrainSettings:
    out: str = ""  # the diffusers folder to write; default <work_dir>/model (never the shipped one unless asked)
    work_dir: str = "runs/pretrain-mini"
    init_from: str = ""  # a builtin:mini folder to continue from (its latent space kept): the VAE stage is skipped
    seed: int = 0
    vae_steps: int = 1500  # the defaults fit ~90 min of 2 CPU cores (docs/quality.md has the measured run)
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    steps: int = 6500
    decoder_steps: int = 1000
    decoder_lr: float = 5e-4
    batch_size: int = 32
    lr: float = 6e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    empty_caption_share: float = 0.1
    # Share of the denoiser's images that show two shapes side by side ("a red circle on the left and a blue square
    # on the right on a white background"): the multi-concept world; with it the judging also asks two-object
    # prompts. Continue the shipped model with it: --init_from lora_diffusion/assets/mini (docs/research.md).
    two_object_share: float = 0.0
    checkpoint_every: int = 250
    eval_every: int = 1000
    eval_images: int = 48


def build_models(seed):
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))
    vae = AutoencoderKL(**VAE_CONFIG)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    return text_encoder, vae, unet


# ---------------------------------------------------------------------------------------------------------------
# Data: a batch is a pure function of (seed, stage, step), so a resumed run sees the same batches.


def world_batch(seed, stage, step, batch_size, shapes, pairs, empty_share=0.0, two_object_share=0.0):
    """(images, captions) of one step. A two-object image takes its shapes from `shapes` and its colours from the
    whole palette (each shape's colour differs from the background); its caption is the two-object sentence. With
    no two-object share the batches are those of earlier versions (the same draws in the same order)."""
    rng = random.Random(f"{seed}-{stage}-{step}")

    def scene():
        if two_object_share > 0 and rng.random() < two_object_share:
            return world.sample_two_object_scene(rng, shapes=shapes)
        return world.sample_scene(rng, shapes=shapes, pairs=pairs)

    scenes = [scene() for _ in range(batch_size)]
    styles = ["empty" if rng.random() < empty_share else rng.choice(("sentence", "tags")) for _ in scenes]
    images, captions = [], []
    for scene, style in zip(scenes, styles):
        two = isinstance(scene, world.TwoObjectScene)
        render = world.render_two_objects if two else world.render
        images.append(to_tensor(render(scene, RESOLUTION)))
        captions.append("" if style == "empty" else world.two_object_caption(scene) if two else
                        world.caption(scene, style))
    return torch.stack(images), captions


def to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


class TokenCache:
    """Token ids per caption; the world has a few hundred distinct captions."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, captions):
        missing = [c for c in set(captions) if c not in self.cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            self.cache.update(zip(missing, ids))
        return torch.stack([self.cache[c] for c in captions])


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: one safetensors file per stage, the tensors and, in its metadata, the rest as JSON.


def save_checkpoint(path, modules, optimizer, info):
    """<path>/state.safetensors: the modules' and the optimizer's tensors, and `info` (step, ...) with the
    optimizer's param_groups as JSON in the file's metadata. One file written atomically, so a run killed at any
    moment leaves the previous checkpoint or this one, never the tensors of one step beside the info of another."""
    tensors = {f"{name}.{k}": v.detach().contiguous() for name, m in modules.items() for k, v in m.state_dict().items()}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optimizer.{index}.{key}"] = value.detach().reshape(value.shape).contiguous()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    metadata = {"info": json.dumps({**info, "param_groups": opt["param_groups"]})}
    atomic_write(path / "state.safetensors", lambda f: f.write(safetensors_bytes(tensors, metadata)))
    (path / "state.json").unlink(missing_ok=True)  # the second file of the old two-file layout


def has_checkpoint(path):
    return (Path(path) / "state.safetensors").is_file()


def read_checkpoint(path):
    """(info, tensors) of a stage's checkpoint, or None where there is none. Also reads the old layout, where
    state.json beside the tensors held the info, written second: a run stopped between the two writes left
    tensors a checkpoint ahead of it, which shows as an optimizer that took more steps than state.json counts
    (it can take fewer, never more); such a pair is refused rather than resumed out of step."""
    path = Path(path)
    file = path / "state.safetensors"
    if not file.is_file():
        return None
    with safe_open(file, "pt") as f:
        metadata = f.metadata() or {}
    tensors = load_file(file)
    if "info" in metadata:
        return json.loads(metadata["info"]), tensors
    legacy = path / "state.json"
    if not legacy.is_file():
        return None  # the old layout stopped before its first state.json: that run restarted the stage too
    info = json.loads(legacy.read_text())
    taken = max((int(v.item()) for k, v in tensors.items() if k.startswith("optimizer.") and k.endswith(".step")),
                default=0)
    if taken > info["step"]:
        raise ValueError(f"{path}: the optimizer in state.safetensors has taken {taken} steps but state.json says "
                         f"step {info['step']}: a run of an older pretrain-mini stopped between writing the two, and "
                         f"this stage cannot resume from them; delete {path} to redo the stage from its start")
    return info, tensors


def load_checkpoint(path, modules, optimizer):
    checkpoint = read_checkpoint(path)
    if checkpoint is None:
        return None
    info, tensors = checkpoint
    for name, module in modules.items():
        prefix = name + "."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    state = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, field = key.split(".", 2)
            state.setdefault(int(index), {})[field] = value
    optimizer.load_state_dict({"state": state, "param_groups": info.pop("param_groups")})
    return info


def lr_at(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def truncate_losses(path, start):
    """Drop rows after `start` (left by a run that stopped after its last checkpoint)."""
    path = Path(path)
    if path.exists():
        rows = list(csv.reader(path.open()))
        kept = rows[:1] + [r for r in rows[1:] if int(r[0]) <= start]
        with path.open("w", newline="") as f:
            csv.writer(f).writerows(kept)


def append_loss(path, step, loss, lr):
    new = not Path(path).exists()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["step", "loss", "lr"])
        writer.writerow([step, f"{loss:.6f}", f"{lr:.3e}"])


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: the VAE.


def edge_loss(reconstruction, images):
    """L1 between the images' horizontal and vertical differences: keeps edges (the star's points) sharp, where
    pixel losses alone settle for a blur."""
    def grads(x):
        return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]

    return sum(F.l1_loss(a, b) for a, b in zip(grads(reconstruction), grads(images)))


def reconstruction_loss(reconstruction, images):
    return F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images) + edge_loss(reconstruction, images)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_vae(vae, settings: PretrainSettings, work: Path):
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    info = load_checkpoint(work / "vae_state", {"vae": vae}, optimizer) or {"step": 0}
    start = info["step"]
    truncate_losses(work / "loss_vae.csv", start)
    vae.train()
    bar = tqdm(range(start, settings.vae_steps), initial=start, total=settings.vae_steps, desc="VAE", unit="step")
    for step in bar:
        lr = lr_at(step, settings.vae_steps, settings.vae_lr, settings.warmup_steps)
        set_lr(optimizer, lr)
        images, _ = world_batch(settings.seed, "vae", step, settings.vae_batch_size, world.SHAPES, ALL_PAIRS)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        rec = reconstruction_loss(reconstruction, images)
        loss = rec + 1e-6 * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{rec.item():.4f}")
        append_loss(work / "loss_vae.csv", step + 1, rec.item(), lr)
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.vae_steps:
            save_checkpoint(work / "vae_state", {"vae": vae}, optimizer, {"step": step + 1})
    vae.eval()
    if "scaling_factor" not in info:
        with torch.no_grad():
            images, _ = world_batch(settings.seed, "vae-scale", 0, 256, world.SHAPES, ALL_PAIRS)
            latents = vae.encode(images).latent_dist.sample()
        info["scaling_factor"] = round(1.0 / latents.std().item(), 5)
        save_checkpoint(work / "vae_state", {"vae": vae}, optimizer, {**info, "step": settings.vae_steps})
    vae.register_to_config(scaling_factor=info["scaling_factor"])
    return vae


def finetune_decoder(vae, settings: PretrainSettings, work: Path):
    """Stage 3: only the decoder learns; the latents it decodes come from the frozen encoder."""
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=settings.decoder_lr, weight_decay=0.0)
    info = load_checkpoint(work / "decoder_state", {"vae": vae}, optimizer) or {"step": 0}
    start = info["step"]
    truncate_losses(work / "loss_decoder.csv", start)
    vae.decoder.train()
    bar = tqdm(range(start, settings.decoder_steps), initial=start, total=settings.decoder_steps, desc="decoder",
               unit="step")
    for step in bar:
        lr = lr_at(step, settings.decoder_steps, settings.decoder_lr, settings.warmup_steps)
        set_lr(optimizer, lr)
        images, _ = world_batch(settings.seed, "decoder", step, settings.vae_batch_size, world.SHAPES, ALL_PAIRS)
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample()
        reconstruction = vae.decode(latents).sample
        loss = reconstruction_loss(reconstruction, images)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        append_loss(work / "loss_decoder.csv", step + 1, loss.item(), lr)
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.decoder_steps:
            save_checkpoint(work / "decoder_state", {"vae": vae}, optimizer, {"step": step + 1})
    return vae.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: text encoder and U-Net.


def train_denoiser(text_encoder, vae, unet, tokenizer, settings: PretrainSettings, work: Path):

    noise_scheduler = make_noise_scheduler()
    params = list(text_encoder.parameters()) + list(unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01)
    ema_te, ema_unet = copy.deepcopy(text_encoder).requires_grad_(False), copy.deepcopy(unet).requires_grad_(False)
    modules = {"text_encoder": text_encoder, "unet": unet, "ema_text_encoder": ema_te, "ema_unet": ema_unet}
    info = load_checkpoint(work / "denoiser_state", modules, optimizer) or {"step": 0, "evals": []}
    start = info["step"]
    truncate_losses(work / "loss_denoiser.csv", start)
    tokens = TokenCache(tokenizer)
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=settings.min_snr_gamma) / snr
    pairs = world.color_pairs()
    text_encoder.train(), unet.train()
    bar = tqdm(range(start, settings.steps), initial=start, total=settings.steps, desc="U-Net + text encoder",
               unit="step")
    for step in bar:
        lr = lr_at(step, settings.steps, settings.lr, settings.warmup_steps)
        set_lr(optimizer, lr)
        images, captions = world_batch(settings.seed, "denoiser", step, settings.batch_size, world.PRETRAIN_SHAPES,
                                       pairs, settings.empty_caption_share, settings.two_object_share)
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
        with torch.no_grad():
            moments = vae.encode(images).latent_dist
            latents = (moments.mean + moments.std * torch.randn(moments.mean.shape, generator=generator))
            latents = latents * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(tokens(captions))[0]
        prediction = unet(noisy, timesteps, hidden).sample
        loss = (F.mse_loss(prediction, noise, reduction="none").mean((1, 2, 3)) * weights[timesteps]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_te, text_encoder), (ema_unet, unet)):
                for e, p in zip(ema.parameters(), live.parameters()):
                    e.lerp_(p, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        append_loss(work / "loss_denoiser.csv", step + 1, loss.item(), lr)
        done = step + 1
        if done % settings.eval_every == 0 or done == settings.steps:
            accuracy = judge_model(tokenizer, ema_te, vae, ema_unet, n=settings.eval_images, steps=20)
            info["evals"].append({"step": done, **accuracy})
            tqdm.write(f"step {done}: judged on held-out colour pairs: {quality.fmt(accuracy)}")
            if settings.two_object_share > 0:
                two = judge_two_objects_model(tokenizer, ema_te, vae, ema_unet, n=settings.eval_images, steps=20)
                info["evals"][-1]["two_objects"] = two
                tqdm.write(f"step {done}: two-object prompts: {quality.fmt(two)}")
        if done % settings.checkpoint_every == 0 or done == settings.steps:
            save_checkpoint(work / "denoiser_state", modules, optimizer, {**info, "step": done})
    return ema_te, ema_unet, info


# ---------------------------------------------------------------------------------------------------------------
# Judging during training.


TWO_OBJECT_KEYS = ("left", "right", "background", "all")  # the two-object judge's shares the run reports


@contextmanager
def judged_parts(tokenizer, text_encoder, vae, unet):
    """The models as a pipeline's parts, in eval mode for the judging and back in their own mode after."""
    was_training = text_encoder.training, unet.training
    text_encoder.eval(), unet.eval()
    try:
        yield SimpleNamespace(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                              noise_scheduler=DPMSolverMultistepScheduler(**SCHEDULER_CONFIG))
    finally:
        text_encoder.train(was_training[0]), unet.train(was_training[1])


@torch.no_grad()
def judge_model(tokenizer, text_encoder, vae, unet, n=48, steps=30):
    with judged_parts(tokenizer, text_encoder, vae, unet) as parts:
        pipe = quality.world_pipeline(parts, DPMSolverMultistepScheduler(**SCHEDULER_CONFIG))
        accuracy, _ = quality.judge_prompts(pipe, quality.held_out_scenes(n), steps=steps)
    return accuracy


@torch.no_grad()
def judge_two_objects_model(tokenizer, text_encoder, vae, unet, n=48, steps=30):
    """The two-object judge's shares (TWO_OBJECT_KEYS) on n two-object prompts (not regional)."""
    with judged_parts(tokenizer, text_encoder, vae, unet) as parts:
        accuracy, _ = quality.judge_two_object_prompts(parts, quality.two_object_scenes(n), regional=False,
                                                       steps=steps)
    return {key: accuracy[key] for key in TWO_OBJECT_KEYS}


# ---------------------------------------------------------------------------------------------------------------
# The folder.


def write_folder(out, tokenizer, text_encoder, vae, unet):
    """The diffusers folder, fp16 safetensors, built beside `out` and renamed into place."""

    def fill(staging):
        for name, module in (("text_encoder", text_encoder), ("vae", vae), ("unet", unet)):
            half = torch.nn.Module.to(copy.deepcopy(module), torch.float16)
            half.save_pretrained(staging / name, safe_serialization=True)
        declare_fp32_load(staging / "text_encoder" / "config.json")  # fp16 weights, loaded as fp32 like the U-Net
        save_tokenizer(tokenizer, staging / "tokenizer")
        DPMSolverMultistepScheduler(**SCHEDULER_CONFIG).save_pretrained(staging / "scheduler")
        write_model_index(staging, "DPMSolverMultistepScheduler")

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    build_folder_atomically(out, fill)
    return out


def warm_start(folder, text_encoder, vae, unet, settings, work):
    """Continue from a written folder (a later session, another machine) rather than from scratch: its weights
    start every stage that has no checkpoint yet, and its VAE counts as trained, so the latents stay the same."""

    shipped = load_models(folder)
    text_encoder.load_state_dict(shipped.text_encoder.state_dict())
    unet.load_state_dict(shipped.unet.state_dict())
    vae.load_state_dict(shipped.vae.state_dict())
    if not has_checkpoint(work / "vae_state"):
        info = {"step": settings.vae_steps, "scaling_factor": shipped.vae.config.scaling_factor,
                "init_from": str(folder)}
        save_checkpoint(work / "vae_state", {"vae": vae}, torch.optim.AdamW(vae.parameters()), info)


def pretrain(settings: PretrainSettings, stage="all"):
    work = Path(settings.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "settings.json").write_text(json.dumps(asdict(settings), indent=1))
    start = time.time()
    tokenizer = load_clip_tokenizer(v2=False)
    text_encoder, vae, unet = build_models(settings.seed)
    if settings.init_from:
        warm_start(Path(settings.init_from), text_encoder, vae, unet, settings, work)
    vae = train_vae(vae, settings, work).requires_grad_(False)
    if stage == "decoder":
        finetune_decoder(vae, settings, work)
        return None, None
    ema_te, ema_unet, info = train_denoiser(text_encoder, vae, unet, tokenizer, settings, work)
    vae = finetune_decoder(vae, settings, work)
    out = write_folder(settings.out or work / "model", tokenizer, ema_te, vae, ema_unet)
    print(f"wrote {out} in {(time.time() - start) / 60:.1f} min of this run; judging it ...")

    mini = load_models(out)
    scheduler = DPMSolverMultistepScheduler.from_pretrained(out, subfolder="scheduler")
    accuracy, images = quality.judge_prompts(quality.world_pipeline(mini, scheduler),
                                             quality.held_out_scenes(2 * settings.eval_images), steps=30)
    quality.grid(images[:48], columns=12).save(work / "held_out_samples.png")
    result = {"held_out_accuracy": accuracy, "evals": info["evals"], "settings": asdict(settings)}
    (work / "eval.json").write_text(json.dumps(result, indent=1))
    print(f"held-out colour pairs, {len(images)} images, 30 steps, guidance 5: {quality.fmt(accuracy)}")
    if settings.two_object_share > 0:
        for regional in (False, True):
            two, _ = quality.judge_two_object_prompts(mini, quality.two_object_scenes(2 * settings.eval_images),
                                                      regional=regional, steps=30)
            two = {key: two[key] for key in TWO_OBJECT_KEYS}
            result[f"two_objects{'_regional' if regional else ''}"] = two
            print(f"two-object prompts{' (regional)' if regional else ''}: {quality.fmt(two)}")
        (work / "eval.json").write_text(json.dumps(result, indent=1))
    return out, accuracy


def add_arguments(parser):
    for field, default in asdict(PretrainSettings()).items():
        parser.add_argument(f"--{field}", type=type(default), default=default)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: the cores not busy now, at least 1)")
    parser.add_argument("--stage", choices=["all", "decoder"], default="all",
                        help="decoder: only stage 3 (the VAE must be trained), e.g. beside a running stage 2")


def run(args) -> int:

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads}: expected an integer >= 1")
    set_cpu_threads(args.threads, "pretrain-mini")
    settings = PretrainSettings(**{k: v for k, v in vars(args).items() if k in PretrainSettings.__dataclass_fields__})
    pretrain(settings, args.stage)
    return 0

"""The baseline of bench_end_to_end.py: a short, faithful version of diffusers' examples/text_to_image/
train_text_to_image_lora.py (the loop users would otherwise run), on a kohya-layout image folder.

    python benchmarks/diffusers_style_train.py --pretrained_model_name_or_path DIR --train_data_dir PARENT \
        --resolution 256 --rank 16 --mixed_precision bf16 --max_train_steps 16 [--cache_latents]

As the example: every part loaded with from_pretrained in fp32, then cast to weight_dtype (unet, vae and text encoder);
unet.add_adapter(LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian", target_modules=...)); the LoRA parameters
cast to fp32 (the example does this for fp16; we do it for bf16 too, as our trainer keeps fp32 LoRA weights);
accelerator.prepare(unet, optimizer, dataloader) (its forward runs under autocast); AdamW; the VAE and the text
encoder run every step; MSE loss on the noise; grad-norm clipping at 1.0. --targets kohya (default, the same 192
modules as ours) or diffusers (to_q/k/v/out.0 only, the example's choice).
--cache_latents encodes each image once before the loop (not in the example; for a like-for-like comparison).
"""

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def read_images(parent: Path, resolution: int):
    """(pixel tensor in [-1, 1], caption) for every image under parent/<n>_<name>/: resize + center crop, as the
    example's transforms (Resize, CenterCrop, ToTensor, Normalize([0.5], [0.5]))."""
    import numpy as np
    from PIL import Image

    items = []
    for path in sorted(Path(parent).glob("*/*")):
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
            continue
        image = Image.open(path).convert("RGB")
        scale = resolution / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float() / 127.5 - 1
        caption_file = path.with_suffix(".txt")
        items.append((pixels, caption_file.read_text().strip() if caption_file.exists() else ""))
    return items


def baseline_arguments(description, resolution, max_train_steps):
    """The flags of both baseline loops (this one and diffusers_sdxl_style_train.py): bench_end_to_end passes the
    same ones to either."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--pretrained_model_name_or_path", required=True)
    p.add_argument("--train_data_dir", required=True)
    p.add_argument("--resolution", type=int, default=resolution)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", choices=["kohya", "diffusers"], default="kohya")
    p.add_argument("--mixed_precision", choices=list(DTYPES), default="bf16")
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--train_batch_size", type=int, default=1)
    p.add_argument("--max_train_steps", type=int, default=max_train_steps)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    return p


def add_unet_lora(unet, args, fp32=True):
    """unet.add_adapter(LoraConfig(...)) as the examples do; returns the LoRA parameters, cast to fp32 with fp32
    (diffusers.training_utils.cast_training_params)."""
    from peft import LoraConfig

    targets = common.KOHYA_UNET_REGEX if args.targets == "kohya" else common.DIFFUSERS_TARGETS
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=targets))
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    if fp32:
        for param in lora_layers:
            param.data = param.data.float()
    return lora_layers


def report_done(step, loop_s, first_step_s, loss):
    """The line bench_end_to_end.run_measured reads."""
    print(f"done: {step} steps in {loop_s:.1f}s (first step {first_step_s:.1f}s); loss {loss.item():.4f}")


def main(argv=None):
    p = baseline_arguments(__doc__.splitlines()[0], resolution=512, max_train_steps=16)
    p.add_argument("--lora_dtype", choices=["fp32", "weight"], default="fp32")
    p.add_argument("--cache_latents", action="store_true")
    p.add_argument("--output_dir", help="save the LoRA here as the example does (save_lora_weights)")
    p.add_argument("--save_every_n_steps", type=int, default=None)
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    wall_start = time.time()

    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not torch.cuda.is_available())
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device, weight_dtype = accelerator.device, DTYPES[args.mixed_precision]
    path = args.pretrained_model_name_or_path

    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
    unet.to(device, dtype=weight_dtype)
    vae.to(device, dtype=weight_dtype)
    text_encoder.to(device, dtype=weight_dtype)
    lora_layers = add_unet_lora(unet, args, fp32=args.lora_dtype == "fp32")
    optimizer = torch.optim.AdamW(lora_layers, lr=args.learning_rate)

    items = read_images(Path(args.train_data_dir), args.resolution)
    if not items:
        raise SystemExit(f"no images under {args.train_data_dir}")
    input_ids = tokenizer([c for _, c in items], max_length=tokenizer.model_max_length, padding="max_length",
                          truncation=True, return_tensors="pt").input_ids
    dataset = [{"pixel_values": pixels, "input_ids": ids} for (pixels, _), ids in zip(items, input_ids)]
    if args.cache_latents:
        with torch.no_grad():
            for example in dataset:
                pixels = example["pixel_values"][None].to(device, weight_dtype)
                example["latents"] = vae.encode(pixels).latent_dist.sample()[0]
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True, num_workers=0)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    print(f"loaded in {time.time() - wall_start:.1f}s; training {sum(p.numel() for p in lora_layers):,} LoRA "
          f"parameters ({lora_layers[0].dtype}) for {args.max_train_steps} steps on {device}", flush=True)

    unet.train()
    step, loop_start, first_step_s = 0, time.time(), None
    for _ in range(math.ceil(args.max_train_steps / len(loader))):
        for batch in loader:
            if "latents" in batch:
                latents = batch["latents"]
            else:
                latents = vae.encode(batch["pixel_values"].to(dtype=weight_dtype)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      device=latents.device).long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(lora_layers, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if args.output_dir and (step == args.max_train_steps or
                                    (args.save_every_n_steps and step % args.save_every_n_steps == 0)):
                save_lora(accelerator.unwrap_model(unet), Path(args.output_dir), step)
            if first_step_s is None:
                first_step_s = time.time() - loop_start
            if step >= args.max_train_steps:
                break
    report_done(step, time.time() - loop_start, first_step_s, loss)


def save_lora(unet, folder, step):
    """As the example: the peft state dict converted to diffusers' names, written by save_lora_weights."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True,
                                              weight_name=f"diffusers-{step:06d}.safetensors")


if __name__ == "__main__":
    main()

"""The SDXL baseline of bench_end_to_end.py (--family sdxl): a short, faithful version of the loop of diffusers'
examples/text_to_image/train_text_to_image_lora_sdxl.py, on a kohya-layout image folder.

    python benchmarks/diffusers_sdxl_style_train.py --pretrained_model_name_or_path DIR --train_data_dir PARENT \
        --resolution 512 --rank 16 --mixed_precision bf16 --max_train_steps 8

As the example: every part loaded with from_pretrained in fp32; the U-Net and both text encoders cast to the weight
dtype, the VAE kept in fp32 ("to avoid NaN losses", as the example does when no fp16-fixed VAE is given);
unet.add_adapter(LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian", target_modules=...)), the LoRA
parameters in fp32; accelerator.prepare(unet, optimizer, dataloader); per step: the VAE encodes the images (fp32),
both text encoders encode the captions (the penultimate hidden states of each, concatenated to 2048 wide; the
pooled, projected output of the second), the size/crop time ids (original size, crop top-left, target size), MSE on
the noise, grad-norm clipping at 1.0, AdamW. --targets kohya (default: the modules kohya's SDXL LoRA trains, as
ours) or diffusers (to_q/k/v/out.0, the example's choice).
"""

import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from diffusers_style_train import DTYPES, add_unet_lora, baseline_arguments, read_images, report_done  # noqa: E402


def encode_prompt(text_encoders, input_ids_list):
    """As the example's encode_prompt: hidden_states[-2] of each encoder side by side; the pooled output is the
    projected one of the last encoder (text_encoder_2)."""
    embeds = []
    for text_encoder, input_ids in zip(text_encoders, input_ids_list):
        out = text_encoder(input_ids, output_hidden_states=True, return_dict=False)
        pooled = out[0]
        embeds.append(out[-1][-2])
    return torch.cat(embeds, dim=-1), pooled


def main(argv=None):
    p = baseline_arguments(__doc__.splitlines()[0], resolution=1024, max_train_steps=8)
    p.add_argument("--gradient_checkpointing", action="store_true")
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    wall_start = time.time()

    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not torch.cuda.is_available())
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device, weight_dtype = accelerator.device, DTYPES[args.mixed_precision]
    path = args.pretrained_model_name_or_path

    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder=name) for name in ("tokenizer", "tokenizer_2")]
    text_encoder_one = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    text_encoder_two = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    for model in (unet, vae, text_encoder_one, text_encoder_two):
        model.requires_grad_(False)
    unet.to(device, dtype=weight_dtype)
    vae.to(device, dtype=torch.float32)
    text_encoder_one.to(device, dtype=weight_dtype)
    text_encoder_two.to(device, dtype=weight_dtype)
    lora_layers = add_unet_lora(unet, args)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(lora_layers, lr=args.learning_rate)

    items = read_images(Path(args.train_data_dir), args.resolution)
    if not items:
        raise SystemExit(f"no images under {args.train_data_dir}")
    captions = [c for _, c in items]
    ids = [t(captions, max_length=t.model_max_length, padding="max_length", truncation=True,
             return_tensors="pt").input_ids for t in tokenizers]
    dataset = [{"pixel_values": pixels, "input_ids_one": a, "input_ids_two": b,
                "original_sizes": torch.tensor([args.resolution, args.resolution]),
                "crop_top_lefts": torch.tensor([0, 0])} for (pixels, _), a, b in zip(items, *ids)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True, num_workers=0)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    print(f"loaded in {time.time() - wall_start:.1f}s; training {sum(p.numel() for p in lora_layers):,} LoRA "
          f"parameters ({lora_layers[0].dtype}) for {args.max_train_steps} steps on {device}", flush=True)

    unet.train()
    step, loop_start, first_step_s = 0, time.time(), None
    for _ in range(math.ceil(args.max_train_steps / len(loader))):
        for batch in loader:
            model_input = vae.encode(batch["pixel_values"]).latent_dist.sample()
            model_input = (model_input * vae.config.scaling_factor).to(weight_dtype)
            noise = torch.randn_like(model_input)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (model_input.shape[0],),
                                      device=model_input.device).long()
            noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
            target_size = torch.tensor([args.resolution, args.resolution]).expand(len(model_input), 2)
            add_time_ids = torch.cat([batch["original_sizes"], batch["crop_top_lefts"], target_size], dim=1)
            prompt_embeds, pooled = encode_prompt((text_encoder_one, text_encoder_two),
                                                  (batch["input_ids_one"], batch["input_ids_two"]))
            conditions = {"time_ids": add_time_ids.to(device, weight_dtype), "text_embeds": pooled}
            model_pred = unet(noisy_model_input, timesteps, prompt_embeds, added_cond_kwargs=conditions).sample
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(lora_layers, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if first_step_s is None:
                first_step_s = time.time() - loop_start
            if step >= args.max_train_steps:
                break
    report_done(step, time.time() - loop_start, first_step_s, loss)


if __name__ == "__main__":
    main()

"""The pieces of lora_diffusion.dataset's LoRADataset, one idea per module: errors, subset (the declaration of every
dataset option: one folder's settings), buckets, images (decoding, resize, crop, masks, colour and face crop),
captions, layout (kohya concept folders, repeats and mask folders), metadata (kohya's fine-tuning JSON),
dataset_config (kohya's dataset config file; config_file is its old name), latents (the latent cache) and debug
(debug_dataset). lora_diffusion/dataset.py puts them together (and dataset.py at the repository root is that
module)."""

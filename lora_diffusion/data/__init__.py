"""The pieces of lora_diffusion.dataset's LoRADataset, one idea per module: errors, subset (one folder's settings),
buckets, images, captions, layout (kohya concept folders and repeats), dataset_config (kohya's dataset
config file; config_file is its old name) and latents (the latent cache). lora_diffusion/dataset.py puts them together
(and dataset.py at the repository root is that module)."""

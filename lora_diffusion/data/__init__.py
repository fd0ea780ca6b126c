"""The pieces of dataset.py's LoRADataset, one idea per module: errors, subset (one folder's settings),
buckets, images, captions, layout (kohya concept folders and repeats), config_file (kohya's dataset
config) and latents (the latent cache). dataset.py at the top level puts them together."""

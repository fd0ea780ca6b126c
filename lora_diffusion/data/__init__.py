"""The training data, one idea per module: dataset.py (LoRADataset, BucketBatchSampler, collate_fn: the pieces put
together), subset.py (the declaration of every dataset option: one folder's settings), layout.py (kohya's concept
folders, repeats, regularization and mask folders), dataset_config.py (kohya's dataset config file), metadata.py
(kohya's fine-tuning JSON), captions.py, images.py (decoding, resize, crop, masks, colour and face crop),
buckets.py, latents.py (the latent cache), debug.py (debug_dataset), files.py and errors.py.
`import dataset` at the repository root gives dataset.py's names."""

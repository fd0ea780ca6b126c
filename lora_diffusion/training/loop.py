"""The training loop: one optimizer step, the saving and sampling at the end of a step or an epoch, the stop at a
step boundary, and what processes must agree on. `Run` holds what a run is built from (fixed once it starts),
`RunState` where it is (step, epoch, batch_in_epoch, epoch files, the last file and samples); every function takes
them as arguments. What a step trains towards is run.objective (training.objective.Objective); a recipe adds its own
loss terms and after-step hooks through run.loss_terms and run.step_hooks.
"""

import os
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lora_diffusion.models.family import rebatch
from lora_diffusion.models.sampling import sample_images

from .errors import TrainingError
from .objective import Objective
from .optim import set_schedule_free_mode
from .outputs import SAVE_PRECISION_DTYPES, save_lora, session_of, summarize_last_samples
from .precision import loss_scale, step_was_skipped
from .progress import ProgressFile
from .state import StateError, non_finite, rotate, save_state
from .validation import caption_encoder, validate

LR_LOG_NAMES = {"unet": "lr/unet", "text_encoder": "lr/textencoder", "text_encoder_2": "lr/textencoder2",
                "embeddings": "lr/embeddings"}


@dataclass
class Run:
    """What a run is built from: the flags, the models, the network and its optimizer, the data, where files go."""

    args: Any
    accelerator: Any
    models: Any
    network: Any
    optimizer: Any
    lr_scheduler: Any
    loader: Any
    batch_sampler: Any
    batches_per_epoch: int
    steps_per_epoch: int
    max_train_steps: int
    num_epochs: int
    output_dir: Path
    session_id: str
    network_shape: dict
    metadata: dict  # the ss_* keys of every LoRA file of the run
    resolution: tuple
    weight_dtype: torch.dtype
    params: list  # the parameters that train (the LoRA's, a new token's embedding)
    prompts: list | None = None  # --sample_prompts, read
    text_cache: dict | None = None  # caption -> encoder states (SDXL: (context, pooled)), frozen encoders only
    embedding: Any = None  # --token_string's new vectors
    embedding_steps: int = 0  # they train during the first embedding_steps steps
    train_text_encoder: bool = True
    log_with: str | None = None
    validation: Any = None  # training.validation.Validation: held-out images and/or prompts to score
    progress: ProgressFile = field(default_factory=lambda: ProgressFile(None))  # --progress_file's events
    prepared: Any = None  # NetworkForward as accelerate prepared it (DDP) in a multi-process run, else None
    # The loop's seams for a recipe's own pieces (e.g. ED-LoRA's attention loss and embedding freeze):
    loss_terms: list = field(default_factory=list)  # term(run, batch) -> tensor added to each micro-batch's loss
    step_hooks: list = field(default_factory=list)  # hook(run, state) after each optimizer step that updated
    objective: Objective | None = None  # noise, timesteps, target and loss; default: Objective.of(args)

    def __post_init__(self):
        if self.objective is None:
            self.objective = Objective.of(self.args)

    @property
    def device(self):
        return self.accelerator.device

    @property
    def pieces(self) -> dict:
        """What --save_state saves and --resume loads."""
        return dict(network=self.network, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
                    accelerator=self.accelerator)


@dataclass
class RunState:
    """Where the run is: optimizer steps done, the 0-based epoch and the batches of it done, and its files."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    epoch_files: list = field(default_factory=list)  # stems of the epoch files this run wrote, oldest first
    step_files: list = field(default_factory=list)  # stems of the --save_every_n_steps files, oldest first
    last_saved: Path | None = None  # the last LoRA file this process wrote; every file written was checked finite
    last_sampled_step: int | None = None
    last_samples: list = field(default_factory=list)  # the PNGs of the last sampling
    recent_losses: list = field(default_factory=list)
    first_step_done: tuple | None = None  # (time, step) after the first step: later steps are the steady pace
    validations: list = field(default_factory=list)  # {"epoch", "step", "validation_loss", metrics...} per check
    norms: tuple | None = None  # --scale_weight_norms: (keys scaled, mean norm, max norm) of the last step
    skipped_steps: int = 0  # steps whose update the fp16 GradScaler skipped (inf/NaN gradients)


def intact(state: RunState) -> str:
    return (f"The last file written, {state.last_saved}, holds finite weights." if state.last_saved else
            "No LoRA file was written by this run.")


@contextmanager
def eval_weights(run: Run):
    """The weights to save, sample or validate: a schedule-free optimizer's averaged point, back to its training
    point afterwards (other optimizers: nothing changes)."""
    set_schedule_free_mode(run.optimizer, train=False)
    try:
        yield
    finally:
        set_schedule_free_mode(run.optimizer, train=True)


def save_checkpoint(run: Run, state: RunState, stem, epoch, batch_in_epoch, *, with_state=None, final=False):
    with eval_weights(run):
        _save_checkpoint(run, state, stem, epoch, batch_in_epoch, with_state=with_state, final=final)


def _save_checkpoint(run: Run, state: RunState, stem, epoch, batch_in_epoch, *, with_state=None, final=False):
    """The LoRA (and, with --save_state, the state to resume at `batch_in_epoch` of 0-based `epoch`) as
    `<stem>...`, never with NaN/inf (checked after the cast to --save_precision); a write error names the path."""
    args, step = run.args, state.step
    with_state = args.save_state if with_state is None else with_state
    path, state_dir = run.output_dir / f"{stem}.safetensors", run.output_dir / f"{stem}-state"
    bad = non_finite(run.network.file_tensors(SAVE_PRECISION_DTYPES[args.save_precision]))
    if bad:
        cause = "are NaN/inf" if non_finite(run.network.state_dict()) else \
            f"overflow --save_precision {args.save_precision} (fp16 ends at 65504)"
        raise TrainingError(f"at step {step} the LoRA weights {cause} ({len(bad)} tensors, e.g. {bad[0]}); "
                            f"{path.name} was not written. {intact(state)} Try a lower --learning_rate or "
                            f"--unet_lr/--text_encoder_lr, --max_grad_norm 1.0, or --save_precision bf16/float")
    extra = dict(session_id=run.session_id, network_shape=run.network_shape, epoch_files=state.epoch_files,
                 step_files=state.step_files)
    target = path
    try:
        save_lora(run, path, epoch=epoch + (batch_in_epoch > 0), step=step, final=final)  # ss_epoch counts from 1
        state.last_saved, target = path, state_dir
        if with_state:
            save_state(state_dir, step=step, epoch=epoch, batch_in_epoch=batch_in_epoch, extra=extra,
                                **run.pieces)
        run.progress.write("checkpoint", step=step, epoch=epoch + (batch_in_epoch > 0), path=path,
                           state=state_dir if with_state else None)
    except OSError as e:
        raise TrainingError(f"could not write {target} at step {step}: {e.strerror or e}. Files already "
                            f"there are left as they were (writes are atomic). {intact(state)}") from None
    except StateError as e:
        raise TrainingError(f"at step {step}: {e}. {intact(state)}") from None


def sample(run: Run, state: RunState, epoch=None):
    with eval_weights(run):
        _sample(run, state, epoch)


def _sample(run: Run, state: RunState, epoch=None):
    """Pictures of --sample_prompts with the LoRA as it is now (main process)."""
    state.last_sampled_step = state.step
    if not run.prompts or not run.accelerator.is_main_process:
        return
    # generate_samples puts every module (the LoRA too: no dropout in the pictures) in eval mode and gives each
    # submodule its own mode back: the frozen base stays in eval, the LoRA in train mode.
    args, models = run.args, run.models
    state.last_samples = sample_images(
        models, prompts=run.prompts, out_dir=run.output_dir / "sample", step=state.step, epoch=epoch,
        output_name=args.output_name, device=run.device, dtype=run.weight_dtype, sampler=args.sample_sampler,
        clip_skip=args.clip_skip, max_token_length=args.max_token_length, seed=args.seed,
        expand_prompt=run.network.expand_prompt)
    for path, prompt in zip(state.last_samples, run.prompts):
        run.progress.write("sample", step=state.step, epoch=state.epoch + 1 if epoch is None else epoch, path=path,
                           prompt=prompt["prompt"])


class NetworkForward(torch.nn.Module):
    """The network as the module accelerate prepares (DDP in a multi-process run): its parameters are exactly what
    trains (the LoRA's, a new token's vectors), and its forward is one micro-batch's loss through the models that
    carry the LoRA, so DDP's hooks all-reduce the LoRA's gradients in buckets while the backward still runs."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, loss_of, batch):
        # accelerate wraps a prepared module's forward in autocast; the loss autocasts only what it means to (the
        # encoders and the U-Net), exactly as in a one-process run, so the wrapper's is turned off here.
        with torch.autocast(next(self.parameters()).device.type, enabled=False):
            return loss_of(batch)


def forward_loss(run: Run, batch):
    """compute_loss of one micro-batch; in a multi-process run through the prepared network (DDP)."""
    if run.prepared is None:
        return compute_loss(run, batch)
    return run.prepared(partial(compute_loss, run), batch)


def gradient_sync(run: Run, sync: bool):
    """Within a step's micro-batches but its last, DDP only accumulates (no all-reduce): accelerate's no_sync."""
    if sync or run.prepared is None:
        return nullcontext()
    return run.accelerator.no_sync(run.prepared)


def batch_latents(run: Run, batch):
    """The batch's latents: cached, or its images through the VAE (frozen, in its own dtype)."""
    if "latents" in batch:
        return batch["latents"].to(run.device)
    vae = run.models.vae
    with torch.no_grad():
        images = batch["images"].to(run.device, vae.dtype)
        return vae.encode(images).latent_dist.sample() * vae.config.scaling_factor


def compute_loss(run: Run, batch):
    """One micro-batch: latents, text states, noise, the U-Net's prediction, the loss (run.objective's)."""
    models, objective = run.models, run.objective
    latents = batch_latents(run, batch).to(run.weight_dtype)
    context, added = text_conditioning(run, batch)
    noise = objective.noise(latents)
    timesteps = objective.timesteps(latents.shape[0], run.device)
    noisy, target = objective.noisy_and_target(models.noise_scheduler, latents, noise, timesteps,
                                               models.v_parameterization)
    is_reg = batch["is_reg"].to(run.device)
    if run.args.reg_target == "base_model" and is_reg.any():
        target = target.clone()  # only the regularization rows learn the base model's prediction
        target[is_reg] = base_model_prediction(run, batch, noisy, timesteps, rows=is_reg).to(target.dtype)
    with run.accelerator.autocast():
        pred = models.family.call_unet(models.unet, noisy, timesteps, context.to(run.weight_dtype), added)
    loss = objective.loss(pred, target, timesteps=timesteps, noise_scheduler=models.noise_scheduler,
                          v_parameterization=models.v_parameterization, is_reg=is_reg,
                          mask=batch.get("alpha_masks"))  # kohya: whenever images have masks
    for term in run.loss_terms:
        loss = loss + term(run, batch)
    return loss


def text_conditioning(run: Run, batch):
    """The U-Net's text inputs for a batch: the encoder states (cached, or encoded with the text-encoder LoRA and
    the new token) and the family's added conditioning (SDXL: the pooled embedding and the size/crop ids)."""
    args, models, device = run.args, run.models, run.device
    family = models.family
    if run.text_cache is not None:
        encoded = rebatch([run.text_cache[c] for c in batch["captions"]])
    else:
        grad = torch.is_grad_enabled() and (run.train_text_encoder or (run.embedding is not None and
                                                                       run.embedding.trainable))
        encode = caption_encoder(models, run.network.expand_prompt, clip_skip=args.clip_skip,
                                 max_token_length=args.max_token_length, weighted=args.weighted_captions)
        with torch.set_grad_enabled(grad), run.accelerator.autocast():
            encoded = encode(batch["captions"])
    time_ids = family.time_ids(batch, device=device, dtype=run.weight_dtype)
    return family.unet_conditioning(encoded, time_ids, device=device, dtype=run.weight_dtype)


def batch_rows(batch, rows):
    """The collated batch's samples where `rows` (a bool tensor over the batch) is true: its per-sample tensors and
    lists cut to those rows, anything else as it is."""
    size = rows.shape[0]
    picked = rows.nonzero().flatten().tolist()
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == size:
            out[key] = value[rows.to(value.device)]
        elif isinstance(value, (list, tuple)) and len(value) == size:
            out[key] = [value[i] for i in picked]
        else:
            out[key] = value
    return out


@torch.no_grad()
def base_model_prediction(run: Run, batch, noisy, timesteps, rows=None):
    """--reg_target base_model: what the model without the LoRA predicts for these noisy latents and captions.
    Regularization samples learn that instead of the noise that was added: the LoRA learns to leave their prompts
    as the base model draws them, rather than to redraw the regularization images. With `rows` (a bool tensor over
    the batch, the regularization samples), the base model runs on those rows alone and returns their prediction
    only: the same values as the whole batch's for those rows, at the cost of the rows it needs."""
    if rows is not None:
        batch, noisy, timesteps = batch_rows(batch, rows), noisy[rows], timesteps[rows]
    with run.network.bypassed():  # not multiplier 0: a DoRA layer still computes there
        context, added = text_conditioning(run, batch)
        with run.accelerator.autocast():
            return run.models.family.call_unet(run.models.unet, noisy, timesteps, context.to(run.weight_dtype),
                                               added)


def optimizer_step(run: Run, state: RunState, params):
    """After the micro-batches of one step (their gradients averaged over processes by DDP): clip, step, count."""
    if run.args.max_grad_norm:
        run.accelerator.clip_grad_norm_(params, run.args.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    skipped = step_was_skipped(run.optimizer)  # the fp16 GradScaler found inf/NaN gradients: the weights did not move
    if skipped:
        state.skipped_steps += 1
    else:
        run.lr_scheduler.step()
    state.step += 1
    for hook in [] if skipped else run.step_hooks:
        hook(run, state)
    if run.args.scale_weight_norms:  # kohya's max-norm regularization, after the step
        state.norms = run.network.apply_max_norm(run.args.scale_weight_norms)


def after_step(run: Run, state: RunState, loss, progress):
    """Log the step, then the --save_every_n_steps file and the --sample_every_n_steps pictures."""
    args = run.args
    state.recent_losses = (state.recent_losses + [loss.item()])[-100:]
    losses = state.recent_losses
    logs = {"loss/current": losses[-1], "loss/average": sum(losses) / len(losses)}
    for group_of_params, lr in zip(run.optimizer.param_groups, run.lr_scheduler.get_last_lr()):
        name = group_of_params.get("name")  # block-wise and LoRA+ groups log under their own names
        logs[LR_LOG_NAMES.get(name) or (f"lr/{name}" if name else "lr/textencoder")] = lr
    progress.update(1)
    if state.first_step_done is None:
        state.first_step_done = (time.time(), state.step)  # later steps are the steady pace
    if state.norms is not None:  # kohya's names
        logs.update(zip(("keys_scaled", "average_key_norm", "max_key_norm"), state.norms))
    scale = loss_scale(run.accelerator)
    if scale is not None:  # fp16: the GradScaler's scale, and the steps it skipped on inf/NaN gradients
        logs.update({"amp/loss_scale": scale, "amp/skipped_steps": state.skipped_steps})
    progress.set_postfix(loss=f"{logs['loss/average']:.4f}")
    run.progress.step_done(step=state.step, epoch=state.epoch + 1, loss=logs["loss/current"],
                           loss_average=logs["loss/average"], lr=run.lr_scheduler.get_last_lr(),
                           max_train_steps=run.max_train_steps)
    if run.log_with:
        run.accelerator.log({args.log_prefix + k: v for k, v in logs.items()}, step=state.step)
    if args.save_every_n_steps and state.step % args.save_every_n_steps == 0:
        stem = f"{args.output_name}-step{state.step:08d}"
        state.step_files = [f for f in state.step_files if f != stem] + [stem]
        save_checkpoint(run, state, stem, state.epoch, state.batch_in_epoch)
        if args.save_last_n_steps and run.accelerator.is_main_process:
            # kohya's: keep the files (and states) of the last N steps (--save_last_n_steps_state for the states)
            for suffix, n in ((".safetensors", args.save_last_n_steps),
                              ("-state", args.save_last_n_steps_state or args.save_last_n_steps)):
                recent = sum(int(f.rsplit("-step", 1)[1]) >= state.step - n for f in state.step_files)
                rotate_own(run, [run.output_dir / f"{f}{suffix}" for f in state.step_files], recent)
    if args.sample_every_n_steps and state.step % args.sample_every_n_steps == 0:
        sample(run, state)
    if run.validation is not None and args.validate_every_n_steps and state.step % args.validate_every_n_steps == 0:
        with eval_weights(run):
            validate(run, state, state.epoch + 1)  # the epoch in progress


def rotate_own(run: Run, paths, keep: int):
    """Delete all but the newest `keep` of `paths` that still carry this run's session id."""
    rotate(paths, keep, owned=lambda path: session_of(Path(path)) == run.session_id)


def after_epoch(run: Run, state: RunState):
    """The --save_every_n_epochs file (keeping --save_last_n_epochs of them) and --sample_every_n_epochs pictures."""

    args, done = run.args, state.epoch + 1
    if args.save_every_n_epochs and done % args.save_every_n_epochs == 0 and done < run.num_epochs:
        stem = f"{args.output_name}-{done:06d}"
        state.epoch_files = [s for s in state.epoch_files if s != stem] + [stem]
        save_checkpoint(run, state, stem, done, 0)
        if run.accelerator.is_main_process:  # only files of this run, checked
            for suffix, n in ((".safetensors", args.save_last_n_epochs),
                              ("-state", args.save_last_n_epochs_state or args.save_last_n_epochs)):
                if n:
                    rotate_own(run, [run.output_dir / f"{s}{suffix}" for s in state.epoch_files], n)
    if args.sample_every_n_epochs and done % args.sample_every_n_epochs == 0:
        sample(run, state, epoch=done)
    if run.validation is not None and done % args.validation_every_n_epochs == 0:
        with eval_weights(run):
            validate(run, state, done)


def train_epochs(run: Run, state: RunState, skip_batches: int):
    """The loop, from `state` (a resumed run: `skip_batches` of its epoch done) to --max_train_steps. Ctrl-C or
    SIGTERM (to any process) stop it at the next step boundary with the LoRA and the state saved (then
    StoppedAndSaved, a KeyboardInterrupt)."""
    from tqdm.auto import tqdm

    args, accelerator, embedding = run.args, run.accelerator, run.embedding
    first_epoch, params = state.epoch, run.params
    progress = tqdm(total=run.max_train_steps, initial=state.step, disable=not accelerator.is_local_main_process,
                    desc="steps")

    set_schedule_free_mode(run.optimizer, train=True)
    if args.sample_at_first and state.step == 0:
        sample(run, state, epoch=0)
    stop = DeferredStop().__enter__()
    try:
        for epoch in range(first_epoch, run.num_epochs):
            state.epoch = epoch
            if state.step >= run.max_train_steps:
                break
            run.batch_sampler.set_epoch(epoch)
            state.batch_in_epoch = skip_batches if epoch == first_epoch else 0
            run.batch_sampler.skip_batches = state.batch_in_epoch * accelerator.num_processes
            micro = 0
            for batch in run.loader:
                if micro == 0:  # one optimizer step sums N micro-batches, or what is left of the epoch
                    group = min(args.gradient_accumulation_steps, run.batches_per_epoch - state.batch_in_epoch)
                    if embedding is not None and state.step >= run.embedding_steps and embedding.trainable:
                        embedding.freeze()  # --train_text_encoder_ti_frac: kept from here on
                with gradient_sync(run, sync=micro + 1 == group):
                    loss = forward_loss(run, batch)
                    if not loss_is_finite(loss, accelerator):
                        raise TrainingError(
                            f"the loss became {loss.item()} at step {state.step + 1} (epoch {epoch + 1}); stopping "
                            f"before a broken file is written. {intact(state)} Try a lower --learning_rate, "
                            f"--mixed_precision bf16 instead of fp16, or --max_grad_norm 1.0")
                    accelerator.backward(loss / group)
                micro, state.batch_in_epoch = micro + 1, state.batch_in_epoch + 1
                if micro < group:
                    continue
                micro = 0
                optimizer_step(run, state, params)
                if hasattr(run.loader.dataset, "set_current_step"):  # kohya's token warm-up counts steps
                    run.loader.dataset.set_current_step(state.step)
                after_step(run, state, loss, progress)
                if state.step >= run.max_train_steps:
                    break
                if stop_requested(stop, accelerator):  # a whole step is done: its LoRA and state resume exactly
                    raise StopAtBoundary
            if state.batch_in_epoch < run.batches_per_epoch:
                continue  # stopped inside the epoch
            after_epoch(run, state)
    except StopAtBoundary:
        why = signal.Signals(stop.signum).name if stop.signum else "a signal to another process"
        accelerator.print(f"\n{why} at step {state.step}: saving the LoRA and the training state")
        stem = f"{args.output_name}-step{state.step:08d}"
        save_checkpoint(run, state, stem, state.epoch, state.batch_in_epoch, with_state=True)  # a 2nd signal aborts
        accelerator.print(f"resume with: --resume {run.output_dir / (stem + '-state')}")
        raise StoppedAndSaved(accelerator.num_processes) from None
    finally:
        stop.__exit__()
        progress.close()  # an error message then starts on a line of its own


def save_final_files(run: Run, state: RunState) -> tuple[Path, list[str]]:
    """The final LoRA (and embedding) file and the final samples; returns the LoRA's path and lines to print."""
    args, accelerator, embedding = run.args, run.accelerator, run.embedding
    check_identical_across_processes(run.params, accelerator)
    final_path = run.output_dir / f"{args.output_name}.safetensors"
    save_checkpoint(run, state, args.output_name, state.epoch, state.batch_in_epoch, final=True,
                    with_state=args.save_state or args.save_state_on_train_end)
    lines = []
    if embedding is not None and accelerator.is_main_process:
        emb_path = run.output_dir / f"{args.output_name}_emb.safetensors"
        embedding.save_textual_inversion(emb_path, {"ss_session_id": run.session_id})
        run.progress.files.append(str(emb_path))
        load = f"load_textual_inversion(path, token={args.token_string!r})"
        if "clip_l" in embedding.vectors:
            load = f"load_textual_inversion of its clip_l and clip_g, token={args.token_string!r}, into each encoder"
        lines.append(f"embedding {' '.join(embedding.tokens)}: bundled in the LoRA file (A1111/Forge) and in "
                     f"{emb_path} (diffusers: {load}, and load_lora_weights of the LoRA file's tensors without its "
                     f"bundle_emb.* keys)")
    if run.prompts and state.last_sampled_step != state.step:
        sample(run, state)  # the final LoRA's pictures, unless this step was just sampled
    if state.last_samples:
        lines += summarize_last_samples(state.last_samples, run.output_dir / "sample" / f"{args.output_name}_grid.png")
    return final_path, lines


# ---------------------------------------------------------------------------------------------------------------
# What the processes must agree on, and stopping at a step boundary


class ShardedBatches(torch.utils.data.Sampler):
    """This process's share of the bucket batches (every world-th batch); equal counts on every process."""

    def __init__(self, batch_sampler, rank: int, world: int):
        self.batch_sampler, self.rank, self.world = batch_sampler, rank, world

    def __iter__(self):
        batches = list(self.batch_sampler)
        usable = len(batches) - len(batches) % self.world
        return iter(batches[self.rank:usable:self.world])

    def __len__(self):
        return len(self.batch_sampler) // self.world


def loss_is_finite(loss, accelerator) -> bool:
    """The same answer on every process (so that all stop together): is the loss finite everywhere?"""
    finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite, reduction="sum") / accelerator.num_processes
    return finite.item() == 1.0


def average_gradients(params, accelerator):
    """Mean of the LoRA gradients over processes, in one flat all-reduce after the backward: for a loop of one's
    own that does not prepare its network (the trainer's loop lets DDP do it during the backward)."""
    if accelerator.num_processes == 1:
        return
    params = [p for p in params if p.requires_grad]  # a frozen embedding keeps no gradient: the optimizer skips it
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    for p, piece in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = piece.view_as(p)


def check_identical_across_processes(params, accelerator):
    """Every process must end with the same LoRA: compare a fingerprint of the weights before one process writes."""
    if accelerator.num_processes == 1:
        return
    flat = torch.cat([p.detach().float().reshape(-1) for p in params])
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device).remainder_(9973)
    fingerprint = torch.stack([flat.double().sum(), (flat.double() * weights).sum()])
    everyone = accelerator.gather(fingerprint[None]).reshape(-1, 2)
    if not torch.equal(everyone.min(0).values, everyone.max(0).values):
        raise TrainingError(f"LoRA weights differ between processes: {everyone.tolist()}")
    accelerator.print(f"LoRA weights identical on {accelerator.num_processes} processes")


class DeferredStop:
    """Ctrl-C / SIGTERM during the loop only ask the loop to stop at the next step boundary (so the saved LoRA and
    state are those of a whole step and a resumed run ends exactly as an uninterrupted one); a second one aborts."""

    def __init__(self):
        self.signum, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        os.write(2, f"\n{signal.Signals(signum).name}: finishing this step, then saving the LoRA and the state "
                    f"(again to stop at once, without saving)\n".encode())

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def stop_requested(stop: DeferredStop, accelerator) -> bool:
    """Did any process get a signal? (All processes must stop at the same step.)"""
    flag = stop.signum is not None
    if accelerator.num_processes > 1:
        total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
        flag = total.item() > 0
    return flag


class StopAtBoundary(Exception):
    """Raised inside the loop after a whole step when a signal asked to stop."""


class StoppedAndSaved(KeyboardInterrupt):
    """The run stopped at a step boundary on a signal, with the LoRA and the state saved on every process."""

    def __init__(self, processes: int = 1):
        super().__init__()
        self.processes = processes

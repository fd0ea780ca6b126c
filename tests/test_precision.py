"""Precision: the fp16 GradScaler path (it runs on the CPU as on a GPU), a skipped step leaves the LR schedule where
it was, kohya's --full_fp16 trains fp16 weights with unscaled fp16 gradients, TF32 on CUDA only."""

import pytest
import torch

import train_lora
from lora_diffusion.training import loop
from lora_diffusion.training.precision import FP16GradScaler, allow_tf32
from test_train import base_flags, make_dataset, read


def record_steps(monkeypatch, poison_step=None):
    """Wrap the loop's optimizer step: before each, the LoRA's weights and (scaled) gradients and the loss scale;
    after it the weights, whether the step was skipped and the LR. `poison_step`: that 0-based step gets an inf
    gradient, which the GradScaler must catch."""
    steps, real = [], loop.optimizer_step

    def optimizer_step(run, state, params):
        if state.step == poison_step:
            params[0].grad.view(-1)[0] = float("inf")
        scaler = run.accelerator.scaler
        before = dict(weights=[p.detach().clone() for p in params], scale=scaler.get_scale(),
                      grads=[None if p.grad is None else p.grad.detach().clone() for p in params], scaler=scaler)
        real(run, state, params)
        steps.append(dict(before, after=[p.detach().clone() for p in params], lr=run.lr_scheduler.get_last_lr()[0],
                          skipped=run.optimizer.step_was_skipped))

    monkeypatch.setattr(loop, "optimizer_step", optimizer_step)
    return steps


def test_a_step_the_scaler_skips_leaves_the_weights_and_the_lr_schedule(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = record_steps(monkeypatch, poison_step=1)
    data = make_dataset(tmp_path)
    argv = base_flags(tmp_path, data, mixed_precision="fp16", lr_scheduler="linear", max_train_steps=4,
                      logging_dir=tmp_path / "logs")
    assert train_lora.main(argv) == 0
    assert [s["skipped"] for s in steps] == [False, True, False, False]
    assert all(torch.equal(a, b) for a, b in zip(steps[1]["weights"], steps[1]["after"]))  # no update
    assert not all(torch.equal(a, b) for a, b in zip(steps[2]["weights"], steps[2]["after"]))
    # the linear schedule, lr x (1 - n / max_train_steps), moved by the 3 steps that updated, not by the skipped one
    assert [s["lr"] for s in steps] == pytest.approx([1e-3 * (1 - n / 4) for n in (1, 1, 2, 3)])
    assert [s["scale"] for s in steps] == [2.0**16, 2.0**16, 2.0**15, 2.0**15]  # torch's backoff: halved
    accumulator = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent)).Reload()
    assert [e.value for e in accumulator.Scalars("amp/loss_scale")] == [2.0**16, 2.0**15, 2.0**15, 2.0**15]
    assert [e.value for e in accumulator.Scalars("amp/skipped_steps")] == [0, 1, 1, 1]


def test_full_fp16_trains_fp16_weights_with_unscaled_fp16_gradients(tmp_path, monkeypatch):
    steps = record_steps(monkeypatch)
    data = make_dataset(tmp_path)
    lr = 0.05
    argv = base_flags(tmp_path, data, mixed_precision="fp16", full_fp16=True, optimizer_type="torch.optim.SGD",
                      learning_rate=lr, max_grad_norm=0, max_train_steps=3)
    assert train_lora.main(argv) == 0
    assert isinstance(steps[0]["scaler"], FP16GradScaler)
    for step in steps:
        assert not step["skipped"]
        for before, grad, after in zip(step["weights"], step["grads"], step["after"]):
            assert before.dtype == after.dtype == torch.float16 and grad.dtype == torch.float16
            # plain SGD: w - lr x (the scaled gradient / the scale), in fp32 here, rounded once to fp16
            expected = (before.float() - lr * grad.float() / step["scale"]).half()
            torch.testing.assert_close(after, expected, rtol=0, atol=float(expected.abs().max()) * 2e-3 + 1e-7)
    assert any(not torch.equal(b, a) for b, a in zip(steps[-1]["weights"], steps[-1]["after"]))
    tensors, meta = read(tmp_path / "out" / "t.safetensors")
    assert meta["ss_full_fp16"] == "True" and all(torch.isfinite(t).all() for t in tensors.values())


def test_full_fp16_needs_fp16_mixed_precision(tmp_path, capsys):
    assert train_lora.main(base_flags(tmp_path, make_dataset(tmp_path), full_fp16=True)) == 2
    assert capsys.readouterr().err.strip() == "error: --full_fp16 needs --mixed_precision fp16"


def test_tf32_is_allowed_on_cuda_only_and_no_tf32_keeps_pytorchs_fp32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
        allow_tf32(torch.device("cpu"))
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        allow_tf32(torch.device("cuda"))
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        allow_tf32(torch.device("cuda"), allowed=False)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

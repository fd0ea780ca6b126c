"""--fused_backward_pass: stepping each parameter inside the backward gives, step for step, the weights of the
ordinary backward-then-step with the same optimizer (transformers' Adafactor, two groups of their own lr), and
leaves no gradient behind; kohya's conditions are refused in one line."""

import pytest
import torch

from lora_diffusion.training.errors import TrainingError
from lora_diffusion.training.fused_backward import check_fused_backward, install_fused_backward
from lora_diffusion.training.optim import create_optimizer


def model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    groups = [{"params": list(model[0].parameters()), "lr": 1e-2}, {"params": list(model[2].parameters()), "lr": 3e-3}]
    return model, create_optimizer("Adafactor", groups, learning_rate=1e-2,
                                   optimizer_args=["relative_step=False", "scale_parameter=False"])


def test_fused_steps_give_the_ordinary_steps_weights():
    plain, plain_opt = model_and_optimizer()
    fused, fused_opt = model_and_optimizer()
    install_fused_backward(fused_opt)
    data = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(4, 6, generator=data), torch.randn(4, 3, generator=data)
        torch.nn.functional.mse_loss(plain(x), y).backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(fused(x), y).backward()
        assert all(p.grad is None for p in fused.parameters())  # each gradient freed once its step is done
        fused_opt.step()  # the loop's own step: nothing left to move
    for a, b in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-7)
    assert not torch.equal(plain[0].weight, model_and_optimizer()[0][0].weight)  # it did train
    assert [len(g["params"]) for g in fused_opt.param_groups] == [2, 2]  # the groups restored after each step


def test_kohyas_conditions_are_refused_in_one_line():
    check_fused_backward("Adafactor", 1, "bf16")
    for args, words in ((("AdamW", 1, "no"), "Adafactor only"), (("adafactor", 2, "no"), "gradient_accumulation"),
                        (("Adafactor", 1, "fp16"), "fp16"), (("Adafactor", 1, "no", 2), "multi-process")):
        with pytest.raises(TrainingError, match=words):
            check_fused_backward(*args)


def test_a_fused_run_of_the_trainer_writes_the_lora_of_an_ordinary_one(tmp_path, capsys):
    import train_lora
    from tests.test_train import base_flags, make_dataset, read

    data = make_dataset(tmp_path)
    flags = dict(optimizer_type="Adafactor", optimizer_args=["relative_step=False", "scale_parameter=False"],
                 max_train_steps=3, max_grad_norm=0)
    assert train_lora.main(base_flags(tmp_path / "plain", data, **flags)) == 0
    assert train_lora.main(base_flags(tmp_path / "fused", data, fused_backward_pass=True, **flags)) == 0
    plain, _ = read(tmp_path / "plain" / "out" / "t.safetensors")
    fused, meta = read(tmp_path / "fused" / "out" / "t.safetensors")
    assert plain.keys() == fused.keys()
    for key in plain:
        torch.testing.assert_close(fused[key].float(), plain[key].float(), rtol=0, atol=1e-6, msg=key)
    assert any(plain[k].abs().sum() > 0 for k in plain if "lora_up" in k)  # the up weights left 0: it trained
    assert meta["ss_steps"] == "3"
    capsys.readouterr()
    assert train_lora.main(base_flags(tmp_path / "adamw", data, fused_backward_pass=True, max_train_steps=1)) == 2
    assert "--fused_backward_pass works with --optimizer_type Adafactor only" in capsys.readouterr().err

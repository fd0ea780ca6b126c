"""pretrain-mini's stage checkpoints: a run killed while it saves resumes with the weights, the optimizer and the step
of one and the same checkpoint. The reference for "the same" is torch's own count: AdamW's `step` state is the
number of optimizer steps the saved tensors have taken."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lora_diffusion.world import pretrain_mini
from lora_diffusion.world.pretrain_mini import PretrainSettings, finetune_decoder, load_checkpoint, read_checkpoint


class Killed(BaseException):
    """What a SIGKILL mid-save looks like to the files: nothing after this point runs."""


def settings(tmp_path, steps):
    return PretrainSettings(work_dir=str(tmp_path), decoder_steps=steps, vae_batch_size=2, checkpoint_every=1,
                            warmup_steps=1)


def adam_steps(tensors):
    return {int(v.item()) for k, v in tensors.items() if k.startswith("optimizer.") and k.endswith(".step")}


def kill_during_save(monkeypatch, save_number, point):
    """Make the save_number-th file write of pretrain_mini die: before it, half-way through it, or just after it."""
    real, calls = pretrain_mini.atomic_write, []

    def dying(path, write_fn, **kwargs):
        calls.append(path)
        if len(calls) != save_number:
            return real(path, write_fn, **kwargs)
        if point == "before":
            raise Killed()
        if point == "half-way":
            def half(f):
                f.write(b"\0" * 100)
                raise Killed()
            return real(path, half, **kwargs)
        real(path, write_fn, **kwargs)
        raise Killed()

    monkeypatch.setattr(pretrain_mini, "atomic_write", dying)


@pytest.mark.parametrize("point", ["before", "half-way", "after"])
def test_a_run_killed_while_saving_resumes_in_step(tmp_path, monkeypatch, point):
    """Stage 3 (the decoder), the stage of the quickest steps; every stage saves through save_checkpoint."""
    vae = pretrain_mini.build_models(0)[1]
    kill_during_save(monkeypatch, save_number=2, point=point)  # the step-2 checkpoint
    with pytest.raises(Killed):
        finetune_decoder(vae, settings(tmp_path, 3), tmp_path)
    monkeypatch.undo()
    info, tensors = read_checkpoint(tmp_path / "decoder_state")
    assert adam_steps(tensors) == {info["step"]}
    assert info["step"] == (2 if point == "after" else 1)
    # the resumed run continues from there and finishes in step
    finetune_decoder(pretrain_mini.build_models(0)[1], settings(tmp_path, 3), tmp_path)
    info, tensors = read_checkpoint(tmp_path / "decoder_state")
    assert info["step"] == 3 and adam_steps(tensors) == {3}
    rows = (tmp_path / "loss_decoder.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3]  # each step once: resumed where the checkpoint was
    assert [p.name for p in (tmp_path / "decoder_state").iterdir()] == ["state.safetensors"]


def old_layout(tmp_path, tensor_step, json_step):
    """The two files older versions wrote: tensors (here at tensor_step) and state.json (at json_step)."""
    vae = pretrain_mini.build_models(0)[1]
    optimizer = torch.optim.AdamW(vae.parameters())
    pretrain_mini.save_checkpoint(tmp_path / "new", {"vae": vae}, optimizer, {"step": 0})
    _, tensors = read_checkpoint(tmp_path / "new")
    tensors.update({f"optimizer.{i}.step": torch.tensor(float(tensor_step)) for i in range(3)})
    tensors.update({f"optimizer.{i}.{m}": torch.zeros(p.shape) for i, p in enumerate(list(vae.parameters())[:3])
                    for m in ("exp_avg", "exp_avg_sq")})
    folder = tmp_path / "vae_state"
    folder.mkdir()
    save_file(tensors, str(folder / "state.safetensors"))
    groups = optimizer.state_dict()["param_groups"]
    (folder / "state.json").write_text(json.dumps({"step": json_step, "param_groups": groups}))
    return folder, vae


def test_the_old_two_file_layout_resumes_when_in_step_and_is_refused_when_not(tmp_path):
    folder, vae = old_layout(tmp_path, tensor_step=2, json_step=2)
    assert load_checkpoint(folder, {"vae": vae}, torch.optim.AdamW(vae.parameters()))["step"] == 2
    folder, vae = old_layout(tmp_path / "killed", tensor_step=2, json_step=1)  # killed between the two writes
    with pytest.raises(ValueError, match=r"taken 2 steps but state.json says step 1.*delete .*vae_state"):
        load_checkpoint(folder, {"vae": vae}, torch.optim.AdamW(vae.parameters()))

"""kohya's --initial_step / --initial_epoch / --skip_until_initial_step: where a run starts counting, and which data
it trains first. The batches a run trains are recorded at the data loader (collate_fn) and compared with those of
an uninterrupted run from step 0: the expectation comes from that run, not from the code that skips."""

import pytest

import train_lora
from lora_diffusion.data import dataset as dataset_module
from test_train import base_flags, make_dataset


def trained_batches(monkeypatch, argv):
    batches = []
    real = dataset_module.collate_fn

    def recording(items, *args, **kwargs):
        batches.append(sorted(item["path"].rsplit("/", 1)[-1] for item in items))
        return real(items, *args, **kwargs)

    monkeypatch.setattr(dataset_module, "collate_fn", recording)
    assert train_lora.main(argv) == 0
    monkeypatch.setattr(dataset_module, "collate_fn", real)
    return batches


def test_skip_until_initial_step_trains_the_batches_a_full_run_trains_next(tmp_path, monkeypatch):
    data = make_dataset(tmp_path)  # 4 images x 5 repeats, batch 2: 10 steps an epoch
    full = trained_batches(monkeypatch, base_flags(tmp_path / "a", data, max_train_steps=6))
    assert len(full) == 6
    skipped = trained_batches(monkeypatch, base_flags(tmp_path / "b", data, max_train_steps=6, initial_step=3,
                                                      skip_until_initial_step=True, save_every_n_steps=2))
    assert skipped == full[3:]
    files = sorted(p.name for p in (tmp_path / "b" / "out").glob("t-step*.safetensors"))
    assert files and all(int(name[6:14]) > 3 for name in files), files  # the counter started at step 3
    again = trained_batches(monkeypatch, base_flags(tmp_path / "c", data, max_train_steps=6, initial_step=3))
    assert again == full[:3]  # without skipping, the data starts at the beginning of the epoch


def test_initial_epoch_starts_at_its_first_step(tmp_path, monkeypatch, capsys):
    data = make_dataset(tmp_path)
    batches = trained_batches(monkeypatch, base_flags(tmp_path, data, max_train_steps=12, initial_epoch=2))
    assert len(batches) == 2 and "starting at step 10 (epoch 2" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (dict(initial_step=4), "--initial_step starts at step 4, which leaves nothing of --max_train_steps 4"),
    (dict(initial_epoch=0), "--initial_epoch must be >= 1"),
])
def test_a_start_past_the_end_is_a_clear_error(tmp_path, capsys, flags, message):
    data = make_dataset(tmp_path)
    assert train_lora.main(base_flags(tmp_path, data, **flags)) != 0
    assert message in capsys.readouterr().err

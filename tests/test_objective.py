"""The objective a run trains towards is one object built from its options; a research recipe passes its own
(here one that doubles the loss) and the loop uses it, with no module function patched."""

import train_lora
from lora_diffusion.training import trainer
from lora_diffusion.training.objective import Objective
from tests.test_train import base_flags, make_dataset


def test_objective_of_the_options_holds_them():
    args = train_lora.parse_args(["--pretrained_model_name_or_path", "builtin:tiny", "--train_data_dir", "d",
                                  "--noise_offset", "0.05", "--loss_type", "huber", "--min_timestep", "10"])
    objective = Objective.of(args)
    assert (objective.noise_offset, objective.loss_type, objective.min_timestep) == (0.05, "huber", 10)
    assert objective.max_timestep == args.max_timestep == 1000  # the option's own default, not restated


def test_a_run_uses_the_objective_it_is_given(tmp_path, monkeypatch):
    data = make_dataset(tmp_path)
    seen = []

    class Doubled(Objective):
        def loss(self, pred, target, **kwargs):
            loss = super().loss(pred, target, **kwargs)
            seen.append(float(loss.detach()))
            return 2 * loss

    real_run = trainer.Run

    def run_with_doubled(*args, **kwargs):
        run = real_run(*args, **kwargs)
        run.objective = Doubled(**vars(run.objective))
        return run

    monkeypatch.setattr(trainer, "Run", run_with_doubled)
    assert train_lora.main(base_flags(tmp_path, data, max_train_steps=2)) == 0
    assert len(seen) == 2

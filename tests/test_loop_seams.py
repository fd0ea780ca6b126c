"""The loop's seams for a recipe's own pieces: loss terms added to each micro-batch's loss, hooks after each
optimizer step that updated, and the prepared (DDP) network's forward outside accelerate's autocast."""

from types import SimpleNamespace

import torch

from lora_diffusion.training.loop import NetworkForward, RunState, optimizer_step


class Optimizer:
    def __init__(self, skip_at=()):
        self.steps, self.skip_at, self.step_was_skipped = 0, set(skip_at), False

    def step(self):
        self.steps += 1
        self.step_was_skipped = self.steps in self.skip_at

    def zero_grad(self, set_to_none=True):
        pass


def fake_run(optimizer, hooks):
    scheduler = SimpleNamespace(steps=0)
    scheduler.step = lambda: setattr(scheduler, "steps", scheduler.steps + 1)
    return SimpleNamespace(args=SimpleNamespace(max_grad_norm=0, scale_weight_norms=None), optimizer=optimizer,
                           lr_scheduler=scheduler, step_hooks=hooks, accelerator=None)


def test_step_hooks_run_after_each_step_that_updated_and_see_its_count():
    seen = []
    run = fake_run(Optimizer(skip_at={2}), [lambda run, state: seen.append(state.step)])
    state = RunState()
    for _ in range(4):
        optimizer_step(run, state, [])
    assert state.step == 4 and state.skipped_steps == 1
    assert seen == [1, 3, 4]  # step 2 was skipped by the GradScaler: the weights did not move, no hook
    assert run.lr_scheduler.steps == 3


def test_the_prepared_network_computes_its_loss_outside_the_wrappers_autocast():
    net = NetworkForward(torch.nn.Linear(2, 2))

    def loss_of(batch):
        inside = torch.is_autocast_enabled("cpu")
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what the loss itself autocasts still autocasts
            return inside, (batch @ batch).dtype

    with torch.autocast("cpu", dtype=torch.bfloat16):  # what accelerate puts around a prepared module's forward
        inside, dtype = net(loss_of, torch.ones(2, 2))
    assert inside is False and dtype == torch.bfloat16

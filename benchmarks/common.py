"""Shared pieces of the benchmarks: threads, machine load, peak memory, timing, and SD1.5-size models.

Every benchmark is `python benchmarks/<name>.py [--quick] [--json out.json]`; --quick swaps the SD1.5-size U-Net for
the tiny one so the whole file runs in seconds (a smoke test, not a measurement).
"""

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

ASSETS = ROOT / "lora_diffusion" / "assets"
CACHE_DIR = Path(os.environ.get("LORA_BENCH_CACHE", Path(tempfile.gettempdir()) / "lora_diffusion_bench"))
# kohya's default U-Net targets, as peft target_modules (a regex over module paths): every Linear and 1x1 conv in
# the transformer blocks. The same 192 modules (SD1.5) that create_network wraps.
KOHYA_UNET_REGEX = (r".*(attentions\.\d+)\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn1|attn2)\."
                    r"(to_q|to_k|to_v|to_out\.0)|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2))")
DIFFUSERS_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # train_text_to_image_lora.py's choice


def set_threads(threads: int = 2):
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def machine() -> dict:
    """What the numbers ran on."""
    return {"cpu": cpu_name(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available()
            else None, "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def other_busy_processes(threshold: float = 20.0) -> list[str]:
    """Other processes using more than `threshold` % CPU right now (from ps), to report who shared the machine."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=5).stdout.splitlines()[1:]
    except (OSError, subprocess.SubprocessError):
        return []
    busy = []
    for line in out:
        pid, cpu, comm = line.split(None, 2)
        if int(pid) != os.getpid() and float(cpu) > threshold:
            busy.append(f"{comm}({cpu}%)")
    return busy


def wait_for_quiet(max_load: float = 1.0, timeout: float = 120.0) -> float:
    """Wait (up to `timeout` s) until the 1-minute load average drops below `max_load`; returns the load seen."""
    deadline = time.time() + timeout
    while loadavg() > max_load and time.time() < deadline:
        time.sleep(5)
    return loadavg()


# -- child processes -----------------------------------------------------------------------------------------------
# A benchmark's children (trainers, workers) run in process groups of their own, and each group is ended when the
# benchmark is done with it, however that happens (normally, on an exception, on SIGTERM or Ctrl-C): a timed-out
# benchmark left its train_lora.py running as an orphan when only the benchmark's own pid was killed.


def start(command, **kwargs) -> subprocess.Popen:
    """subprocess.Popen(command, **kwargs) in a new session: its own process group, whose id is its pid. The
    caller stops it with stop(); SIGTERM to this process then unwinds (SystemExit) so that it can."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_signal)
    return subprocess.Popen(command, start_new_session=True, **kwargs)


@contextlib.contextmanager
def child(command, **kwargs):
    """start(command, **kwargs) for the block; on leaving it, however, the child's whole group is stopped."""
    process = start(command, **kwargs)
    try:
        yield process
    finally:
        stop(process)


def stop(process: subprocess.Popen, grace: float = 5.0):
    """End the child's process group: SIGTERM, then after `grace` seconds SIGKILL to whatever of it is left (what
    the child started can outlive it in its group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            break  # nothing of the group is left
        if sig == signal.SIGTERM:
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
    process.wait()


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the children's groups


# -- memory --------------------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory over a block: max allocated on CUDA, else the process RSS polled every 5 ms (the kernel's
    ru_maxrss cannot be reset, so a later, smaller phase would be hidden by an earlier peak)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._stop = threading.Event()
            self.peak = rss_bytes()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device="cpu") -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternate(runs: dict, repeats: int, warmup: int = 1, max_load: float | None = None) -> dict:
    """Time each callable in `runs` A B A B ...: `warmup` untimed rounds, then `repeats` timed rounds.

    Returns {name: [seconds, ...]} plus "_load": the load average before each timed round."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times = {name: [] for name in runs}
    times["_load"] = []
    for _ in range(repeats):
        for name, fn in runs.items():
            if max_load is not None:
                wait_for_quiet(max_load, timeout=60)
            times["_load"].append(loadavg())
            times[name].append(fn())
            shown = times[name][-1]
            shown = shown.get("seconds", shown.get("wall_s")) if isinstance(shown, dict) else shown
            print(f"  {name}: {shown:.3g} s (load {times['_load'][-1]:.2f})", file=sys.stderr, flush=True)
    return times


def median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


# -- models --------------------------------------------------------------------------------------------------------


QUICK_CONFIGS = {"v1": "tiny-sd", "sdxl": "tiny-xl"}  # the tiny model of each family's topology


def unet_config(quick: bool, family: str = "v1") -> dict:
    """The shipped U-Net config of `family` (v1: SD1.5, sdxl: SDXL base), or its tiny model's with `quick`."""
    with open(ASSETS / (QUICK_CONFIGS[family] if quick else family) / "unet" / "config.json") as f:
        return json.load(f)


def build_unet(quick: bool = False, dtype=torch.float32, device="cpu", seed: int = 0, family: str = "v1"):
    """A UNet2DConditionModel of SD1.5's architecture (SDXL's with family="sdxl"; or the tiny one) with random,
    seeded weights, made on `device` (a GPU initialises 2.6 B parameters in a second, a CPU core in a minute)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else default)  # no fp32 copy of a bf16 model
    try:
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(unet_config(quick, family))
    finally:
        torch.set_default_dtype(default)
    return torch.nn.Module.to(unet, device=device, dtype=dtype).requires_grad_(False)


def unet_inputs(unet, resolution: int, batch_size: int = 1, dtype=torch.float32, device="cpu", seed: int = 0):
    """(noisy latents, timesteps, text context) for one step at `resolution` px (latents are resolution / 8)."""
    g = torch.Generator().manual_seed(seed)
    size = resolution // 8
    config = unet.config
    latents = torch.randn(batch_size, config.in_channels, size, size, generator=g).to(device, dtype)
    timesteps = torch.randint(0, 1000, (batch_size,), generator=g).to(device)
    context = torch.randn(batch_size, 77, config.cross_attention_dim, generator=g).to(device, dtype)
    return latents, timesteps, context


def sdxl_added_conditioning(unet, resolution: int, batch_size: int = 1, dtype=torch.float32, device="cpu",
                            seed: int = 1) -> dict:
    """SDXL's added conditioning for `batch_size` images at `resolution` px: the pooled text embedding (random, as
    cached text-encoder outputs would give it) and the size/crop time ids."""
    config = unet.config
    pooled_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    pooled = torch.randn(batch_size, pooled_width, generator=torch.Generator().manual_seed(seed))
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch_size)
    return {"text_embeds": pooled.to(device, dtype), "time_ids": time_ids.to(device, dtype)}


def sd15_diffusers_folder(quick: bool = False) -> Path:
    """A diffusers folder of an SD1.5-architecture pipeline with random weights, saved in fp32 safetensors (about
    4 GB), written once under CACHE_DIR and reused. quick: the tiny pipeline."""
    from lora_diffusion.formats.io import build_folder_atomically
    from lora_diffusion.models import (
        deterministic_state_dict,
        empty_modules,
        load_clip_tokenizer,
        make_noise_scheduler,
        save_tiny_diffusers_folder,
    )
    from lora_diffusion.models.tokenizer import save_tokenizer

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / ("tiny-diffusers" if quick else "sd15-diffusers-fp32")
    if (path / "model_index.json").is_file():
        return path
    if quick:
        return save_tiny_diffusers_folder(path)

    def fill(staging):
        text_encoder, vae, unet = empty_modules(ASSETS / "v1")
        for offset, (name, module) in enumerate((("text_encoder", text_encoder), ("vae", vae), ("unet", unet))):
            module.load_state_dict(deterministic_state_dict(module, offset), assign=True)
            module.save_pretrained(staging / name, safe_serialization=True)
            del module
        del text_encoder, vae, unet
        save_tokenizer(load_clip_tokenizer(), staging / "tokenizer")
        make_noise_scheduler(False).save_pretrained(staging / "scheduler")
        index = {"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
                 "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDPMScheduler"],
                 "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
        (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    build_folder_atomically(path, fill)  # lora_diffusion.formats.io: the folder replacer of the library
    return path


def sdxl_diffusers_folder(quick: bool = False) -> Path:
    """A diffusers folder of an SDXL-base-architecture pipeline (the shipped configs, assets/sdxl) with random
    weights in fp32 safetensors, one file per part as Stability's repository has them (about 14 GB), written once
    under CACHE_DIR and reused. quick: builtin:tiny-xl's folder."""
    from lora_diffusion.formats.io import build_folder_atomically
    from lora_diffusion.models import deterministic_state_dict, make_noise_scheduler
    from lora_diffusion.models.sdxl import (
        empty_sdxl_modules,
        save_tiny_xl_diffusers_folder,
        shipped_tokenizers,
        write_sdxl_model_index,
    )
    from lora_diffusion.models.tokenizer import save_tokenizer

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / ("tiny-xl-diffusers" if quick else "sdxl-diffusers-fp32")
    if (path / "model_index.json").is_file():
        return path
    if quick:
        return save_tiny_xl_diffusers_folder(path)

    def fill(staging):
        names = ("text_encoder", "text_encoder_2", "vae", "unet")  # empty_sdxl_modules' order
        for offset, name in enumerate(names):
            module = empty_sdxl_modules(ASSETS / "sdxl")[offset]  # on the meta device: one part in memory at once
            module.load_state_dict(deterministic_state_dict(module, offset), assign=True)
            module.save_pretrained(staging / name, safe_serialization=True, max_shard_size="20GB")
            del module
        for name, tokenizer in zip(("tokenizer", "tokenizer_2"), shipped_tokenizers()):
            save_tokenizer(tokenizer, staging / name)
        make_noise_scheduler(False).save_pretrained(staging / "scheduler")
        write_sdxl_model_index(staging)

    build_folder_atomically(path, fill)
    return path


def make_captioned_images(parent: Path, count: int = 8, size: int = 256, repeats: int = 1) -> Path:
    """`count` PNG images with captions in kohya layout: parent/<repeats>_bench/; returns parent."""
    import numpy as np
    from PIL import Image

    folder = Path(parent) / f"{repeats}_bench"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    for i in range(count):
        y, x = np.mgrid[0:size, 0:size]
        pixels = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 40 * (i % 6))], -1)
        pixels = np.clip(pixels + rng.normal(0, 10, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(f"a photo of sks, {colors[i % len(colors)]} gradient")
    return Path(parent)


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- output --------------------------------------------------------------------------------------------------------


def print_table(title: str, header: list[str], rows: list[list]):
    cells = [[str(c) for c in header]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def fmt(value) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def write_json(path, data: dict):
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    print(f"\nwrote {path}")


def gib(nbytes: float) -> float:
    return nbytes / 2**30

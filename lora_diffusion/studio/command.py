"""lora-diffusion studio: a local web UI for the LoRA workflow (dataset, train form, job queue, live progress,
models and files). It drives the library and train_lora.py only; see docs/studio.md.

    pip install -e ".[studio]"
    lora-diffusion studio            # http://127.0.0.1:7860

Listening on another address than 127.0.0.1 needs the token, made on the first start (printed once, kept 0600 in
the data folder). Every file the page names must lie under --root (default: the current folder), where the studio
works: relative paths in the form are relative to it.
"""

import os
import sys
from pathlib import Path


def add_arguments(parser):
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (another than 127.0.0.1, "
                        "localhost or ::1 requires the token)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--root", default=".", help="the folder the studio may read and write under (default: "
                        "the current folder)")
    parser.add_argument("--data_dir", default=None, help="the studio's own files: the job database, the jobs' "
                        "TOMLs and logs, the token (default: <root>/.studio)")
    parser.add_argument("--max_jobs", type=int, default=1, help="jobs that may run at once")


def run(args) -> int:
    root = Path(args.root).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"--root {args.root}: not a folder")
    if args.max_jobs < 1:
        raise ValueError(f"--max_jobs {args.max_jobs}: expected 1 or more")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port}: expected a port number from 1 to 65535")
    try:
        import uvicorn

        from .server import create_app
    except ImportError as e:
        raise ValueError(f"the studio needs its extra: pip install 'lora-diffusion[studio]' ({e})") from None
    from .security import is_local, load_or_create_token

    data_dir = Path(args.data_dir).expanduser().resolve() if args.data_dir else root / ".studio"
    data_dir.mkdir(parents=True, exist_ok=True)
    token, created = load_or_create_token(data_dir)
    os.chdir(root)  # the trainer's checks read relative paths from here, as its jobs do
    app = create_app(root, data_dir, host=args.host, port=args.port, token=token, max_running=args.max_jobs)
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{shown_host}:{args.port}/"
    if is_local(args.host):
        print(f"lora-diffusion studio: {url} (root {root}, data {data_dir})", flush=True)
    elif created:
        print(f"lora-diffusion studio: {url}?token={token}\n  the token is printed this once; it is kept in "
              f"{data_dir / 'token'} (0600)", flush=True)
    else:
        print(f"lora-diffusion studio: {url}?token=<the token in {data_dir / 'token'}>", flush=True)
    sys.stdout.flush()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0

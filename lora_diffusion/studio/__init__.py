"""`lora-diffusion studio`: a local web UI over the library and train_lora.py (docs/studio.md).

The pieces: paths.py (every file the page names is checked to lie under --root), security.py (the token, the
Host/Origin/CSRF checks), progress.py (the trainer's progress file read as it grows), jobs.py (the SQLite queue)
and runner.py (train_lora.py subprocesses), form.py (the train form from the option declarations), dataset.py and
tools.py (the dataset view and the `lora-diffusion` tools), server.py (the HTTP API and the page), command.py (the
subcommand). Only server.py imports the web stack (Starlette, uvicorn: the [studio] extra).
"""

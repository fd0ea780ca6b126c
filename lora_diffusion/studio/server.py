"""The studio's HTTP API and page (Starlette; uvicorn serves it). Every route reads or writes through the studio's
modules; security.Guard wraps the whole app. Blocking work (the trainer's checks, the dataset scan, SQLite) runs
in Starlette's thread pool; a runner thread starts and watches the jobs."""

import asyncio
import contextlib
import json
import threading
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from . import dataset, form, tools
from .jobs import JobError, JobQueue
from .paths import PathRefused, inside_root, relative_to_root
from .progress import summarize
from .runner import Runner
from .security import Guard

STATIC = Path(__file__).parent / "static"
TICK_S = 0.5  # how often the runner looks at its jobs and a page's stream at its files


class Studio:
    """What the routes share: the root, the data folder, the queue, the runner and the tool tasks."""

    def __init__(self, root, data_dir, max_running=1):
        self.root, self.data_dir = Path(root).resolve(), Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.queue = JobQueue(self.data_dir / "jobs.sqlite")
        self.runner = Runner(self.queue, self.data_dir, self.root, max_running)
        self.tasks = tools.Tasks(self.root)
        self.lock = threading.Lock()  # the runner's tick and the routes that start or stop processes
        self.stopping = threading.Event()

    def tick(self):
        with self.lock:
            self.runner.tick()

    def loop(self):
        with self.lock:
            self.runner.recover()
        while not self.stopping.wait(TICK_S):
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - one bad tick must not end the runner; the next retries
                print(f"studio: runner: {type(e).__name__}: {e}", flush=True)

    def job_view(self, job: dict, full=False) -> dict:
        view = {k: job[k] for k in ("id", "name", "state", "output_dir", "output_name", "resume_of", "pid",
                                    "created", "started", "ended", "returncode", "error", "stop_requested")}
        if full:
            events = self.runner.events(job)
            view.update(options=job["options"], progress=summarize(events), log=self.runner.log_tail(job["id"]),
                        files=[self.file_view(p) for p in self.runner.written(job, events)],
                        resume_state=self.runner.resume_state(job, events) if job["state"] in ("stopped", "failed")
                        else None,
                        command=safe_command(job["options"]))
        return view

    def file_view(self, path: Path) -> dict:
        return {"path": relative_to_root(self.root, path), "dir": path.is_dir(),
                "size": path.stat().st_size if path.is_file() else None}

    def add_job(self, values: dict, name: str | None = None, resume_of: int | None = None) -> dict:
        checked = form.check(values, self.root)
        with self.lock:  # the runner must not claim the job before it has its progress file
            job_id = self.queue.add(name or checked["output_name"], values, checked["output_dir"],
                                    checked["output_name"], resume_of)
            if not values.get("progress_file"):  # each job its own, beside its log (a resumed run gets a new one)
                self.queue.set_options(job_id, {**values, "progress_file": str(self.runner.job_dir(job_id) /
                                                                                 "progress.jsonl")})
        self.tick()
        return self.job_view(self.queue.get(job_id))


def safe_command(values):
    try:
        return form.command_line(values)
    except form.FormError:
        return None


# -- routes ----------------------------------------------------------------------------------------------------

def studio_of(request) -> Studio:
    return request.app.state.studio


async def body(request) -> dict:
    try:
        data = await request.json()
    except ValueError:
        raise form.FormError("the request's body is not JSON") from None
    if not isinstance(data, dict):
        raise form.FormError("expected a JSON object")
    return data


def answer(function):
    """A route whose refusals (bad values, paths out of the root, unknown jobs) are one-line JSON errors."""
    async def route(request):
        try:
            result = await function(request)
        except PathRefused as e:
            return JSONResponse({"error": str(e)}, status_code=403)
        except JobError as e:
            return JSONResponse({"error": str(e)}, status_code=404 if str(e).startswith("no job") else 409)
        except (form.FormError, ValueError, OSError) as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return result if isinstance(result, Response) else JSONResponse(result)
    return route


async def index(request):
    return FileResponse(STATIC / "index.html", headers={"cache-control": "no-store"})


@answer
async def options(request):
    fields = await run_in_threadpool(form.option_fields)
    return {"fields": fields, "groups": list(dict.fromkeys(f["group"] for f in fields)),
            "not_in_form": form.NOT_IN_FORM}


@answer
async def check_options(request):
    data = await body(request)
    return await run_in_threadpool(form.check, data.get("values", {}), studio_of(request).root)


@answer
async def import_options(request):
    data = await body(request)
    text, name = data.get("text"), data.get("name") or "imported.toml"
    if data.get("path"):
        path = inside_root(studio_of(request).root, data["path"], "path")
        text, name = path.read_text(encoding="utf-8"), relative_to_root(studio_of(request).root, path)
    if not isinstance(text, str):
        raise form.FormError("import: expected the file's text, or its path under the root")
    return await run_in_threadpool(form.import_config, text, str(name))


@answer
async def list_jobs(request):
    studio = studio_of(request)
    return {"jobs": [studio.job_view(j) for j in await run_in_threadpool(studio.queue.all)]}


@answer
async def add_job(request):
    data = await body(request)
    studio = studio_of(request)
    return await run_in_threadpool(studio.add_job, data.get("values", {}), data.get("name"))


@answer
async def get_job(request):
    studio = studio_of(request)
    job = await run_in_threadpool(studio.queue.get, request.path_params["job"])
    return await run_in_threadpool(studio.job_view, job, True)


@answer
async def stop_job(request):
    await body(request)
    studio = studio_of(request)

    def stop():
        with studio.lock:
            return studio.job_view(studio.runner.stop(request.path_params["job"]))
    return await run_in_threadpool(stop)


@answer
async def resume_job(request):
    await body(request)
    studio = studio_of(request)
    job = await run_in_threadpool(studio.queue.get, request.path_params["job"])
    state = await run_in_threadpool(studio.runner.resume_state, job)
    if job["state"] not in ("stopped", "failed") or state is None:
        raise JobError(f"job {job['id']} has no state to resume from (it is {job['state']})")
    values = {k: v for k, v in job["options"].items() if k != "progress_file"}
    return await run_in_threadpool(studio.add_job, {**values, "resume": state}, f"{job['name']} (resumed)",
                                   job["id"])


@answer
async def delete_job(request):
    data = await body(request)
    studio = studio_of(request)
    job = await run_in_threadpool(studio.queue.get, request.path_params["job"])
    if job["state"] == "running":
        raise JobError(f"job {job['id']} is running: stop it first")
    removed = await run_in_threadpool(studio.runner.delete_outputs, job) if data.get("files") else []
    await run_in_threadpool(studio.queue.delete, job["id"])
    return {"deleted": job["id"], "removed": [relative_to_root(studio.root, Path(p)) for p in removed]}


async def job_events(request):
    """Server-sent events: the job's row and its progress summary whenever they change, the log tail."""
    studio = studio_of(request)
    try:
        await run_in_threadpool(studio.queue.get, request.path_params["job"])
    except JobError as e:
        return JSONResponse({"error": str(e)}, status_code=404)

    async def stream():
        last = None
        while True:
            job = await run_in_threadpool(studio.queue.get, request.path_params["job"])
            view = await run_in_threadpool(studio.job_view, job, True)
            text = json.dumps(view)
            if text != last:
                last = text
                yield f"event: job\ndata: {text}\n\n"
            else:
                yield ": keep-alive\n\n"
            if job["state"] not in ("queued", "running"):
                return
            await asyncio.sleep(TICK_S)
    return StreamingResponse(stream(), media_type="text/event-stream", headers={"cache-control": "no-store"})


@answer
async def evaluate_job(request):
    await body(request)
    studio = studio_of(request)
    job = await run_in_threadpool(studio.queue.get, request.path_params["job"])
    model = job["options"].get("pretrained_model_name_or_path") or "builtin:mini"
    pattern = str(Path(job["output_dir"]) / f"{job['output_name']}*.safetensors")
    out = str(Path(job["output_dir"]) / f"{job['output_name']}-evaluate")
    return await run_in_threadpool(studio.tasks.start, "evaluate", {"model": model, "lora": [pattern], "out": out})


@answer
async def dataset_view(request):
    data = await body(request)
    values = {k: v for k, v in data.items() if k not in ("train_data_dir", "reg_data_dir")}
    return await run_in_threadpool(dataset.scan, studio_of(request).root, data.get("train_data_dir"),
                                   data.get("reg_data_dir"), **values)


@answer
async def save_caption(request):
    data = await body(request)
    saved = await run_in_threadpool(dataset.save_caption, studio_of(request).root, data.get("image"),
                                    data.get("caption_extension", ".txt"), data.get("caption"))
    return {"saved": saved}


@answer
async def image(request):
    path = await run_in_threadpool(dataset.image_file, studio_of(request).root, request.query_params.get("path"))
    return FileResponse(path, headers={"cache-control": "no-store"})


@answer
async def thumbnail(request):
    data = await run_in_threadpool(dataset.thumbnail, studio_of(request).root, request.query_params.get("path"))
    return Response(data, media_type="image/png")


@answer
async def json_file(request):
    """A results.json of `lora-diffusion evaluate` (no other file: the studio reads none but images and these)."""
    path = inside_root(studio_of(request).root, request.query_params.get("path"), "path")
    if path.name != "results.json" or not path.is_file():
        raise ValueError(f"{request.query_params.get('path')!r}: only an evaluation's results.json is served")
    return JSONResponse(json.loads(path.read_text(encoding="utf-8")))


@answer
async def list_folders(request):
    return {"folders": await run_in_threadpool(dataset.folders, studio_of(request).root,
                                               request.query_params.get("under", "."))}


@answer
async def list_images(request):
    return {"images": await run_in_threadpool(dataset.images_in, studio_of(request).root,
                                              request.query_params.get("under", "."))}


@answer
async def tool_list(request):
    return {"tools": {name: await run_in_threadpool(tools.tool_fields, name) for name in tools.TOOLS}}


@answer
async def run_tool(request):
    data = await body(request)
    return await run_in_threadpool(studio_of(request).tasks.start, request.path_params["tool"],
                                   data.get("values", {}))


@answer
async def get_task(request):
    return studio_of(request).tasks.get(request.path_params["task"])


@answer
async def info(request):
    studio = studio_of(request)
    return {"root": str(studio.root), "data_dir": str(studio.data_dir), "max_jobs": studio.runner.max_running,
            "time": time.time()}


def create_app(root, data_dir, *, host="127.0.0.1", port=7860, token=None, max_running=1, run_jobs=True):
    """The studio as an ASGI app (Guard outside). run_jobs=False leaves the runner thread off (tests tick it)."""
    studio = Studio(root, data_dir, max_running)
    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/options", options),
        Route("/api/options/check", check_options, methods=["POST"]),
        Route("/api/options/import", import_options, methods=["POST"]),
        Route("/api/jobs", list_jobs),
        Route("/api/jobs", add_job, methods=["POST"]),
        Route("/api/jobs/{job:int}", get_job),
        Route("/api/jobs/{job:int}/events", job_events),
        Route("/api/jobs/{job:int}/stop", stop_job, methods=["POST"]),
        Route("/api/jobs/{job:int}/resume", resume_job, methods=["POST"]),
        Route("/api/jobs/{job:int}/evaluate", evaluate_job, methods=["POST"]),
        Route("/api/jobs/{job:int}/delete", delete_job, methods=["POST"]),
        Route("/api/dataset", dataset_view, methods=["POST"]),
        Route("/api/caption", save_caption, methods=["POST"]),
        Route("/api/image", image),
        Route("/api/thumbnail", thumbnail),
        Route("/api/results", json_file),
        Route("/api/folders", list_folders),
        Route("/api/images", list_images),
        Route("/api/tools", tool_list),
        Route("/api/tools/{tool}", run_tool, methods=["POST"]),
        Route("/api/tasks/{task:int}", get_task),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        thread = threading.Thread(target=studio.loop, daemon=True, name="studio-runner") if run_jobs else None
        if thread:
            thread.start()
        yield
        studio.stopping.set()
        if thread:
            thread.join(timeout=5)

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.studio = studio
    return Guard(app, host=host, port=port, token=token)

// lora-diffusion studio's page: plain DOM, no build step. Every text from the server goes in as textContent.
"use strict";

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value === true) node.setAttribute(key, "");
    else if (value !== false && value != null) node.setAttribute(key, value);
  }
  for (const child of children.flat()) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}
const $ = (selector) => document.querySelector(selector);

async function api(path, data) {
  const options = data === undefined ? {} : {
    method: "POST", body: JSON.stringify(data),
    headers: {"Content-Type": "application/json", "X-Studio-Request": "1"},
  };
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({error: `${response.status} ${response.statusText}`}));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function say(text, ok = false) {
  const box = $("#message");
  box.textContent = text;
  box.className = ok ? "ok" : "";
  box.hidden = !text;
}
async function attempt(action) {
  try { say(""); return await action(); } catch (e) { say(e.message); }
}

// -- tabs -----------------------------------------------------------------------------------------------------
function showTab(name) {
  for (const button of document.querySelectorAll("#tabs button"))
    button.classList.toggle("active", button.dataset.tab === name);
  for (const section of document.querySelectorAll("main > section")) section.hidden = section.id !== `tab-${name}`;
  if (name === "jobs") loadJobs();
}
for (const button of document.querySelectorAll("#tabs button"))
  button.addEventListener("click", () => showTab(button.dataset.tab));

// -- the train form ---------------------------------------------------------------------------------------------
const form = {fields: [], groups: [], values: {}, group: null};

function fieldInput(field) {
  const value = form.values[field.name];
  const set = (v) => {
    if (v === "" || v === null || (field.kind === "switch" && v === !!field.default)) delete form.values[field.name];
    else form.values[field.name] = v;
    row.classList.toggle("set", field.name in form.values);
  };
  let input;
  if (field.kind === "switch") {
    input = el("input", {type: "checkbox", checked: value ?? field.default ?? false});
    input.addEventListener("change", () => set(input.checked));
  } else if (field.kind === "choice") {
    input = el("select", {}, el("option", {value: ""}, `(default${field.default != null ? ": " + field.default : ""})`),
      field.choices.map((c) => el("option", {value: c, selected: String(value) === String(c)}, c)));
    input.addEventListener("change", () => set(input.value));
  } else {
    const shown = Array.isArray(value) ? value.join(" ") : value ?? "";
    const placeholder = field.default == null || field.default === "" ? "" : Array.isArray(field.default) ?
      field.default.join(" ") : String(field.default);
    input = el("input", {value: shown, placeholder, title: field.kind === "list" ? "items separated by spaces" : ""});
    input.addEventListener("change", () => set(field.kind === "list" ? input.value.split(/\s+/).filter(Boolean) :
      input.value.trim()));
  }
  input.name = field.name;
  const note = [field.help, field.alias_of ? `(sets --${field.alias_of})` : "", field.refused ?
    `refused here: ${field.refused}` : "", field.kohya ? "" : "(this trainer's own)"].filter(Boolean).join(" ");
  const row = el("div", {class: "field" + (field.refused ? " refused" : "") + (field.name in form.values ? " set" : ""),
    "data-field": field.name}, el("span", {class: "name"}, `--${field.name}`), input, el("span", {class: "help"}, note));
  return row;
}

function drawForm() {
  const groups = $("#groups");
  groups.replaceChildren(...form.groups.map((g) => el("button", {class: g === form.group ? "active" : "",
    "data-group": g, onclick: () => { form.group = g; drawForm(); }}, g.split(" (")[0])));
  $("#fields").replaceChildren(...form.fields.filter((f) => f.group === form.group).map(fieldInput));
}

async function loadForm() {
  const options = await api("/api/options");
  Object.assign(form, {fields: options.fields, groups: options.groups, group: options.groups[0]});
  drawForm();
}

function showCheck(result) {
  const out = [el("h3", {}, "TOML"), el("pre", {id: "toml"}, result.toml),
    el("h3", {}, "Command line"), el("pre", {id: "command"}, result.command),
    el("a", {href: URL.createObjectURL(new Blob([result.toml], {type: "application/toml"})), download: "run.toml"},
      "Download the TOML")];
  for (const warning of result.warnings || []) out.unshift(el("div", {class: "warn"}, warning));
  $("#check-result").replaceChildren(...out);
}

$("#import-go").addEventListener("click", () => attempt(async () => {
  const file = $("#import-file").files[0];
  const path = $("#import-path").value.trim();
  const request = file ? {text: await file.text(), name: file.name} : {path};
  const result = await api("/api/options/import", request);
  form.values = result.values;
  drawForm();
  $("#check-result").replaceChildren(...result.warnings.map((w) => el("div", {class: "warn"}, w)));
  say(`imported ${Object.keys(result.values).length} settings from ${file ? file.name : path}`, true);
}));
$("#check").addEventListener("click", () => attempt(async () => {
  showCheck(await api("/api/options/check", {values: form.values}));
  say("the trainer accepts these settings", true);
}));
$("#queue").addEventListener("click", () => attempt(async () => {
  const job = await api("/api/jobs", {values: form.values});
  say(`queued job ${job.id} (${job.name})`, true);
  showTab("jobs");
  openJob(job.id);
}));
$("#reset").addEventListener("click", () => { form.values = {}; drawForm(); $("#check-result").replaceChildren(); });

// -- jobs -------------------------------------------------------------------------------------------------------
let selectedJob = null, stream = null;

async function loadJobs() {
  const {jobs} = await api("/api/jobs");
  $("#job-table tbody").replaceChildren(...jobs.map((job) => el("tr", {class: "job" + (job.id === selectedJob ?
    " selected" : ""), "data-job": job.id, onclick: () => openJob(job.id)}, el("td", {}, job.id), el("td", {}, job.name),
    el("td", {class: `state-${job.state}`}, job.state), el("td", {}, ""),
    el("td", {}, job.started ? new Date(job.started * 1000).toLocaleTimeString() : ""))));
}

function openJob(id) {
  selectedJob = id;
  if (stream) stream.close();
  stream = new EventSource(`/api/jobs/${id}/events`);
  stream.addEventListener("job", (event) => drawJob(JSON.parse(event.data)));
  stream.onerror = () => { stream.close(); };  // the job ended (the server closes the stream) or the studio stopped
  loadJobs();
}

function seconds(s) {
  if (s == null) return "?";
  s = Math.round(s);
  return s >= 3600 ? `${Math.floor(s / 3600)} h ${Math.floor(s % 3600 / 60)} min` : s >= 60 ?
    `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}

function chart(title, points, series) {  // points: [[x, y1, y2, ...]]; an SVG line per series
  const w = 420, h = 180, pad = 34, ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", w); svg.setAttribute("height", h); svg.setAttribute("class", "chart");
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text != null) node.textContent = text;
    svg.append(node);
  };
  add("text", {x: pad, y: 12}, title);
  const usable = points.filter((p) => p.slice(1).some((v) => typeof v === "number"));
  if (usable.length) {
    const xs = usable.map((p) => p[0]), ys = usable.flatMap((p) => p.slice(1).filter((v) => typeof v === "number"));
    const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    const X = (x) => pad + (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5) * (w - pad - 8);
    const Y = (y) => h - 18 - (y1 > y0 ? (y - y0) / (y1 - y0) : 0.5) * (h - 40);
    add("line", {x1: pad, y1: h - 18, x2: w - 8, y2: h - 18, stroke: "#999"});
    add("text", {x: 2, y: Y(y1) + 4}, y1.toPrecision(3)); add("text", {x: 2, y: Y(y0)}, y0.toPrecision(3));
    add("text", {x: pad, y: h - 4}, x0); add("text", {x: w - 40, y: h - 4}, x1);
    series.forEach((color, i) => {
      const line = usable.filter((p) => typeof p[i + 1] === "number").map((p) => `${X(p[0])},${Y(p[i + 1])}`);
      if (line.length) add("polyline", {points: line.join(" "), fill: "none", stroke: color, "stroke-width": 1.5});
    });
  }
  return svg;
}

function imageUrl(path) { return `/api/image?path=${encodeURIComponent(path)}`; }

function drawJob(job) {
  if (job.id !== selectedJob) return;
  const p = job.progress || {};
  const buttons = [];
  const act = (label, action, attrs = {}) => buttons.push(el("button", {...attrs, onclick: () => attempt(action)}, label));
  if (job.state === "running" || job.state === "queued")
    act("Stop", async () => { await api(`/api/jobs/${job.id}/stop`, {}); say("stop asked: the trainer saves a LoRA " +
      "and its state at the next step", true); }, {id: "job-stop"});
  if (job.resume_state)
    act("Resume", async () => { const next = await api(`/api/jobs/${job.id}/resume`, {}); openJob(next.id); },
      {id: "job-resume"});
  act("Edit & re-run", async () => { form.values = {...job.options}; delete form.values.progress_file;
    delete form.values.resume; drawForm(); showTab("train"); });
  if (job.state === "finished") act("Evaluate the epochs", async () => {
    const task = await api(`/api/jobs/${job.id}/evaluate`, {});
    watchTask(task, $("#job-evaluate"), `${job.output_dir}/${job.output_name}-evaluate`);
  });
  if (job.state !== "running")
    act("Delete", async () => {
      if (!confirm(`Delete job ${job.id} from the list?`)) return;
      const files = confirm("Also delete the files this job wrote (its LoRA files, states and samples)?");
      await api(`/api/jobs/${job.id}/delete`, {files}); selectedJob = null; $("#job-detail").replaceChildren();
      loadJobs();
    });
  const stepLine = `step ${p.step ?? 0}${p.max_train_steps ? " / " + p.max_train_steps : ""}, epoch ` +
    `${p.epoch || 1}${p.epochs ? " / " + p.epochs : ""}` +
    (p.steps_per_s ? `, ${p.steps_per_s.toFixed(2)} it/s, ETA ${seconds(p.eta_s)}` : "");
  const metrics = p.validations.map((v) => el("tr", {}, el("td", {}, `step ${v.step}`),
    el("td", {}, Object.entries(v.metrics || {}).map(([k, x]) => `${k} ${typeof x === "number" ? x.toFixed(4) : x}`)
      .join(", "))));
  const lrColors = ["#1d5fa8", "#a85a1d", "#2f6f3e"];
  $("#job-detail").replaceChildren(
    el("h2", {}, `Job ${job.id}: ${job.name} `, el("span", {id: "job-state", class: `state-${job.state}`}, job.state)),
    el("div", {class: "row"}, buttons),
    job.error ? el("div", {class: "warn"}, job.error) : "",
    el("div", {id: "job-step"}, stepLine),
    p.max_train_steps ? el("progress", {max: p.max_train_steps, value: p.step || 0}) : "",
    el("div", {class: "charts"}, chart("loss (and its running average)", p.loss || [], ["#a82020", "#777"]),
      chart("learning rate", p.lr || [], lrColors)),
    metrics.length ? el("table", {id: "job-validation"}, el("tr", {}, el("th", {}, "validation"), el("th", {}, "")),
      metrics) : "",
    el("h3", {}, "Samples"),
    el("div", {class: "gallery", id: "job-samples"}, p.samples.map((s) => el("figure", {class: "thumb"},
      el("img", {src: imageUrl(s.path), alt: s.prompt || ""}), el("figcaption", {}, `step ${s.step}: ${s.prompt || ""}`)))),
    el("h3", {}, "Files"),
    el("ul", {id: "job-files"}, job.files.map((f) => el("li", {}, f.path + (f.dir ? "/" : "") +
      (f.size != null ? ` (${(f.size / 1024).toFixed(1)} KiB)` : "")))),
    el("div", {id: "job-evaluate"}),
    el("h3", {}, "Command line"), el("pre", {}, job.command || ""),
    el("h3", {}, "Log"), el("pre", {id: "job-log"}, (job.log || []).join("\n")));
  const row = document.querySelector(`tr[data-job="${job.id}"]`);
  if (row) {
    row.children[2].textContent = job.state; row.children[2].className = `state-${job.state}`;
    row.children[3].textContent = p.step ? `${p.step}${p.max_train_steps ? "/" + p.max_train_steps : ""}` : "";
  } else loadJobs();
}

// -- tools ------------------------------------------------------------------------------------------------------
let toolFields = null;

function watchTask(task, box, resultsFolder) {
  const out = el("pre", {class: "task-output"}, "running ...");
  box.replaceChildren(el("div", {class: "muted"}, `lora-diffusion ${task.tool} ${task.argv.slice(1).join(" ")}`), out);
  const poll = async () => {
    const now = await api(`/api/tasks/${task.id}`);
    out.textContent = now.output || (now.state === "running" ? "running ..." : "");
    if (now.state === "running") return setTimeout(poll, 700);
    box.append(el("div", {class: `state-${now.state}`}, `${now.state} (exit status ${now.returncode})`));
    const best = (now.output.match(/^best by \S+: (\S+)/m) || [])[1];  // lora-diffusion evaluate's verdict
    if (resultsFolder && now.state === "finished") showResults(box, resultsFolder, best);
  };
  setTimeout(poll, 300);
}

async function showResults(box, folder, best) {  // lora-diffusion evaluate's results.json and grid.png
  const rows = await api(`/api/results?path=${encodeURIComponent(folder + "/results.json")}`);
  const keys = Object.keys(rows[0] || {}).filter((k) => typeof rows[0][k] !== "object");
  box.append(el("table", {class: "results"}, el("tr", {}, keys.map((k) => el("th", {}, k))),
    rows.map((r) => el("tr", {class: r.label === best ? "best" : ""}, keys.map((k) => el("td", {},
      typeof r[k] === "number" ? +r[k].toFixed(4) : r[k]))))),
  best ? el("p", {}, `best: ${best}`) : "",
  el("img", {src: imageUrl(folder + "/grid.png"), class: "grid"}));
}

function drawToolRunner(box) {
  const names = box.dataset.tools.split(" ");
  const select = el("select", {}, names.map((n) => el("option", {value: n}, n)));
  const fields = el("div"), output = el("div");
  const values = {};
  const draw = () => {
    for (const key of Object.keys(values)) delete values[key];
    fields.replaceChildren(...toolFields[select.value].map((f) => {
      let input;
      if (f.kind === "switch") {
        input = el("input", {type: "checkbox"});
        input.addEventListener("change", () => { values[f.name] = input.checked; });
      } else {
        input = el("input", {placeholder: f.default == null || Array.isArray(f.default) ? "" : String(f.default)});
        input.addEventListener("change", () => {
          values[f.name] = f.kind === "list" ? input.value.split(/\s+/).filter(Boolean) : input.value.trim();
        });
      }
      input.name = f.name;
      return el("div", {class: "field"}, el("span", {class: "name"}, f.positional ? f.name : `--${f.name}`), input,
        el("span", {class: "help"}, f.help));
    }));
  };
  select.addEventListener("change", draw);
  const run = el("button", {class: "primary", onclick: () => attempt(async () => {
    const task = await api(`/api/tools/${select.value}`, {values});
    watchTask(task, output, select.value === "evaluate" ? values.out : null);
  })}, "Run");
  box.replaceChildren(el("div", {class: "row"}, select, run), fields, output);
  draw();
}

// -- dataset ----------------------------------------------------------------------------------------------------
function datasetRequest() {
  return {train_data_dir: $("#ds-train").value.trim(), reg_data_dir: $("#ds-reg").value.trim() || null,
    caption_extension: $("#ds-ext").value.trim() || ".txt", resolution: $("#ds-res").value.trim() || null,
    enable_bucket: $("#ds-bucket").checked};
}

async function loadDataset() {
  const request = datasetRequest();
  const result = await api("/api/dataset", request);
  $("#ds-warnings").replaceChildren(...result.warnings.map((w) => el("div", {class: "warn"}, w)));
  $("#ds-summary").replaceChildren(
    el("table", {id: "ds-concepts"}, el("tr", {}, ["folder", "repeats", "class tokens", "images", "steps per epoch"]
      .map((h) => el("th", {}, h))), result.concepts.map((c) => el("tr", {}, el("td", {}, c.folder + (c.is_reg ?
      " (reg)" : "")), el("td", {}, c.repeats), el("td", {}, c.class_tokens || ""), el("td", {}, c.images),
      el("td", {}, c.steps_per_epoch)))),
    el("p", {}, `${result.total_images} images; buckets: ` + Object.entries(result.buckets).map(([b, n]) =>
      `${b} (${n})`).join(", ")));
  $("#ds-images").replaceChildren(...result.images.map((image) => {
    const text = el("textarea", {rows: 3}, image.caption);
    const save = el("button", {onclick: () => attempt(async () => {
      const saved = await api("/api/caption", {image: image.path, caption_extension: request.caption_extension,
        caption: text.value});
      say(`saved ${saved.saved}`, true);
    })}, "Save caption");
    return el("figure", {class: "thumb", "data-image": image.path},
      el("img", {src: `/api/thumbnail?path=${encodeURIComponent(image.path)}`, alt: image.path, loading: "lazy"}),
      el("figcaption", {class: "muted"}, `${image.path.split("/").pop()} ${image.size.join("x")} -> ${image.bucket
        .join("x")}`), text, save);
  }));
}
$("#ds-load").addEventListener("click", () => attempt(loadDataset));
$("#ds-from-form").addEventListener("click", () => {
  const v = form.values;
  $("#ds-train").value = v.train_data_dir || ""; $("#ds-reg").value = v.reg_data_dir || "";
  $("#ds-ext").value = v.caption_extension || ".txt"; $("#ds-res").value = v.resolution || "";
  $("#ds-bucket").checked = !!v.enable_bucket;
  attempt(loadDataset);
});

$("#img-show").addEventListener("click", () => attempt(async () => {
  const {images} = await api(`/api/images?under=${encodeURIComponent($("#img-folder").value.trim())}`);
  $("#img-gallery").replaceChildren(...images.map((p) => el("figure", {class: "thumb"}, el("img", {src: imageUrl(p)}),
    el("figcaption", {}, p))));
}));

// -- start ------------------------------------------------------------------------------------------------------
attempt(async () => {
  const info = await api("/api/info");
  $("#root").textContent = `root ${info.root}`;
  await loadForm();
  toolFields = (await api("/api/tools")).tools;
  for (const box of document.querySelectorAll(".tool-runner")) drawToolRunner(box);
  document.body.dataset.ready = "1";
});

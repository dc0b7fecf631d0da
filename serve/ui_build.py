"""The Build tab: from a dataset to a fine-tuned, compared chatbot without leaving the browser.

    1. Data      bundled sample, a file in the Builder's data folder (or an upload), or a hub id;
                 Preview shows the detected format, kept/dropped counts with reasons, length histogram
    2. Settings  a preset as the starting point, then base, quantization, LoRA and training length;
                 a memory estimate (`chatbuild.planner`) follows the settings
    3. Run       Start checks every field (errors appear on the field, before anything starts) and
                 queues a fine-tune job: a separate process (`serve.jobs`), never this server's
    Jobs         every job with its state; the selected one's progress bar, loss curve, tokens/s,
                 memory and log tail, refreshed every second; Cancel (checkpoint, then stop), Resume
    Evaluate     "evaluate against …": an eval job over this server's API on the demo or Vicuna
                 questions; its battles go to the Leaderboard tab

Who: every action (upload, preview, start, cancel, resume, evaluate) asks the Builder whether the
login of the request may build (`Builder.refusal`; `chatbuild serve --builder-users`), and cancel
and resume act only on the login's own jobs. A login without the permission sees the tab with its
buttons off and a line saying why; calling the endpoints anyway gets that line as the error.

When a fine-tune finishes, the server hot-loads its adapter (`Builder._after`) and the Chat and
Arena model pickers of every open page pick it up at their next refresh.

API names (gradio_client): /build_preset /build_estimate /build_upload /build_preview /build_start
/build_job /build_cancel /build_resume /build_evaluate.

The logic lives in `serve.builder` (no Gradio); this module is layout and wiring.
"""

import html

import gradio as gr
import pandas as pd

from chatbuild import runs
from chatbuild.config import OBJECTIVES
from chatbuild.data import FORMATS, MODES, PAIR_FORMATS
from chatbuild.engines import LoadsAdapters
from chatbuild.errors import UserError
from serve.builder import FIELDS, Builder, DataChoice, preset_values, presets, progress_of
from serve.jobs import FINISHED, Job
from serve.ui_common import UIContext
from serve.uploads import discard, uploaded_file

SOURCES = {"Bundled sample": "sample", "File in the data folder": "file", "Hub dataset id": "hub"}
JOB_COLUMNS = ["Job", "Kind", "Name", "Status", "Progress", "Loss", "Note"]
DEFAULT_PRESET = "tiny-cpu"
# The objectives in a few words (chatbuild.config.OBJECTIVES has the full lines; docs/ui.md).
OBJECTIVE_INFO = "sft: conversations · dpo: preference pairs, against a frozen reference · orpo: pairs, no reference"


def build_build_tab(ctx: UIContext, builder: Builder, pickers: list[gr.Dropdown]) -> None:
    """Lay out the tab and wire its events. `pickers` are the model dropdowns of the other tabs,
    refreshed when the set of served models changes."""
    start_values = _defaults(ctx)
    access = gr.Markdown(elem_id="build-access")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=300):
            gr.Markdown("### 1. Data")
            source = gr.Radio(list(SOURCES), value="Bundled sample", label="Training data", elem_id="build-source")
            data_file = gr.Dropdown(builder.data_files(), label="File in the data folder", allow_custom_value=True,
                                    elem_id="build-data-file", visible=False)
            upload = gr.File(label="Upload a dataset (.jsonl, .json, .jsonl.gz, .parquet)", visible=False,
                             file_types=[".jsonl", ".json", ".gz", ".parquet"], elem_id="build-upload")
            hub_id = gr.Textbox(label="Hub dataset id", placeholder="OpenAssistant/oasst1", visible=False,
                                elem_id="build-hub-id")
            with gr.Accordion("How to read it", open=False):
                fmt = gr.Dropdown(list(dict.fromkeys([*FORMATS, *PAIR_FORMATS])), value="auto", label="Format",
                                  info="DPO and ORPO read preference pairs: OASST1 ranked replies or a pairs file")
                mode = gr.Radio(list(MODES), value="top1", label="OASST1 threads",
                                info="top1: the best-ranked reply at each turn (the paper's choice); all: every branch")
                lang = gr.Textbox(label="Languages", placeholder="all (or e.g. en,de)")
            preview = gr.Button("Preview data", size="sm", elem_id="build-preview")
            report = gr.Markdown(elem_id="build-data-report")
        with gr.Column(scale=1, min_width=300):
            gr.Markdown("### 2. Model and training")
            preset = gr.Dropdown(presets(), value=DEFAULT_PRESET, label="Start from preset", elem_id="build-preset")
            fields = {
                "model.base": gr.Textbox(start_values["model.base"], label=FIELDS["model.base"],
                                         info="hub id, local folder, or 'tiny' (the embedded CPU base)",
                                         elem_id="build-base"),
                "model.quant": gr.Dropdown(["nf4", "fp4", "int8", "none"], value=start_values["model.quant"],
                                           label=FIELDS["model.quant"]),
                "model.double_quant": gr.Checkbox(start_values["model.double_quant"], label=FIELDS["model.double_quant"]),
            }
            with gr.Row():
                fields["lora.r"] = gr.Number(start_values["lora.r"], label=FIELDS["lora.r"], precision=0,
                                             elem_id="build-lora-r")
                fields["lora.alpha"] = gr.Number(start_values["lora.alpha"], label=FIELDS["lora.alpha"], precision=0)
                fields["lora.dropout"] = gr.Number(start_values["lora.dropout"], label=FIELDS["lora.dropout"])
            with gr.Row():
                fields["train.steps"] = gr.Number(start_values["train.steps"], label=FIELDS["train.steps"], precision=0,
                                                  elem_id="build-steps")
                fields["train.lr"] = gr.Number(start_values["train.lr"], label=FIELDS["train.lr"])
                fields["data.max_length"] = gr.Number(start_values["data.max_length"], label=FIELDS["data.max_length"],
                                                      precision=0)
            with gr.Row():
                fields["train.batch_size"] = gr.Number(start_values["train.batch_size"], label=FIELDS["train.batch_size"],
                                                       precision=0)
                fields["train.micro_batch_size"] = gr.Number(start_values["train.micro_batch_size"],
                                                             label=FIELDS["train.micro_batch_size"], precision=0)
            with gr.Row():
                fields["train.objective"] = gr.Radio(list(OBJECTIVES), value=start_values["train.objective"],
                                                     label=FIELDS["train.objective"], elem_id="build-objective",
                                                     info=OBJECTIVE_INFO, scale=2)
                fields["train.beta"] = gr.Number(start_values["train.beta"], label=FIELDS["train.beta"],
                                                 elem_id="build-beta", scale=1, min_width=90)
            fields = {key: fields[key] for key in FIELDS}  # inputs and outputs below go in FIELDS' order
            estimate = gr.Markdown(builder.estimate(start_values), elem_id="build-estimate")
        with gr.Column(scale=1, min_width=260):
            gr.Markdown("### 3. Run")
            name = gr.Textbox(_free_name(builder, ctx), label="Run name", info="also the model's name once served",
                              elem_id="build-name")
            start = gr.Button("Start fine-tune", variant="primary", elem_id="build-start")
            started = gr.Markdown(elem_id="build-started")

    gr.Markdown("### Jobs")
    jobs_table = gr.Dataframe(headers=JOB_COLUMNS, datatype=["number", "str", "str", "str", "str", "str", "str"],
                              interactive=False, elem_id="build-jobs", value=_jobs_rows(builder, builder.jobs.jobs(), None))
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            job = gr.Dropdown(_job_choices(builder), label="Job", allow_custom_value=True, elem_id="build-job")
            bar = gr.HTML(_bar(None), elem_id="build-progress")
            stats = gr.Markdown(elem_id="build-stats")
            curve = gr.LinePlot(None, x="step", y="loss", color="split", title="Loss",
                                elem_id="build-loss", height=260)
            with gr.Row():
                cancel = gr.Button("Cancel", variant="stop", size="sm", elem_id="build-cancel")
                resume = gr.Button("Resume", size="sm", elem_id="build-resume")
        with gr.Column(scale=2):
            log = gr.Textbox(label="Log (last lines)", lines=14, max_lines=14, autoscroll=True, elem_id="build-log")
    gr.Markdown("### Evaluate against …")
    with gr.Row():
        models = ctx.models()
        eval_model = gr.Dropdown(models, value=models[0] if models else None, label="Model",
                                 allow_custom_value=True, elem_id="build-eval-model")
        against = gr.Dropdown(models, value=models[-1] if models else None, label="Against",
                              allow_custom_value=True, elem_id="build-eval-against")
        questions = gr.Radio(["demo", "vicuna"], value="demo", label="Questions",
                             info="demo: the bundled 16; vicuna: the Vicuna benchmark's 80")
        answer_tokens = gr.Number(128, label="Answer length (tokens)", precision=0)
        evaluate = gr.Button("Evaluate", elem_id="build-evaluate")
    gr.Markdown(builder.judge_description() + ". Results land in the Leaderboard tab (source: judge).")
    known_models = gr.State(models)

    # ── events ──
    def pick_source(choice):
        kind = SOURCES.get(choice, "sample")
        return (gr.update(visible=kind == "file", choices=builder.data_files()), gr.update(visible=kind == "file"),
                gr.update(visible=kind == "hub"))

    def uploaded(path, request: gr.Request):
        """Copy an upload into the data folder. Only a file in Gradio's upload folder is taken (a
        client can name any path); a refused one is deleted at once."""
        _allowed(builder, request)
        if not path:
            return gr.skip(), gr.skip()
        try:
            upload = uploaded_file(path, builder.max_upload_bytes, "max_upload_bytes")
        except UserError as e:
            raise gr.Error(str(e)) from None
        try:
            saved = builder.save_upload(upload)
        except UserError as e:
            discard(upload)
            raise gr.Error(str(e)) from None
        return gr.update(choices=builder.data_files(), value=saved, visible=True), f"Saved as `{saved}` in the data folder."

    def data_choice(source, data_file, hub_id, fmt, mode, lang) -> DataChoice:
        kind = SOURCES.get(source, source)  # API callers may give the kind itself
        return DataChoice(kind, data_file if kind == "file" else (hub_id or ""), fmt, mode, lang or "")

    def preview_data(source, data_file, hub_id, fmt, mode, lang, objective, request: gr.Request):
        if refusal := builder.refusal(_login(request)):
            return f"⚠️ {refusal}"
        try:
            text, _ = builder.preview(data_choice(source, data_file, hub_id, fmt, mode, lang), objective or "sft")
        except UserError as e:
            return f"⚠️ {e}"
        return text

    def load_preset(name):
        try:
            values = preset_values(name)
        except UserError as e:
            raise gr.Error(str(e)) from None
        if values["model.base"] == "tiny":  # the tiny preset trains on what this server serves, if it can
            values["model.base"] = _defaults(ctx)["model.base"]
        return [values[k] for k in FIELDS]

    def estimate_memory(*values):
        return builder.estimate(dict(zip(FIELDS, values)))

    form = [name, source, data_file, hub_id, fmt, mode, lang, preset, *fields.values()]

    # `request` comes before the fields' values: Gradio passes it only to a named positional parameter.
    def validate(name, source, data_file, hub_id, fmt, mode, lang, preset, request: gr.Request, *values):
        """One verdict per input of the Start event, so each error shows on its own field."""
        if refusal := builder.refusal(_login(request)):  # checked first: nothing about the folder is told
            return [gr.validate(False, refusal)] + [None] * (len(form) - 1)
        errors = builder.check(preset, dict(zip(FIELDS, values)), name,
                               data_choice(source, data_file, hub_id, fmt, mode, lang))
        verdicts = [gr.validate("name" not in errors, errors.get("name", "")), None, None, None, None, None, None,
                    gr.validate("preset" not in errors and "settings" not in errors,
                                errors.get("preset") or errors.get("settings", ""))]
        if "data" in errors:  # on the widget of the chosen source
            verdicts[{"file": 2, "hub": 3}.get(SOURCES.get(source, source), 1)] = gr.validate(False, errors["data"])
        # the label leads: API callers see these inputs as parameter_N
        verdicts += [gr.validate(k not in errors, f"{FIELDS[k]}: {errors[k]}" if k in errors else "") for k in FIELDS]
        return verdicts

    def start_job(name, source, data_file, hub_id, fmt, mode, lang, preset, request: gr.Request, *values):
        try:
            job = builder.submit_finetune(preset, dict(zip(FIELDS, values)), name,
                                          data_choice(source, data_file, hub_id, fmt, mode, lang), _login(request))
        except UserError as e:
            raise gr.Error(str(e)) from None
        where = "starts now" if not _busy(builder, job.id) else "waits for the running job"
        return (f"Job **{job.id}** `{job.name}` queued; it {where}. Follow it below.",
                gr.update(choices=_job_choices(builder), value=job.id), _free_name(builder, ctx, taken=job.name))

    def show_job(job_id, seen_models, request: gr.Request):
        """The job view plus the table, and new model choices for the pickers when they changed."""
        jobs = builder.jobs.jobs()  # one snapshot: the view and the table never disagree on a job's status
        login = _login(request)
        view = _job_view(builder, job_id, jobs, login)
        current = ctx.models()
        if current != seen_models:
            new = [m for m in current if m not in (seen_models or [])]
            updates = [gr.update(choices=current) for _ in pickers] + \
                      [gr.update(choices=current, value=new[-1]) if new else gr.update(choices=current),
                       gr.update(choices=current)]
        else:
            updates = [gr.skip() for _ in range(len(pickers) + 2)]
        return (*view, _jobs_rows(builder, jobs, login), current, *updates)

    def cancel_job(job_id, request: gr.Request):
        try:
            job = builder.cancel(_job_id(job_id), _login(request))
        except UserError as e:
            raise gr.Error(str(e)) from None
        return f"Job {job.id}: " + ("cancelled." if job.status == "cancelled" else
                                    "stopping — it saves a checkpoint first, then stops.")

    def resume_job(job_id, request: gr.Request):
        try:
            job = builder.resume(_job_id(job_id), _login(request))
        except UserError as e:
            raise gr.Error(str(e)) from None
        return f"Job {job.id} queued again; it continues " + ("from its last checkpoint." if job.resume else "from the start.")

    def evaluate_models(model, against, questions, tokens, request: gr.Request):
        try:
            job = builder.submit_eval(model, against, questions, int(tokens or 128), login=_login(request))
        except (UserError, ValueError) as e:
            raise gr.Error(str(e)) from None
        return (f"Evaluation job **{job.id}** queued: `{model}` vs `{against}` on the {questions} questions.",
                gr.update(choices=_job_choices(builder), value=job.id))

    def show_access(request: gr.Request):
        """On page load: a login that may not build gets the reason and the action buttons off."""
        refusal = builder.refusal(_login(request))
        off = gr.update(interactive=False) if refusal else gr.skip()
        return (f"⚠️ {refusal}." if refusal else "", *[off] * 6)

    gr.on(None, show_access, None, [access, upload, preview, start, cancel, resume, evaluate],
          api_visibility="private", queue=False)
    source.change(pick_source, source, [data_file, upload, hub_id], api_visibility="private", queue=False)
    upload.upload(uploaded, upload, [data_file, report], api_name="build_upload")
    preview.click(preview_data, [source, data_file, hub_id, fmt, mode, lang, fields["train.objective"]], report,
                  api_name="build_preview",
                  concurrency_limit=2, concurrency_id="build_preview")
    preset.change(load_preset, preset, list(fields.values()), api_name="build_preset", queue=False)
    gr.on([f.change for f in fields.values()], estimate_memory, list(fields.values()), estimate,
          api_name="build_estimate", queue=False, show_progress="hidden")
    start.click(start_job, form, [started, job, name], api_name="build_start", validator=validate)
    view_outputs = [bar, stats, curve, log, jobs_table, known_models, *pickers, eval_model, against]
    job.change(show_job, [job, known_models], view_outputs, api_name="build_job", show_progress="hidden")
    gr.Timer(1.0).tick(show_job, [job, known_models], view_outputs, api_visibility="private", show_progress="hidden")
    cancel.click(cancel_job, job, started, api_name="build_cancel", queue=False)
    resume.click(resume_job, job, started, api_name="build_resume", queue=False)
    evaluate.click(evaluate_models, [eval_model, against, questions, answer_tokens], [started, job],
                   api_name="build_evaluate")


# ── helpers ────────────────────────────────────────────────────────────────────────────────────
def _defaults(ctx: UIContext) -> dict:
    """The tiny preset, on the base this server serves (so the result can be served here at once)."""
    values = preset_values(DEFAULT_PRESET)
    engine = ctx.state.engine
    if isinstance(engine, LoadsAdapters):  # key: (base, revision, quant, ...), see Run.base_key()
        values["model.base"], values["model.quant"] = engine.base_key[0], engine.base_key[2]
    return values


def _free_name(builder: Builder, ctx: UIContext, taken: str | None = None) -> str:
    used = {p.name for p in builder.runs_dir.iterdir()} | set(ctx.models()) | {taken}
    n = 1
    while f"my-chatbot-{n}" in used:
        n += 1
    return f"my-chatbot-{n}"


def _login(request: gr.Request | None) -> str | None:
    """The request's UI login; None on a server without logins."""
    return getattr(request, "username", None)


def _allowed(builder: Builder, request: gr.Request | None) -> None:
    if refusal := builder.refusal(_login(request)):
        raise gr.Error(refusal)


def _job_id(value) -> int:
    try:
        return int(str(value).split(" ")[0].lstrip("#"))
    except (TypeError, ValueError):
        raise gr.Error("pick a job first") from None


def _job_choices(builder: Builder) -> list[tuple[str, int]]:
    return [(f"#{j.id} {j.kind} {j.name}", j.id) for j in builder.jobs.jobs()]


def _busy(builder: Builder, job_id: int) -> bool:
    return any(j.status == "running" and j.id != job_id for j in builder.jobs.jobs())


def _jobs_rows(builder: Builder, jobs: list[Job], login: str | None) -> list[list]:
    """The queue's table; the last column (error or note) only on the rows `login` may read."""
    rows = []
    for j in jobs[:50]:
        p = progress_of(j)
        step = f"{p['step']}/{p['steps']}" if p.get("steps") else ""
        said = (j.error or j.note or "") if builder.may_read(j, login) else ""
        rows.append([j.id, j.kind, j.name, j.status, step, "" if p.get("loss") is None else f"{p['loss']:.3f}", said])
    return rows


def _job_view(builder: Builder, job_id, jobs: list[Job], login: str | None) -> tuple:
    """(progress bar, stats, loss curve, log tail) of one job, as it is in the snapshot `jobs`; its log,
    error, note and folder only when `login` may read them (`Builder.may_read`)."""
    if job_id in (None, ""):
        return _bar(None), "Start a job, or pick one above.", _curve_frame(None), ""
    try:
        wanted = _job_id(job_id)
    except gr.Error:
        return _bar(None), f"No job {job_id}.", _curve_frame(None), ""
    job = next((j for j in jobs if j.id == wanted), None)
    if job is None:
        return _bar(None), f"No job {job_id}.", _curve_frame(None), ""
    p = progress_of(job)
    parts = [f"**{job.status}**"]
    if p.get("steps"):
        parts.append(f"step {p['step']} of {p['steps']}")
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.3f}")
    if p.get("tokens_per_s"):
        parts.append(f"{p['tokens_per_s']:,.0f} tokens/s")
    if p.get("memory_gb"):
        parts.append(f"{p['memory_gb']:.2f} GB peak memory")
    if not builder.may_read(job, login):
        parts.append(f"its log and messages are shown only to {job.owner or 'the operator'}")
        return _bar(job, p["fraction"]), " · ".join(parts), _curve_frame(p), ""
    if job.error:
        parts.append(f"⚠️ {job.error}")
    if job.note:
        parts.append(job.note)
    if job.kind == "eval" and job.status == "done":
        board = builder.evals_dir / job.name / "leaderboard.md"
        if board.is_file():
            parts.append("\n\n" + board.read_text())
    elif job.status in FINISHED and job.kind == "finetune":
        parts.append(f"run folder: `{job.run_dir}`")
    if job.kind == "finetune" and (board := runs.tracking_dir(job.run_dir, "tensorboard")).is_dir():  # train.report_to
        parts.append(f"tensorboard: `tensorboard --logdir {board}`")
    return _bar(job, p["fraction"]), " · ".join(parts), _curve_frame(p), job.log_tail(60)


def _bar(job, fraction: float = 0.0) -> str:
    label = "" if job is None else f"{job.status} · {fraction:.0%}"
    value = f"{fraction:.4f}"
    return (f'<div class="build-progress"><progress max="1" value="{value}" data-fraction="{value}" '
            f'style="width:100%;height:1.1em"></progress><span>{html.escape(label)}</span></div>')


def _curve_frame(p: dict | None) -> pd.DataFrame | None:
    """The loss curve's data, or None (an empty plot) before the first logged step. Gradio 6 draws no
    lines into a plot that was once given an empty frame, so "nothing yet" is None, never an empty frame."""
    rows = [] if p is None else [(s, v, "train") for s, v in p["train"]] + [(s, v, "validation") for s, v in p["eval"]]
    if not rows:
        return None
    return pd.DataFrame({"step": pd.Series([r[0] for r in rows], dtype="int64"),
                         "loss": pd.Series([r[1] for r in rows], dtype="float64"),
                         "split": pd.Series([r[2] for r in rows], dtype="object")})

"""Open a web page to classify dog photos and explore labelling runs (Gradio, local only).

    breedlabel ui --model bundles/mobilenet_v2 --examples ../shared/data/sample_bucket --runs runs/labels

Tab "Classify": drop or pick a photo, see the 3 most likely breeds. Tab "Runs": point at a
label output (folder or s3://) to see its run manifests, breed histogram, unsure and error rows.
The bundle and its runtime are loaded once per server. No analytics, no share links.
"""
import argparse
import errno
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read by gradio at import

from core import options  # noqa: E402
from core.errors import EXIT_OK, BreedlabelError, ConfigError  # noqa: E402
from core.explore import ALL  # noqa: E402
from core.options import option, positive_int  # noqa: E402
from core.predict import PredictConfig  # noqa: E402
from jobs.predict import add_runtime_argument  # noqa: E402

log = logging.getLogger(__name__)


def port_number(text: str) -> int:
    """argparse type of --port: 1..65535 (not 0: Gradio cannot tell which port the system picked)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text}: give a port number between 1 and 65535")
    return value


def upload_size(text: str) -> str:
    """argparse type of --max-upload: what Gradio's max_file_size takes, a whole number and a unit."""
    size = text.replace(" ", "").lower()
    match = re.fullmatch(r"(\d+)(b|kb|mb|gb|tb)", size)
    if match is None or int(match[1]) < 1:
        raise argparse.ArgumentTypeError(f"{text}: give a size such as 500kb, 50mb or 2gb (units b, kb, mb, gb, tb)")
    return size


@dataclass(frozen=True)
class UIConfig:
    """`breedlabel ui`'s options (shown by --help), besides --model and --runtime."""

    host: str = option("127.0.0.1", "address to listen on (keep 127.0.0.1 unless behind a proxy)")
    port: int = option(7860, "port to listen on", type=port_number)
    runs: str | None = option(None, "label output (folder or s3://bucket/prefix) preset in the Runs tab",
                              metavar="OUTPUT_URI")
    examples: str | None = option(None, "local folder of example photos shown on the page (searched recursively)",
                                  metavar="DIR")
    max_examples: int = option(48, "examples shown at most")
    max_upload: str = option("50mb", "largest file a visitor may upload", type=upload_size)
    min_prob: float = option(0.5, "below this top-1 probability the page says the model is unsure")
    threads: int | None = option(PredictConfig.threads, "inference threads (default: all cores)",
                                 type=positive_int)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="BUNDLE", help="bundle path or URI")
    options.add_options(parser, UIConfig)
    add_runtime_argument(parser, PredictConfig.runtime)


def run(args: argparse.Namespace) -> int:
    from core.predict import Predictor
    from jobs.ui_pages import ClassifyPage, ExplorerPage, find_examples

    if not 0.0 <= args.min_prob <= 1.0:
        raise ConfigError(f"--min-prob {args.min_prob}: give a probability between 0 and 1")
    check_listen(args.host, args.port)  # before the model loads
    examples = find_examples(args.examples, args.max_examples)
    predictor = Predictor(args.model, runtime=args.runtime, threads=args.threads)
    page = ClassifyPage(predictor, args.min_prob)
    app = build_app(page, ExplorerPage(), examples, args.runs or "")
    log.info("model %s (%s runtime); open http://%s:%d", predictor.bundle.model_id[:12],
             predictor.runtime.name, args.host, args.port)
    app.queue(default_concurrency_limit=1)  # one inference at a time: the runtime uses every core
    try:
        app.launch(server_name=args.host, server_port=args.port, share=False, ssr_mode=False,
                   show_error=True, quiet=True, footer_links=[], max_file_size=args.max_upload)
    except OSError:  # Gradio says "Cannot find empty port" for any failure to listen
        check_listen(args.host, args.port)  # the port was taken since: say so
        raise
    return EXIT_OK


def check_listen(host: str, port: int) -> None:
    """Raise, in words, when the server could not listen on host:port (in use, not an address of
    this machine, a privileged port), which Gradio would report as "Cannot find empty port"."""
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        family, kind, proto, _, address = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise BreedlabelError(f"--host {host}: unknown address ({exc.strerror}); give an address of this "
                              "machine, e.g. 127.0.0.1") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise BreedlabelError(f"--port {port}: already in use on {host}; pass --port N with a free "
                                      "port") from None
            if exc.errno == errno.EACCES:
                raise BreedlabelError(f"--port {port}: not allowed to listen on it here (ports below 1024 "
                                      "need root); pass --port N above 1023") from None
            raise BreedlabelError(f"--host {host}: cannot listen on this address ({exc.strerror}); give an "
                                  "address of this machine, e.g. 127.0.0.1 (this machine only) or 0.0.0.0 "
                                  "(every interface)") from None


def build_app(page, explorer, examples: list[str], runs_uri: str = ""):
    """The Gradio Blocks: wiring only; the logic is in jobs.ui_pages."""
    import gradio as gr

    with gr.Blocks(title="breedlabel", analytics_enabled=False) as app:
        gr.Markdown("# breedlabel: dog breeds")
        with gr.Tab("Classify"):
            _classify_tab(gr, page, examples)
        with gr.Tab("Runs"):
            _runs_tab(gr, explorer, runs_uri, page.min_prob)
    return app


def _classify_tab(gr, page, examples: list[str]) -> None:
    with gr.Row():
        with gr.Column():
            upload = gr.File(label="Photo (drop a file here)", file_count="single", type="filepath",
                             elem_id="photo-upload")
            preview = gr.Image(label="Photo", type="filepath", interactive=False, height=320)
        with gr.Column():
            verdict = gr.Markdown(page.classify_file(None).message, elem_id="verdict")
            top3 = gr.Label(label="Top 3 breeds", num_top_classes=3, elem_id="top3")
            with gr.Accordion("Model card", open=False):
                gr.Markdown(page.card_markdown(), elem_id="model-card")
    if examples:
        gallery = gr.Gallery(value=examples, label="Examples (click one)", columns=8, height=260,
                             allow_preview=False, interactive=False, elem_id="examples")

        def pick(evt: gr.SelectData):
            return examples[evt.index]

        gallery.select(pick, inputs=None, outputs=upload)

    def classify(path):
        v = page.classify_file(path)
        return v.label, v.message, v.preview

    upload.change(classify, inputs=upload, outputs=[top3, verdict, preview])


def _runs_tab(gr, explorer, runs_uri: str, min_prob: float) -> None:
    from jobs.ui_pages import ERROR_HEADERS, UNSURE_HEADERS

    with gr.Row():
        uri = gr.Textbox(value=runs_uri, label="Label output (folder or s3://bucket/prefix)", scale=4,
                         elem_id="runs-uri")
        load = gr.Button("Load", variant="primary", scale=1, elem_id="runs-load")
    status = gr.Markdown(elem_id="runs-status")
    manifests = gr.Dataframe(label="Finished runs (manifests)", interactive=False, wrap=True)
    with gr.Row():
        run_id = gr.Dropdown([ALL], value=ALL, label="Run")
        breed = gr.Dropdown([ALL], value=ALL, label="Predicted breed", filterable=True)
        threshold = gr.Slider(0, 1, value=min_prob, step=0.05, label="Unsure below")
    histogram = gr.BarPlot(x="breed", y="images", sort="-y", x_label_angle=-60, y_lim=[0, None],
                           label="Breed histogram (labelled rows)", height=320, elem_id="breed-histogram")
    unsure_gallery = gr.Gallery(label="Least sure rows", columns=8, height=300, allow_preview=True,
                                fit_columns=False, elem_id="unsure-gallery")
    unsure_rows = gr.Dataframe(headers=UNSURE_HEADERS, label="Least sure rows", interactive=False, wrap=True)
    error_gallery = gr.Gallery(label="Error rows", columns=8, height=220, allow_preview=True,
                               fit_columns=False, elem_id="error-gallery")
    error_rows = gr.Dataframe(headers=ERROR_HEADERS, label="Error rows", interactive=False, wrap=True)

    outputs = [status, manifests, run_id, breed, histogram, unsure_gallery, unsure_rows, error_gallery, error_rows]

    def show(uri_value, run_value, breed_value, threshold_value, reload=False):
        import pandas as pd

        from core.explore import MANIFEST_FIELDS

        v = explorer.view(uri_value, run_value, breed_value, threshold_value, reload=reload)
        return (v.status,
                pd.DataFrame(v.manifests, columns=list(MANIFEST_FIELDS)),
                gr.Dropdown(choices=[ALL, *v.run_ids], value=run_value if run_value in v.run_ids else ALL),
                gr.Dropdown(choices=[ALL, *((b.replace('_', ' '), b) for b in v.breeds)],
                            value=breed_value if breed_value in v.breeds else ALL),
                pd.DataFrame(v.histogram, columns=["breed", "images"]),
                v.unsure_gallery, pd.DataFrame(v.unsure_rows, columns=UNSURE_HEADERS),
                v.error_gallery, pd.DataFrame(v.error_rows, columns=ERROR_HEADERS))

    inputs = [uri, run_id, breed, threshold]
    load.click(lambda *a: show(*a, reload=True), inputs=inputs, outputs=outputs)
    uri.submit(lambda *a: show(*a, reload=True), inputs=inputs, outputs=outputs)
    for control in (run_id, breed):
        control.input(show, inputs=inputs, outputs=outputs)
    threshold.release(show, inputs=inputs, outputs=outputs)


if __name__ == "__main__":
    from jobs.cli import main

    sys.exit(main(["ui", *sys.argv[1:]]))

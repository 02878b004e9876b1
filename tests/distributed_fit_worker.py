"""One process of a multi-process fit, started by torchrun from tests/test_distributed.py.

Usage: python -m torch.distributed.run --standalone --nproc_per_node N tests/distributed_fit_worker.py SPEC.json

SPEC lists jobs (data source + output directory). For every job each process writes
`<report_dir>/<job>-rank<R>.json` with the rank, world size and distributed type it ran under and how many images it
fitted, so the test can assert the processes it actually got and how the images were shared.
"""

import json
import logging
import sys
import time
from pathlib import Path


from padim_hf.fit import build_model, fit_padim, make_accelerator, save_fitted, training_split


class FitLog(logging.Handler):
    """Keeps fit_padim's per-process line: `process %d/%d (%s, %s): %d images`."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("process "):
            self.lines.append(record.args)


def data_of(job: dict):
    if job["kind"] == "folder":
        dataset = training_split(job["path"])
        return dataset.select(range(job["limit"])) if "limit" in job else dataset
    if job["kind"] == "paths":
        return [Path(p) for p in job["paths"]]
    if job["kind"] == "hub_stream":
        return training_split(job["path"], streaming=True)
    raise ValueError(job["kind"])


def run(spec: dict) -> None:
    log = FitLog()
    logger = logging.getLogger("padim_hf.fit")
    logger.addHandler(log)
    logger.setLevel(logging.INFO)
    report_dir = Path(spec["report_dir"])
    for job in spec["jobs"]:
        log.lines.clear()
        accelerator = make_accelerator()  # no cpu=True: several processes on CPUs must cooperate anyway
        model = build_model(spec["config"], backbone_weights=spec["weights"])
        if job.get("slow_main_seconds"):  # the main process's factorisation (a WR50 one, a push) takes a while
            finalise = model.set_gaussian
            model.set_gaussian = lambda *a, **k: (time.sleep(job["slow_main_seconds"]), finalise(*a, **k))[1]
        options = job.get("fit_options", {})  # e.g. holdout_fraction: good-only calibration (tests/test_calibration.py)
        model = fit_padim(model, data_of(job), batch_size=2, accelerator=accelerator, progress=False, **options)
        save_fitted(model, job["output"])
        returned = time.time()
        (rank, world, distributed_type, device, images), = log.lines
        report = dict(
            rank=accelerator.process_index, world=accelerator.num_processes, logged_rank=rank, logged_world=world,
            distributed_type=str(distributed_type), images=images, returned=returned,
        )
        (report_dir / f"{job['name']}-rank{accelerator.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    import torch.distributed

    run(json.loads(Path(sys.argv[1]).read_text()))
    torch.distributed.destroy_process_group()  # as padim-hf does: exiting with a gloo group alive can abort (-6)

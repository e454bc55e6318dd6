"""The quiet console: events on the terminal, Ray's and the libraries' output in the log file."""
from __future__ import annotations

import logging
import os
import sys

import pytest

from deepindex import console


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_events_and_errors_reach_the_console_the_rest_only_the_log_file(capsys):
    path = console.setup("unit")
    assert path.parent.name == "logs" and path.name.startswith("unit-")
    console.event("trial t1: 5/5 epochs, val_map 0.9900")
    logging.getLogger("deepindex.tune.driver").info("a detail for the log file")
    logging.getLogger("deepindex.tracking").warning("a warning of ours")
    logging.getLogger("ray.tune").info("Wrote the latest version of all result files")
    logging.getLogger("ray.tune").warning("a warning of Ray's")
    logging.getLogger("mlflow").info("Waiting up to 300 seconds for model version to finish creation")
    logging.getLogger("ray.serve").error("a replica failed")
    err = capsys.readouterr().err
    assert _lines(err) == ["trial t1: 5/5 epochs, val_map 0.9900", "WARNING deepindex.tracking: a warning of ours",
                           "ERROR ray.serve: a replica failed"]
    text = path.read_text()
    for seen in ("trial t1", "a detail for the log file", "Wrote the latest version", "a warning of Ray's",
                 "Waiting up to 300 seconds", "a replica failed"):
        assert seen in text, seen
    # A nested command (make demo runs `up`, `index build`, `serve` in its process) keeps the file.
    assert console.setup("nested") == path


def test_forwarded_worker_output_goes_to_the_file_and_marked_lines_become_events(ray_local, capsys):
    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printer = ray_worker.print_to_stdstream
    path = console.setup("unit")
    console.route_worker_output()
    try:
        # Ray's own printer is out of the dispatcher; its raylet-notice printer is ours.
        assert [name for name, _ in dispatcher.handlers if name == "ray_print_logs"] == []
        assert "deepindex" in [name for name, _ in dispatcher.handlers]
        dispatcher.emit({"lines": ["Setting up process group for: env://", f"{console.MARK}epoch 1/5: val_map 0.5"],
                         "pid": 123, "actor_name": "TrainController", "is_err": False})
        dispatcher.emit({"lines": ["[core_worker.cc:2465] Actor PreemptionWatcher has constructor arguments"],
                         "pid": 124, "is_err": True})
        ray_worker.print_to_stdstream({"lines": ["WARNING: 24 PYTHON worker processes have been started"],
                                       "pid": "raylet", "is_err": False}, ignore_prefix=False)
        out = capsys.readouterr()
        assert _lines(out.err) == ["epoch 1/5: val_map 0.5"] and out.out == ""
        text = path.read_text()
        assert "(TrainController pid=123) Setting up process group" in text
        assert "(pid=124) [core_worker.cc:2465]" in text and "(pid=raylet) WARNING: 24 PYTHON" in text
    finally:
        console.teardown()
    # Teardown gives Ray its printing back (the next ray.init in this process prints as usual).
    assert ray_worker.print_to_stdstream is printer
    assert "deepindex" not in [name for name, _ in dispatcher.handlers]


def test_verbose_prints_everything_and_teardown_restores_the_environment(capsys, monkeypatch):
    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    path = console.setup("unit", verbose=True)
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ  # Tune keeps its status tables with -v
    logging.getLogger("ray.tune").info("Trial status: 4 RUNNING")
    assert "Trial status: 4 RUNNING" in capsys.readouterr().err
    console.teardown()
    console.setup("unit")
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"  # quiet: Tune's engine that is silent at verbose=0
    console.teardown()
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ
    assert path.is_file()


def test_the_train_epoch_callback_prints_one_marked_line(capsys):
    from deepindex.train.trainer import epoch_lines

    cb = epoch_lines(8)
    cb.after_report(None, [{"epoch": 2, "train_loss": 0.1234, "val_map": 0.98765, "images_per_s": 812.3}], None)
    assert capsys.readouterr().out == f"{console.MARK}epoch 3/8: train_loss 0.1234, val_map 0.9877, 812 images/s\n"


@pytest.mark.timeout(120)
def test_cli_commands_write_their_log_file(capsys):
    from deepindex.cli import main
    from deepindex.paths import state_dir

    assert main(["tune", "--space", "no-such-space.yaml"]) == 2
    assert capsys.readouterr().err.strip() == ("deepindex tune: error: space: no such file no-such-space.yaml "
                                               "(or a shipped space: default, noisy_labels, smoke)")
    assert [p.name.split("-")[0] for p in (state_dir() / "logs").glob("*.log")] == ["tune"]


def test_a_library_with_a_console_handler_of_its_own_joins_a_short_commands_console(capsys):
    """``deepindex submit`` imports Ray's Jobs client, whose logger prints to stderr by itself."""
    ray_logger = logging.getLogger("ray")
    saved = (list(ray_logger.handlers), ray_logger.propagate)
    undo = console.plain()
    try:
        ray_logger.addHandler(logging.StreamHandler(sys.stderr))  # as `import ray` leaves it
        ray_logger.propagate = False
        console.library_imported()
        sdk = logging.getLogger("ray.dashboard.modules.job.sdk")
        sdk.info("WebSocket closed for job raysubmit_x with close code 1000")
        sdk.warning("a warning of Ray's")
    finally:
        undo()
        ray_logger.handlers[:], ray_logger.propagate = saved
    assert _lines(capsys.readouterr().err) == ["WARNING ray.dashboard.modules.job.sdk: a warning of Ray's"]


def test_short_commands_print_our_lines_as_they_are_and_leave_the_libraries_info_out(capsys):
    """``deepindex collection|example|tracking|submit ...``: no log file; the console is ours."""
    undo = console.plain()
    try:
        logging.getLogger("deepindex.collection.store").info("collection x created")
        logging.getLogger("somelib").info("a library's chatter")
        logging.getLogger("deepindex.data").debug("a debug line")
        logging.getLogger("deepindex.tracking").warning("a warning of ours")
        logging.getLogger("somelib").warning("a library's warning")
    finally:
        undo()
    logging.getLogger("deepindex.collection.store").info("after the command: not on its console")
    assert _lines(capsys.readouterr().err) == ["collection x created", "WARNING deepindex.tracking: a warning of ours",
                                               "WARNING somelib: a library's warning"]

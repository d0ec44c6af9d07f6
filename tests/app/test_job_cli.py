"""The command line every job shares: config and overrides in, exit status and result out."""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest
from pydantic import BaseModel

from app.config import KaizenConfig
from app.job_cli import EXIT_BAD_INPUT, EXIT_NOT_DONE, EXIT_OK, JobNotDone, job_parser, run_job


class Result(BaseModel):
    rows: int
    capture_rate: float


def test_a_job_gets_its_config_with_the_overrides_and_prints_its_result_as_json(capsys: Any) -> None:
    seen: dict[str, Any] = {}

    def main(args: argparse.Namespace, cfg: KaizenConfig, opts: Any) -> Result:
        seen["opts"] = opts
        return Result(rows=args.rows, capture_rate=cfg.collection.capture_rate)

    parser = job_parser("jobs.example", "Do the example.\n\nMore text.")
    parser.add_argument("--rows", type=int, default=3)
    status = run_job(parser, main, ["--rows", "7", "collection.capture_rate=0.25"])

    assert status == EXIT_OK
    assert json.loads(capsys.readouterr().out) == {"rows": 7, "capture_rate": 0.25}
    assert seen["opts"] is None
    assert parser.description == "Do the example."
    assert parser.prog == "python -m jobs.example"


def test_a_section_job_gets_its_options_from_the_section_overrides() -> None:
    seen: dict[str, Any] = {}

    def main(args: argparse.Namespace, cfg: KaizenConfig, opts: Any) -> None:
        seen["opts"] = opts

    status = run_job(job_parser("jobs.example", None), main, ["dataset.keep_fraction=0.5"], section="dataset")

    assert status == EXIT_OK
    assert seen["opts"].keep_fraction == 0.5


def test_a_bad_key_exits_2_naming_the_key_before_the_job_runs(capsys: Any) -> None:
    ran = []
    status = run_job(job_parser("jobs.example", None), lambda *a: ran.append(a), ["collection.capture_rat=0.5"])

    assert status == EXIT_BAD_INPUT
    assert not ran
    err = capsys.readouterr().err
    assert err.startswith("python -m jobs.example: ")
    assert "collection.capture_rat" in err


@pytest.mark.parametrize(
    "error",
    [ValueError("finetune.lr: must be > 0"), FileNotFoundError("no rows at x"), FileExistsError("ds-1 is taken")],
)
def test_bad_input_inside_the_job_exits_2_with_the_message_and_no_traceback(capsys: Any, error: Exception) -> None:
    def main(*_: Any) -> None:
        raise error

    assert run_job(job_parser("jobs.example", None), main, []) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert str(error) in err
    assert "Traceback" not in err


class TooLittleData(RuntimeError):
    pass


@pytest.mark.parametrize("error", [JobNotDone("nothing new"), TooLittleData("12 rows, need 50")])
def test_a_job_that_stops_short_on_purpose_exits_1(capsys: Any, error: Exception) -> None:
    def main(*_: Any) -> None:
        raise error

    status = run_job(job_parser("jobs.example", None), main, [], not_done=(TooLittleData,))

    assert status == EXIT_NOT_DONE
    assert str(error) in capsys.readouterr().err


def test_an_unexpected_error_is_not_hidden_as_bad_input() -> None:
    def main(*_: Any) -> None:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_job(job_parser("jobs.example", None), main, [])

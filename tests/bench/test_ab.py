"""bench/ab.py: RelayGate against a variant of itself, in alternating pairs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from ab import busy_cpus, parse_env, sink_mismatches, summarise, variant_env

ROOT = Path(__file__).resolve().parents[2]
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
AB = ROOT / "bench" / "ab.py"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"


def test_env_pairs_are_parsed_and_a_bad_one_is_named() -> None:
    assert parse_env(["RG_X=1", "RG_Y=a=b", "RG_Z="]) == {"RG_X": "1", "RG_Y": "a=b", "RG_Z": ""}
    for bad in ("RG_X", "=1", "RG-X=1"):
        with pytest.raises(ValueError, match=bad):
            parse_env([bad])


def test_the_variant_comes_first_on_the_python_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = variant_env(tmp_path, {"RG_X": "1"})
    assert env == {"RG_X": "1", "PYTHONPATH": f"{tmp_path.resolve()}{os.pathsep}/elsewhere"}
    assert variant_env(None, {"RG_X": "1"}) == {"RG_X": "1"}


def test_busy_cpus_leave_out_idle_and_iowait() -> None:
    # user nice system idle iowait irq softirq: 30 + 10 + 10 busy of 100 ticks
    before = [0, 0, 0, 0, 0, 0, 0]
    after = [30, 0, 10, 40, 10, 0, 10]
    assert busy_cpus(before, after) == pytest.approx(0.5 * (os.cpu_count() or 1))
    assert busy_cpus(after, after) == 0.0


def test_the_summary_gives_medians_and_b_over_a() -> None:
    def run(system: str, rate: float, user: float) -> dict[str, float | str]:
        return {
            "system": system,
            "accepted_per_s": rate,
            "user_ms_per_msg": user,
            "system_ms_per_msg": 0.5,
            "busy_cpus": 1.5,
            "voluntary_switches_per_msg": 2.0,
            "involuntary_switches_per_msg": 1.0,
        }

    rows = [run("A", 900, 0.5), run("B", 1200, 1.0), run("A", 1000, 0.5), run("B", 1000, 1.0)]
    rows += [run("A", 1100, 0.5), run("B", 1100, 1.0)]
    summary = summarise(rows)
    assert summary["A"]["accepted_per_s"] == 1000
    assert summary["B"]["accepted_per_s"] == 1100
    assert summary["B/A"]["accepted_per_s"] == pytest.approx(1.1)
    assert summary["B/A"]["cpu_per_msg"] == pytest.approx(1.5)  # (1.0 + 0.5) / (0.5 + 0.5)


def test_a_run_with_a_lost_or_a_duplicated_message_is_a_mismatch() -> None:
    rows = [
        {"system": "A", "at_sink": 300, "expected_at_sink": 300},
        {"system": "B", "at_sink": 299, "expected_at_sink": 300},
        {"system": "A", "at_sink": 305, "expected_at_sink": 300},
    ]
    assert [r["at_sink"] for r in sink_mismatches(rows)] == [299, 305]


@pytest.mark.parametrize(
    ("option", "name", "message"),
    [
        ("--python", "no-python", "not an executable"),
        ("--variant", "", "no relaygate package there"),
    ],
)
def test_a_bad_variant_or_python_is_refused_by_name(
    tmp_path: Path, option: str, name: str, message: str
) -> None:
    path = tmp_path / name if name else tmp_path
    proc = subprocess.run(
        [sys.executable, str(AB), option, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert f"{option} {path}: {message}" in proc.stderr


@pytest.mark.skipif(
    not os.access(SMTP_SOURCE, os.X_OK),
    reason="smtp-source not installed (Debian package postfix; `make debs`)",
)
@pytest.mark.timeout(240)
def test_a_and_b_take_turns_and_b_runs_the_variant_with_its_environment(tmp_path: Path) -> None:
    """B's relay is a copy of src/ that records, at import, the variable given with --env, a mark
    of the --python wrapper and its command line: so the variant, the environment and the
    interpreter all reached B's `relaygate serve`."""
    variant = tmp_path / "variant"
    shutil.copytree(ROOT / "src", variant, ignore=shutil.ignore_patterns("__pycache__"))
    marks = tmp_path / "marks"
    marks.mkdir()
    init = variant / "relaygate" / "__init__.py"
    init.write_text(
        init.read_text()
        + "\nimport os as _os\n"
        + "if _os.environ.get('AB_MARK'):\n"
        + "    (__import__('pathlib').Path(_os.environ['AB_MARK']) / str(_os.getpid()))"
        + ".write_text(_os.environ.get('AB_VALUE', '') + ' ' + _os.environ.get('AB_VIA', '-')"
        + " + ' ' + ' '.join(__import__('sys').argv))\n"
    )
    # B's interpreter (--python): this checkout's, through a wrapper that marks its processes
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nAB_VIA=wrapper exec {VENV_PYTHON} "$@"\n')
    wrapper.chmod(0o755)
    out = tmp_path / "ab.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(AB),
            "--variant",
            str(variant),
            "--env",
            f"AB_MARK={marks}",
            "--env",
            "AB_VALUE=b-side",
            "--python",
            str(wrapper),
            "--pairs",
            "1",
            "--sessions",
            "2",
            "--messages",
            "200",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=220,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"B: {variant / 'relaygate'}" in proc.stdout
    result = json.loads(out.read_text())
    assert [r["system"] for r in result["runs"]] == ["A", "B"]
    for r in result["runs"]:
        assert r["at_sink"] == r["expected_at_sink"] == 300, r
        assert r["accepted_per_s"] > 0 and r["user_ms_per_msg"] > 0, r
        assert 0 < r["busy_cpus"] <= (os.cpu_count() or 1) + 0.01, r
        # every message wakes the event loop at least once (it blocks in epoll between them)
        assert r["voluntary_switches_per_msg"] >= 1, r
        assert r["involuntary_switches_per_msg"] >= 0, r
    # the import check, and B's relay (supervisor and workers), all ran the variant with its env
    written = [p.read_text() for p in marks.iterdir()]
    assert written and all(w.startswith("b-side wrapper ") for w in written), written
    assert any(" serve --config " in w for w in written), written
    assert "Python 3." in proc.stdout  # each side's interpreter is named
    assert "B / A" in proc.stdout

"""benchmarks/run_all.py: sections, flags, RESULTS.md format, failure handling."""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"


def _load_run_all():
    spec = importlib.util.spec_from_file_location("bench_run_all", BENCH / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


run_all = _load_run_all()


def _args(*argv: str) -> argparse.Namespace:
    return run_all.parse_args(list(argv))


def _target_source(cmd: list[str]) -> str:
    """Source of the script or ``dynadet`` sub-command a section runs."""
    if cmd[1] == "-m":
        module = {"benchmark": "benchmark", "quickstart": "quickstart"}[cmd[3]]
        return (REPO / "dynadet" / "tools" / f"{module}.py").read_text()
    return (REPO / cmd[1]).read_text()


@pytest.mark.parametrize("mode", [(), ("--quick",), ("--threads", "0", "--device", "cuda")])
def test_every_flag_passed_is_defined_by_its_script(mode, tmp_path):
    args = _args(*mode, "--with-quickstart")
    sections = run_all.build_sections(args, tmp_path)
    names = [s.name for s in sections]
    assert names == ["ops", "masked_conv", "dyhead", "fgdh", "compare_dyhead", "compare_fgdh",
                     "compare_rcnn", "throughput", "loader", "quickstart"]
    for section in sections:
        for cmd in section.commands:
            source = _target_source(cmd)
            for flag in (w for w in cmd[2:] if w.startswith("--")):
                assert f'"{flag}"' in source, f"{section.name}: {flag} not defined by {cmd[1:4]}"


def test_threads_device_and_quick_flags_reach_the_commands(tmp_path):
    quick = {s.name: s for s in run_all.build_sections(_args("--quick", "--threads", "2"),
                                                         tmp_path)}
    masked = quick["masked_conv"].commands[0]
    assert masked[-2:] == ["--threads", "2"] and "--densities" in masked
    assert len(quick["throughput"].commands) == len(run_all.PRESETS)
    assert all("--json" in c and "--train" in c for c in quick["throughput"].commands)
    assert str(tmp_path / "compare") in quick["compare_rcnn"].commands[0]
    full = {s.name: s for s in run_all.build_sections(_args("--threads", "0"), tmp_path)}
    assert full["dyhead"].commands[0][2:] == []  # the script's own defaults
    assert full["throughput"].commands[0][3:] == [
        "benchmark", "fcos_r50_fpn_1x", "--train", "--size", "320", "320", "--batch-sizes",
        "2", "--iters", "3", "--json", "--no-progress"]  # fmt: skip
    assert "quickstart" not in full
    cuda = {s.name: s for s in run_all.build_sections(_args("--device", "cuda"), tmp_path)}
    assert cuda["fgdh"].commands[0][-2:] == ["--device", "cuda"] and cuda["fgdh"].device == "cuda"
    assert "--device" not in cuda["ops"].commands[0] and cuda["ops"].device == "cpu"


def test_every_benchmark_script_is_run_by_a_section():
    scripts = {p.stem for p in BENCH.glob("*.py")}
    assert scripts <= run_all.SCRIPTS, f"add a section for {sorted(scripts - run_all.SCRIPTS)}"


def test_names_expand_aliases_and_reject_typos():
    known = ["ops", "loader", "compare_dyhead", "compare_fgdh", "compare_rcnn"]
    assert run_all._names("ops, compare_training", known, "--only") == [
        "ops", "compare_dyhead", "compare_fgdh", "compare_rcnn"]  # fmt: skip
    assert run_all._names(None, known, "--only") == []
    with pytest.raises(SystemExit, match="did you mean 'loader'"):
        run_all._names("loadr", known, "--only")


def _fake_sections(args, work):
    py = sys.executable
    table = ("print('header line'); print(); print('| a | b |'); print('|---|---|'); "
             "print('| 1 | 2 |')")
    return [
        run_all.Section("first", "a table", "Prints a table.", [[py, "-c", table]]),
        run_all.Section("broken", "fails", "Exits with an error.",
                        [[py, "-c", "import sys; print('x'*5); sys.exit('boom: bad flag')"]]),
        run_all.Section("multi", "two commands", "One of two fails.",
                        [[py, "-c", "print('{\"v\": 1}')"], [py, "-c", "raise SystemExit(3)"]],
                        report=lambda rs: f"{sum(r.ok for r in rs)} of {len(rs)} ok"),
        run_all.Section("last", "after the failures", "Still runs.",
                        [[py, "-c", "print('| z |')"]]),
    ]  # fmt: skip


def test_results_file_format_and_failures(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_all, "build_sections", _fake_sections)
    out = tmp_path / "res" / "RESULTS.md"
    code = run_all.main(["--skip", "last", "--out", str(out), "--threads", "1",
                         "--work", str(tmp_path / "w")])  # fmt: skip
    assert code == 1  # a section failed
    text = out.read_text()
    progress = capsys.readouterr().out
    assert "[1/3] first" in progress and "[3/3] multi" in progress and "FAILED" in progress
    assert "## last" not in text and "## first: a table" in text
    first = text.split("## first: a table")[1].split("## broken")[0]
    assert "Prints a table." in first
    assert re.search(r"```bash\nOMP_NUM_THREADS=1 \S+ -c ", first)
    machine = re.search(r"\*Machine:\* (.*)", first)[1]
    for part in ("cores", "torch ", "device cpu", "threads 1", "load average", "UTC"):
        assert part in machine
    assert "header line\n\n| a | b |\n|---|---|\n| 1 | 2 |" in first  # verbatim
    assert re.search(r"\*Wall time:\* \d+\.\d s \(ok\)", first)
    broken = text.split("## broken: fails")[1].split("## multi")[0]
    assert "**Failed** (exit code 1)" in broken and "boom: bad flag" in broken
    assert "(failed)" in broken
    multi = text.split("## multi: two commands")[1]
    assert "1 of 2 ok" in multi and "(partial)" in multi
    assert "| first | ok |" in text and "| broken | failed |" in text
    assert "Made by `python benchmarks/run_all.py --skip last" in text and "finished" in text


def test_timeout_kills_the_command(tmp_path):
    res = run_all.run_command([sys.executable, "-c", "import time; time.sleep(30)"],
                              {}, timeout=0.5, cwd=tmp_path)  # fmt: skip
    assert res.returncode is None and not res.ok and res.seconds < 10
    assert "timeout" in run_all._tail(res)


def test_throughput_report_rows_and_skipped_presets():
    payload = ('{"input_size": [64, 64], "iters": 1, "warmup": 0, "params": {"total": 3400000},'
               ' "flops": {"macs": 75000000}, "inference": [{"batch_size": 2, "latency_ms": 10.0,'
               ' "throughput_img_s": 200.0, "memory_method": "rss"}], "train": [{"batch_size": 2,'
               ' "latency_ms": 40.0, "throughput_img_s": 50.0, "peak_memory_mb": 31.0,'
               ' "memory_method": "rss"}]}')  # fmt: skip
    ok = run_all.CommandResult(["py", "-m", "dynadet", "benchmark", "quickstart"], 0,
                               "noise\n" + payload, "", 1.0)
    bad = run_all.CommandResult(["py", "-m", "dynadet", "benchmark", "swin"], 1, "",
                                "Traceback\nRuntimeError: out of memory", 1.0)
    text = run_all.throughput_report([ok, bad])
    assert "| quickstart | 64×64 | 2 | 3.4 | 0.07 | 10 | 200.00 | 40 | 50.00 | 31 |" in text
    assert "Skipped **swin**" in text and "RuntimeError: out of memory" in text


def test_quick_masked_conv_end_to_end(tmp_path):
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--quick", "--only", "masked_conv",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    assert "## masked_conv:" in text and "**Quick mode**" in text
    assert "| batch | density % |" in text and "| 1 | 100 |" in text


@pytest.mark.slow
def test_quick_mode_runs_every_section(tmp_path):
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--quick", "--with-quickstart",
         "--out", str(out)],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    text = out.read_text()
    for name in ("ops", "masked_conv", "dyhead", "fgdh", "compare_dyhead", "compare_fgdh",
                 "compare_rcnn", "throughput", "loader", "quickstart"):
        assert f"\n## {name}:" in text, name
        assert f"| {name} | ok |" in text, (name, proc.stdout[-3000:])
    assert proc.returncode == 0
    for preset in run_all.PRESETS:
        assert f"| {preset} | 64×64 | 1 |" in text

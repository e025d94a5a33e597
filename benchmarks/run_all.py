"""Run every benchmark script of the repository and write ``benchmarks/RESULTS.md``.

    python benchmarks/run_all.py [--quick] [--only NAMES] [--skip NAMES] [--out PATH]
                                 [--threads 1] [--device cpu] [--with-quickstart]
                                 [--presets NAMES] [--work DIR] [--timeout S]

Sections (names for ``--only`` / ``--skip``, comma-separated; ``compare_training`` stands for
its three pairs): ``ops``, ``masked_conv``, ``dyhead``, ``fgdh``, ``compare_dyhead``,
``compare_fgdh``, ``compare_rcnn``, ``throughput`` (``dynadet benchmark PRESET --train`` for
each of ``--presets``), ``loader`` (``benchmarks/loader.py``) and, with ``--with-quickstart``,
``quickstart`` (``dynadet quickstart``, about 9 minutes, its ``summary.json``; also run when
``--only`` names it).

Each script runs in its own process, from the repository root, with ``OMP_NUM_THREADS`` and
its ``--threads`` set to ``--threads`` (0: neither is set, each script's own default). Each
section of the results file gives the exact command, the machine (CPU model and cores, torch
version, device, threads, load average just before the run), the date, the script's output
verbatim (its markdown tables) and its wall time; a failed script's section shows the tail of
its output instead, and the run goes on. The file is rewritten after every section, so an
interrupted run keeps what was measured.

``--quick`` passes tiny sizes and one iteration to every script (see ``QUICK``): it checks that
everything runs (a few minutes in all; ``ops`` has no size flag and still takes about 1.5
minutes), the numbers mean nothing, and unless ``--out`` is given the file goes to
``runs/benchmarks/RESULTS.quick.md``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "RESULTS.md"
QUICK_OUT = REPO / "runs" / "benchmarks" / "RESULTS.quick.md"
PRESETS = [
    "fcos_r50_fpn_1x", "atss_r50_fpn_1x", "retinanet_r50_fpn_1x", "faster_rcnn_r50_fpn_1x",
    "dynamic_rcnn_r50_fpn_1x", "dyhead_r50_atss_fpn_1x", "fgdh_r50_fcos_fix_d4_1x",
    "fgdh_r50_fcos_dynamic_d4_mid_1x", "dyhead_swint_atss_fpn_2x_ms", "quickstart",
]  # fmt: skip
PAIRS = ("dyhead", "fgdh", "rcnn")
ALIASES = {"compare_training": [f"compare_{p}" for p in PAIRS]}
# benchmarks/*.py run by a section (anything else there is reported as not run)
SCRIPTS = {"ops", "masked_conv", "dyhead", "fgdh", "compare_training", "loader", "run_all"}
# flags per section: (full run, --quick); --threads/--device/--out are added separately
FULL: dict[str, list[str]] = {
    "compare": ["--iters", "300"],  # the README's tables
    "throughput": ["--train", "--size", "320", "320", "--batch-sizes", "2", "--iters", "3"],
}
QUICK: dict[str, list[str]] = {
    "ops": ["--repeat", "1"],
    "masked_conv": ["--repeat", "1", "--batches", "1", "--densities", "5", "100",
                    "--size", "25", "42", "--channels", "64"],
    "dyhead": ["--size", "128", "128", "--repeat", "1"],
    "fgdh": ["--size", "128", "128", "--repeat", "1"],
    "compare": ["--iters", "2", "--images", "16", "--cost-images", "2"],
    "throughput": ["--train", "--size", "64", "64", "--batch-sizes", "1", "--iters", "1",
                   "--warmup", "0", "--num-images", "0"],
    "loader": ["--images", "8", "--batches", "1", "--warmup", "1"],
    "quickstart": ["--minutes", "0.2", "--images", "24"],
}  # fmt: skip
TAIL_LINES = 25


@dataclass
class CommandResult:
    """One finished command: exit code (``None``: timed out), outputs and wall time."""

    command: list[str]
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def verbatim(results: list[CommandResult]) -> str:
    """The report of a one-command section: what the script printed on stdout."""
    return results[0].stdout.strip()


@dataclass
class Section:
    """A heading of the results file, made by one or more commands and a report of them."""

    name: str
    title: str
    description: str
    commands: list[list[str]]
    report: Callable[[list[CommandResult]], str] = verbatim
    device: str = "cpu"
    labels: list[str] = field(default_factory=list)  # one per command, for progress lines


@dataclass
class SectionResult:
    section: Section
    status: str  # "ok", "partial" or "failed"
    body: str
    machine: str
    started: str
    seconds: float


# ----------------------------------------------------------------------------- sections


def _py(script: str, *args: str) -> list[str]:
    return [sys.executable, f"benchmarks/{script}.py", *args]


def _dynadet(*args: str) -> list[str]:
    return [sys.executable, "-m", "dynadet", *args]


def build_sections(args: argparse.Namespace, work: Path) -> list[Section]:
    """Every section, with the flags of ``--quick``, ``--threads`` and ``--device``."""
    quick = args.quick
    threads = ["--threads", str(args.threads)] if args.threads > 0 else []
    device = ["--device", args.device] if args.device != "cpu" else []

    def flags(name: str) -> list[str]:
        return list((QUICK if quick else FULL).get(name, []))

    sections = [
        Section("ops", "pure-PyTorch ops vs naive baselines",
                "Batched NMS, modulated DCNv2 and RoIAlign against the greedy loop, the dense "
                "conv and the per-RoI loop (CPU only).",
                [_py("ops", *flags("ops"), *threads)]),
        Section("masked_conv", "sparse vs dense masked 3×3 conv + GN + ReLU",
                "FGDH's gated depth path: gather → GEMM → scatter against the dense conv, "
                "per batch and gate density.",
                [_py("masked_conv", *flags("masked_conv"), *threads, *device)], device=args.device),
        Section("dyhead", "ATSS R50-FPN with and without DyHead ×6",
                "Network forward time and counted MACs of both presets on the same input.",
                [_py("dyhead", *flags("dyhead"), *threads, *device)], device=args.device),
        Section("fgdh", "FGDH Dynamic D8 (forced gate density) vs Fix D8 head",
                "Head wall time beside the counted-MACs speed-up; realised / MACs target ≥ 0.7.",
                [_py("fgdh", *flags("fgdh"), *threads, *device)], device=args.device),
    ]  # fmt: skip
    for pair in PAIRS:
        sections.append(Section(
            f"compare_{pair}", f"training comparison: {pair} pair",
            "Two scaled-down detectors differing in one dynamic component, trained side by side "
            "on the synthetic data set (CPU only); AP on its validation split.",
            [_py("compare_training", pair, *flags("compare"), *threads,
                 "--out", str(work / "compare"))],
        ))  # fmt: skip
    presets = args.presets
    sections.append(Section(
        "throughput", "inference and training-step throughput per preset",
        "`dynadet benchmark PRESET --train` with random weights on synthetic images: "
        "parameters, MACs, inference and training-step latency and images/s, peak memory.",
        [_dynadet("benchmark", p, *flags("throughput"), *threads, *device, "--json",
                  "--no-progress") for p in presets],
        report=throughput_report, device=args.device, labels=list(presets),
    ))  # fmt: skip
    sections.append(Section(
        "loader", "data loader alone vs a training step",
        "The quickstart's training loader on the synthetic data set against the quickstart "
        "model's training step on the same batches: is data loading ever the bottleneck?",
        [_py("loader", *flags("loader"), *threads, *device)], device=args.device,
    ))  # fmt: skip
    if args.with_quickstart:
        run_dir = work / f"quickstart-{datetime.now():%Y%m%d-%H%M%S}"
        sections.append(Section(
            "quickstart", "the quickstart run",
            "`dynadet quickstart`: synthetic data, time-budgeted training of the `quickstart` "
            "preset, COCO evaluation; figures from its summary.json.",
            [_dynadet("quickstart", "--out", str(run_dir), *flags("quickstart"),
                      "--device", args.device)],
            report=lambda results: quickstart_report(run_dir), device=args.device,
        ))  # fmt: skip
    return sections


def throughput_report(results: list[CommandResult]) -> str:
    """One row per preset and batch size from the ``--json`` outputs; failures as notes."""
    rows, failed = [], []
    for res in results:
        preset = res.command[res.command.index("benchmark") + 1]
        if not res.ok:
            failed.append((preset, res))
            continue
        out = json.loads(res.stdout[res.stdout.index("{"):])
        size = "×".join(map(str, out["input_size"]))
        gmacs = out["flops"]["macs"] / 1e9
        train = {r["batch_size"]: r for r in out.get("train") or []}
        for inf in out["inference"]:
            tr = train.get(inf["batch_size"], {})
            mem = tr.get("peak_memory_mb")
            rows.append(
                f"| {preset} | {size} | {inf['batch_size']} | {out['params']['total'] / 1e6:.1f} "
                f"| {gmacs:.2f} | {inf['latency_ms']:.0f} | {inf['throughput_img_s']:.2f} | "
                f"{_fmt(tr.get('latency_ms'), '.0f')} | {_fmt(tr.get('throughput_img_s'), '.2f')} "
                f"| {_fmt(mem, '.0f')} |"
            )
    lines = [
        "| preset | input | batch | params (M) | GMACs / image | inference ms | inference "
        "images/s | train step ms | train images/s | train peak memory MB |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    if results and results[0].ok:
        out = json.loads(results[0].stdout[results[0].stdout.index("{"):])
        lines.append(f"\nlatency: median of {out['iters']} runs after {out['warmup']} warm-up; "
                     f"memory: {(out.get('train') or out['inference'])[0]['memory_method']}")
    for preset, res in failed:
        lines.append(f"\nSkipped **{preset}** (failed, exit code {res.returncode}): "
                     f"`{_last_line(res)}`")
        lines += ["", "```text", _tail(res), "```"]
    return "\n".join(lines)


def quickstart_report(run_dir: Path) -> str:
    """A table of the quickstart run's ``summary.json``."""
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = summary.get("metrics") or {}
    head = ["iterations", "train min", "total min", *metrics]
    values = [str(summary["iterations"]), f"{summary['train_seconds'] / 60:.1f}",
              f"{summary['total_seconds'] / 60:.1f}", *(f"{v:.1f}" for v in metrics.values())]
    return "\n".join([
        "| " + " | ".join(head) + " |",
        "|" + "---:|" * len(head),
        "| " + " | ".join(values) + " |",
        f"\nrun folder: `{run_dir}` (summary.md, plots, predictions, checkpoint)",
    ])  # fmt: skip


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


# ----------------------------------------------------------------------------- running


def run_command(
    cmd: list[str], env: dict[str, str], timeout: float | None, cwd: Path = REPO
) -> CommandResult:
    """Run ``cmd`` in its own process group (killed as a whole on timeout)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n[run_all] killed after the {timeout:g} s timeout"
        code = None
    return CommandResult(cmd, code, out, err, time.perf_counter() - start)


def _clean(text: str) -> list[str]:
    """Lines as a terminal shows them (progress bars rewrite a line with ``\\r``)."""
    return [line.split("\r")[-1].rstrip() for line in text.splitlines()]


def _tail(res: CommandResult, n: int = TAIL_LINES) -> str:
    lines = [x for x in _clean(res.stderr) if x] or [x for x in _clean(res.stdout) if x]
    return "\n".join(lines[-n:])


def _last_line(res: CommandResult, width: int = 160) -> str:
    tail = _tail(res, 1).replace("`", "'") or "no output"
    return tail if len(tail) <= width else tail[: width - 1] + "…"


def display(cmd: Sequence[str], threads: int) -> str:
    """The command as typed from the repository root."""
    exe = shutil.which("python")
    words = list(cmd)
    if exe and os.path.realpath(exe) == os.path.realpath(sys.executable):
        words[0] = "python"
    prefix = f"OMP_NUM_THREADS={threads} " if threads > 0 else ""
    return prefix + shlex.join(words)


def machine_line(device: str, threads: int) -> str:
    """CPU model and cores, torch, device, threads and the current load average."""
    import torch

    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    core_text = f"{cores} cores" + (f" ({usable} usable)" if usable != cores else "")
    dev = device
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    nthreads = f"{threads}" if threads > 0 else f"{torch.get_num_threads()} (torch default)"
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"{cpu_model()}, {core_text} · torch {torch.__version__} · device {dev} · "
            f"threads {nthreads} · load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
            "(1 / 5 / 15 min)")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def run_section(
    section: Section, env: dict[str, str], threads: int, timeout: float | None,
    log: Callable[[str], None] = print,
) -> SectionResult:
    """Run a section's commands (all of them, whatever fails) and render its body."""
    machine, started = machine_line(section.device, threads), _now()
    start = time.perf_counter()
    results = []
    for i, cmd in enumerate(section.commands):
        label = f" {section.labels[i]}" if section.labels else ""
        res = run_command(cmd, env, timeout)
        status = "ok" if res.ok else f"FAILED (exit code {res.returncode}): {_last_line(res)}"
        log(f"    {section.name}{label}: {status}, {res.seconds:.1f} s")
        results.append(res)
    seconds = time.perf_counter() - start
    n_ok = sum(r.ok for r in results)
    status = "ok" if n_ok == len(results) else ("partial" if n_ok else "failed")
    if len(results) == 1 and not n_ok:
        res = results[0]
        body = (f"**Failed** (exit code {res.returncode}); the last lines of its output:"
                f"\n\n```text\n{_tail(res)}\n```")
    else:  # a multi-command report notes its failed commands itself
        try:
            body = section.report(results)
        except Exception as err:  # a report that cannot be made is a failed section
            status = "failed"
            body = (f"**Failed**: could not read the results ({err!r}); the last lines of "
                    f"the output:\n\n```text\n{_tail(results[-1])}\n```")
    return SectionResult(section, status, body.strip(), machine, started, seconds)


def render_section(res: SectionResult, threads: int) -> str:
    s = res.section
    commands = "\n".join(display(c, threads) for c in s.commands)
    return "\n".join([
        f"## {s.name}: {s.title}", "", s.description, "", "```bash", commands, "```", "",
        f"*Machine:* {res.machine} · started {res.started}", "", res.body, "",
        f"*Wall time:* {res.seconds:.1f} s ({res.status})", "",
    ])  # fmt: skip


def render_results(
    header: dict[str, Any], done: list[SectionResult], pending: list[Section], threads: int
) -> str:
    lines = [
        "# dynadet benchmark results", "",
        f"Made by `{header['command']}` on {header['started']}"
        + (f", finished {header['finished']}" if header.get("finished") else " (running)")
        + f"; sections run one after the other. Machine at the start: {header['machine']}.", "",
    ]  # fmt: skip
    if header["quick"]:
        lines += ["**Quick mode**: tiny sizes and single iterations, a smoke test; the numbers "
                  "mean nothing.", ""]
    if header["unregistered"]:
        names = ", ".join(f"`benchmarks/{n}.py`" for n in header["unregistered"])
        lines += [f"Not run (no section in `run_all.py`): {names}.", ""]
    lines += ["| section | status | wall time (s) |", "|:---|:---|---:|"]
    lines += [f"| {r.section.name} | {r.status} | {r.seconds:.1f} |" for r in done]
    lines += [f"| {s.name} | not run yet | – |" for s in pending]
    lines.append("")
    lines += [render_section(r, threads) for r in done]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- CLI


def _names(text: str | None, known: Sequence[str], what: str) -> list[str]:
    if not text:
        return []
    out = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        if name in ALIASES:
            out += ALIASES[name]
        elif name in known:
            out.append(name)
        else:
            hint = difflib.get_close_matches(name, [*known, *ALIASES], n=1)
            raise SystemExit(f"{what}: unknown name {name!r}"
                             + (f"; did you mean {hint[0]!r}?" if hint else "")
                             + f" (known: {', '.join(known)})")
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and iterations (smoke test)")
    p.add_argument("--only", help="comma-separated sections to run")
    p.add_argument("--skip", help="comma-separated sections to leave out")
    p.add_argument("--out", type=Path, default=None,
                   help="results file (benchmarks/RESULTS.md; --quick: "
                   "runs/benchmarks/RESULTS.quick.md)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads and OMP_NUM_THREADS of every script (1; 0: as is)")
    p.add_argument("--device", default="cpu", help="device of the scripts that take one (cpu)")
    p.add_argument("--with-quickstart", action="store_true",
                   help="also run `dynadet quickstart` (about 9 minutes)")
    p.add_argument("--presets", default=",".join(PRESETS),
                   help="comma-separated presets of the throughput section (all ten)")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for training runs and data (runs/benchmarks; --quick: a "
                   "temporary folder, removed at the end)")
    p.add_argument("--timeout", type=float, default=0,
                   help="seconds before a command is killed (0: no limit)")
    args = p.parse_args(argv)
    args.presets = [n.strip() for n in args.presets.split(",") if n.strip()]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if "quickstart" in (args.only or "").replace(" ", "").split(","):
        args.with_quickstart = True  # naming it is asking for it
    out = (args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)).resolve()
    temp_work = args.work is None and args.quick
    work = Path(tempfile.mkdtemp(prefix="dynadet-bench-")) if temp_work else (
        (args.work or REPO / "runs" / "benchmarks").resolve()
    )
    sections = build_sections(args, work)
    known = [s.name for s in sections] + ([] if args.with_quickstart else ["quickstart"])
    only = _names(args.only, known, "--only")
    skip = set(_names(args.skip, known, "--skip"))
    chosen = [s for s in sections if (not only or s.name in only) and s.name not in skip]

    env = dict(os.environ)
    if args.threads > 0:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    scripts = {p.stem for p in (REPO / "benchmarks").glob("*.py")}
    given = sys.argv[1:] if argv is None else list(argv)
    command = display(["python", "benchmarks/run_all.py", *given], 0)
    header: dict[str, Any] = {
        "command": command, "started": _now(), "finished": None, "quick": args.quick,
        "machine": machine_line(args.device, args.threads),
        "unregistered": sorted(scripts - SCRIPTS),
    }  # fmt: skip
    if header["unregistered"]:
        print(f"note: not run (no section): {', '.join(header['unregistered'])}")
    timeout = args.timeout or None
    done: list[SectionResult] = []
    try:
        for i, section in enumerate(chosen):
            print(f"[{i + 1}/{len(chosen)}] {section.name}: "
                  + "; ".join(display(c, args.threads) for c in section.commands[:1])
                  + (f" (+{len(section.commands) - 1} more)" if len(section.commands) > 1 else ""),
                  flush=True)  # fmt: skip
            res = run_section(section, env, args.threads, timeout,
                              log=lambda m: print(m, flush=True))
            done.append(res)
            print(f"    -> {res.status} in {res.seconds:.1f} s", flush=True)
            write_atomic(out, render_results(header, done, chosen[i + 1 :], args.threads))
        header["finished"] = _now()
        write_atomic(out, render_results(header, done, [], args.threads))
    finally:
        if temp_work:
            shutil.rmtree(work, ignore_errors=True)
    failed = [r.section.name for r in done if r.status != "ok"]
    print(f"wrote {out}" + (f"; not ok: {', '.join(failed)}" if failed else "; all ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

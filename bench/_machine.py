"""Machine description and background-load accounting shared by the benchmark scripts.

The benchmark machines are small shared VMs: another job running at the same time takes cores
away and silently lowers every number. :class:`BackgroundLoad` measures how much CPU *other*
processes used during a timed phase (all CPU time in /proc/stat minus that of this process and its
descendants), so that every result can be printed with the load it was measured under.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from the first line of /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def _tree_ticks(root: int, exclude: set[int] = frozenset()) -> int:
    """CPU jiffies of process ``root`` and its live descendants, plus their reaped children.

    Processes in ``exclude`` (and their descendants) are left out.
    """
    stats: dict[int, tuple[int, int]] = {}  # pid -> (ppid, ticks)
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            raw = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        rest = raw[raw.rindex(")") + 2:].split()  # fields after "pid (comm)"
        ppid = int(rest[1])
        utime, stime, cutime, cstime = (int(v) for v in rest[11:15])
        stats[int(d)] = (ppid, utime + stime + cutime + cstime)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in exclude:
            continue
        if pid in stats:
            total += stats[pid][1]
        todo.extend(children.get(pid, []))
    return total


class BackgroundLoad:
    """CPU used by other processes between :meth:`start` and :meth:`stop`.

    ``stop()`` returns the fraction of the machine (all CPUs) that processes outside this
    process tree used meanwhile: 0.0 on a quiet machine, 0.5 when another job kept one of two
    cores busy. Descendants that exit *and are not reaped by us* in between are not counted as
    ours (DataLoader workers are reaped when the loader shuts down; measure before that).
    Children whose pid is in the class attribute ``exclude`` (a deliberate load generator)
    count as other processes.
    """

    exclude: set[int] = set()

    def __init__(self) -> None:
        self.t0: tuple[int, int, int] | None = None

    def start(self) -> "BackgroundLoad":
        busy, total = _machine_busy_ticks()
        self.t0 = (busy, total, _tree_ticks(os.getpid(), self.exclude))
        return self

    def stop(self) -> float:
        assert self.t0 is not None, "start() first"
        busy, total = _machine_busy_ticks()
        mine = _tree_ticks(os.getpid(), self.exclude)
        d_busy, d_total, d_mine = busy - self.t0[0], total - self.t0[1], mine - self.t0[2]
        if d_total <= 0:
            return 0.0
        return max(0.0, (d_busy - d_mine) / d_total)


def describe_machine() -> dict[str, str]:
    """CPU model and count, memory, kernel, python and torch versions."""
    import torch

    info = {"cpus": str(os.cpu_count()), "python": platform.python_version(),
            "torch": torch.__version__, "kernel": platform.release()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "Hypervisor vendor"):
                info[k.strip()] = v.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
        info["memory"] = f"{int(mem) / 2**20:.1f} GiB"
    except (OSError, IndexError, ValueError):
        pass
    return info


def add_step_args(p, steps: int) -> None:
    """The flags every training-step benchmark takes (model, batch, device, timing, threads)."""
    p.add_argument("--model", default="SiT-B/2")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=steps, help="timed steps (medians)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def apply_threads(args) -> None:
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)

"""What a device holds while a program runs, and whether that fits a named device.

A compiled program's own memory (argument + output + temp - alias, or XLA's peak on TPU) leaves out
what else stays on the device meanwhile: during the update's micro-step the float32 master weights,
Adam's moments and the reference are resident without being arguments of it; during the rollout's
decode the whole training state is (one set of devices generates and trains in turn). A `Residency`
names what is live on the devices when a program runs (abstract arrays with their shardings, built
by reval_jax/tools/scale_programs.py as the trainer holds them) and which of those are the program's
arguments; `resident_bytes` counts, per device, the live arrays that are not arguments (by identity:
the same abstract array object is the same buffer), exactly from each array's sharding.

    device holds = program peak + resident state that is not an argument       (per device)

`device_budget` picks the memory it is held against: a named device (`DEVICES`, `--device`, with a
default per platform) or `--device_memory=80GB`; `verdict` says fits / does not fit with the headroom.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from reval_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """One accelerator's memory as a program may use it."""

    name: str
    memory: int  # bytes
    source: str  # where the figure comes from


DEVICES = {
    "h100": DeviceSpec("NVIDIA H100 80GB", 80 * 10**9, "80 GB of HBM3 (nominal)"),
    "h200": DeviceSpec("NVIDIA H200", 141 * 10**9, "141 GB of HBM3e (nominal)"),
    "v5p": DeviceSpec("TPU v5p", 95_740_000_000, "95.74 GB usable to XLA (the compiler's own figure)"),
    "v5e": DeviceSpec("TPU v5e", 15_750_000_000, "15.75 GB usable to XLA (the compiler's own figure)"),
    "v6e": DeviceSpec("TPU v6e", 32 * 10**9, "32 GB of HBM (nominal)"),
}
# the device a platform's figures are held against unless --device / --device_memory says otherwise:
# a CPU compile stands in for the GPUs the project runs on
DEFAULT_DEVICE = {"cpu": "h100", "v5p": "v5p", "v5e": "v5e", "v6e": "v6e"}

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GB' -> 80e9, '74.5 GiB' -> 74.5 * 2**30, '8e10' / '80000000000' -> bytes (decimal GB, binary GiB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise UserError(f"--device_memory={text!r}: expected bytes or a size such as 80GB, 95.74GB or 16GiB")
    value = float(match.group(1)) * _UNITS[unit]
    if value <= 0 or not math.isfinite(value):
        raise UserError(f"--device_memory={text!r}: must be more than 0 bytes")
    return int(value)


def device_budget(platform: str, device: str = "", device_memory: str = "") -> DeviceSpec:
    """The memory a device holds its programs in: `device_memory` (bytes or '80GB') if given, else the
    named `device`, else the platform's default (DEFAULT_DEVICE)."""
    name = (device or "").strip().lower()
    if name and name not in DEVICES:
        raise UserError(f"--device={device!r}: expected one of {', '.join(DEVICES)} (or --device_memory=<bytes>)")
    if device_memory:
        memory = parse_bytes(device_memory)
        label = DEVICES[name].name if name else "a device"
        return DeviceSpec(f"{label} of {device_memory.strip()}", memory, "--device_memory")
    spec = DEVICES[name or DEFAULT_DEVICE.get(platform, "h100")]
    return spec


# ----------------------------------------------------------------------------- resident state


@dataclasses.dataclass(frozen=True)
class Residency:
    """The arrays live on the devices while a program runs (`live`: name -> tree of abstract arrays
    with shardings; an array in two trees counts once, under the first name) and the program's
    arguments in that call (`args`). `when` says which call of the program this is."""

    live: dict[str, Any]
    args: tuple
    when: str


def _leaves(tree) -> list:
    import jax

    return [x for x in jax.tree.leaves(tree) if hasattr(x, "shape") and hasattr(x, "dtype")]


def bytes_per_device(leaf) -> dict[int, int]:
    """Bytes of one abstract array on each device of its sharding (device id -> bytes)."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        raise ValueError(f"{leaf} has no sharding: resident state is counted from the arrays' shardings")
    itemsize = leaf.dtype.itemsize
    out = {}
    for device, index in sharding.devices_indices_map(tuple(leaf.shape)).items():
        elements = 1
        for dim, part in zip(leaf.shape, index, strict=True):
            elements *= len(range(*part.indices(dim)))
        out[device.id] = elements * itemsize
    return out


def resident_bytes(residency: Residency) -> dict:
    """Per device, the live arrays that are not arguments of the call: {"bytes": the most any device
    holds, "device": its id, "parts": {name: bytes on that device}, "when": ...}."""
    arguments = {id(x) for x in _leaves(residency.args)}
    seen, per_name = set(arguments), {}
    for name, tree in residency.live.items():
        totals: dict[int, int] = {}
        for leaf in _leaves(tree):
            if id(leaf) in seen:
                continue
            seen.add(id(leaf))
            for device, n in bytes_per_device(leaf).items():
                totals[device] = totals.get(device, 0) + n
        per_name[name] = totals
    devices = {d for totals in per_name.values() for d in totals}
    worst = max(devices, key=lambda d: sum(t.get(d, 0) for t in per_name.values()), default=0)
    parts = {name: totals.get(worst, 0) for name, totals in per_name.items()}
    return {"bytes": sum(parts.values()), "device": worst, "parts": parts, "when": residency.when}


def worst_residency(residencies) -> dict:
    """The call of a program that leaves the most resident state beside it (`resident_bytes` of it)."""
    figures = [resident_bytes(r) for r in residencies]
    return max(figures, key=lambda f: f["bytes"], default={"bytes": 0, "device": 0, "parts": {}, "when": ""})


def verdict(holds: int, budget: DeviceSpec) -> dict:
    """Whether `holds` bytes per device fit `budget`: {"fits", "headroom" (negative: over by)}."""
    return {"fits": holds <= budget.memory, "headroom": budget.memory - holds}

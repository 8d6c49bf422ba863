"""The float32 copies of bfloat16 arrays that a CPU compile keeps, read from XLA's buffer assignment.

The CPU backend has no bfloat16 dot: it converts bfloat16 operands (weights, activations) to float32
and keeps those copies in its temporary buffer, where a GPU or TPU computes in bfloat16. This module
measures how much of a CPU program's temp they are at its peak, from the files XLA writes with
`xla_dump_to` (`compile_dumping`):

    *.cpu_after_optimizations.txt                    the optimized HLO (what each buffer's instruction is)
    *.cpu_after_optimizations-buffer-assignment.txt  each value's allocation, offset and size
    *.cpu_after_optimizations-live-range.txt         each value's live range in the module's schedule

The temp allocation's values are swept in schedule order; values that overlap in the allocation at the
same time share a buffer (aliases), so each offset counts once. At the moment the most temp bytes are
live, `upcasts_at_peak` sums the live values an instruction made by converting bfloat16 to float32 and
nothing else (a `convert`, or a fusion of only a convert and data movement).
"""

from __future__ import annotations

import collections
import re
import uuid
from pathlib import Path

_SUFFIX = ".cpu_after_optimizations"
_MOVES = {"parameter", "convert", "bitcast", "copy", "reshape", "transpose", "broadcast", "slice",
          "dynamic-slice", "get-tuple-element", "constant", "tuple"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
_VALUE = re.compile(r"value: <\d+ ([^ >]+)(?: \(phi\))? @\d+> \(size=(\d+),offset=(\d+)\)")
_RANGE = re.compile(r"^\s+(\S+):(\d+)-(\d+)$")


def dump_options(directory: str) -> dict:
    """compiler_options that make XLA write the files this module reads into `directory`."""
    return {"xla_dump_to": directory, "xla_dump_hlo_as_text": True}


def compile_dumping(lowered, directory: str):
    """`lowered.compile()` writing the files this module reads into `directory`. A program loaded from
    JAX's persistent compilation cache is not compiled and writes nothing (the dump options are left
    out of the cache key), so the options carry one more, unique to this call, that the key includes
    and that changes nothing compiled: a pattern of emitter names to dump that no emitter has."""
    options = {**dump_options(directory), "xla_dump_emitter_re": f"^reval-no-emitter-{uuid.uuid4().hex}$"}
    return lowered.compile(compiler_options=options)


def _operands(rest: str) -> list[str]:
    """The %names inside an instruction's operand list (up to its closing parenthesis)."""
    depth, end = 1, len(rest)
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            end = i
            break
    return re.findall(r"%([\w.\-]+)", rest[:end])


def parse_hlo(text: str) -> tuple[dict, dict]:
    """({instruction: (type, opcode, operands, called computation)}, {computation: [instructions]})."""
    instructions, computations, current = {}, {}, None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY\s+)?%([\w.\-]+) .*\{\s*$", line)
        if header and "=" not in line.split("(")[0]:
            current = computations.setdefault(header.group(1), [])
            continue
        match = _INSTRUCTION.match(line)
        if match and current is not None:
            name, type_, opcode, rest = match.groups()
            called = re.search(r"calls=%([\w.\-]+)", rest)
            instructions[name] = (type_, opcode, _operands(rest), called.group(1) if called else None)
            current.append(name)
    return instructions, computations


def _is_cast(name: str, instructions: dict) -> bool:
    type_, opcode, operands, _ = instructions[name]
    return (opcode == "convert" and type_.startswith("f32[") and len(operands) == 1
            and instructions.get(operands[0], ("",))[0].startswith("bf16["))


def is_upcast(name: str, instructions: dict, computations: dict) -> bool:
    """Whether instruction `name` makes a float32 copy of a bfloat16 array and does nothing else."""
    type_, opcode, _, called = instructions[name]
    if not type_.startswith("f32["):
        return False
    if opcode == "convert":
        return _is_cast(name, instructions)
    if opcode != "fusion" or called not in computations:
        return False
    body = computations[called]
    return (all(instructions[i][1] in _MOVES for i in body)
            and any(_is_cast(i, instructions) for i in body))


def _temp_values(text: str) -> list[tuple[str, int, int]]:
    """(value, size, offset) of every value in the preallocated temp allocation(s)."""
    out, in_temp = [], False
    for line in text.splitlines():
        if line.startswith("allocation "):
            in_temp = "preallocated-temp" in line
        elif in_temp and (match := _VALUE.search(line)):
            name, size, offset = match.group(1), int(match.group(2)), int(match.group(3))
            out.append((name if "{" in name else name + "{}", size, offset))
    return out


def _live_ranges(text: str) -> dict[str, tuple[int, int]]:
    ranges, on = {}, False
    for line in text.splitlines():
        on = on or line.strip() == "BufferLiveRange:"
        if on and (match := _RANGE.match(line)):
            ranges[match.group(1)] = (int(match.group(2)), int(match.group(3)))
    return ranges


def peak_of(values: list[tuple[str, int, int]], ranges: dict) -> tuple[int, int, list]:
    """(time, bytes, live values) at the moment the most temp bytes are live; values at one offset
    live at the same time are one buffer (the largest of them counts)."""
    events = collections.defaultdict(lambda: ([], []))
    for v in values:
        if v[0] in ranges:
            start, end = ranges[v[0]]
            events[start][0].append(v)
            events[end][1].append(v)
    live: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    total, best = 0, (0, -1)
    for t in sorted(events):
        for changes, sign in ((events[t][0], 1), (None, 0), (events[t][1], -1)):
            if changes is None:
                best = max(best, (total, t))
                continue
            for _, size, offset in changes:
                before = max(live[offset], default=0)
                live[offset][size] += sign
                if live[offset][size] <= 0:
                    del live[offset][size]
                total += max(live[offset], default=0) - before
    t = best[1]
    return t, best[0], [v for v in values if v[0] in ranges and ranges[v[0]][0] <= t <= ranges[v[0]][1]]


def upcasts_at_peak(directory: str, temp_size: int) -> dict | None:
    """{"upcast": float32-copy bytes live at the temp's peak, "live": temp bytes live then, "temp":
    the temp allocation} from the dump of one CPU compile (the module whose temp is `temp_size`), or
    None when the files are not there or none matches."""
    for assignment in sorted(Path(directory).glob(f"*{_SUFFIX}-buffer-assignment.txt")):
        text = assignment.read_text()
        if _allocation_size(text) != temp_size:
            continue
        values = _temp_values(text)
        stem = str(assignment)[: -len("-buffer-assignment.txt")]
        instructions, computations = parse_hlo(Path(stem + ".txt").read_text())
        ranges = _live_ranges(Path(stem + "-live-range.txt").read_text())
        _, live_bytes, live = peak_of(values, ranges)
        by_offset = {}
        for name, size, offset in live:
            instruction = name.split("{")[0]  # a whole value, not a tuple element
            if name.endswith("{}") and instruction in instructions and is_upcast(instruction, instructions,
                                                                                  computations):
                by_offset[offset] = max(by_offset.get(offset, 0), size)
        return {"upcast": sum(by_offset.values()), "live": live_bytes, "temp": temp_size,
                "upcast_buffers": len(by_offset)}
    return None


def _allocation_size(text: str) -> int:
    """Size of the preallocated temp allocation (the sum when there are several)."""
    return sum(int(m.group(1)) for m in re.finditer(r"^allocation \d+: size (\d+), preallocated-temp", text, re.M))

"""Collective bytes of a compiled XLA program, read from its HLO text with loop trip counts.

    compiled = jax.jit(f).lower(*abstract_args).compile()
    report = hlo.collectives(compiled.as_text())
    report.bytes  # {"all-gather": ..., "all-reduce": ..., ...} per device, loops multiplied in

`compiled.cost_analysis()` counts a while-loop body once; a layer scan or a micro-batch loop runs
it L or n times. Here every collective is weighted by the product of the trip counts of the loops
around it, following the call graph (while body/condition, fusion `calls=`, `to_apply=`,
conditional branches, async wrappers) from the ENTRY computation.

Bytes of one collective (per device, per execution): max(bytes of its operands, bytes of its
result). That is the result for all-gather, the operand for reduce-scatter and either for
all-reduce, all-to-all and collective-permute: the size of the full buffer the collective moves
on one device, not the wire traffic of a particular algorithm. Async pairs are counted once, at
the `-start` (whose tuple result also holds the operand and context scalars; those are dropped),
never at the `-done`.

Trip counts: `backend_config` `known_trip_count` when XLA found one (CPU); otherwise, with
`infer=True`, from the loop condition's `compare(i, c)`: c − i₀ for LT, c − i₀ + 1 for LE, where i₀
is the induction variable's initial value when the while's init tuple holds a constant there
(else 0), and the step is assumed to be 1 (the TPU compiler attaches no known_trip_count; its
windowed-einsum loops start at 0 and count up by one). For a data-dependent condition such as
`step < A & ~all(done)` with a non-constant start this is the bound A, not the trips actually run. A loop with neither
counts once and is listed in `Report.loops` with `source="unknown"`.
"""

from __future__ import annotations

import dataclasses
import math
import re

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1,
    "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1, "f8e8m0fnu": 1, "s16": 2, "u16": 2,
    "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
    "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")  # f32[16,8] (layouts {..} ignored)
_COMP = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLS = re.compile(
    r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # one of KINDS
    name: str  # the instruction's name
    computation: str  # the computation it sits in
    bytes: int  # per device, one execution (see the module docstring)
    count: int  # executions per program run: product of enclosing loop trip counts
    op_name: str = ""  # the jax op it came from (metadata op_name), for finding it in the source


@dataclasses.dataclass(frozen=True)
class Loop:
    name: str  # the while instruction
    body: str
    trip_count: int
    source: str  # known_trip_count | condition | unknown


@dataclasses.dataclass(frozen=True)
class Report:
    collectives: tuple[Collective, ...]
    loops: tuple[Loop, ...]

    @property
    def bytes(self) -> dict[str, int]:
        """Per-device bytes of each collective kind for one program run, loops multiplied in."""
        out = dict.fromkeys(KINDS, 0)
        for c in self.collectives:
            out[c.kind] += c.bytes * c.count
        return out

    def largest(self, n: int = 3) -> list[Collective]:
        """The n collectives with the most bytes × count."""
        return sorted(self.collectives, key=lambda c: -c.bytes * c.count)[:n]

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


@dataclasses.dataclass
class _Instr:
    name: str
    shape: str  # the result type text, e.g. "f32[16]{0}" or "(s32[], f32[16]{0})"
    opcode: str
    operands: list[str]
    args: str  # the text inside the operand parentheses (a constant's value)
    attrs: str  # everything after the operand list


def array_bytes(shape: str) -> int:
    """Bytes of every array in a (possibly tuple) HLO type string."""
    return sum(_leaf_bytes(d, dims) for d, dims in _ARRAY.findall(shape))


def _leaf_bytes(dtype: str, dims: str) -> int:
    if dtype not in DTYPE_BYTES:
        return 0  # token[], opaque types
    n = math.prod(int(x) for x in dims.split(",") if x) if dims else 1
    return n * DTYPE_BYTES[dtype]


def _split_type(rest: str) -> tuple[str, str]:
    """'(s32[], f32[16]{0}) while(%t), ...' -> ('(s32[], f32[16]{0})', "while(%t), ...")."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


def _parse_instr(rest: str, name: str) -> _Instr:
    shape, rest = _split_type(rest)
    opcode, _, rest = rest.partition("(")
    depth, i = 1, 0
    while i < len(rest) and depth:
        depth += rest[i] == "("
        depth -= rest[i] == ")"
        i += 1
    args = rest[: i - 1]
    return _Instr(name, shape, opcode.strip(), re.findall(r"%([\w.\-]+)", args), args, rest[i:])


def parse(text: str) -> tuple[dict[str, list[_Instr]], str]:
    """Computations (name -> instructions) of an HLO module text, and the ENTRY's name."""
    comps: dict[str, list[_Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m and "=" not in line.split("(")[0]:
            current = m.group(2)
            comps[current] = []
            entry = current if m.group(1) else entry
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            comps[current].append(_parse_instr(m.group(3), m.group(2)))
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _kind(opcode: str) -> str | None:
    base = opcode.removesuffix("-start")
    return base if base in KINDS else None


def _collective_bytes(ins: _Instr, shapes: dict[str, str]) -> int:
    operands = [shapes.get(o, "") for o in ins.operands]
    leaves = _ARRAY.findall(ins.shape)
    if ins.opcode.endswith("-start"):
        op_leaves = [leaf for s in operands for leaf in _ARRAY.findall(s)]
        if len(leaves) > len(op_leaves) and leaves[: len(op_leaves)] == op_leaves:
            leaves = leaves[len(op_leaves) :]  # all-gather/collective-permute-start: (operand, result, ...)
        leaves = [(d, s) for d, s in leaves if s or d not in ("u32", "s32")]  # context scalars
    result = sum(_leaf_bytes(d, s) for d, s in leaves)
    return max(result, sum(array_bytes(s) for s in operands))


def _infer_trip(cond: str, comps: dict[str, list[_Instr]]) -> tuple[int, int | None] | None:
    """(bound, induction tuple index) of the loop condition's `compare(i, c)`: c for LT, c + 1 for LE
    (following fused compares); the index is that of the get-tuple-element i reads, when it does."""
    for comp in _reachable(cond, comps):
        consts, gtes = {}, {}
        for ins in comps[comp]:
            if ins.opcode == "constant" and re.fullmatch(r"[su]\d+\[\]", _base_type(ins.shape)):
                consts[ins.name] = int(ins.args)
            if ins.opcode == "get-tuple-element":
                gtes[ins.name] = int(re.search(r"index=(\d+)", ins.attrs).group(1))
        for ins in comps[comp]:
            bound = [consts[o] for o in ins.operands if o in consts]
            if ins.opcode not in ("compare", "fusion") or not bound:
                continue
            callee = _CALLS.search(ins.attrs)
            direction = _direction(ins, comps, callee.group(2) if callee else None)
            index = next((gtes[o] for o in ins.operands if o in gtes), None)
            if direction in ("LT", "GT"):
                return bound[0], index
            if direction in ("LE", "GE"):
                return bound[0] + 1, index
    return None


def _initial_value(loop: _Instr, index: int | None, instrs: dict[str, _Instr]) -> int:
    """The constant the loop's induction variable starts from (through copies); 0 if not constant."""
    init = instrs.get(loop.operands[0]) if loop.operands else None
    if index is None or init is None or init.opcode != "tuple" or index >= len(init.operands):
        return 0
    value = instrs.get(init.operands[index])
    while value is not None and value.opcode == "copy" and value.operands:
        value = instrs.get(value.operands[0])
    if value is not None and value.opcode == "constant" and re.fullmatch(r"-?\d+", value.args.strip()):
        return int(value.args)
    return 0


def _direction(ins: _Instr, comps, callee: str | None) -> str | None:
    m = re.search(r"direction=(\w+)", ins.attrs)
    if m:
        return m.group(1)
    for inner in comps.get(callee, []) if callee else []:
        m = re.search(r"direction=(\w+)", inner.attrs)
        if inner.opcode == "compare" and m:
            return m.group(1)
    return None


def _base_type(shape: str) -> str:
    return re.sub(r"\{.*\}", "", shape)


def _reachable(start: str, comps) -> list[str]:
    seen, todo = [], [start]
    while todo:
        c = todo.pop()
        if c in seen or c not in comps:
            continue
        seen.append(c)
        for ins in comps[c]:
            todo += [m.group(2) for m in _CALLS.finditer(ins.attrs)]
    return seen


def collectives(text: str, *, infer: bool = True) -> Report:
    """Every collective of the module with its per-execution bytes and its execution count."""
    comps, entry = parse(text)
    instrs = {ins.name: ins for body in comps.values() for ins in body}
    shapes = {name: ins.shape for name, ins in instrs.items()}
    found: list[Collective] = []
    loops: list[Loop] = []

    def visit(comp: str, count: int, stack: tuple[str, ...]):
        # every call site counts: a computation called twice is visited twice
        if comp not in comps or comp in stack:
            return
        for ins in comps[comp]:
            if ins.opcode.endswith(("-done", "-update")):
                continue  # an async pair is counted at its -start
            kind = _kind(ins.opcode)
            if kind:
                op = re.search(r'op_name="([^"]*)"', ins.attrs)
                found.append(Collective(kind, ins.name, comp, _collective_bytes(ins, shapes), count,
                                        op.group(1) if op else ""))
            calls = [(m.group(1), m.group(2)) for m in _CALLS.finditer(ins.attrs)]
            branches = _BRANCHES.search(ins.attrs)
            if branches:
                calls += [("branch", b.strip().lstrip("%")) for b in branches.group(1).split(",")]
            if ins.opcode == "while":
                body = dict(calls)["body"]
                trip, source = _trip_count(ins, dict(calls)["condition"], comps, instrs, infer)
                loops.append(Loop(ins.name, body, trip, source))
                visit(dict(calls)["condition"], count * trip, stack + (comp,))
                visit(body, count * trip, stack + (comp,))
                continue
            for role, callee in calls:
                if role != "to_apply" or kind is None:  # a reduction's combiner is no call site
                    visit(callee, count, stack + (comp,))

    visit(entry, 1, ())
    return Report(tuple(found), tuple(loops))


def _trip_count(ins: _Instr, cond: str, comps, instrs, infer: bool) -> tuple[int, str]:
    m = _TRIP.search(ins.attrs)
    if m:
        return int(m.group(1)), "known_trip_count"
    if infer:
        found = _infer_trip(cond, comps)
        if found is not None:
            bound, index = found
            return max(bound - _initial_value(ins, index, instrs), 0), "condition"
    return 1, "unknown"

"""What a run would hold in memory, checked against the machine before it runs.

The estimates are arithmetic on the architecture and the batch, so the check
costs nothing; a run that cannot fit is refused with one line naming the option
to change and the size in GiB, instead of failing with a MemoryError (or being
killed by the kernel) part-way.
"""

from __future__ import annotations

import os

from .errors import InputError

GIB = 1 << 30
FLOAT = 8  # bytes of a float64
# stalk-sized arrays an engine holds at its peak: the stalks, the values sent on
# the edges, the discords, the forces and the scheme's buffers (measured: 7.5 to
# 9.6 on the local engine for [2,2000,1], [2,3000,1] and [2,500,500,1])
STALK_COPIES = 8
# copies of the weights a run holds: the model, the problem's own copy, the
# gradients, the SGD baseline's
WEIGHT_COPIES = 4
# copies of the data a task's generator holds while it draws it
DATA_COPIES = 3


def physical_memory() -> int | None:
    """Bytes of physical memory, or None where the system does not say."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    return total if total > 0 else None


def gib(nbytes: float) -> str:
    size = nbytes / GIB
    return f"{size:.3g} GiB" if size < 100 else f"{size:,.0f} GiB"


def stalk_floats(arch: list[int], output: str = "identity") -> int:
    """Floats of one example's stalks: a0, z1, a1, ..., zK and maybe a_out."""
    hidden = sum(arch[1:-1])
    return arch[0] + 2 * hidden + arch[-1] * (1 if output == "identity" else 2)


def weight_floats(arch: list[int]) -> int:
    return sum((n_in + 1) * n_out for n_in, n_out in zip(arch[:-1], arch[1:],
                                                          strict=True))


def run_bytes(arch: list[int], batch: int, output: str = "identity") -> int:
    """About what a run of ``batch`` examples holds at its peak."""
    return FLOAT * (STALK_COPIES * stalk_floats(arch, output) * batch
                    + WEIGHT_COPIES * weight_floats(arch))


def spectral_bytes(arch: list[int], patterns: int) -> int:
    """The dense eigendecompositions of ``L[Omega,Omega]`` of the spectral
    diagnostics: the matrix and its eigenvectors, kept per activation pattern."""
    n = 2 * sum(arch[1:-1]) + arch[-1]
    return FLOAT * n * n * (patterns + 2)


def check_fits(arg: str, got: str, need: int, fix: str) -> None:
    """An InputError naming ``arg`` when ``need`` bytes exceed the memory."""
    total = physical_memory()
    if total is not None and need > total:
        raise InputError(arg, f"{got}: about {gib(need)} of memory",
                         f"this machine has {gib(total)}; {fix}")


def check_run(arch: list[int], batch: int, output: str, net_arg: str,
              batch_arg: str, examples: str = "inputs",
              blame_net: bool = True) -> None:
    """Refuse a run whose stalks and weights do not fit in memory.

    The network's option is named when even one example does not fit or
    ``blame_net`` (the user chose the network); otherwise the batch's option,
    with the number of examples that would fit.
    """
    total = physical_memory()
    need = run_bytes(arch, batch, output)
    if total is None or need <= total:
        return
    shape = ",".join(map(str, arch))
    one = run_bytes(arch, 1, output)
    if one > total:
        check_fits(net_arg, f"a network [{shape}]", one, "it does not fit even "
                   "for one example: narrow it")
    per = FLOAT * STALK_COPIES * stalk_floats(arch, output)
    fit = max(1, (total - run_bytes(arch, 0, output)) // per)
    if blame_net:
        check_fits(net_arg, f"[{shape}] with {batch} {examples}", need,
                   f"narrow the network, or give at most {fit} {examples} "
                   f"({batch_arg})")
    check_fits(batch_arg, f"{batch} {examples} on [{shape}]", need,
               f"give at most {fit} {examples}, or a narrower network")

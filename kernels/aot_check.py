"""Ahead-of-time compile check of the Triton kernels for sm_80 and sm_90, on a machine without a GPU.

The public tile functions of ``cdpo_kernels.triton_tiles`` run on meta tensors at real model
shapes with their kernels swapped for recorders, so every launch (arguments and the launch config
the launchers pick) is captured without touching a device. Each distinct launch is specialised the
way Triton's JIT would specialise it for the target, compiled to a cubin by Triton's bundled
``ptxas``, and measured: registers and spill bytes from ptxas' ``-v`` log, shared memory from the
kernel metadata, and the matrix instructions every ``tl.dot`` lowered to from the PTX.

These are compile-time figures, not timings. Exit status: 0 when every launch compiles, fits in
the target's shared memory and spills nothing; 1 otherwise; 2 on bad arguments.

    python kernels/aot_check.py                    # full matrix, markdown table on stdout
    python kernels/aot_check.py --quick --json r.json
    python kernels/aot_check.py --dtypes bf16 --kernels lse --force BM=128   # try a config
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field

# Compiling for a GPU target needs the real compiler, not the interpreter the tests use.
os.environ.pop("TRITON_INTERPRET", None)
# Triton 3.9 warns when this is unset; 1 is its (and the runtime's) default.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from cdpo_kernels import triton_tiles as tt  # noqa: E402

KERNELS = {"lse": "_lse_fwd_kernel", "kl": "_kl_fwd_kernel", "grad": "_grad_tile_kernel"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}
ARCHS = (80, 90)
# Largest dynamic shared memory one block may request (opt-in): A100 163 KiB, H100 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# (name, hidden size, vocabulary) and token counts: Llama-3 heads; 8191 is a ragged row count.
MODELS = (("llama3-8b", 4096, 128256), ("llama3-70b", 8192, 128256))
ROWS = (8192, 8191)


def _die(msg: str) -> None:
    print(f"aot_check: {msg}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------------------------
# recording launches


class _Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` only records."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.fn, args, kwargs))


@contextlib.contextmanager
def recording(force: dict):
    """Swap the kernels for recorders (and optionally override launch-config entries)."""
    log: list = []
    saved = {name: getattr(tt, name) for name in KERNELS.values()}
    config = tt._config
    try:
        for name, fn in saved.items():
            setattr(tt, name, _Recorder(fn, log))
        if force:
            tt._config = lambda *a, **k: {**config(*a, **k), **force}
        yield log
    finally:
        for name, fn in saved.items():
            setattr(tt, name, fn)
        tt._config = config


def drive(kernels: set[str], dtype_names: list[str], models, rows, force: dict) -> list:
    """Run the launchers on meta tensors; returns the recorded (fn, args, kwargs, variant label)."""
    meta = dict(device="meta")
    out = []
    for dname in dtype_names:
        dt = DTYPES[dname]
        tf32 = dname == "tf32"
        for _, H, V in models:
            for n in rows:
                x, x2 = (torch.empty(n, H, dtype=dt, **meta) for _ in range(2))
                w, w2 = (torch.empty(V, H, dtype=dt, **meta) for _ in range(2))
                y = torch.empty(n, dtype=torch.long, **meta)
                v = torch.empty(n, dtype=torch.float32, **meta)
                for bias in (None, torch.empty(V, dtype=dt, **meta)):
                    needs = (True, True, bias is not None)
                    calls = []
                    if "lse" in kernels:
                        calls += [lambda: tt.lse_forward(x, w, y, bias),
                                  lambda: tt.lse_forward(x, w, y, bias, x2, w2, 2.0, -1.0)]
                    if "kl" in kernels:
                        calls += [lambda: tt.kl_forward(x, x2, w, bias),
                                  lambda: tt.kl_forward(x, x2, w, bias, y)]
                    if "grad" in kernels:
                        calls += [lambda: tt.logprob_backward(x, w, bias, y, v, v, needs),
                                  lambda: tt.kl_backward(x, x2, w, bias, y, v, v, v, None, needs),
                                  lambda: tt.kl_backward(x, x2, w, bias, y, v, v, v, v, needs)]
                    for call in calls:
                        with recording(force) as log, _tf32(tf32):
                            call()
                        out += [(fn, a, k, dname) for fn, a, k in log]
    return out


@contextlib.contextmanager
def _tf32(on: bool):
    """Launch as if torch's TF32 switch were ``on`` (what fp32 heads consult), without touching it."""
    requested = tt.tf32_requested
    tt.tf32_requested = lambda: on
    try:
        yield
    finally:
        tt.tf32_requested = requested


# ---------------------------------------------------------------------------------------------
# compiling and measuring


@dataclass
class Result:
    kernel: str
    variant: str  # e.g. "bf16 bias two_heads"
    dtype: str
    arch: int
    config: str
    specializations: int = 0
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0
    mma: str = ""
    errors: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (not self.errors and self.spill_stores == 0 and self.spill_loads == 0
                and self.shared <= SMEM_LIMIT[self.arch])


_FLAGS = ("HAS_BIAS", "TWO_HEADS", "HAS_TGT", "HAS_LP", "HAS_KL")


def specialise(fn, args, kwargs, arch):
    """(signature, constexprs, attrs, options) exactly as the JIT would derive them for ``arch``."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return signature, constexprs, attrs, options


def mma_kinds(ptx: str) -> str:
    """Matrix instructions in the PTX, e.g. 'wgmma m64n128k16 bf16'; 'FMA' when dots run on CUDA cores."""
    found = set()
    for shape, ty in re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\.f32\.(\w+?)\.", ptx):
        found.add(f"wgmma {shape} {ty}")
    for shape, ty in re.findall(r"\bmma\.sync\.aligned\.(m\d+n\d+k\d+)\.row\.col\.f32\.(\w+?)\.", ptx):
        found.add(f"mma {shape} {ty}")
    return ", ".join(sorted(found)) or "FMA"


def compile_one(name, signature, constexprs, attrs, options, arch) -> dict:
    """Compile kernel ``name`` to a cubin: registers and spills from ptxas' -v log, which Triton prints."""
    # ptxas runs (and logs) only on a cache miss: never serve a kernel from Triton's cache.
    knobs.compilation.always_compile = True
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(ASTSource(getattr(tt, name), signature, constexprs, attrs),
                                target=GPUTarget("cuda", arch, 32), options=options)
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or spills is None:
        raise RuntimeError(f"no ptxas resource line in the log:\n{text[-2000:]}")
    return dict(registers=int(regs.group(1)), spill_stores=int(spills.group(1)),
                spill_loads=int(spills.group(2)), shared=int(kernel.metadata.shared), mma=mma_kinds(kernel.asm["ptx"]))


def _compile_task(task) -> dict:
    try:
        return compile_one(*task)
    except Exception as exc:  # noqa: BLE001 - reported per variant, the run goes on
        first = str(exc).strip().splitlines()
        return dict(error=f"{type(exc).__name__}: {first[0] if first else ''}")


def variant_of(fn, constexprs, dname):
    names = [p.name for p in fn.params]
    cfg = {names[path[0]]: val for path, val in constexprs.items()}
    on = [k.removeprefix("HAS_").lower() for k in _FLAGS if cfg.get(k)]
    return " ".join([dname] + on), f"{cfg['BM']}x{cfg['BN']}x{cfg['BK']}"


def check(launches, archs, jobs=1, verbose=False) -> list[Result]:
    """Compile every distinct specialisation of the recorded launches; one Result per variant and target."""
    results: dict = {}
    tasks: dict = {}  # specialisation key -> (Result, compile arguments)
    for arch in archs:
        for fn, args, kwargs, dname in launches:
            signature, constexprs, attrs, options = specialise(fn, args, kwargs, arch)
            variant, config = variant_of(fn, constexprs, dname)
            config += f" w{options.num_warps} s{options.num_stages}"
            res = results.setdefault((fn.__name__, variant, arch, config),
                                     Result(fn.__name__, variant, dname, arch, config))
            key = (fn.__name__, arch, repr(signature), repr(sorted(constexprs.items())),
                   repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
            if key not in tasks:
                res.specializations += 1
                tasks[key] = (res, (fn.__name__, signature, constexprs, attrs, options.__dict__, arch))
    pool = concurrent.futures.ProcessPoolExecutor(jobs) if jobs > 1 else None
    try:
        outputs = (pool.map(_compile_task, [t for _, t in tasks.values()]) if pool
                   else map(_compile_task, [t for _, t in tasks.values()]))
        for (res, task), got in zip(tasks.values(), outputs):
            if verbose:
                print(f"sm_{res.arch} {res.kernel} {res.variant} {res.config}: {got}", file=sys.stderr, flush=True)
            if "error" in got:
                res.errors.append(got["error"])
                continue
            res.registers = max(res.registers, got["registers"])
            res.spill_stores = max(res.spill_stores, got["spill_stores"])
            res.spill_loads = max(res.spill_loads, got["spill_loads"])
            res.shared = max(res.shared, got["shared"])
            res.mma = got["mma"] if res.mma in ("", got["mma"]) else f"{res.mma}; {got['mma']}"
    finally:
        if pool:
            pool.shutdown()
    return list(results.values())


# ---------------------------------------------------------------------------------------------
# report


def table(results: list[Result]) -> str:
    rows: dict = {}
    for r in results:
        rows.setdefault((r.kernel, r.variant, r.config), {})[r.arch] = r
    archs = sorted({r.arch for r in results})
    head = "| kernel | variant | BMxBNxBK warps stages |" + "".join(
        f" sm_{a} regs | sm_{a} spill st/ld B | sm_{a} smem KiB | sm_{a} MMA |" for a in archs)
    lines = [head, "|" + "---|" * (3 + 4 * len(archs))]
    for (kernel, variant, config), by_arch in sorted(rows.items()):
        cells = []
        for a in archs:
            r = by_arch.get(a)
            if r is None:
                cells += ["", "", "", ""]
            elif r.errors:
                cells += ["error", "", "", r.errors[0][:60]]
            else:
                spill = f"{r.spill_stores}/{r.spill_loads}" + ("" if r.ok else " **")
                cells += [str(r.registers), spill, f"{r.shared / 1024:.0f}", r.mma]
        lines.append(f"| `{kernel}` | {variant} | {config} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI matrix: one shape and row count")
    p.add_argument("--archs", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    p.add_argument("--dtypes", default="bf16,fp16,fp32,tf32",
                   help="bf16, fp16, fp32 (fp32 head, IEEE), tf32 (fp32 head, TF32 requested)")
    p.add_argument("--kernels", default="lse,kl,grad", help="lse, kl, grad")
    p.add_argument("--force", action="append", default=[], metavar="KEY=INT",
                   help="override a launch-config entry for every launch (BM, BN, BK, num_warps, num_stages)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles (default 2)")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per compiled specialisation on stderr")
    a = p.parse_args(argv)
    try:
        archs = [int(x) for x in a.archs.split(",")]
        force = {k: int(v) for k, v in (f.split("=", 1) for f in a.force)}
    except ValueError:
        _die(f"--archs takes integers, --force KEY=INT; got {a.archs!r}, {a.force!r}")
    dtypes, kernels = a.dtypes.split(","), set(a.kernels.split(","))
    for bad, name in [(set(archs) - set(ARCHS), "--archs"), (set(dtypes) - set(DTYPES), "--dtypes"),
                      (kernels - set(KERNELS), "--kernels"),
                      (set(force) - {"BM", "BN", "BK", "num_warps", "num_stages"}, "--force")]:
        if bad:
            _die(f"{name}: unknown {sorted(bad)}")
    models, rows = (MODELS[:1], ROWS[:1]) if a.quick else (MODELS, ROWS)

    start = time.time()
    launches = drive(kernels, dtypes, models, rows, force)
    results = check(launches, archs, max(1, a.jobs), a.verbose)
    print(table(results))
    bad = [r for r in results if not r.ok]
    n = sum(r.specializations for r in results)
    print(f"\n{n} specialisations compiled in {time.time() - start:.0f} s; "
          f"{len(bad)} variant(s) spill, overflow shared memory or fail to compile", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump([asdict(r) | {"ok": r.ok} for r in results], f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

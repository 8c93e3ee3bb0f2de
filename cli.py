"""The command line the scripts share: --key=value flags read into config dataclasses, --help,
one-line errors, and where the run goes (--device, --kernels, and whether it fits there).

Every script has its configuration in dataclasses (TrainConfig nests DataConfig and GPTConfig, which
nests MLAConfig, MoEConfig and EngramConfig). Field names are unique across them, so the command line
stays flat: --kv_lora_rank=64, not --model.mla.kv_lora_rank=64. `parse` turns argv into a new config,
and every dataclass re-checks its own values in its __post_init__, the one place they are validated.
--help lists each field with its default and the comment written beside it in the dataclass, so the
help text is the source and cannot drift from it.
"""
import dataclasses
import difflib
import inspect
import math
import os
import re
import sys
import typing

import torch

import kernels


class ConfigError(Exception):
    """A bad flag, value or file the user can fix; the scripts print it as one line."""


def fail(error, code: int = 2):
    """Print `error: ...` as one line on stderr and exit with code. Under torchrun only rank 0 prints,
    so a bad flag is reported once, not once per process."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
    sys.exit(code)


# ----------------------------------------------------------------------------- flags

def flat_fields(cfg) -> dict:
    """{field name: its type} across cfg and the configs nested in it (tuple[int, ...] -> tuple)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_fields(value))
        else:
            out[f.name] = typing.get_origin(f.type) or f.type
    return out


def flat_values(cfg) -> dict:
    """{field name: value} across cfg and the configs nested in it."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out.update(flat_values(value) if dataclasses.is_dataclass(value) else {f.name: value})
    return out


def parse_value(key: str, text, typ):
    """'--key=text' -> a value of typ (bool, int, float, str or a tuple of ints). Non-strings pass through."""
    if not isinstance(text, str):
        return text
    try:
        if typ is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is tuple:
            return tuple(int(t) for t in text.replace(" ", "").split(",") if t)
        return typ(text)
    except ValueError:
        kind = {bool: "true or false", tuple: "comma-separated integers"}.get(typ, typ.__name__)
        raise ConfigError(f"--{key}={text}: expected {kind}") from None


def unknown_flag(key: str, known) -> ConfigError:
    """The error for a flag no config has, naming the nearest valid ones."""
    near = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join('--' + n for n in near)}?" if near else " (see --help)"
    return ConfigError(f"unknown flag --{key}{hint}")


def parse_flags(argv, known: dict) -> dict:
    """['--a=1', '--b', '2', '--flag'] -> {'a': '1', 'b': '2', 'flag': 'true'}, for the flags in
    known ({name: type}). A bare --flag means true, and only a bool may be bare."""
    flags, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: flags are --key=value (see --help)")
        key, eq, value = arg[2:].partition("=")
        if key not in known:
            raise unknown_flag(key, known)
        if not eq and known[key] is bool:
            value = "true"
        elif not eq:
            if i + 1 == len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
            value, i = argv[i + 1], i + 1
        flags[key] = value
        i += 1
    return flags


def apply(cfg, flags: dict):
    """A copy of cfg (nested configs too) with the flags set. Each dataclass is rebuilt, so its
    __post_init__ checks the new values; a ValueError there becomes a one-line ConfigError."""
    table = flat_fields(cfg)
    for key in flags:
        if key not in table:
            raise unknown_flag(key, table)

    def rebuild(c):
        changes = {}
        for f in dataclasses.fields(c):
            value = getattr(c, f.name)
            if dataclasses.is_dataclass(value):
                changes[f.name] = rebuild(value)
            elif f.name in flags:
                changes[f.name] = parse_value(f.name, flags[f.name], table[f.name])
        return dataclasses.replace(c, **changes)
    try:
        return rebuild(cfg)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


def parse(cfg, argv, doc: str):
    """The whole command line of a script whose flags are exactly cfg's fields: -h/--help prints the
    help and exits; otherwise a new, validated cfg."""
    exit_with_help_if_asked(argv, doc, cfg)
    return apply(cfg, parse_flags(argv, flat_fields(cfg)))


def exit_with_help_if_asked(argv, doc: str, *configs, extra: str = ""):
    """-h or --help anywhere on the command line: print help_text and exit 0."""
    if "-h" in argv or "--help" in argv:
        print(help_text(doc, *configs, extra=extra))
        sys.exit(0)


# ----------------------------------------------------------------------------- numbers

INT_LIMIT = 2**63  # an int must fit int64: what torch's tensors and numpy's integers hold


def check_numbers(cfg, nonneg=(), positive=(), seeds=()):
    """The checks every number of a config gets, called first by each dataclass's __post_init__ (its own
    fields, not the nested configs', which check themselves): every float finite (no nan or inf), every int
    within int64, the fields named in nonneg >= 0 and in positive > 0, and seeds in [0, 2^63): numpy's
    default_rng takes no negative seed, torch.manual_seed none from 2^64 on."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{f.name}={value}: must be a finite number")
        if isinstance(value, int) and not -INT_LIMIT < value < INT_LIMIT:
            raise ValueError(f"--{f.name}={value}: too large (at most 2^63 - 1)")
        if f.name in seeds and not 0 <= value < INT_LIMIT:
            raise ValueError(f"--{f.name}={value}: a seed must be between 0 and 2^63 - 1")
        if f.name in nonneg and value < 0:
            raise ValueError(f"--{f.name}={value}: must be >= 0")
        if f.name in positive and not value > 0:
            raise ValueError(f"--{f.name}={value}: must be > 0")


# ----------------------------------------------------------------------------- --help

def field_comments(cls) -> dict:
    """{field: the comment on its line} from a dataclass's source: the help text of each flag."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2)
    return comments


def help_text(doc: str, *configs, extra: str = "") -> str:
    """The script's docstring, then every flag grouped by the dataclass that holds it, each with its
    default and the comment beside the field."""
    lines = [doc.strip(), "", "Flags (--key=value; a bool may be given bare: --compile):"]

    def describe(cfg):
        comments = field_comments(type(cfg))
        rows, nested = [], []
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if dataclasses.is_dataclass(value):
                nested.append(value)
                continue
            default = ",".join(map(str, value)) if isinstance(value, tuple) else value
            rows.append((f"--{f.name}={default}", comments.get(f.name, "")))
        if rows:
            lines.append(f"\n  {type(cfg).__name__} ({os.path.basename(inspect.getsourcefile(type(cfg)))})")
            width = max(len(r[0]) for r in rows)
            lines.extend(f"    {flag:<{width}}  {text}".rstrip() for flag, text in rows)
        for sub in nested:
            describe(sub)
    for cfg in configs:
        describe(cfg)
    return "\n".join(lines + ([extra] if extra else []))


# ----------------------------------------------------------------------------- the device

DEVICES = "auto, cpu, cuda, cuda:N or mps"  # what the project runs on; torch knows more (xpu, meta, hip, ...)


def check_device_name(device: str):
    """--device is one the project supports, by its spelling alone (before torch touches any device)."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        raise ConfigError(f"--device={device}: not a device this project runs on; expected {DEVICES}")


def resolve_device(device: str) -> str:
    """--device: 'auto' becomes cuda when an NVIDIA GPU is present, else mps on an Apple-silicon Mac, else cpu;
    a device that is not there, or one the project does not support (xpu, meta, hip, ...), is an error."""
    check_device_name(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={device}: no CUDA GPU is available; use --device=cpu")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"--device={device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device=mps: this machine has no Apple GPU; use --device=cpu")
    return device


def describe_device(device: str) -> dict:
    """{'type', 'name', 'capability'} of a resolved --device: what the dtype and kernel choices depend on
    (tests pass such dicts for hardware this machine lacks). capability is (major, minor) on CUDA, else None."""
    kind = torch.device(device).type
    if kind == "cuda":
        return {"type": kind, "name": torch.cuda.get_device_name(device),
                "capability": tuple(torch.cuda.get_device_capability(device))}
    return {"type": kind, "name": "Apple GPU (MPS)" if kind == "mps" else "CPU", "capability": None}


DTYPES = ("auto", "bfloat16", "float16", "float32")


def resolve_dtype(dtype: str, hardware: dict) -> str:
    """--dtype for the hardware (describe_device): 'auto' is bfloat16 autocast on CUDA GPUs of compute
    capability 8.0+ (A100, RTX 30xx on), float16 autocast with loss scaling on older ones (V100 7.0, T4 7.5
    have no bf16 units), float32 on the CPU and on Apple GPUs. The capability is read, not
    torch.cuda.is_bf16_supported(), which also says yes to bf16 emulated in software."""
    cuda = hardware["type"] == "cuda"
    has_bf16 = cuda and tuple(hardware["capability"]) >= (8, 0)
    if dtype == "auto":
        return ("bfloat16" if has_bf16 else "float16") if cuda else "float32"
    if dtype == "bfloat16" and cuda and not has_bf16:
        major, minor = hardware["capability"]
        raise ConfigError(f"--dtype=bfloat16: {hardware['name']} (compute capability {major}.{minor}) has no "
                          "bfloat16; use --dtype=float16 (or auto, which picks it)")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype={dtype}: expected one of {', '.join(DTYPES)}")
    return dtype


def setup_device(device: str, kernel_mode: str, dtype: str = "float32") -> tuple[str, str]:
    """Resolve --device and --dtype, and set --kernels for them (kernels.py's one switch, which picks each
    op's kernel by the GPU and the compute dtype); returns (device, dtype)."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, describe_device(device))
    try:  # --kernels=triton needs triton and a GPU that suits every kernel (or the interpreter): say so now
        kernels.set_mode(kernel_mode, device, getattr(torch, dtype))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return device, dtype


def check_fits(n_bytes: int, device: str, what: str, hint: str = ""):
    """Fail now, not after minutes of work, if n_bytes cannot fit in the device's free memory."""
    if device.startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    elif os.path.exists("/proc/meminfo"):  # Linux: MemAvailable, free plus reclaimable cache
        with open("/proc/meminfo") as f:
            free = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    elif hasattr(os, "sysconf"):  # macOS and other Unixes: the machine's whole memory, an upper bound
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        free = None
    if free is not None and n_bytes > 0.9 * free:  # memory we cannot read is no reason to refuse
        raise ConfigError(f"{what} need about {n_bytes / 2**30:,.1f} GiB, and {device} has "
                          f"{free / 2**30:.1f} GiB free" + (f"; {hint}" if hint else ""))

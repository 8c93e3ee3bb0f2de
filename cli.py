"""The command line the scripts share: --key=value flags read into config dataclasses, --help,
one-line errors, and where the run goes (--device, --kernels, and whether it fits there).

Every script has its configuration in dataclasses (TrainConfig nests DataConfig and GPTConfig, which
nests MLAConfig, MoEConfig and EngramConfig). Field names are unique across them, so the command line
stays flat: --kv_lora_rank=64, not --model.mla.kv_lora_rank=64. `parse` turns argv into a new config,
and every dataclass re-checks its own values in its __post_init__, the one place they are validated.
--help lists each field with its default and the comment written beside it in the dataclass, so the
help text is the source and cannot drift from it.
"""
import contextlib
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


def check_numbers(cfg, at_least_1=(), nonneg=(), positive=(), seeds=(), one_of=None):
    """The declarative checks of one config's own fields (the nested configs check themselves), called
    first by its __post_init__, which then keeps only the rules that span several fields. Every field:
    a value of its declared type (a bool is true or false, a tuple holds ints), a float finite (no nan or
    inf), an int within int64. Then the fields named in at_least_1 >= 1, in nonneg >= 0, in positive > 0,
    seeds in [0, 2^63) (numpy's default_rng takes no negative seed, torch.manual_seed none from 2^64 on),
    and one_of {field: the values it may take} ('' among them: the field may be left empty)."""
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), typing.get_origin(f.type) or f.type
        if dataclasses.is_dataclass(value):
            continue
        check_type(f.name, value, kind)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{f.name}={value}: must be a finite number")
        if isinstance(value, int) and not isinstance(value, bool) and not -INT_LIMIT < value < INT_LIMIT:
            raise ValueError(f"--{f.name}={value}: too large (at most 2^63 - 1)")
        if f.name in seeds and not 0 <= value < INT_LIMIT:
            raise ValueError(f"--{f.name}={value}: a seed must be between 0 and 2^63 - 1")
        if f.name in at_least_1 and value < 1:
            raise ValueError(f"--{f.name}={value}: must be at least 1")
        if f.name in nonneg and value < 0:
            raise ValueError(f"--{f.name}={value}: must be >= 0")
        if f.name in positive and not value > 0:
            raise ValueError(f"--{f.name}={value}: must be > 0")
        if one_of and f.name in one_of and value not in one_of[f.name]:
            allowed = [v for v in one_of[f.name] if v]
            choices = " or ".join(allowed) if len(allowed) <= 2 else "one of " + ", ".join(allowed)
            raise ValueError(f"--{f.name}={value}: expected {choices}" + (" (or nothing)" if "" in one_of[f.name]
                                                                           else ""))


def check_type(name: str, value, kind):
    """value is of the field's declared kind: bool, int, float (an int will do), str, or a tuple of ints."""
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str),
          tuple: lambda v: isinstance(v, tuple) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)}
    if kind in ok and not ok[kind](value):
        expected = {bool: "true or false", tuple: "comma-separated integers"}.get(kind, kind.__name__)
        raise ValueError(f"--{name}={value}: expected {expected}")


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


def precision(dtype: str, device: str):
    """(resolved dtype, autocast context, GradScaler) for --dtype on a resolved --device (resolve_dtype):
    autocast in bfloat16 or float16, or none for float32; the scaler is enabled only for float16."""
    dtype, kind = resolve_dtype(dtype, describe_device(device)), torch.device(device).type
    autocast = torch.autocast(kind, dtype=getattr(torch, dtype)) if dtype != "float32" else contextlib.nullcontext()
    return dtype, autocast, torch.amp.GradScaler(kind, enabled=dtype == "float16")


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


def check_fits(n_bytes, device: str, what: str, hint: str = ""):
    """Fail now, not after minutes of work, if n_bytes cannot fit in the device's free memory. n_bytes may be
    {flag: bytes} (model.step_bytes): then the hint names the flag of the biggest part."""
    if isinstance(n_bytes, dict):
        n_bytes, hint = sum(n_bytes.values()), f"lower {max(n_bytes, key=n_bytes.get)}"
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


# ----------------------------------------------------------------------------- a training run's config

def train_config(argv, defaults, presets: dict, doc: str, read_saved=None, split_tokens=None):
    """The TrainConfig of a run: defaults <- preset (chosen by device unless given) <- command line. With
    --resume: the config saved in out_dir's checkpoint (read_saved(out_dir) returns it: harness.saved_config)
    <- the flags given now, which may change how the run trains (max_iters, device, kernels, ...) but not
    its model, data or preset. split_tokens(data config) -> the train split's tokens (data.split_tokens),
    which size the cpu preset's Engram table (rows_for_split) unless --engram_rows_per_head is given."""
    exit_with_help_if_asked(argv, doc, defaults, extra="\n  --engram=on|off: the default engram_layers, or none")
    flags = parse_flags(argv, {**flat_fields(defaults), "engram": str})
    engram = flags.pop("engram", "on").lower()  # --engram=off: shorthand for an empty engram_layers
    if engram not in ("on", "off"):
        raise ConfigError(f"--engram={engram}: expected on or off")
    if engram == "off":
        flags["engram_layers"] = ""
    if parse_value("resume", flags.get("resume", "false"), bool):
        cfg = resumed_config(defaults, flags, read_saved)
    else:  # the gpu preset on an NVIDIA GPU; the cpu preset, sized for a laptop, on a CPU or an Apple GPU
        device = resolve_device(flags.get("device", "auto"))
        preset = flags.get("preset") or ("gpu" if device.startswith("cuda") else "cpu")
        cfg = apply(defaults, {**presets.get(preset, {}), "preset": preset, **flags})
        if preset == "cpu" and "engram_rows_per_head" not in flags and cfg.model.engram.engram_layers:
            rows = rows_for_split(split_tokens(cfg.data))
            cfg.model.engram = dataclasses.replace(cfg.model.engram, engram_rows_per_head=rows)
    device, _ = setup_device(cfg.device, cfg.kernels, cfg.dtype)
    return fit_to_device(dataclasses.replace(cfg, device=device))


# The cpu preset's Engram rows per head, by the prepared train split's size (RESULTS.md, "The CPU preset"):
# 2^16, the largest table whose step stayed close to the smallest's, was the best size on 1.6M tokens
# (compare.py --memory_sweep); on the 0.5M-token offline excerpt a 2^16 table is spread too thin (each row
# is looked up too rarely in 400 steps), and 4,099 rows did better.
SMALL_SPLIT_TOKENS, SMALL_SPLIT_ROWS, ROWS = 1_000_000, 4099, 65536


def rows_for_split(train_tokens: int) -> int:
    return SMALL_SPLIT_ROWS if train_tokens < SMALL_SPLIT_TOKENS else ROWS


def config_from_dict(cls, values: dict):
    """The inverse of dataclasses.asdict for these configs: nested configs rebuilt, JSON lists back to tuples,
    keys this code does not know ignored; each config checks its values as it is built."""
    if not isinstance(values, dict):
        raise TypeError(f"{cls.__name__} is a {type(values).__name__}, not a dict")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            value = values[f.name]
            if dataclasses.is_dataclass(f.type):
                value = config_from_dict(f.type, value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[f.name] = value
    return cls(**kwargs)


def resumed_config(defaults, flags: dict, read_saved):
    """The config saved with the run in --out_dir, with the flags given now; a flag that would change
    the model, the data or the preset is refused (the weights were trained for them)."""
    out_dir = flags.get("out_dir", defaults.out_dir)
    try:
        cfg = config_from_dict(type(defaults), read_saved(out_dir))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{os.path.join(out_dir, 'ckpt.pt')} holds a config this code cannot read ({e}); retrain it") from None
    new, fixed = apply(cfg, flags), {"preset", *flat_fields(cfg.model), *flat_fields(cfg.data)}
    for key in fixed & set(flags):
        if flat_values(new)[key] != flat_values(cfg)[key]:
            raise ConfigError(f"--{key}: a resumed run keeps its model, data and preset; drop the flag, or "
                              "train a new run in another --out_dir")
    return settings_for_this_machine(new, given=flags)


def settings_for_this_machine(cfg, given):
    """A resumed run keeps its saved --device, --dtype and --kernels where this machine has them. One it
    lacks (a GPU run resumed on a laptop: cuda, triton) and not given now falls back to auto, with a note."""
    checks = {"device": lambda c: resolve_device(c.device),
              "dtype": lambda c: resolve_dtype(c.dtype, describe_device(resolve_device(c.device))),
              "kernels": lambda c: setup_device(c.device, c.kernels, c.dtype)}
    for key, check in checks.items():
        try:
            check(cfg)
        except ConfigError as e:
            if key in given:
                raise
            print(f"note: resuming with --{key}=auto, as the saved setting does not suit this machine ({e})")
            cfg = dataclasses.replace(cfg, **{key: "auto"})
    return cfg


def fit_to_device(cfg):
    """What the device cannot do, worked around: MPS has no sparse tensors (PyTorch issues 87886, 129842),
    so there the Engram tables train densely, with AdamW (harness.announce says so, and what it costs)."""
    engram = cfg.model.engram
    if cfg.device != "mps" or not (engram.engram_sparse and engram.engram_layers):
        return cfg
    if cfg.resume:
        raise ConfigError(f"--resume on mps: {cfg.out_dir} trains its Engram tables sparsely, which MPS cannot; "
                          "resume it on a CPU or an NVIDIA GPU (sample.py runs it on MPS as it is)")
    dense = dataclasses.replace(engram, engram_sparse=False)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, engram=dense))

"""Run parameters: defaults < preset < per-student settings < overrides.

``resolve(arch, preset="cpu-quick", overrides)`` gives one flat dict that the stages read and
that a run stores as ``params.yaml``. Presets live in ``params/presets/<name>.yaml``,
per-student settings in ``params/students.yaml``. An unknown key, preset or student fails with
the valid choices; an override of ``None`` means "not set" (notebook parameters default to
None so that the preset decides).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .paths import ROOT

PARAMS_DIR = ROOT / "params"
DEFAULT_PRESET = "cpu-quick"

# Every key a run understands, with its default and meaning.
DEFAULTS: dict[str, Any] = {
    "arch": None,  # student mixer name (linearize.mixers.available())
    "run_name": None,  # outputs/<arch>/<run_name>/; None -> the preset's name
    "preset": DEFAULT_PRESET,
    "teacher": "smollm2-135m-instruct",  # embedded default, a Llama hub id or a local folder
    "corpus": "embedded",  # see linearize.data
    "val_fraction": 0.05,  # documents held out for validation
    "seq_len": 128,
    "batch_size": 4,  # per process; global batch = batch_size * processes
    "val_blocks": 8,  # validation blocks of seq_len (ppl and KL after every stage)
    "val_batch_size": 4,
    "seed": 0,
    # conversion
    "qkv_copy": True,  # copy the teacher's Q/K/V/O where the mixer has them (Table 2 turns it off)
    "chunk_size": 64,
    "backend": "auto",
    "mixer_options": {},
    # beyond the paper: an exact softmax window of hybrid_window tokens (0 = off) plus the first
    # hybrid_sinks positions beside the student's linear branch, mixed per head by a learned gate
    # that starts at hybrid_mix on the window (linearize.mixers.hybrid); copied into mixer_options
    "hybrid_window": 0,
    "hybrid_sinks": 4,
    "hybrid_mix": 0.99,
    # closed-form o_proj fit after conversion (linearize.calibrate; an extension, 0 = off as in
    # the paper): the first ceil(tokens / seq_len) training blocks, ridge towards the copied o_proj
    "readout_fit_tokens": 0,
    "readout_fit_ridge": 1.0e-2,
    # which stages run
    "matrix_mixing": True,  # stage 1
    "h2h": True,  # stage 2
    "distill": True,  # stage 3
    # token budgets
    "stage1_tokens": 4096,
    "stage2_tokens": 4096,
    "stage3_tokens": 8192,
    # optimiser: AdamW
    "stage1_lr": 1.0e-3,
    "stage2_lr": 1.0e-3,
    "stage3_lr": 3.0e-4,
    "weight_decay": 0.0,
    "betas": [0.9, 0.95],
    "grad_clip": 1.0,  # max global grad norm; 0 or None turns clipping off
    # schedules: warmup-stable-decay (stages 1-2), linear warmup then linear decay (stage 3)
    "warmup_fraction": 0.1,
    "decay_fraction": 0.2,  # WSD: last fraction of steps decays linearly
    "min_lr_ratio": 0.0,  # the learning rate decays to lr * min_lr_ratio
    # losses
    "mm_loss": "frobenius",  # or "mse"
    "h2h_loss": "l2",  # or "mse"
    "kd_alpha": 1.0,  # L = CE + kd_alpha * KL
    "kd_temperature": 1.0,
    "stage3_train": "all",  # all | mixers | no-embeddings
    # runtime
    "bf16": False,  # bf16 autocast (CPU or GPU)
    "checkpoint_every": 16,  # steps between resumable checkpoints (and always at a stage's end)
    "log_every": 1,  # steps between metrics lines
    "measure_teacher_throughput": True,  # stage 3: teacher forward+backward tokens/s, same shapes
    "stop_after_steps": None,  # stop a stage early after this many steps (simulates a kill)
}


class ParamsError(ValueError):
    """An unknown key, preset or student, or a badly typed value."""


def presets() -> list[str]:
    return sorted(p.stem for p in (PARAMS_DIR / "presets").glob("*.yaml"))


def _load_yaml(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path} must hold a mapping of parameter names to values.")
    return data


def _check_keys(values: dict, where: str) -> None:
    unknown = sorted(set(values) - set(DEFAULTS))
    if unknown:
        raise ParamsError(f"unknown parameter(s) {unknown} in {where}; valid keys: {', '.join(DEFAULTS)}")


def student_settings() -> dict[str, dict]:
    data = _load_yaml(PARAMS_DIR / "students.yaml")
    for name, settings in data.items():
        _check_keys(settings or {}, f"params/students.yaml [{name}]")
    return {k: (v or {}) for k, v in data.items()}


def resolve(arch: str | None = None, preset: str | None = None, overrides: dict | None = None) -> dict:
    """The flat parameter dict for one student: defaults < preset < student < overrides."""
    from . import mixers

    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    _check_keys(overrides, "the overrides")
    arch = arch or overrides.get("arch")
    preset = preset or overrides.get("preset") or DEFAULT_PRESET
    if arch is None:
        raise ParamsError(f"no student given; set arch to one of {', '.join(mixers.available())}.")
    try:
        arch = mixers.spec(arch).name  # resolves aliases, fails listing valid names
    except KeyError as err:
        raise ParamsError(err.args[0]) from None
    if preset not in presets():
        raise ParamsError(f"unknown preset {preset!r}; valid presets: {', '.join(presets())} (params/presets/*.yaml).")
    preset_values = _load_yaml(PARAMS_DIR / "presets" / f"{preset}.yaml")
    _check_keys(preset_values, f"params/presets/{preset}.yaml")
    students = student_settings()
    if arch not in students:
        raise ParamsError(f"student {arch!r} has no entry in params/students.yaml; entries: {', '.join(students)}")
    params = {**DEFAULTS, **preset_values, **students[arch], **overrides}
    params["arch"], params["preset"] = arch, preset
    params["run_name"] = params["run_name"] or preset
    for key in params:
        params[key] = _as_number(key, params[key])
    _check_values(params)
    params["mixer_options"] = _with_hybrid(params)
    return params


def _with_hybrid(p: dict) -> dict:
    """``mixer_options`` with the hybrid keys the mixer reads (unchanged when hybrid_window is 0,
    so the stage identities of runs made before the hybrid existed still match)."""
    from .mixers import hybrid

    options = dict(p["mixer_options"])
    wanted = hybrid.options_of(p["hybrid_window"], p["hybrid_sinks"], p["hybrid_mix"])
    given = {k: options[k] for k in hybrid.OPTION_KEYS if k in options}
    clash = {k: v for k, v in given.items() if k not in wanted or wanted[k] != v}
    if clash:
        raise ParamsError(f"mixer_options {clash} set the hybrid window directly; use the keys hybrid_window, "
                          "hybrid_sinks and hybrid_mix instead (they fill mixer_options).")
    try:
        hybrid.settings(wanted)
    except ValueError as err:
        raise ParamsError(str(err)) from None
    if wanted and p["arch"] == "softmax":
        raise ParamsError("hybrid_window is for the subquadratic students: the softmax student is exact "
                          "attention already; set hybrid_window=0 for it.")
    return {**options, **wanted}


def _as_number(key: str, value):
    """``value`` as the number type of ``DEFAULTS[key]`` where that default is a number.

    YAML 1.1 (PyYAML) reads ``1e-4`` without a dot as the *string* '1e-4', so
    ``--set stage2_lr=1e-4`` used to reach the optimiser as a string; such strings are parsed
    here, and anything that is not a number fails with the key's name."""
    default = DEFAULTS.get(key)
    if value is None or isinstance(default, bool) or not isinstance(default, (int, float)):
        return value
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ParamsError(f"{key} must be a number, got {value!r}.")
    if isinstance(default, int):
        if number != int(number):
            raise ParamsError(f"{key} must be a whole number, got {value!r}.")
        return int(number)
    return float(number)


def _check_values(p: dict) -> None:
    from .losses import HIDDEN_KINDS, MATRIX_MIXING_KINDS

    for key in ("seq_len", "batch_size", "val_blocks", "val_batch_size", "checkpoint_every", "log_every"):
        if not isinstance(p[key], int) or p[key] < 1:
            raise ParamsError(f"{key} must be a positive integer, got {p[key]!r}.")
    for key in ("stage1_tokens", "stage2_tokens", "stage3_tokens"):
        if not isinstance(p[key], int) or p[key] < 0:
            raise ParamsError(f"{key} must be a non-negative integer (tokens), got {p[key]!r}.")
    if p["mm_loss"] not in MATRIX_MIXING_KINDS:
        raise ParamsError(f"mm_loss must be one of {MATRIX_MIXING_KINDS}, got {p['mm_loss']!r}.")
    if p["h2h_loss"] not in HIDDEN_KINDS:
        raise ParamsError(f"h2h_loss must be one of {HIDDEN_KINDS}, got {p['h2h_loss']!r}.")
    from .stages import STAGE3_TRAIN

    if p["stage3_train"] not in STAGE3_TRAIN:
        raise ParamsError(f"stage3_train must be one of {STAGE3_TRAIN}, got {p['stage3_train']!r}.")
    if not 0 <= p["warmup_fraction"] <= 1 or not 0 <= p["decay_fraction"] <= 1:
        raise ParamsError("warmup_fraction and decay_fraction must lie in [0, 1].")
    if p["warmup_fraction"] + p["decay_fraction"] > 1:
        raise ParamsError("warmup_fraction + decay_fraction must not exceed 1 (warmup-stable-decay).")
    if p["readout_fit_tokens"] < 0 or p["readout_fit_ridge"] <= 0:
        raise ParamsError("readout_fit_tokens must be >= 0 (0: off) and readout_fit_ridge > 0.")
    if not isinstance(p["mixer_options"], dict):
        raise ParamsError(f"mixer_options must be a mapping, got {p['mixer_options']!r}.")

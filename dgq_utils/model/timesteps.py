"""Per-timestep activation parameters: which parameter set a UNet call uses.

Diffusion activations change a lot over the sampling trajectory, so DGQ (like TFMQ/Q-Diffusion variants)
calibrates one activation parameter *set* per sampling step. The pipeline calls the UNet once per step (with
classifier-free guidance the batch is doubled, still one call), so a forward *pre-hook on the UNet* is the one
place that sees every step: it reads the ``timestep`` argument, decides the set index, and writes it into a
:class:`TimestepState` that every quantizer of the model holds a reference to (one attribute write per UNet
call -- no loop over quantizers).

Mappings (``QuantRecipe.timestep_mapping``; default first)
---------------------------------------------------------
* ``"exact"`` (default, sound): calibration records the ordered list of UNet calls of one generation -- the
  *call index* since the scheduler's last ``set_timesteps``. A PNDM/PLMS sampler calls the UNet twice with the
  same ``t`` (SD v1.4, 25 steps: 26 calls, ``t = 961, 921, 921, 881, ...``), so keying by ``t`` would merge two
  different inputs; keying by call index gives each its own set. At inference call ``i`` uses set ``i`` after
  checking that its ``t`` equals the calibrated ``t`` of call ``i``.

  **Mismatch policy** (sampler or step count differs from calibration): ``on_mismatch="error"`` (default) raises
  a ``RuntimeError`` that shows both schedules -- a silently different parameter set is the kind of surprise a
  careful user does not want. ``on_mismatch="nearest"`` instead uses the set whose calibrated ``t`` is nearest
  (earliest call on ties) and warns once per generation. Set it with :func:`set_timestep_mismatch_policy` or the
  ``on_timestep_mismatch=`` argument of ``quantize_pipeline`` / ``load_quant_state``.

  **Warning, counted** (every mapping that approximates): with ``"nearest"``, the calls of one pipeline run that
  used another call's parameter set are counted (a Python counter, no extra host sync) and one
  ``RuntimeWarning`` at the last UNet call of the run names how many of how many calls fell outside the
  calibrated sets. ``"error"`` raises at the first such call instead (see the official mapping below);
  ``"strict"`` raises for every approximation, the official mapping's clamped index included.
* ``"official"``: ``index = (T - t) // (T // num_inference_steps)`` with ``T = num_train_timesteps`` (1000),
  as in the official ``load_cali_model``. With PLMS this is off by one after the repeated step: t = 961 -> set 0,
  both t = 921 calls -> set 1, t = 881 -> set 2 (calibrated on the *second* t = 921 call), ..., and the last set
  is never used (see ``shared/dgq-official-code.md`` section 4). Indices are clamped to the calibrated range
  (the official code would fail with an index error past the end, e.g. DDIM with ``steps_offset=0``). A call
  falls outside the calibrated sets when its index had to be clamped, or when the run uses another number of
  steps than calibration (the sets then belong to other timesteps). Another step count raises with the default
  ``on_mismatch="error"``; with ``"nearest"`` it is counted and warned about like the exact mapping's
  mismatches. A clamped index at the calibrated step count (DDIM with ``steps_offset=0``: the last call's index
  is one past the end) is part of the official mapping: counted and warned about under ``"error"`` and
  ``"nearest"``, an error under ``"strict"``.
* ``per_timestep=False``: one set (index 0) for every call.

How a new generation is detected: the controller keeps a reference to ``scheduler.timesteps`` of the pipeline it
belongs to; ``set_timesteps`` (called at the start of every pipeline run) creates a new tensor, so an identity
change resets the call counter. Without a pipeline (the UNet called directly) the counter resets when ``t``
increases, or when the calibrated number of calls has been reached; :meth:`TimestepController.reset` resets it
by hand.
"""
from __future__ import annotations

import logging
import warnings
import weakref
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

MAPPINGS = ("exact", "official", "shared")
MISMATCH_POLICIES = ("error", "nearest", "strict")


class TimestepState:
    """Shared, mutable "where are we in the sampling trajectory" record read by every quantizer.

    ``set_index``: parameter set to use now. ``call_index``: UNet calls since the generation started (0-based).
    ``t``: the timestep value of the current call (``None`` before the first call).

    :meth:`index_tensor` gives the set index as a 0-d ``int32`` tensor on a device, updated in place (an
    asynchronous ``fill_``, no host sync) whenever ``set_index`` is assigned: GPU kernels and compiled graphs read
    the set from it, so the host never waits and a compiled graph does not specialise (recompile) on the set.
    """

    __slots__ = ("_index_tensors", "_set_index", "call_index", "t")

    def __init__(self, set_index: int = 0, call_index: int = -1, t: float | None = None):
        self._index_tensors: dict[torch.device, torch.Tensor] = {}
        self._set_index = int(set_index)
        self.call_index = call_index
        self.t = t

    @property
    def set_index(self) -> int:
        return self._set_index

    @set_index.setter
    def set_index(self, value: int) -> None:
        value = int(value)
        if value != self._set_index:
            for buf in self._index_tensors.values():
                buf.fill_(value)
        self._set_index = value

    def index_tensor(self, device: torch.device) -> torch.Tensor:
        """The current set index as a 0-d ``int32`` tensor on ``device`` (the same tensor every call)."""
        buf = self._index_tensors.get(device)
        if buf is None:
            buf = self._index_tensors[device] = torch.full((), self._set_index, dtype=torch.int32, device=device)
        return buf

    def __repr__(self) -> str:
        return f"TimestepState(set_index={self._set_index}, call_index={self.call_index}, t={self.t})"

    def __eq__(self, other) -> bool:
        if not isinstance(other, TimestepState):
            return NotImplemented
        return (self._set_index, self.call_index, self.t) == (other._set_index, other.call_index, other.t)

    __hash__ = None


def _timestep_value(t, known: _HostTimesteps | None = None) -> float:
    """A Python float from the UNet's ``timestep`` argument (number, 0-d or 1-d tensor with equal entries).

    ``known``: the host copy of the scheduler's timesteps; a ``t`` that is a view into them (what a pipeline
    passes: an element of ``scheduler.timesteps``, possibly expanded to the batch) is read from that copy
    without a device -> host synchronisation.
    """
    if known is not None and isinstance(t, torch.Tensor):
        v = known.lookup(t)
        if v is not None:
            return v
    if isinstance(t, torch.Tensor):
        if t.numel() == 0:
            raise ValueError("The UNet was called with an empty timestep tensor.")
        flat = t.detach().reshape(-1)
        if flat.numel() > 1 and not bool((flat == flat[0]).all()):
            raise ValueError(
                "Per-timestep quantization needs one timestep per UNet call, but this call mixes timesteps "
                f"{sorted(set(flat.tolist()))[:8]} in one batch. Use per_timestep=False for such samplers."
            )
        return float(flat[0])
    return float(t)


class _HostTimesteps:
    """A host copy of one ``scheduler.timesteps`` tensor (made once per generation) and the lookup of a ``t`` that
    shares its memory: the element offset into the storage names the entry, so its value needs no sync."""

    def __init__(self, ts: torch.Tensor):
        self.ts = ts
        self.values = [float(v) for v in ts.detach().reshape(-1).tolist()] if ts.is_contiguous() else None
        self.storage_ptr = ts.untyped_storage().data_ptr()

    def lookup(self, t: torch.Tensor) -> float | None:
        ts = self.ts
        if (self.values is None or t.dtype != ts.dtype or t.device != ts.device or t.numel() == 0
                or t.untyped_storage().data_ptr() != self.storage_ptr):
            return None
        if t.numel() > 1 and any(st != 0 for st, n in zip(t.stride(), t.shape) if n > 1):
            return None  # several distinct elements: let the general path check them
        off = t.storage_offset() - ts.storage_offset()
        if not 0 <= off < len(self.values):
            return None
        return self.values[off]


@dataclass
class TimestepController:
    """Forward pre-hook on the UNet that sets :attr:`state.set_index` for every call.

    Modes: ``"calibrate"`` records the calibration schedule (``set_index = call_index`` if per-timestep, else 0)
    and checks that every calibration batch follows the same schedule; ``"infer"`` maps calls to calibrated sets
    with ``mapping``. ``callback(unet, args, kwargs)`` (optional) runs after the index is set -- calibration uses
    it to run extra forward passes; calls made from inside the callback do not advance the counter.
    """

    mapping: str = "exact"
    on_mismatch: str = "error"
    state: TimestepState = field(default_factory=TimestepState)
    mode: str = "calibrate"
    schedule: list[float] = field(default_factory=list)  # calibrated t per call index
    num_inference_steps: int | None = None
    num_train_timesteps: int = 1000
    callback: object = None

    def __post_init__(self):
        if self.mapping not in MAPPINGS:
            raise ValueError(f"timestep mapping must be one of {MAPPINGS}; got {self.mapping!r}.")
        if self.on_mismatch not in MISMATCH_POLICIES:
            raise ValueError(f"on_mismatch must be one of {MISMATCH_POLICIES}; got {self.on_mismatch!r}.")
        self._pipe_ref = None
        self._handle = None
        self._last_timesteps = None
        self._host_ts = None
        self._inside_callback = False
        self._warned_this_generation = False
        self._approximated = 0
        self._generation_schedule: list[float] = []
        self.calibration_generations = 0

    # -- wiring ------------------------------------------------------------------------------------------------
    def install(self, unet, pipe=None) -> TimestepController:
        """Register the pre-hook on ``unet``; ``pipe`` (optional, held weakly) provides the scheduler."""
        self._pipe_ref = weakref.ref(pipe) if pipe is not None else None
        self._handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def num_sets(self) -> int:
        """Number of parameter sets this schedule calls for."""
        return 1 if self.mapping == "shared" else max(1, len(self.schedule))

    def reset(self) -> None:
        """Start a new generation (call counter back to 0 at the next call)."""
        self.state.call_index = -1
        self._warned_this_generation = False
        self._generation_schedule = []
        self._approximated = 0  # calls of this generation that used another call's parameter set

    def start_calibration(self) -> None:
        self.mode = "calibrate"
        self.schedule = []
        self.calibration_generations = 0
        self._last_timesteps = None
        self.reset()

    def finish_calibration(self) -> None:
        self._close_calibration_generation()
        self.mode = "infer"
        self._last_timesteps = None
        self.reset()

    # -- the hook ----------------------------------------------------------------------------------------------
    def _scheduler(self):
        pipe = self._pipe_ref() if self._pipe_ref is not None else None
        return getattr(pipe, "scheduler", None) if pipe is not None else None

    def _host_timesteps(self) -> _HostTimesteps | None:
        """The host copy of the current ``scheduler.timesteps`` (re-made when the tensor changes)."""
        sched = self._scheduler()
        ts = getattr(sched, "timesteps", None) if sched is not None else None
        if not isinstance(ts, torch.Tensor):
            return None
        cached = self._host_ts
        if cached is None or cached.ts is not ts:
            cached = self._host_ts = _HostTimesteps(ts)
        return cached

    def _new_generation(self, t: float) -> bool:
        sched = self._scheduler()
        ts = getattr(sched, "timesteps", None) if sched is not None else None
        if ts is not None:
            if ts is not self._last_timesteps:
                self._last_timesteps = ts  # holding the reference keeps its id from being reused
                return True
            return False
        # no scheduler: t increases -> new trajectory; or the calibrated length is exhausted
        if self.state.t is None or t > self.state.t:
            return True
        return self.mode == "infer" and self.mapping == "exact" and self.state.call_index + 1 >= len(self.schedule)

    @torch.compiler.disable
    def _hook(self, module, args, kwargs):
        self.before_call(module, args, kwargs)

    def before_call(self, module, args, kwargs) -> None:
        """What the pre-hook does for one UNet call ``module(*args, **kwargs)``: read its timestep, advance the
        call counter and set :attr:`state.set_index` (filling the device index tensors). A caller that runs the
        UNet's ``forward`` without its hooks (a replayed CUDA graph) calls this first, with the call's own
        arguments (the timestep as the scheduler gave it, so it is read from the host copy, without a sync)."""
        if self._inside_callback:
            return
        if len(args) > 1:
            t_arg = args[1]
        elif "timestep" in kwargs:
            t_arg = kwargs["timestep"]
        else:
            raise ValueError("DGQ timestep hook: the UNet was called without a `timestep` argument.")
        t = _timestep_value(t_arg, self._host_timesteps())
        if self._new_generation(t):
            if self.mode == "calibrate":
                self._close_calibration_generation()
            self.reset()
        self.state.call_index += 1
        self.state.t = t
        self.state.set_index = self._set_index(self.state.call_index, t)
        if self._approximated and not self._warned_this_generation:
            self._warn_if_last_call()
        if self.callback is not None:
            self._inside_callback = True
            try:
                self.callback(module, args, kwargs)
            finally:
                self._inside_callback = False
        return

    # -- mapping -----------------------------------------------------------------------------------------------
    def _set_index(self, i: int, t: float) -> int:
        if self.mode == "calibrate":
            self._generation_schedule.append(t)
            if self.calibration_generations == 0:
                self.schedule.append(t)
            else:
                if i >= len(self.schedule) or self.schedule[i] != t:
                    raise RuntimeError(
                        "Calibration batches must follow the same sampling schedule; batch "
                        f"{self.calibration_generations + 1} calls the UNet with t={t:g} at call {i}, the first "
                        f"batch had {self.schedule[i] if i < len(self.schedule) else 'no call'} there."
                    )
            return 0 if self.mapping == "shared" else i
        if self.mapping == "shared":
            return 0
        if self.mapping == "official":
            return self._official_index(t)
        return self._exact_index(i, t)

    def _close_calibration_generation(self) -> None:
        if self._generation_schedule:
            if self.calibration_generations > 0 and len(self._generation_schedule) != len(self.schedule):
                raise RuntimeError(
                    f"Calibration batches must follow the same sampling schedule; one batch made "
                    f"{len(self._generation_schedule)} UNet calls, the first made {len(self.schedule)}."
                )
            self.calibration_generations += 1
            self._generation_schedule = []

    def _official_index(self, t: float) -> int:
        sched = self._scheduler()
        steps = getattr(sched, "num_inference_steps", None) or self.num_inference_steps
        if not steps:
            raise RuntimeError("official timestep mapping needs num_inference_steps (none recorded).")
        total = self.num_train_timesteps
        idx = int((total - int(round(t))) // (total // int(steps)))
        clamped = min(max(idx, 0), self.num_sets - 1)
        other_steps = self.num_inference_steps is not None and int(steps) != int(self.num_inference_steps)
        if (other_steps and self.on_mismatch == "error") or (self.on_mismatch == "strict" and clamped != idx):
            if not other_steps:
                raise RuntimeError(
                    f"DGQ official timestep mapping: UNet call {self.state.call_index} (t = {t:g}) has official index "
                    f"{idx}, outside the {self.num_sets} calibrated sets (on_timestep_mismatch='strict'). Use the "
                    "exact mapping, a scheduler with steps_offset=1, or the default policy 'error' (clamps with a "
                    "warning).")
            raise RuntimeError(
                f"DGQ official timestep mapping: this run samples {steps} steps but the parameter sets were "
                f"calibrated for {self.num_inference_steps}, so UNet call {self.state.call_index} (t = {t:g}) "
                "would use a set calibrated for another timestep. Re-calibrate with the same scheduler and "
                "num_inference_steps, or accept the clamped sets (with a warning per pipeline call) with "
                "set_timestep_mismatch_policy(pipe, 'nearest') / on_timestep_mismatch='nearest'.")
        if clamped != idx or other_steps:
            self._approximated += 1
        return clamped

    def _warn_if_last_call(self) -> None:
        """One warning per generation, at its last UNet call (or at once when no scheduler tells the length)."""
        sched = self._scheduler()
        ts = getattr(sched, "timesteps", None) if sched is not None else None
        calls = len(ts) if ts is not None else None
        if calls is not None and self.state.call_index + 1 < calls:
            return
        of = f" of {calls}" if calls is not None else " so far"
        stricter = "error" if self.on_mismatch == "nearest" else "strict"
        warnings.warn(
            f"DGQ ({self.mapping} timestep mapping): {self._approximated}{of} UNet calls of this pipeline run fell "
            f"outside the calibrated parameter sets (calibrated: {_fmt(self.schedule)}) and used the nearest "
            "calibrated t / a clamped set instead. Re-calibrate with this scheduler and num_inference_steps, or make "
            f"this an error with set_timestep_mismatch_policy(pipe, {stricter!r}).",
            RuntimeWarning,
            stacklevel=2,
        )
        self._warned_this_generation = True

    def _exact_index(self, i: int, t: float) -> int:
        if i < len(self.schedule) and self.schedule[i] == t:
            return i
        if self.on_mismatch in ("error", "strict"):
            sched = self._scheduler()
            current = getattr(sched, "timesteps", None)
            current = [float(v) for v in current.tolist()] if current is not None else "unknown"
            raise RuntimeError(
                f"DGQ per-timestep parameters were calibrated for {len(self.schedule)} UNet calls with "
                f"t = {_fmt(self.schedule)}, but UNet call {i} of this generation has t = {t:g} "
                f"(scheduler timesteps: {_fmt(current) if isinstance(current, list) else current}). "
                "The sampler or the number of steps differs from calibration. Re-calibrate with the same "
                "scheduler and num_inference_steps, or allow the nearest calibrated timestep with "
                "set_timestep_mismatch_policy(pipe, 'nearest')."
            )
        self._approximated += 1
        dist = [abs(s - t) for s in self.schedule]
        return int(min(range(len(dist)), key=lambda j: (dist[j], j)))

    # -- (de)serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "mapping": self.mapping,
            "schedule": list(self.schedule),
            "num_inference_steps": self.num_inference_steps,
            "num_train_timesteps": self.num_train_timesteps,
        }


def _fmt(values, limit: int = 8) -> str:
    vals = [f"{v:g}" for v in values]
    return "[" + ", ".join(vals if len(vals) <= limit else vals[:limit] + ["..."]) + f"] ({len(vals)} calls)"


def official_index(t: float, num_inference_steps: int, num_train_timesteps: int = 1000) -> int:
    """The official code's parameter-set index for timestep ``t``: ``(T - t) // (T // steps)`` (unclamped)."""
    return int((num_train_timesteps - int(round(t))) // (num_train_timesteps // int(num_inference_steps)))


def mapping_for(recipe) -> str:
    """The controller mapping for a recipe: ``"shared"`` if not per-timestep, else ``recipe.timestep_mapping``."""
    return "shared" if not recipe.per_timestep else recipe.timestep_mapping
